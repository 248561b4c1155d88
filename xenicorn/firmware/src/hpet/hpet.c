/* hpet32 / hpet64: the HPET as an OS finds and programs it (IA-PC HPET
 * specification 1.0a; the register values are Xen's vhpet,
 * xen/arch/x86/hvm/hpet.c).
 *
 *  1. ACPI: the "HPET" table gives the event timer block ID and the base.
 *  2. Capabilities: vendor, three timers, 64-bit counter, legacy capable,
 *     the tick in femtoseconds; each timer's INT_ROUTE_CAP (GSIs 20-23).
 *  3. The main counter: halted it holds a written value, enabled it runs
 *     (at least as fast as the ACPI PM timer says time passes) and its
 *     high half carries.
 *  4. A one-shot edge timer through IOAPIC pin 20, never early.
 *  5. A periodic timer set with VAL_SET: the comparator, then the period;
 *     every comparator read in its handler is a later match.
 *  6. A level timer on pin 21: its status bit is set, the line stays up
 *     (redelivered after an EOI) until software writes 1 to the bit.
 *  7. Legacy replacement: timer 0 on IRQ 0 (IOAPIC pin 2 through the ISA
 *     override, and the 8259), timer 1 on IRQ 8, the PIT cut from IRQ 0.
 * Without an HPET table the result is SKIP (XTF's "No working HPET"). */
#include "../lib/kernel.h"

#define LAPIC 0xFEE00000UL
#define IOAPIC 0xFEC00000UL
#define PM_TMR 0x60C                      /* the ACPI PM timer, 3.579545 MHz */

#define CAP 0x000
#define CFG 0x010
#define STATUS 0x020
#define COUNTER 0x0F0
#define TN_CFG(n) (0x100 + 0x20 * (n))
#define TN_CMP(n) (0x108 + 0x20 * (n))
#define CFG_ENABLE 1
#define CFG_LEGACY 2
#define TN_LEVEL 0x002
#define TN_ENABLE 0x004
#define TN_PERIODIC 0x008
#define TN_SETVAL 0x040
#define TN_32BIT 0x100
#define TN_ROUTE(g) ((u32)(g) << 9)

static ulong hpet;

/* 64-bit registers: one MOV in hpet64, two 32-bit halves (low first) in
 * hpet32. (Unicorn hands xenicorn an 8-byte MMIO access as two 4-byte ones
 * anyway, so both reach the HPET as halves: harmless for the registers used
 * here, whose halves merge into the 64-bit value.) */
static u32 rd32(u32 off) { return *(volatile u32 *)(hpet + off); }
static void wr32(u32 off, u32 v) { *(volatile u32 *)(hpet + off) = v; }
#ifdef __x86_64__
static u64 rd64(u32 off) { return *(volatile u64 *)(hpet + off); }
static void wr64(u32 off, u64 v) { *(volatile u64 *)(hpet + off) = v; }
#else
static u64 rd64(u32 off) { return (u64)rd32(off + 4) << 32 | rd32(off); }
static void wr64(u32 off, u64 v) { wr32(off, (u32)v); wr32(off + 4, (u32)(v >> 32)); }
#endif
/* The running counter: its high half read around the low one, so a carry
 * between the two reads is never torn (what 32-bit software must do). */
static u64 counter(void) {
    u32 hi = rd32(COUNTER + 4), lo = rd32(COUNTER), again = rd32(COUNTER + 4);
    if (hi != again) { lo = rd32(COUNTER); hi = again; }
    return (u64)hi << 32 | lo;
}

static void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static u32 apic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static void ioapic_write(u32 reg, u32 v) {
    *(volatile u32 *)IOAPIC = reg;
    *(volatile u32 *)(IOAPIC + 0x10) = v;
}
static u32 ioapic_read(u32 reg) {
    *(volatile u32 *)IOAPIC = reg;
    return *(volatile u32 *)(IOAPIC + 0x10);
}
static void ioapic_route(int pin, u32 entry) {
    ioapic_write(0x10 + 2 * pin + 1, 0);                   /* destination APIC 0 */
    ioapic_write(0x10 + 2 * pin, entry);
}
#define MASKED 0x10000
#define LEVEL_TRIGGERED 0x8000

/* -- ACPI: RSDP -> XSDT/RSDT -> "HPET" -------------------------------------------- */
struct __attribute__((packed)) hpet_table {
    struct acpi_sdt h; u32 block_id; u8 space, bit_width, bit_offset, access; u64 address; u8 number;
    u16 min_tick; u8 protect;
};

