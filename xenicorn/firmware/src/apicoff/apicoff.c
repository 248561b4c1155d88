/* apicoff32 / apicoff64: the local APIC's global disable, IA32_APIC_BASE bit 11
 * (SDM vol. 3 §10.4.3).
 *
 * With EN cleared the CPU behaves as one without an APIC: CPUID.1:EDX.APIC
 * reads 0, the page at 0xFEE00000 is no longer the APIC's (reads float high,
 * writes go nowhere: an ICR write sends nothing), and no interrupt is
 * accepted. Setting EN again gives an APIC in its power-up state: software
 * disabled (SVR 0xFF), every LVT entry masked, TPR 0, the version register
 * back. Xen's vlapic behaves so (guest_wrmsr_apic_base, vlapic_reset).
 *
 * A kernel reaches IA32_APIC_BASE through the platform's MSR intercept, which
 * a Xen guest opens by asking for Xen's hypercall-page leaf (CPUID
 * 0x40000002), as every Xen-aware kernel does first. */
#include "../lib/kernel.h"

#define LAPIC 0xFEE00000UL
#define MSR_APIC_BASE 0x1B
#define APIC_EN (1u << 11)
#define APIC_BSP (1u << 8)

static inline u32 apic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }

static volatile int hits;

static void count(struct frame *f) {
    hits++;
    apic_write(0xB0, 0);                                   /* EOI (the APIC is on when it arrives) */
}

static int cpuid_apic(void) {
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    return (d >> 9) & 1;
}

static void settle(void) {
    for (int i = 0; i < 20; i++)
        __asm__ volatile("sti; nop; nop; cli");
}

void kmain(void) {
    u32 a, b, c, d;
    cpuid(0x40000000, 0, &a, &b, &c, &d);                  /* Xen's leaves: as a Xen guest starts */
    cpuid(0x40000002, 0, &a, &b, &c, &d);
    set_handler(0x40, count);

    u64 base = rdmsr(MSR_APIC_BASE);
    check((base & ~0xFFFull) == LAPIC && (base & APIC_EN) && (base & APIC_BSP),
          "IA32_APIC_BASE %#llx: 0xFEE00000, enabled, BSP", base);
    check(cpuid_apic(), "CPUID.1:EDX.APIC set while enabled");
    u32 version = apic_read(0x30);
    apic_write(0xF0, 0x1FF);                               /* software enable */
    apic_write(0x80, 0x20);                                /* TPR, to see the reset */
    apic_write(0x320, 0x41);                               /* timer LVT unmasked, to see the reset */
    apic_write(0x310, 0);
    apic_write(0x300, 0x40000 | 0x40);                     /* self-IPI while enabled */
    settle();
    check(hits == 1, "a self-IPI on vector 0x40 arrives while enabled (%d)", hits);

    wrmsr(MSR_APIC_BASE, base & ~(u64)APIC_EN);
    check(!(rdmsr(MSR_APIC_BASE) & APIC_EN), "EN clears: IA32_APIC_BASE %#llx", rdmsr(MSR_APIC_BASE));
    check(!cpuid_apic(), "CPUID.1:EDX.APIC reads 0 while disabled");
    check(apic_read(0x30) == 0xFFFFFFFF && apic_read(0xF0) == 0xFFFFFFFF,
          "the APIC page reads all ones (version %#x, SVR %#x)", apic_read(0x30), apic_read(0xF0));
    apic_write(0x300, 0x40000 | 0x40);                     /* goes nowhere */
    settle();
    check(hits == 1, "an ICR write sends nothing while disabled (%d)", hits);

    wrmsr(MSR_APIC_BASE, base);
    check(rdmsr(MSR_APIC_BASE) == base, "EN sets again: IA32_APIC_BASE %#llx", rdmsr(MSR_APIC_BASE));
    check(cpuid_apic(), "CPUID.1:EDX.APIC set again");
    check(apic_read(0x30) == version, "the version register is back (%#x)", apic_read(0x30));
    check(apic_read(0xF0) == 0xFF, "power-up state: SVR %#x (software disabled)", apic_read(0xF0));
    check(apic_read(0x80) == 0, "power-up state: TPR %#x", apic_read(0x80));
    check(apic_read(0x320) == 0x10000 && apic_read(0x350) == 0x10000,
          "power-up state: LVT timer %#x and LINT0 %#x masked", apic_read(0x320), apic_read(0x350));
    apic_write(0x300, 0x40000 | 0x40);                     /* software disabled: dropped */
    settle();
    check(hits == 1, "a software-disabled APIC still takes nothing (%d)", hits);
    apic_write(0xF0, 0x1FF);
    apic_write(0x300, 0x40000 | 0x40);
    settle();
    check(hits == 2, "software enabled again, the self-IPI arrives (%d)", hits);
    test_result();
}
