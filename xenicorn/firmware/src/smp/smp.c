/* smp32 / smp64: several CPUs, started and driven as an OS does it.
 *
 *  1. CPUs: the ACPI MADT (start_info's RSDP, else the BIOS-area scan)
 *     lists each processor's local APIC ID; "cpus: N". With one CPU the
 *     SMP steps print SKIP.
 *  2. Start-up: each AP gets INIT (assert, then de-assert as Linux sends
 *     it), 10 ms, then two STARTUP IPIs 200 us apart to vector 0x08: the
 *     real-mode trampoline at 0x8000 (entry.S) takes it to protected mode
 *     (and long mode in smp64) and to ap_main(), which records the APIC ID
 *     from CPUID leaf 1 and from the LAPIC ID register and counts itself in
 *     with LOCK XADD. Intel SDM vol. 3, "MP Initialization Example" and
 *     "Issuing Interprocessor Interrupts"; the second STARTUP must be
 *     ignored by an AP that already runs (checked at the end: nobody
 *     entered the trampoline twice).
 *  3. IPIs: 100 fixed IPIs to each AP by physical destination, each
 *     answered by an IPI back to the BSP from the AP's handler; one IPI with
 *     the "all excluding self" shorthand; two to logical destinations in the
 *     flat model (each AP's LDR holds bit 1 << slot).
 *  4. A plain counter under a LOCK CMPXCHG spinlock and a LOCK ADD counter,
 *     100000 increments per CPU on every CPU at once: exactly N * 100000.
 *  5. Cross-modifying code: patch_fn is "mov $k, %eax; ret". APs run it,
 *     the BSP rewrites k, the APs see the flag, execute CPUID and run it
 *     again and must get the new k (1 -> 2 -> 3); then an AP patches and the
 *     BSP (and the other APs) run it (-> 4 -> 5). SDM vol. 3, "Handling
 *     Self- and Cross-Modifying Code": the executing CPU waits for the
 *     writer's flag, then serializes, then runs the new code.
 *  6. The Xen part (smpxen.c), only when CPUID names Xen.
 * Every wait is bounded by the LAPIC timer (calibrated against PIT channel
 * 2); a timeout is a FAIL line and the kernel goes on. Only the BSP prints:
 * APs leave their findings in struct cpu. */
#include "smp.h"
#include "../lib/xen.h"

#define ITERATIONS 100000
#define ROUND_TRIPS 100

int on_xen;

/* read by entry.S */
u32 ap_ticket;                                  /* LOCK XADD: which stack an AP takes */
ulong ap_cr3, ap_cr4;
struct __attribute__((packed)) { u16 limit; ulong base; } ap_gdtr, ap_idtr;
extern u8 tramp_start[], tramp_end[], tramp_gdtr[], patch_fn[];

static volatile u32 arrivals;                   /* LOCK XADD by each AP */
static volatile u32 strays;                     /* CPUs whose APIC ID the MADT does not list */
static volatile u32 pongs;
static u32 timer_per_ms;                        /* LAPIC timer counts per ms, divide by 16 */

static volatile u32 cmd_seq, cmd_mask;          /* run_on's command word */
static volatile ap_fn cmd_fn;
static volatile ulong cmd_arg;

void skip(const char *fmt, ...) {
    char buf[200]; va_list ap;
    va_start(ap, fmt); vsnprintf(buf, sizeof(buf), fmt, ap); va_end(ap);
    printf("SKIP %s\n", buf);
}

static u32 xadd(volatile u32 *p, u32 v) {
    __asm__ volatile("lock xadd %0, %1" : "+r"(v), "+m"(*p) :: "memory");
    return v;
}

int my_slot(void) {
    u32 id = apic_read(APIC_ID) >> 24;
    for (int i = 0; i < ncpus; i++)
        if (cpus[i].apic_id == id)
            return i;
    return -1;
}

static ulong irq_save(void) { ulong f = read_flags(); __asm__ volatile("cli" ::: "memory"); return f; }
static void irq_restore(ulong f) { if (f & 0x200) __asm__ volatile("sti" ::: "memory"); }

