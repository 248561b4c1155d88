/* irq32 / irq64: the interrupt controllers, programmed as Linux does.
 *
 *  1. PCI enumeration finds the xen-platform device (5853:0001), its BARs,
 *     its interrupt pin, and the unplug magic on port 0x10.
 *  2. Local APIC: software-enable, a self-IPI, EOI clears ISR.
 *  3. LAPIC timer: one-shot and periodic (1 kHz), waking the CPU from HLT.
 *  4. IOAPIC: the UART's IRQ 4 routed edge-triggered to vector 0x44.
 *  5. 8259: remapped to 0x20/0x28, the same UART interrupt through the
 *     virtual wire (LINT0 ExtINT) with the IOAPIC pin masked.
 *  6. PIT channel 0 in mode 2 at 1 kHz on IRQ 0 (vector 0x20).
 *  7. Level-triggered pins: the UART's IRQ 4 as a level IOAPIC pin and as a
 *     level 8259 input (ELCR). The handler EOIs once *before* quieting the
 *     UART: the still-asserted line must be delivered again (Remote IRR /
 *     IRR semantics), and only once more after the UART is acknowledged.
 * Handlers count what arrives; the kernel checks counts and vectors. */
#include "../lib/kernel.h"

#define LAPIC 0xFEE00000UL
#define IOAPIC 0xFEC00000UL

static inline u32 apic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static void ioapic_write(u32 reg, u32 v) {
    *(volatile u32 *)IOAPIC = reg;
    *(volatile u32 *)(IOAPIC + 0x10) = v;
}
static u32 ioapic_read(u32 reg) {
    *(volatile u32 *)IOAPIC = reg;
    return *(volatile u32 *)(IOAPIC + 0x10);
}
static u32 pci_read(int slot, int reg) {
    outl(0xCF8, 0x80000000u | (slot << 11) | reg);
    return inl(0xCFC);
}

static volatile int hits[256];
static volatile int last_vector;

static void count(struct frame *f) {
    hits[f->vector & 0xFF]++;
    last_vector = (int)f->vector;
    if (f->vector >= 0x40 && f->vector < 0x50)
        apic_write(0xB0, 0);                               /* LAPIC EOI */
}

static void uart_irq(struct frame *f) {
    hits[f->vector & 0xFF]++;
    last_vector = (int)f->vector;
    (void)inb(0x3FA);                                      /* IIR read acknowledges THRE */
    outb(0x3F9, 0);                                        /* IER = 0: no more UART interrupts */
    if (f->vector >= 0x20 && f->vector < 0x30)
        outb(0x20, 0x20);                                  /* 8259 non-specific EOI */
    else
        apic_write(0xB0, 0);
}

static void wait_for(volatile int *counter, int n) {
    for (int spins = 0; *counter < n && spins < 1000; spins++)
        __asm__ volatile("sti; hlt; cli");
}

static void test_pci(void) {
    int found = -1;
    for (int slot = 0; slot < 32; slot++)
        if (pci_read(slot, 0) == 0x00015853) found = slot;
    check(found == 2, "xen-platform device at 00:%02x.0", found);
    u32 class = pci_read(found, 8) >> 8, bar0 = pci_read(found, 0x10), bar1 = pci_read(found, 0x14);
    u32 pin = (pci_read(found, 0x3C) >> 8) & 0xFF;
    printf("xen-platform: class %#x BAR0 %#x BAR1 %#x pin INT%c\n", class, bar0, bar1, 'A' + pin - 1);
    check(class == 0xFF8000 && (bar0 & 1) && !(bar1 & 1) && pin == 1, "its class, BARs and INTA");
    outl(0xCF8, 0x80000000u | (found << 11) | 0x14);
    outl(0xCFC, 0xFFFFFFFF);
    u32 size = ~(inl(0xCFC) & ~0xFu) + 1;
    outl(0xCFC, bar1);
    check(size == 16u << 20, "BAR1 sizes to %u MiB", size >> 20);
    check(inw(0x10) == 0x49D2, "unplug magic %#x at port 0x10", inw(0x10));
}

static void test_lapic(void) {
    check((apic_read(0x30) & 0xFF) == 0x14, "LAPIC version %#x", apic_read(0x30));
    apic_write(0xF0, 0x1FF);                               /* software enable, spurious 0xFF */
    apic_write(0x310, 0);
    apic_write(0x300, 0x40000 | 0x40);                     /* self-IPI, fixed, vector 0x40 */
    wait_for(&hits[0x40], 1);
    check(hits[0x40] == 1, "self-IPI arrived on vector 0x40");
    check(apic_read(0x100 + 0x40) == 0, "ISR clear after EOI");
}

static void test_timer(void) {
    apic_write(0x3E0, 0xB);                                /* divide by 1 */
    apic_write(0x320, 0x41);                               /* one-shot, vector 0x41 */
    apic_write(0x380, 200000);                             /* 200 us at 1 GHz */
    wait_for(&hits[0x41], 1);
    check(hits[0x41] == 1 && apic_read(0x390) == 0, "one-shot timer fired once, count 0");
    apic_write(0x320, 0x20042);                            /* periodic, vector 0x42 */
    apic_write(0x380, 1000000);                            /* 1 kHz */
    wait_for(&hits[0x42], 5);
    apic_write(0x320, 0x10000);                            /* mask, stop */
    apic_write(0x380, 0);
    check(hits[0x42] >= 5, "periodic timer ticked %d times", hits[0x42]);
}