static const struct hpet_table *find_hpet_table(void) {
    return (const struct hpet_table *)acpi_find_table("HPET", sizeof(struct hpet_table));
}

/* -- interrupts ------------------------------------------------------------------ */
static volatile int hits[256];
static volatile u64 seen_at[256];       /* the counter when the vector last arrived */
static volatile u32 seen_cmp[16];       /* periodic: the comparator read in each handler */

static void count(struct frame *f) {
    int v = f->vector & 0xFF;
    hits[v]++;
    seen_at[v] = counter();
    if (v >= 0x20 && v < 0x30) outb(0x20, 0x20);            /* 8259 EOI */
    else apic_write(0xB0, 0);                               /* LAPIC EOI */
}

static void periodic_tick(struct frame *f) {
    int k = hits[0x51]++;
    if (k < 16) seen_cmp[k] = rd32(TN_CMP(2));
    apic_write(0xB0, 0);
}

static volatile u32 level_status[4];

static void level_tick(struct frame *f) {
    int k = hits[0x52]++;
    if (k < 4) level_status[k] = rd32(STATUS);
    if (k == 0) {
        wr32(STATUS, 1);                                    /* another timer's bit: changes nothing */
        apic_write(0xB0, 0);                                /* EOI with the line still up */
        return;
    }
    wr32(STATUS, 2);                                        /* write 1 to clear: the line drops */
    apic_write(0xB0, 0);
}

static void wait_for(volatile int *counter_, int n) {
    for (int spins = 0; *counter_ < n && spins < 2000; spins++)
        __asm__ volatile("sti; hlt; cli");
}

/* Sleep ``us`` microseconds on the LAPIC timer (one-shot, vector 0x5F,
 * divide by 1: xenicorn's APIC timer counts at 1 GHz), interrupts on. */
static void sleep_us(u32 us) {
    int woken = hits[0x5F] + 1;
    apic_write(0x3E0, 0xB);
    apic_write(0x320, 0x5F);
    apic_write(0x380, us * 1000);
    wait_for(&hits[0x5F], woken);
}

static u64 mod64(u64 n, u32 d) { u32 r; divmod64(n, d, &r); return r; }

/* -- the tests ------------------------------------------------------------------- */
static void test_caps(void) {
    u64 cap = rd64(CAP);
    u32 vendor = (u32)(cap >> 16) & 0xFFFF, timers = ((u32)(cap >> 8) & 0x1F) + 1, period = (u32)(cap >> 32);
    int wide = cap & 0x2000, legacy = cap & 0x8000;
    check(vendor == 0x8086 && timers == 3 && wide && legacy && period == 16000000 && (cap & 0xFF) == 1,
          "capabilities: vendor %#x, %u timers, %s counter, %s, %u fs", vendor, timers,
          wide ? "64-bit" : "32-bit", legacy ? "legacy capable" : "no legacy route", period);
    check(period && period <= 100000000u, "the tick is at most 100 ns (the spec's bound)");
    for (int n = 0; n < 3; n++) {
        u64 cfg = rd64(TN_CFG(n));
        check((u32)(cfg >> 32) == 0xF00000 && (cfg & 0x30) == 0x30 && !(cfg & 0x8000),
              "timer %d routes %#x, periodic and 64-bit capable, no FSB", n, (u32)(cfg >> 32));
    }
    check(rd32(CFG) == 0 && rd32(STATUS) == 0, "disabled at reset, no status");
    /* XSA-261's walk: every timer asked for every IRQ 16-31 (the spec's
     * INT_ROUTE is 5 bits); an enabled timer only ever keeps a route its
     * caps allow, the first one (20) otherwise (timer_sanitize_int_route) */
    int kept = 1;
    for (int n = 0; n < 3; n++)
        for (u32 irq = 16; irq < 32; irq++) {
            wr32(TN_CFG(n), TN_ENABLE | TN_ROUTE(irq));
            u32 got = (rd32(TN_CFG(n)) >> 9) & 0x1F;
            if (got != (irq >= 20 && irq <= 23 ? irq : 20)) kept = 0;
            wr32(TN_CFG(n), 0);
        }
    check(kept, "routes 16-31 asked of every timer: only 20-23 kept, the others become 20");
}