/* Wait for the previous IPI to leave (delivery status idle), then write the
 * destination and the command: the low-word write sends. Interrupts are off
 * in between, so a handler's own IPI cannot land between the two writes. */
int send_ipi(u32 dest, u32 icr) {
    ulong f = irq_save();
    int idle = 0;
    for (int i = 0; i < 100000 && !(idle = !(apic_read(APIC_ICR_LO) & ICR_BUSY)); i++)
        pause();
    apic_write(APIC_ICR_HI, dest << 24);
    apic_write(APIC_ICR_LO, icr);
    irq_restore(f);
    return idle;
}

/* -- time: the LAPIC timer, one-shot, divide by 16 ------------------------------- */

static void timer_arm(u32 us) {
    int s = my_slot();
    u32 rem;
    u64 count = divmod64((u64)us * timer_per_ms, 1000, &rem) + 1;
    ulong f = irq_save();
    if (s >= 0)
        cpus[s].timer_fired = 0;
    apic_write(APIC_LVT_TIMER, VEC_TIMER);                 /* one-shot, unmasked */
    apic_write(APIC_TIMER_INIT, count > 0xFFFFFFFFu ? 0xFFFFFFFFu : (u32)count);
    irq_restore(f);
}

/* The flag alone could be a late interrupt from an earlier arming: the
 * count must have run out too. */
static int timer_expired(int s) { return s < 0 || (cpus[s].timer_fired && apic_read(APIC_TIMER_CUR) == 0); }

static void timer_stop(void) {
    apic_write(APIC_TIMER_INIT, 0);
    apic_write(APIC_LVT_TIMER, 0x10000 | VEC_TIMER);
}

/* HLT until the timer's interrupt: a waiting CPU costs an emulator nothing */
void udelay(u32 us) {
    int s = my_slot();
    ulong f = irq_save();
    timer_arm(us);
    for (int i = 0; i < 1000000 && !timer_expired(s); i++)
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    timer_stop();
    irq_restore(f);
}

int wait_at_least(volatile u32 *p, u32 want, u32 ms) {
    int s = my_slot();
    timer_arm(ms * 1000);
    while ((int)(*p - want) < 0 && !timer_expired(s))
        pause();
    timer_stop();
    return (int)(*p - want) >= 0;
}

int wait_nonzero(volatile u32 *p, u32 ms) { return wait_at_least(p, 1, ms); }

/* LAPIC timer counts during 10 ms of PIT channel 2 (mode 0, OUT2 on port
 * 0x61 bit 5), as Linux calibrates it without a known bus clock. */
static u32 calibrate(void) {
    apic_write(APIC_TIMER_DIV, 0x3);                       /* divide by 16 */
    apic_write(APIC_LVT_TIMER, 0x10000 | VEC_TIMER);       /* masked */
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);                /* gate 2 high, speaker off */
    outb(0x43, 0xB0);                                      /* channel 2, lo/hi, mode 0 */
    outb(0x42, 11932 & 0xFF);                              /* 10 ms at 1.193182 MHz */
    outb(0x42, 11932 >> 8);
    apic_write(APIC_TIMER_INIT, 0xFFFFFFFFu);
    for (u32 i = 0; i < (1u << 24) && !(inb(0x61) & 0x20); i++)
        ;
    u32 counted = 0xFFFFFFFFu - apic_read(APIC_TIMER_CUR);
    apic_write(APIC_TIMER_INIT, 0);
    return counted / 10;
}

/* -- interrupt handlers (the IDT is shared: each looks up its CPU) -------------------- */

static void count_hit(int kind) {
    int s = my_slot();
    if (s >= 0)
        cpus[s].hits[kind]++;
}

static void on_kick(struct frame *f) { count_hit(HIT_KICK); apic_write(APIC_EOI, 0); }
static void on_bcast(struct frame *f) { count_hit(HIT_BCAST); apic_write(APIC_EOI, 0); }
static void on_logical(struct frame *f) { count_hit(HIT_LOGICAL); apic_write(APIC_EOI, 0); }
static void on_spurious(struct frame *f) { count_hit(HIT_SPURIOUS); }   /* no EOI for a spurious vector */
static void on_pong(struct frame *f) { pongs++; apic_write(APIC_EOI, 0); }

