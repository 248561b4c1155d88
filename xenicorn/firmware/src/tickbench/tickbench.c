/* tickbench32 / tickbench64: computing with and without a 1 kHz LAPIC timer.
 *
 * The command line gives "n=ITERATIONS hz=RATE" (defaults 1000000 and 1000).
 *  1. Calibrate the LAPIC timer against PIT channel 2, as Linux does without
 *     a known bus clock: gate channel 2 for 10 ms (mode 0, OUT2 read back
 *     through port 0x61 bit 5) and count LAPIC timer ticks meanwhile.
 *  2. Phase "quiet": the work loop with no timer, timed with RDTSC.
 *  3. Phase "ticking": the same work with the LAPIC timer periodic at RATE
 *     on vector 0x30, interrupts enabled; the handler counts and EOIs.
 * The work is read-modify-write instructions on memory (ADD m, r) next to a
 * sum kept in a register: if an interrupt or a run-loop stop ever made an
 * instruction run twice, the two sums would differ. */
#include "../lib/kernel.h"

#define LAPIC 0xFEE00000UL
#define TICK_VECTOR 0x30

static inline u32 apic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

/* the number after "key=" at the start of a word of the command line */
static ulong arg(const char *s, const char *key, ulong dflt) {
    ulong k = strlen(key);
    for (const char *w = s; w && *w; w++) {
        if ((w != s && w[-1] != ' ') || memcmp(w, key, k) || w[k] != '=')
            continue;
        ulong n = 0;
        for (w += k + 1; *w >= '0' && *w <= '9'; w++)
            n = n * 10 + (*w - '0');
        return n;
    }
    return dflt;
}

static volatile ulong ticks;
static ulong buf[64];

static void tick(struct frame *f) {
    (void)f;
    ticks++;
    apic_write(0xB0, 0);                                   /* EOI */
}

static u64 tsc_per_ms;

/* LAPIC timer counts (divide by 1) and TSC cycles per ms, over 10 ms of PIT */
static u32 lapic_counts_per_ms(void) {
    apic_write(0x3E0, 0xB);                                /* divide by 1 */
    apic_write(0x320, 0x10000 | TICK_VECTOR);              /* masked, one-shot */
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);                /* gate 2 high, speaker off */
    outb(0x43, 0xB0);                                      /* channel 2, lo/hi, mode 0 */
    outb(0x42, 11932 & 0xFF);                              /* 10 ms at 1.193182 MHz */
    outb(0x42, 11932 >> 8);
    apic_write(0x380, 0xFFFFFFFFu);
    u64 t0 = rdtsc();
    while (!(inb(0x61) & 0x20))
        ;
    u32 counted = 0xFFFFFFFFu - apic_read(0x390);
    u64 cycles = rdtsc() - t0;
    apic_write(0x380, 0);
    u32 rem;
    tsc_per_ms = divmod64(cycles, 10, &rem);
    return counted / 10;
}

/* n iterations of ADD [buf + (i & 63)], i; returns the same sum kept in a register */
static ulong work(ulong n) {
    ulong s = 0;
    for (ulong i = 0; i < n; i++) {
        __asm__ volatile("add %1, %0" : "+m"(buf[i & 63]) : "r"(i));
        s += i;
    }
    return s;
}

static int sums_agree(ulong expect) {
    ulong got = 0;
    for (int j = 0; j < 64; j++) {
        got += buf[j];
        buf[j] = 0;
    }
    return got == expect;
}

void kmain(void) {
    const char *cmdline = (const char *)(ulong)start_info->cmdline_paddr;
    ulong n = arg(cmdline, "n", 1000000), hz = arg(cmdline, "hz", 1000);
    if (!hz)
        hz = 1000;
    printf("tickbench%d: %lu iterations, LAPIC timer at %lu Hz\n", (int)sizeof(ulong) * 8, n, hz);
    apic_write(0xF0, 0x100 | 0xFF);                        /* software-enable, spurious 0xFF */
    set_handler(TICK_VECTOR, tick);
    u32 per_ms = lapic_counts_per_ms();
    printf("LAPIC timer: %u counts per ms (PIT channel 2 calibration)\n", per_ms);
    check(per_ms > 0, "LAPIC timer calibrated");

    u64 t0 = rdtsc();
    ulong s = work(n);
    u64 quiet = rdtsc() - t0;
    check(sums_agree(s), "quiet: memory and register sums agree");

    ticks = 0;
    apic_write(0x320, 0x20000 | TICK_VECTOR);              /* periodic, unmasked */
    apic_write(0x380, (u32)(per_ms * 1000 / hz));
    __asm__ volatile("sti");
    t0 = rdtsc();
    s = work(n);
    u64 ticking = rdtsc() - t0;
    __asm__ volatile("cli");
    apic_write(0x320, 0x10000 | TICK_VECTOR);
    apic_write(0x380, 0);
    check(sums_agree(s), "ticking: memory and register sums agree");
    printf("quiet: %llu cycles\n", (unsigned long long)quiet);
    printf("ticking: %llu cycles, %lu ticks\n", (unsigned long long)ticking, (ulong)ticks);
    u32 rem;
    ulong periods = (ulong)divmod64(divmod64(ticking * hz, 1000, &rem), (u32)tsc_per_ms, &rem);
    /* Never more ticks than periods. Fewer is allowed: on host time a
     * period that passes while the emulator is descheduled or busy
     * delivering the previous tick coalesces into one interrupt, as the
     * LAPIC's single IRR bit does on hardware. */
    check(ticks <= periods + 1 && (ticks > 0 || periods < 2),
          "%lu ticks in %lu timer periods of the work", (ulong)ticks, periods);
    test_result();
}