static void test_counter(void) {
    wr64(COUNTER, 0xFFFFFF00ULL);
    u64 a = counter();
    for (int i = 0; i < 1000; i++) (void)inl(PM_TMR);      /* time passes */
    check(a == 0xFFFFFF00ULL && counter() == a, "halted counter holds %#llx", (unsigned long long)a);
    wr32(CFG, CFG_ENABLE);
    u64 c0 = counter();                                     /* the HPET reads enclose the PM timer's */
    u32 pm0 = inl(PM_TMR);
    while ((u32)(inl(PM_TMR) - pm0) < 3580) ;              /* 1 ms of ACPI PM timer */
    u64 c1 = counter();
    check(c1 > c0, "main counter runs");
    /* the HPET interval encloses the PM timer's 1 ms: at least 62,500 ticks of 16 ns */
    check(c1 - c0 >= 62400, "%u ticks while the PM timer counted 1 ms", (u32)(c1 - c0));
    check(c0 >= 0xFFFFFF00ULL && (counter() >> 32) >= 1, "the high half carried (%#llx)",
          (unsigned long long)counter());
}

static void test_oneshot(void) {
    ioapic_route(20, 0x50);                                 /* edge, fixed, vector 0x50 */
    u64 cmp = counter() + 62500;                            /* 1 ms */
    wr64(TN_CMP(2), cmp);
    wr32(TN_CFG(2), TN_ENABLE | TN_ROUTE(20));
    check((rd32(TN_CFG(2)) & 0x3E00) == TN_ROUTE(20), "timer 2 takes route 20");
    wait_for(&hits[0x50], 1);
    sleep_us(3000);
    check(hits[0x50] == 1 && seen_at[0x50] >= cmp, "one-shot edge timer 2 on GSI 20 (at %llu, comparator %llu)",
          (unsigned long long)seen_at[0x50], (unsigned long long)cmp);
    check(rd32(STATUS) == 0, "an edge timer leaves its status bit clear");
    wr32(TN_CFG(2), 0);
}

/* Periodic in 32-bit mode with 32-bit writes, as Linux programs its HPET
 * clockevent. The counter is first set back below 2^32: Xen advances a
 * periodic comparator against the whole 64-bit counter, so past 2^32 a
 * 32-bit comparator's first match would be within a period of the write,
 * not at the value written (hpet_get_comparator). */
static void test_periodic(void) {
    set_handler(0x51, periodic_tick);
    ioapic_route(20, 0x51);
    wr32(CFG, 0);
    wr64(COUNTER, 0);
    wr32(CFG, CFG_ENABLE);
    const u32 period = 10000;                               /* 160 us */
    u32 first = (u32)counter() + 20000;
    wr32(TN_CFG(2), TN_PERIODIC | TN_SETVAL | TN_32BIT | TN_ROUTE(20));
    wr32(TN_CMP(2), first);                                 /* VAL_SET: the comparator */
    check(!(rd32(TN_CFG(2)) & TN_SETVAL), "VAL_SET clears with the comparator write");
    wr32(TN_CMP(2), period);                                /* and now the period */
    u64 start = counter();
    wr32(TN_CFG(2), TN_ENABLE | TN_PERIODIC | TN_32BIT | TN_ROUTE(20));
    wait_for(&hits[0x51], 5);
    u64 end = counter();
    wr32(TN_CFG(2), 0);
    int n = hits[0x51], aligned = 1;
    for (int k = 0; k < n && k < 16; k++)
        if (seen_cmp[k] <= first || mod64(seen_cmp[k] - first, period)) aligned = 0;
    printf("periodic: %d ticks in %u counter ticks\n", n, (u32)(end - start));
    check(n >= 5 && aligned, "periodic timer 2 with SETVAL: every comparator read is first + k * period");
    ioapic_route(20, MASKED);
}

static void test_level(void) {
    set_handler(0x52, level_tick);
    ioapic_route(21, LEVEL_TRIGGERED | 0x52);
    wr64(TN_CMP(1), counter() + 6250);
    wr32(TN_CFG(1), TN_ENABLE | TN_LEVEL | TN_ROUTE(21));
    wait_for(&hits[0x52], 2);
    sleep_us(1000);
    check(hits[0x52] == 2 && level_status[0] == 2 && level_status[1] == 2,
          "level timer 1 on GSI 21: status %#x, redelivered once after an EOI (%d calls)", level_status[0],
          hits[0x52]);
    check(rd32(STATUS) == 0 && !(ioapic_read(0x10 + 2 * 21) & 0x4000),
          "status bit 1 cleared by writing 1, Remote IRR clear");
    wr32(TN_CFG(1), 0);
    ioapic_route(21, MASKED);
}

static void pit_start(u16 count) {
    outb(0x43, 0x34);                                       /* counter 0, lo/hi, mode 2 */
    outb(0x40, count & 0xFF);
    outb(0x40, count >> 8);
}