static void on_timer(struct frame *f) {
    int s = my_slot();
    if (s >= 0)
        cpus[s].timer_fired = 1;
    apic_write(APIC_EOI, 0);
}

static void on_ping(struct frame *f) {
    count_hit(HIT_PING);
    apic_write(APIC_EOI, 0);
    send_ipi(cpus[0].apic_id, ICR_FIXED | VEC_PONG);
}

/* -- 2. start-up ------------------------------------------------------------------- */

/* The local APIC as each CPU sets it up: software-enabled, TPR 0, the flat
 * logical model with one bit per slot, the timer dividing by 16. */
static void lapic_setup(int slot) {
    apic_write(APIC_SVR, 0x100 | VEC_SPURIOUS);
    apic_write(APIC_TPR, 0);
    apic_write(APIC_DFR, 0xFFFFFFFFu);
    apic_write(APIC_LDR, (1u << slot) << 24);
    apic_write(APIC_TIMER_DIV, 0x3);
    apic_write(APIC_LVT_TIMER, 0x10000 | VEC_TIMER);
}

/* The AP's command loop: HLT until a kick, run what the command word says
 * if this slot is in its mask, then say so in cpus[slot].done. The check
 * happens with interrupts off and "sti; hlt" cannot lose the kick (the STI
 * shadow covers the HLT). */
static void __attribute__((noreturn)) ap_loop(int slot) {
    u32 seen = cmd_seq;
    for (;;) {
        __asm__ volatile("cli" ::: "memory");
        u32 s = cmd_seq;
        if (s == seen) {
            __asm__ volatile("sti; hlt" ::: "memory");
            continue;
        }
        __asm__ volatile("sti" ::: "memory");
        seen = s;
        barrier();
        if (cmd_mask & (1u << slot))
            cmd_fn(slot, cmd_arg);
        barrier();
        cpus[slot].done = s;
    }
}

void ap_main(void) {
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    u32 lapic_id = apic_read(APIC_ID) >> 24;
    int slot = my_slot();
    if (slot <= 0) {                                       /* not in the MADT (or the BSP's ID) */
        xadd(&strays, 1);
        for (;;)
            __asm__ volatile("cli; hlt");
    }
    lapic_setup(slot);
    cpus[slot].cpuid_apic = b >> 24;
    cpus[slot].lapic_id = lapic_id;
    if (on_xen)
        xen_identify(slot);
    cpus[slot].done = cmd_seq;
    barrier();
    cpus[slot].arrived = xadd(&arrivals, 1) + 1;
    ap_loop(slot);
}

u32 ap_mask(void) {
    u32 m = 0;
    for (int i = 1; i < ncpus; i++)
        if (cpus[i].arrived)
            m |= 1u << i;
    return m;
}

static int all_done(u32 mask, u32 seq) {
    for (int i = 1; i < ncpus; i++)
        if ((mask >> i & 1) && cpus[i].done != seq)
            return 0;
    return 1;
}

u32 run_on_start(u32 mask, ap_fn fn, ulong arg) {
    cmd_fn = fn;
    cmd_arg = arg;
    cmd_mask = mask;
    barrier();
    u32 seq = ++cmd_seq;
    send_ipi(0, ICR_ALL_BUT_SELF | ICR_FIXED | VEC_KICK);
    return seq;
}

int run_on_finish(u32 mask, u32 seq, u32 ms) {
    int s = my_slot();
    timer_arm(ms * 1000);
    while (!all_done(mask, seq) && !timer_expired(s))
        pause();
    timer_stop();
    return all_done(mask, seq);
}

/* Run fn(slot, arg) on the APs in mask and wait (bounded) until each is done */
int run_on(u32 mask, ap_fn fn, ulong arg, u32 ms) { return run_on_finish(mask, run_on_start(mask, fn, arg), ms); }

