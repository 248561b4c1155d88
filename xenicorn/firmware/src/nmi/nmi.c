/* nmi32 / nmi64: NMI blocking, as the SDM gives it (vol. 3 §6.7.1).
 *
 * After the CPU delivers an NMI it blocks further NMIs until the next IRET.
 * An NMI that arrives meanwhile is not lost: it is held, and taken at the
 * instruction boundary right after that IRET. An IRET that faults ends the
 * blocking too, before the fault's handler runs. Each NMI here is a
 * self-NMI through the local APIC's ICR (delivery mode NMI, shorthand self).
 *
 *  1. An NMI outside any handler is taken at once.
 *  2. A self-NMI sent inside the NMI handler is held while the handler runs
 *     and taken right after the handler's IRET: its frame IP is the
 *     interrupted instruction the first NMI's frame named.
 *  3. Inside the handler, an IRET to the next instruction (what
 *     kvm-unit-tests' eventinj does) ends the blocking: the held NMI's frame
 *     IP is that IRET's target.
 *  4. Inside the handler, an IRET that faults (#GP: a null CS in its frame)
 *     ends the blocking as well: the held NMI is taken before the #GP
 *     handler's first instruction. (QEMU's TCG clears its NMI mask only
 *     when an IRET succeeds, so under QEMU this one check fails.)
 *  5. Three self-NMIs inside the handler are one held NMI: a CPU latches
 *     one pending NMI, not a count.
 */
#include "../lib/kernel.h"

#define LAPIC 0xFEE00000UL
#define ICR_SELF_NMI (0x40000 | 0x400)              /* shorthand self, delivery mode NMI */

static inline u32 apic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }

static volatile int nmis;                            /* NMIs taken */
static volatile ulong nmi_ip[8];                     /* the frame IP of each */
static volatile int mode;                            /* what the handler does (the test's step) */
static volatile int nmis_inside;                     /* NMIs seen while the handler still ran */
static volatile ulong iret_target;                   /* step 3: where the inner IRET went */
static volatile int nmis_at_gp = -1;                 /* step 4: NMIs taken when the #GP handler ran */
static volatile ulong gp_ip, gp_error;

extern char iret_fault_ip[], iret_fault_recover[];

static void self_nmi(void) { apic_write(0x310, 0); apic_write(0x300, ICR_SELF_NMI); }

/* Time for a pending NMI to be taken: port 0x80 reads exit to the platform. */
static void settle(void) { for (int i = 0; i < 50; i++) (void)inb(0x80); }

/* IRET to the next instruction, on the same stack, at the same privilege; returns that address. */
static __attribute__((noinline)) ulong iret_to_next(void) {
    ulong target;
#ifdef __x86_64__
    __asm__ volatile("lea 1f(%%rip), %0\n\t"
                     "mov %%rsp, %%rdx\n\t"
                     "mov %%ss, %%ecx\n\t"
                     "push %%rcx\n\t"
                     "push %%rdx\n\t"
                     "pushfq\n\t"
                     "mov %%cs, %%ecx\n\t"
                     "push %%rcx\n\t"
                     "push %0\n\t"
                     "iretq\n"
                     "1:"
                     : "=&r"(target) :: "rcx", "rdx", "memory");
#else
    __asm__ volatile("mov $1f, %0\n\t"
                     "pushfl\n\t"
                     "mov %%cs, %%ecx\n\t"
                     "push %%ecx\n\t"
                     "push %0\n\t"
                     "iretl\n"
                     "1:"
                     : "=&r"(target) :: "ecx", "memory");
#endif
    return target;
}

/* An IRET whose frame names CS 0: #GP(0) at the IRET. The #GP handler resumes at
 * iret_fault_recover, with the stack as the IRET found it (the frame still on it). */