static void uart_kick(void) {
    outb(0x3FC, 0x08);                                     /* MCR: OUT2 lets IRQ 4 out */
    outb(0x3F9, 0x02);                                     /* IER: THR empty -> interrupt now */
}

static void test_ioapic(void) {
    u32 last = (ioapic_read(1) >> 16) & 0xFF;               /* Xen's vIOAPIC: 48 pins; a PC's: 24 */
    check(last == 47 || last == 23, "IOAPIC with %u pins (version %#x)", last + 1, ioapic_read(1));
    ioapic_write(0x10 + 2 * 4 + 1, 0);                     /* destination APIC 0 */
    ioapic_write(0x10 + 2 * 4, 0x44);                      /* edge, fixed, vector 0x44, unmasked */
    uart_kick();
    wait_for(&hits[0x44], 1);
    check(hits[0x44] == 1, "UART IRQ 4 through the IOAPIC on vector 0x44");
    ioapic_write(0x10 + 2 * 4, 0x10000);                   /* mask the pin again */
}

static void test_pic(void) {
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
    outb(0x20, 0x11); outb(0x21, 0x20); outb(0x21, 0x04); outb(0x21, 0x01);
    outb(0xA0, 0x11); outb(0xA1, 0x28); outb(0xA1, 0x02); outb(0xA1, 0x01);
    outb(0x21, ~(1 << 4) & 0xFF);                          /* only IRQ 4 */
    outb(0xA1, 0xFF);
    uart_kick();
    wait_for(&hits[0x24], 1);
    check(hits[0x24] == 1, "UART IRQ 4 through the 8259 (virtual wire) on vector 0x24");
    outb(0x20, 0x0B);
    check(inb(0x20) == 0, "8259 ISR clear after EOI");
}

static void pit_tick(struct frame *f) {
    hits[f->vector & 0xFF]++;
    outb(0x20, 0x20);
}

static void test_pit(void) {
    set_handler(0x20, pit_tick);
    outb(0x21, 0xFE);                                      /* only IRQ 0 */
    outb(0x43, 0x34);                                      /* counter 0, lo/hi, mode 2 */
    outb(0x40, 1193 & 0xFF);                               /* 1193182 / 1193 = 1 kHz */
    outb(0x40, 1193 >> 8);
    wait_for(&hits[0x20], 3);
    outb(0x43, 0x30);                                      /* mode 0, no count: stop */
    outb(0x21, 0xFF);
    check(hits[0x20] >= 3, "PIT ticked %d times on IRQ 0 (vector 0x20)", hits[0x20]);
    outb(0x43, 0x00);                                      /* latch counter 0 */
    u8 lo = inb(0x40), hi = inb(0x40);
    printf("PIT counter 0 latched at %u\n", lo | hi << 8);
}

static volatile int level_calls;

static void uart_level(struct frame *f) {
    hits[f->vector & 0xFF]++;
    int apic = f->vector >= 0x40;
    if (level_calls++ == 0) {                              /* EOI first: the line stays high */
        if (apic) apic_write(0xB0, 0); else outb(0x20, 0x20);
        return;
    }
    (void)inb(0x3FA);
    outb(0x3F9, 0);
    if (apic) apic_write(0xB0, 0); else outb(0x20, 0x20);
}

static void test_level(void) {
    set_handler(0x45, uart_level);
    level_calls = 0;
    ioapic_write(0x10 + 2 * 4, 0x8000 | 0x45);             /* level, vector 0x45 */
    uart_kick();
    wait_for(&hits[0x45], 2);
    for (int i = 0; i < 3; i++) __asm__ volatile("sti; nop; cli");
    ioapic_write(0x10 + 2 * 4, 0x10000);
    check(hits[0x45] == 2, "level IOAPIC pin redelivered once while still high (%d calls)", hits[0x45]);
    check(!(ioapic_read(0x10 + 2 * 4) & (1 << 14)), "Remote IRR clear at the end");

    set_handler(0x24, uart_level);
    level_calls = 0;
    hits[0x24] = 0;
    outb(0x4D0, 1 << 4);                                   /* ELCR: IRQ 4 level-triggered */
    outb(0x21, ~(1 << 4) & 0xFF);
    uart_kick();
    wait_for(&hits[0x24], 2);
    for (int i = 0; i < 3; i++) __asm__ volatile("sti; nop; cli");
    outb(0x21, 0xFF);
    check(hits[0x24] == 2, "level 8259 input redelivered once while still high (%d calls)", hits[0x24]);
}

void kmain(void) {
    printf("irq%d: interrupt controllers\n", (int)sizeof(ulong) * 8);
    for (int v = 0x20; v < 0x50; v++)
        set_handler(v, count);
    set_handler(0x44, uart_irq);
    set_handler(0x24, uart_irq);
    set_handler(0xFF, count);
    /* A reset 8259 has IMR 0 and vector base 0, and LINT0 takes its output
     * (ExtINT): mask it, as Linux does, until test_pic programs it. */
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
    test_pci();
    test_lapic();
    test_timer();
    test_ioapic();
    test_pic();
    test_pit();
    test_level();
    check(hits[0xFF] == 0 && hits[0x27] == 0, "no spurious interrupts");
}