static void sipi_start(int slot) {
    u32 id = cpus[slot].apic_id;
    send_ipi(id, ICR_INIT | ICR_LEVEL | ICR_ASSERT);
    /* INIT level de-assert: the P6's arbitration-ID sync, ignored since the
     * Pentium 4; Linux still sends it (wakeup_secondary_cpu_via_init) */
    send_ipi(id, ICR_INIT | ICR_LEVEL);
    udelay(10000);
    for (int i = 0; i < 2; i++) {
        send_ipi(id, ICR_STARTUP | (TRAMPOLINE >> 12));
        udelay(200);
    }
}

static void start_aps(void) {
    memcpy((void *)TRAMPOLINE, tramp_start, (ulong)(tramp_end - tramp_start));
    __asm__ volatile("sgdt %0; sidt %1" : "=m"(ap_gdtr), "=m"(ap_idtr));
    u8 *gdtr = (u8 *)TRAMPOLINE + (tramp_gdtr - tramp_start);
    u32 base32 = (u32)ap_gdtr.base;
    memcpy(gdtr, &ap_gdtr.limit, 2);
    memcpy(gdtr + 2, &base32, 4);
    ap_cr3 = read_cr3();
    ap_cr4 = read_cr4();
    for (int s = 1; s < ncpus; s++) {
        /* under Xen with 3 CPUs or more, the last one starts the Xen way */
        int by_xen = on_xen && ncpus >= 3 && s == ncpus - 1;
        if (by_xen) {
            if (!xen_start_vcpu(s))
                continue;
        } else {
            sipi_start(s);
        }
        wait_nonzero(&cpus[s].arrived, 2000);
        struct cpu *c = &cpus[s];
        check(c->arrived && c->cpuid_apic == c->apic_id && c->lapic_id == c->apic_id,
              "CPU %d (APIC ID %u) up by %s: CPUID says %u, LAPIC ID %u, arrived #%u", s, c->apic_id,
              by_xen ? "VCPUOP_initialise + VCPUOP_up" : "INIT-SIPI-SIPI", c->cpuid_apic, c->lapic_id, c->arrived);
        if (on_xen && !by_xen)
            xen_sipi_started(s);
    }
    check(arrivals == (u32)ncpus - 1, "%u of %d APs arrived", arrivals, ncpus - 1);
}

/* -- 3. IPIs ------------------------------------------------------------------------- */

static void test_ipis(void) {
    u32 aps = ap_mask();
    for (int s = 1; s < ncpus; s++) {
        if (!(aps >> s & 1))
            continue;
        u32 before = cpus[s].hits[HIT_PING], n = 0;
        for (; n < ROUND_TRIPS; n++) {
            u32 want = pongs + 1;
            send_ipi(cpus[s].apic_id, ICR_FIXED | VEC_PING);
            if (!wait_at_least(&pongs, want, 500))
                break;
        }
        check(n == ROUND_TRIPS && cpus[s].hits[HIT_PING] - before == ROUND_TRIPS,
              "%u IPI round trips with CPU %d (vector %#x there, %#x back)", n, s, VEC_PING, VEC_PONG);
    }

    u32 got = 0, naps = 0;
    send_ipi(0, ICR_ALL_BUT_SELF | ICR_FIXED | VEC_BCAST);
    for (int s = 1; s < ncpus; s++)
        if (aps >> s & 1) {
            naps++;
            wait_nonzero(&cpus[s].hits[HIT_BCAST], 500);
        }
    udelay(1000);                                          /* time for a wrong second copy */
    int once = 1;
    for (int s = 1; s < ncpus; s++)
        if (aps >> s & 1) {
            got += cpus[s].hits[HIT_BCAST];
            once &= cpus[s].hits[HIT_BCAST] == 1;
        }
    check(once && cpus[0].hits[HIT_BCAST] == 0, "all-excluding-self IPI: %u of %u APs once each, BSP %u",
          got, naps, cpus[0].hits[HIT_BCAST]);

    /* flat model: the destination is a bit mask matched against each LDR */
    u32 first = 0;
    while (first < (u32)ncpus && !(aps >> first & 1))
        first++;
    if (first < (u32)ncpus) {
        send_ipi(1u << first, ICR_LOGICAL | ICR_FIXED | VEC_LOGICAL);
        wait_nonzero(&cpus[first].hits[HIT_LOGICAL], 500);
        udelay(1000);
        int only = cpus[first].hits[HIT_LOGICAL] == 1;
        for (int s = 0; s < ncpus; s++)
            if (s != (int)first)
                only &= cpus[s].hits[HIT_LOGICAL] == 0;
        check(only, "logical IPI to mask %#x (flat): CPU %u only", 1u << first, first);
    }
    send_ipi(aps, ICR_LOGICAL | ICR_FIXED | VEC_LOGICAL);
    int each = 1;
    for (int s = 1; s < ncpus; s++)
        if (aps >> s & 1)
            each &= wait_at_least(&cpus[s].hits[HIT_LOGICAL], (u32)s == first ? 2 : 1, 500);
    udelay(1000);
    for (int s = 1; s < ncpus; s++)
        if (aps >> s & 1)
            each &= cpus[s].hits[HIT_LOGICAL] == ((u32)s == first ? 2u : 1u);
    check(each && cpus[0].hits[HIT_LOGICAL] == 0, "logical IPI to mask %#x (flat): every AP once", aps);
}

