/* Descriptor tables: a GDT with kernel and user segments and a TSS, an IDT
 * whose gates all lead to isr_stubs, and handler registration. */
#include "kernel.h"

struct hvm_start_info *start_info;
extern u8 isr_stubs[];

/* One TSS big enough for both layouts (32-bit: 104 bytes; 64-bit: 104). */
static u32 tss[26] __attribute__((aligned(16)));
static u8 kernel_stack[16384] __attribute__((aligned(16)));
static u8 ist_stacks[2][8192] __attribute__((aligned(16)));

static u64 gdt[10] __attribute__((aligned(16)));
#ifdef __x86_64__
static u64 idt[256 * 2] __attribute__((aligned(16)));
#else
static u64 idt[256] __attribute__((aligned(16)));
#endif
static handler_t handlers[256];

static u64 seg(u32 base, u32 limit, u32 access, u32 flags) {
    return (limit & 0xFFFF) | ((u64)(base & 0xFFFFFF) << 16) | ((u64)access << 40) |
           ((u64)((limit >> 16) & 0xF) << 48) | ((u64)flags << 52) | ((u64)(base >> 24) << 56);
}

struct __attribute__((packed)) dtr { u16 limit; ulong base; };

void set_kernel_stack(ulong sp) {
#ifdef __x86_64__
    tss[1] = (u32)sp; tss[2] = (u32)((u64)sp >> 32);        /* RSP0 at +4 */
#else
    tss[1] = sp; tss[2] = KERNEL_DS;                         /* ESP0 at +4, SS0 at +8 */
#endif
}

void set_ist(int n, ulong sp) {
#ifdef __x86_64__
    tss[9 + 2 * (n - 1)] = (u32)sp; tss[10 + 2 * (n - 1)] = (u32)((u64)sp >> 32);   /* IST1 at +0x24 */
#else
    (void)n; (void)sp;
#endif
}

void *isr_entry(int vector) { return isr_stubs + 16 * vector; }

void set_gate(int vector, void *entry, int dpl, int trap, int ist) {
    ulong off = (ulong)entry;
    u32 type = trap ? 0xF : 0xE;
    u64 lo = (off & 0xFFFF) | ((u64)KERNEL_CS << 16) | ((u64)(ist & 7) << 32) |
             ((u64)(0x80 | (dpl << 5) | type) << 40) | ((u64)((off >> 16) & 0xFFFF) << 48);
#ifdef __x86_64__
    idt[2 * vector] = lo;
    idt[2 * vector + 1] = (u64)off >> 32;
#else
    idt[vector] = lo;
#endif
}

void set_gate_present(int vector, int present) {
#ifdef __x86_64__
    u64 *g = &idt[2 * vector];
#else
    u64 *g = &idt[vector];
#endif
    if (present) *g |= 1ULL << 47; else *g &= ~(1ULL << 47);
}

void set_handler(int vector, handler_t h) { handlers[vector] = h; }

static const char *const names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "?", "#TS", "#NP", "#SS", "#GP",
    "#PF", "?", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void isr_dispatch(struct frame *f) {
    handler_t h = handlers[f->vector & 0xFF];
    if (h) { h(f); return; }
    printf("unexpected %s vector=%lu err=%#lx ip=%#lx cs=%#lx flags=%#lx cr2=%#lx\n",
           f->vector < 32 && names[f->vector] ? names[f->vector] : "interrupt",
           f->vector, f->error, f->ip, f->cs, f->flags, read_cr2());
    printf("Test result: ERROR\n");
    poweroff();
}

void desc_init(void) {
    gdt[0] = 0;
    gdt[1] = seg(0, 0xFFFFF, 0x9A, 0xC);          /* 0x08 kernel code32 */
    gdt[2] = seg(0, 0xFFFFF, 0x9A, 0xA);          /* 0x10 kernel code64 */
    gdt[3] = seg(0, 0xFFFFF, 0x92, 0xC);          /* 0x18 kernel data */
    gdt[4] = seg(0, 0xFFFFF, 0xFA, 0xC);          /* 0x20 user code32 */
    gdt[5] = seg(0, 0xFFFFF, 0xF2, 0xC);          /* 0x28 user data */
    gdt[6] = seg(0, 0xFFFFF, 0xFA, 0xA);          /* 0x30 user code64 */
    ulong t = (ulong)tss;
    gdt[7] = seg((u32)t, sizeof(tss) - 1, 0x89, 0x0);   /* 0x38 TSS, available */
#ifdef __x86_64__
    gdt[8] = (u64)t >> 32;
#endif
    set_kernel_stack((ulong)(kernel_stack + sizeof(kernel_stack)));
    set_ist(1, (ulong)(ist_stacks[0] + sizeof(ist_stacks[0])));
    set_ist(2, (ulong)(ist_stacks[1] + sizeof(ist_stacks[1])));
    struct dtr g = { sizeof(gdt) - 1, (ulong)gdt };
    __asm__ volatile("lgdt %0" :: "m"(g));
#ifdef __x86_64__
    __asm__ volatile("pushq $0x10; lea 1f(%%rip), %%rax; pushq %%rax; lretq; 1:" ::: "rax", "memory");
#else
    __asm__ volatile("ljmp $0x08, $1f; 1:" ::: "memory");
#endif
    __asm__ volatile("mov %0, %%ds; mov %0, %%es; mov %0, %%ss" :: "r"((u16)KERNEL_DS));
    __asm__ volatile("ltr %0" :: "r"((u16)TSS_SEL));
    for (int v = 0; v < 256; v++)
        set_gate(v, isr_entry(v), 0, 0, 0);
    struct dtr i = { sizeof(idt) - 1, (ulong)idt };
    __asm__ volatile("lidt %0" :: "m"(i));
}

ulong ist_stack_top(int n) { return (ulong)(ist_stacks[n - 1] + sizeof(ist_stacks[0])); }
ulong ist_stack_bottom(int n) { return (ulong)ist_stacks[n - 1]; }
ulong kernel_stack_bottom(void) { return (ulong)kernel_stack; }
ulong kernel_stack_end(void) { return (ulong)(kernel_stack + sizeof(kernel_stack)); }

/* Drop to CPL3 at fn with a user stack: an IRET frame to a DPL3 segment. */
void enter_user(void (*fn)(void), ulong user_sp) {
#ifdef __x86_64__
    __asm__ volatile("pushq %0; pushq %1; pushq $0x202; pushq %2; pushq %3; iretq"
                     :: "i"(USER_DS), "r"(user_sp), "i"(USER_CS), "r"((ulong)fn) : "memory");
#else
    __asm__ volatile("mov %0, %%ds; mov %0, %%es; pushl %0; pushl %1; pushl $0x202; pushl %2; pushl %3; iret"
                     :: "r"((u32)USER_DS), "r"(user_sp), "i"(USER_CS), "r"((ulong)fn) : "memory");
#endif
}

void lib_main(void) {
    /* No firmware ran before us: the 8259s are as reset left them (IMR 0,
     * vectors from 0 in QEMU), and the PIT may be ticking on IRQ 0. Mask
     * them, as Linux does early, so enabling interrupts (user mode runs
     * with IF=1) delivers nothing a kernel did not ask for. */
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    desc_init();
    kmain();
    test_result();
}