static __attribute__((noinline)) void faulting_iret(void) {
#ifdef __x86_64__
    __asm__ volatile("mov %%rsp, %%rdx\n\t"
                     "push $0\n\t"                    /* SS */
                     "push %%rdx\n\t"                 /* RSP */
                     "pushfq\n\t"
                     "push $0\n\t"                    /* CS: null */
                     "lea iret_fault_recover(%%rip), %%rdx\n\t"
                     "push %%rdx\n\t"
                     ".globl iret_fault_ip\n"
                     "iret_fault_ip: iretq\n"
                     ".globl iret_fault_recover\n"
                     "iret_fault_recover: add $40, %%rsp"
                     ::: "rdx", "memory");
#else
    __asm__ volatile("pushfl\n\t"
                     "push $0\n\t"                    /* CS: null */
                     "push $iret_fault_recover\n\t"
                     ".globl iret_fault_ip\n"
                     "iret_fault_ip: iretl\n"
                     ".globl iret_fault_recover\n"
                     "iret_fault_recover: add $12, %%esp"
                     ::: "memory");
#endif
}

static void nmi_handler(struct frame *f) {
    int n = nmis++;
    if (n < 8) nmi_ip[n] = f->ip;
    if (n != 0 || mode == 0)
        return;                                      /* the held NMI, or step 1 */
    self_nmi();                                      /* NMIs are blocked: this one waits */
    if (mode == 4) { self_nmi(); self_nmi(); }       /* ... and these add nothing to it */
    settle();
    nmis_inside = nmis - 1;
    if (mode == 2)
        iret_target = iret_to_next();                /* the held NMI is taken right here */
    else if (mode == 3)
        faulting_iret();                             /* ... or before the #GP handler runs */
}

static void gp_handler(struct frame *f) {
    gp_ip = f->ip;
    gp_error = f->error;
    nmis_at_gp = nmis;
    if (f->ip == (ulong)iret_fault_ip)
        f->ip = (ulong)iret_fault_recover;
}

/* One step: send an NMI from the main flow with the handler in `m`; the NMI frame IP it hit. */
static void start(int m) {
    mode = m;
    nmis = 0;
    nmis_inside = -1;
    for (int i = 0; i < 8; i++) nmi_ip[i] = 0;
    self_nmi();
    settle();
}

void kmain(void) {
    set_handler(2, nmi_handler);
    set_handler(13, gp_handler);
    apic_write(0xF0, 0x1FF);                         /* software enable, spurious 0xFF */

    start(0);
    check(nmis == 1, "a self-NMI outside a handler is taken (%d NMIs)", nmis);

    start(1);
    check(nmis_inside == 0, "a self-NMI inside the NMI handler waits (%d taken inside)", nmis_inside);
    check(nmis == 2, "... and is taken after the handler's IRET (%d NMIs)", nmis);
    check(nmi_ip[1] == nmi_ip[0], "... at the instruction the first NMI interrupted (%#lx, first %#lx)",
          nmi_ip[1], nmi_ip[0]);

    start(2);
    check(nmis_inside == 0, "inside the handler, the self-NMI waits (%d taken inside)", nmis_inside);
    check(nmis == 2 && nmi_ip[1] == iret_target,
          "an IRET inside the handler ends the blocking: the held NMI is taken at its target "
          "(%d NMIs, IP %#lx, target %#lx)", nmis, nmi_ip[1], iret_target);

    start(3);
    check(nmis_inside == 0, "the self-NMI waits before the faulting IRET (%d taken inside)", nmis_inside);
    check(gp_ip == (ulong)iret_fault_ip && gp_error == 0, "the IRET to CS 0 raises #GP(0) at the IRET "
          "(IP %#lx, error %#lx)", gp_ip, gp_error);
    check(nmis_at_gp == 2, "a faulting IRET ends the blocking too: the held NMI is taken before the "
          "#GP handler runs (%d NMIs when it ran)", nmis_at_gp);
    check(nmis == 2, "no NMI is lost or repeated (%d NMIs)", nmis);

    start(4);
    check(nmis_inside == 0 && nmis == 2, "three self-NMIs while blocked are one held NMI (%d NMIs, %d inside)",
          nmis, nmis_inside);
    test_result();
}