/* -- 4. a spinlock and an atomic counter ------------------------------------------- */

static volatile u32 lock, plain_counter, atomic_counter, ready, go, lock_timeouts;

/* LOCK CMPXCHG 0 -> 1 takes it; while it is taken, read it without the lock
 * (the cache line stays shared). 0 if the deadline passed while waiting. */
static int spin_lock(volatile u32 *l, int slot) {
    for (;;) {
        u32 old = 0;
        __asm__ volatile("lock cmpxchg %2, %1" : "+a"(old), "+m"(*l) : "r"(1u) : "memory", "cc");
        if (old == 0)
            return 1;
        while (*l)
            if (timer_expired(slot))
                return 0;
            else
                pause();
    }
}

static void spin_unlock(volatile u32 *l) { barrier(); *l = 0; }   /* x86 stores are not reordered with older ones */

static void count_work(int slot, ulong n) {
    xadd(&ready, 1);
    wait_nonzero(&go, 5000);
    timer_arm(60000000);                                   /* a CPU that stops holding the lock: 60 s */
    for (ulong i = 0; i < n; i++) {
        if (!spin_lock(&lock, slot)) {
            xadd(&lock_timeouts, 1);
            break;
        }
        plain_counter = plain_counter + 1;                 /* a load and a store: only the lock keeps it exact */
        spin_unlock(&lock);
        __asm__ volatile("lock addl $1, %0" : "+m"(atomic_counter) :: "memory");
    }
    timer_stop();
}

static void test_counters(void) {
    u32 aps = ap_mask(), n = 1;
    for (int s = 1; s < ncpus; s++)
        n += aps >> s & 1;
    plain_counter = atomic_counter = ready = go = lock_timeouts = 0;
    u32 seq = run_on_start(aps, count_work, ITERATIONS);
    wait_at_least(&ready, n - 1, 2000);                     /* all spin on "go": they start together */
    go = 1;
    count_work(0, ITERATIONS);
    int done = run_on_finish(aps, seq, 60000);
    check(done && !lock_timeouts && plain_counter == n * ITERATIONS, "spinlock (lock cmpxchg): counter %u = %u x %u",
          plain_counter, n, ITERATIONS);
    check(done && atomic_counter == n * ITERATIONS, "lock add: counter %u = %u x %u", atomic_counter, n, ITERATIONS);
}

/* -- 5. cross-modifying code ---------------------------------------------------------- */

static u32 call_patch_fn(void) { return ((u32 (*)(void))(ulong)patch_fn)(); }

static void serialize(void) { u32 a, b, c, d; cpuid(0, 0, &a, &b, &c, &d); }

static void patch(u32 v) {
    volatile u8 *imm = patch_fn + 1;                       /* B8 imm32 C3 */
    for (int i = 0; i < 4; i++)
        imm[i] = (u8)(v >> (8 * i));
}