/* Arm a 32-bit one-shot as Linux's hpet_next_event does: the match is on
 * equality, so a comparator the counter passed before the timer was on
 * waits for the 32-bit wrap (Xen: past its "tiny time span"); arm again
 * until the write was in time. A loaded host can stall a vCPU between the
 * two writes for longer than the delta. */
static void arm_oneshot32(int n, u32 cfg, u32 delta, int vector) {
    for (int tries = 0; tries < 10; tries++) {
        u32 cmp = (u32)counter() + delta;
        wr32(TN_CMP(n), cmp);
        wr32(TN_CFG(n), cfg);
        /* still ahead, or it already fired (interrupts are off: the vector waits in IRR) */
        if ((int)((u32)counter() - cmp) < 0 || (apic_read(0x200 + (vector >> 5) * 0x10) >> (vector & 31) & 1))
            return;
        wr32(TN_CFG(n), 0);
    }
}

static void test_legacy(void) {
    pit_start(119);                                         /* the PIT at 10 kHz on IRQ 0 */
    ioapic_route(2, 0x53);
    wait_for(&hits[0x53], 3);
    check(hits[0x53] >= 3, "the PIT ticks on IRQ 0 first");
    wr32(CFG, CFG_ENABLE | CFG_LEGACY);
    int before = hits[0x53];
    u64 start = counter();
    wr32(TN_CFG(0), TN_ENABLE | TN_PERIODIC | TN_SETVAL | TN_32BIT);    /* as Linux's legacy clockevent */
    wr32(TN_CMP(0), (u32)start + 62500);
    wr32(TN_CMP(0), 62500);                                 /* 1 kHz */
    wait_for(&hits[0x53], before + 5);
    u64 elapsed = counter() - start;
    int got = hits[0x53] - before;
    u32 rem;
    u64 most = divmod64(elapsed, 62500, &rem) + 2;          /* + a PIT tick taken before the switch */
    check(got >= 5, "legacy replacement: timer 0 on IRQ 0 through IOAPIC pin 2 (%d)", got);
    check((u64)got <= most, "the PIT is cut from IRQ 0 (%d interrupts in %u ticks)", got, (u32)elapsed);
    outb(0x43, 0x00);                                       /* the PIT still counts */
    u8 lo = inb(0x40), hi = inb(0x40);
    printf("PIT counter 0 at %u\n", lo | hi << 8);

    ioapic_route(8, 0x54);                                  /* timer 1: IRQ 8 */
    arm_oneshot32(1, TN_ENABLE | TN_32BIT, 62500, 0x54);    /* in 1 ms */
    wait_for(&hits[0x54], 1);
    check(hits[0x54] == 1, "legacy replacement: timer 1 on IRQ 8");
    wr32(TN_CFG(1), 0);
    ioapic_route(8, MASKED);

    ioapic_route(2, MASKED);                                /* now the 8259's way */
    outb(0x20, 0x11); outb(0x21, 0x20); outb(0x21, 0x04); outb(0x21, 0x01);
    outb(0xA0, 0x11); outb(0xA1, 0x28); outb(0xA1, 0x02); outb(0xA1, 0x01);
    outb(0x21, 0xFE);                                       /* only IRQ 0 */
    outb(0xA1, 0xFF);
    wait_for(&hits[0x20], 3);
    outb(0x21, 0xFF);
    check(hits[0x20] >= 3, "legacy replacement: timer 0 on IRQ 0 through the 8259 (%d)", hits[0x20]);
    outb(0x43, 0x30);                                       /* the PIT stops */
}

void kmain(void) {
    printf("hpet%d: the High Precision Event Timer\n", (int)sizeof(ulong) * 8);
    outb(0x21, 0xFF); outb(0xA1, 0xFF);                     /* a reset 8259 is unmasked: mask it */
    const struct hpet_table *t = find_hpet_table();
    if (!t) {
        printf("no ACPI HPET table\nTest result: SKIP\n");
        poweroff();
    }
    hpet = (ulong)t->address;
    check(t->block_id == 0x8086A201 && t->address == 0xFED00000ULL && t->space == 0,
          "HPET table: block id %#x at %#llx", t->block_id, (unsigned long long)t->address);
    for (int v = 0x20; v < 0x60; v++)
        set_handler(v, count);
    set_handler(0xFF, count);
    apic_write(0xF0, 0x1FF);                                /* LAPIC on, spurious 0xFF */
    test_caps();
    test_counter();
    test_oneshot();
    test_periodic();
    test_level();
    test_legacy();
    check(hits[0xFF] == 0 && hits[0x27] == 0, "no spurious interrupts");
}