/* the executing side: the flag (the command) was seen; serialize, then run */
static void xmc_run(int slot, ulong unused) {
    serialize();
    u32 r1 = call_patch_fn(), r2 = call_patch_fn();
    cpus[slot].result = r1 == r2 ? r1 : 0xBAD00000u | r1;
}

static void xmc_patch(int slot, ulong v) { patch((u32)v); }

static int aps_see(u32 aps, u32 want) {
    if (!run_on(aps, xmc_run, 0, 2000))
        return 0;
    for (int s = 1; s < ncpus; s++)
        if ((aps >> s & 1) && cpus[s].result != want)
            return 0;
    return 1;
}

static void test_xmc(void) {
    u32 aps = ap_mask();
    int first = 1;
    while (first < ncpus && !(aps >> first & 1))
        first++;
    if (first == ncpus)
        return;
    check(aps_see(aps, 1), "the APs ran patch_fn: 1 (the code as linked)");
    for (u32 v = 2; v <= 3; v++) {
        patch(v);
        int ok = aps_see(aps, v);
        check(ok, "BSP patched patch_fn to return %u; after CPUID the APs run it: %u", v, cpus[first].result);
    }
    check(call_patch_fn() == 3, "the BSP runs it too: %u", call_patch_fn());
    for (u32 v = 4; v <= 5; v++) {
        int ok = run_on(1u << first, xmc_patch, v, 2000);
        serialize();
        u32 r = call_patch_fn();
        u32 others = aps & ~(1u << first);
        int others_ok = !others || aps_see(others, v);
        check(ok && r == v && others_ok, "CPU %d patched it to return %u; the BSP then runs it: %u%s", first, v, r,
              others ? (others_ok ? ", the other APs too" : ", the other APs NOT") : "");
    }
    patch(1);
}

/* -------------------------------------------------------------------------------------- */

static void skip_smp(const char *why) {
    skip("AP start-up: %s", why);
    skip("IPIs: %s", why);
    skip("spinlock and lock add counters: %s", why);
    skip("cross-modifying code: %s", why);
}

void kmain(void) {
    printf("smp%d: AP start-up, IPIs, locks, cross-modifying code\n", (int)sizeof(ulong) * 8);
    set_handler(VEC_KICK, on_kick);
    set_handler(VEC_TIMER, on_timer);
    set_handler(VEC_PING, on_ping);
    set_handler(VEC_PONG, on_pong);
    set_handler(VEC_BCAST, on_bcast);
    set_handler(VEC_LOGICAL, on_logical);
    set_handler(VEC_SPURIOUS, on_spurious);
    on_xen = xen_cpuid_base() != 0;
    read_madt();
    lapic_setup(0);
    timer_per_ms = calibrate();
    check(timer_per_ms > 0, "LAPIC timer: %u counts per ms (divide by 16), against the PIT", timer_per_ms);
    if (!timer_per_ms) {
        skip_smp("no timer to bound the waits");
        return;
    }
    if (on_xen)
        xen_early();
    __asm__ volatile("sti");
    if (ncpus == 1) {
        skip_smp("one CPU");
    } else {
        start_aps();
        if (!ap_mask()) {
            skip("IPIs, counters, cross-modifying code: no AP arrived");
        } else {
            test_ipis();
            test_counters();
            test_xmc();
        }
    }
    if (on_xen)
        xen_events();
    else
        skip("Xen part: not on Xen (no \"XenVMMXenVMM\" CPUID leaf)");
    if (ncpus > 1)
        check(arrivals == ap_ticket && strays == 0 && arrivals == (u32)ncpus - 1,
              "no AP started twice: %u arrivals, %u trampoline entries, %u strays", arrivals, ap_ticket, strays);
    u32 spurious = 0;
    for (int s = 0; s < ncpus; s++)
        spurious += cpus[s].hits[HIT_SPURIOUS];
    check(spurious == 0, "no spurious interrupts (%u)", spurious);
    __asm__ volatile("cli");
}
