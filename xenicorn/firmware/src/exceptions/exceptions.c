/* exceptions32 / exceptions64: raise each exception and check the frame.
 *
 * For every case the handler prints one "frame" line with what the CPU
 * pushed, and the kernel checks it against the SDM (vol. 3 ch. 6):
 * faults save the address of the faulting instruction, traps and INT n the
 * next one; #GP/#PF carry error codes, #PF sets CR2; an event from CPL3
 * switches to the TSS stack and pushes the user SS:ESP; in 64-bit mode an
 * IST gate switches stacks even at the same privilege.
 * RFLAGS.RF in the saved image (1 for faults per SDM §17.3.1.1) is printed
 * but not checked here, so the kernel also passes on CPUs/emulators that
 * differ; xenicorn's test checks it from the printed lines. */
#include "../lib/kernel.h"

#define NOINLINE __attribute__((noinline, noclone))
#define RF (1UL << 16)
#define IF (1UL << 9)

static volatile struct frame seen;
static volatile int hits;
static volatile ulong resume_ip;
static volatile ulong handler_sp;
static volatile ulong seen_cr2;

extern char de_insn[], de_after[], ud_insn[], ud_after[], bp_after[], int40_after[];
extern char gp_insn[], gp_after[], nc_insn[], nc_after[], pf1_insn[], pf1_after[];
extern char pf2_insn[], pf2_after[], df_insn[], df_after[], ist_after[];
extern char u80_after[], uhlt_insn[], uhlt_after[], upf_insn[], upf_after[];

static void record(struct frame *f) {
    seen = *f;
    hits++;
    seen_cr2 = f->vector == 14 ? read_cr2() : 0;
    handler_sp = read_sp();
#ifdef __x86_64__
    int has_stack = 1;
#else
    int has_stack = (f->cs & 3) != 0;
#endif
    printf("frame vec=%lu err=%#lx ip=%#lx cs=%#lx flags=%#lx", f->vector, f->error, f->ip, f->cs, f->flags);
    if (has_stack)
        printf(" sp=%#lx ss=%#lx", f->sp, f->ss);
    if (f->vector == 14)
        printf(" cr2=%#lx", seen_cr2);
    printf("\n");
    if (resume_ip) {
        f->ip = resume_ip;
        resume_ip = 0;
    }
}

static int frame_is(const char *name, ulong vec, ulong err, void *ip, ulong cs) {
    int ok = hits == 1 && seen.vector == vec && seen.error == err && seen.ip == (ulong)ip && seen.cs == cs
             && (seen.flags & 2) && !(seen.flags & IF);
    check(ok, "%s: vec=%lu err=%#lx ip=%#lx cs=%#lx (expected vec=%lu err=%#lx ip=%#lx cs=%#lx)", name,
          seen.vector, seen.error, seen.ip, seen.cs, vec, err, (ulong)ip, cs);
    hits = 0;
    return ok;
}

static NOINLINE void test_de(void) {
    resume_ip = (ulong)de_after;
    __asm__ volatile(".globl de_insn, de_after\nde_insn: divl %%ecx\nde_after:"
                     :: "a"(5), "d"(0), "c"(0) : "memory");
    frame_is("#DE divide by zero", 0, 0, de_insn, KERNEL_CS);
}

static NOINLINE void test_ud(void) {
    resume_ip = (ulong)ud_after;
    __asm__ volatile(".globl ud_insn, ud_after\nud_insn: ud2\nud_after:" ::: "memory");
    frame_is("#UD ud2", 6, 0, ud_insn, KERNEL_CS);
}

static NOINLINE void test_bp(void) {
    __asm__ volatile("int3\n.globl bp_after\nbp_after:" ::: "memory");
    frame_is("#BP int3 (trap: next instruction)", 3, 0, bp_after, KERNEL_CS);
}

static NOINLINE void test_int(void) {
    __asm__ volatile("int $0x40\n.globl int40_after\nint40_after:" ::: "memory");
    frame_is("int 0x40 (software interrupt)", 0x40, 0, int40_after, KERNEL_CS);
}

static NOINLINE void test_gp_selector(void) {
    resume_ip = (ulong)gp_after;
    __asm__ volatile("mov $0x1230, %%ax\n.globl gp_insn, gp_after\ngp_insn: mov %%ax, %%ds\ngp_after:"
                     ::: "eax", "memory");
    frame_is("#GP loading selector 0x1230 beyond the GDT", 13, 0x1230, gp_insn, KERNEL_CS);
    __asm__ volatile("mov %0, %%ds" :: "r"((u16)KERNEL_DS));
}

static NOINLINE void test_gp_noncanonical(void) {
#ifdef __x86_64__
    resume_ip = (ulong)nc_after;
    __asm__ volatile(".globl nc_insn, nc_after\nnc_insn: movabs 0x8000000000000000, %%rax\nnc_after:"
                     ::: "rax", "memory");
    frame_is("#GP non-canonical address", 13, 0, nc_insn, KERNEL_CS);
#endif
}

#define NOT_PRESENT 0x40000010UL
#ifdef __x86_64__
#define READ_ONLY 0x40200010UL
#else
#define READ_ONLY 0x40400010UL
#endif

#ifndef __x86_64__
static u32 pgdir[1024] __attribute__((aligned(4096)));
#endif

/* Paging for the #PF cases: everything identity-mapped and user-accessible,
 * except one not-present region at 1 GiB and one read-only alias of 4 MiB
 * physical just after it. CR0.WP makes the read-only page fault for the
 * kernel too. */
static void paging_setup(void) {
#ifdef __x86_64__
    extern u64 pd[];
    pd[512] = 0;                                   /* 0x40000000: not present */
    pd[513] = 0x00400000 | 0x85;                   /* 0x40200000 -> 4 MiB, P|U|PS, read-only */
    write_cr3(read_cr3());
#else
    for (int i = 0; i < 1024; i++)
        pgdir[i] = (i << 22) | 0x87;               /* 4 MiB pages: P|RW|U|PS */
    pgdir[0x100] = 0;                              /* 0x40000000: not present */
    pgdir[0x101] = 0x00400000 | 0x85;              /* 0x40400000 -> 4 MiB, read-only */
    write_cr4(read_cr4() | 0x10);                  /* PSE */
    write_cr3((ulong)pgdir);
    write_cr0(read_cr0() | 0x80010000);            /* PG | WP */
#endif
}

static NOINLINE void test_pf(void) {
    paging_setup();
    resume_ip = (ulong)pf1_after;
    __asm__ volatile(".globl pf1_insn, pf1_after\npf1_insn: mov (%0), %%eax\npf1_after:"
                     :: "r"(NOT_PRESENT) : "eax", "memory");
    frame_is("#PF read of a not-present page", 14, 0, pf1_insn, KERNEL_CS);
    check(seen_cr2 == NOT_PRESENT, "#PF CR2=%#lx", seen_cr2);
    resume_ip = (ulong)pf2_after;
    __asm__ volatile(".globl pf2_insn, pf2_after\npf2_insn: movl $1, (%0)\npf2_after:"
                     :: "r"(READ_ONLY) : "memory");
    frame_is("#PF write to a read-only page (CR0.WP)", 14, 3, pf2_insn, KERNEL_CS);
    check(seen_cr2 == READ_ONLY, "#PF CR2=%#lx", seen_cr2);
}

static NOINLINE void test_ist(void) {
#ifdef __x86_64__
    set_gate(0x41, isr_entry(0x41), 0, 0, 1);
    __asm__ volatile("int $0x41\n.globl ist_after\nist_after:" ::: "memory");
    frame_is("int 0x41 through an IST gate", 0x41, 0, ist_after, KERNEL_CS);
    check(handler_sp >= ist_stack_bottom(1) && handler_sp < ist_stack_top(1),
          "IST handler ran on IST1 (sp=%#lx)", handler_sp);
#endif
}

static void df_handler(struct frame *f) {
    record(f);
    set_gate_present(13, 1);
    f->ip = (ulong)df_after;
}

static NOINLINE void test_df(void) {
    set_handler(8, df_handler);
#ifdef __x86_64__
    set_gate(8, isr_entry(8), 0, 0, 2);            /* #DF on its own IST stack, as Linux does */
#endif
    set_gate_present(13, 0);                       /* #GP -> gate not present -> #NP -> #DF */
    __asm__ volatile("mov $0x1230, %%ax\n.globl df_insn, df_after\ndf_insn: mov %%ax, %%ds\ndf_after:"
                     ::: "eax", "memory");
    check(hits == 1 && seen.vector == 8 && seen.error == 0, "#DF from #GP with a not-present #GP gate: "
          "vec=%lu err=%#lx", seen.vector, seen.error);
    hits = 0;
    __asm__ volatile("mov %0, %%ds" :: "r"((u16)KERNEL_DS));
#ifdef __x86_64__
    check(handler_sp >= ist_stack_bottom(2) && handler_sp < ist_stack_top(2),
          "#DF handler ran on IST2 (sp=%#lx)", handler_sp);
#endif
}

/* ---- CPL3 -------------------------------------------------------------- */
static void user_main(void) {
    __asm__ volatile("int $0x80\n.globl u80_after\nu80_after:" ::: "memory");
    __asm__ volatile(".globl uhlt_insn, uhlt_after\nuhlt_insn: hlt\nuhlt_after:" ::: "memory");
    __asm__ volatile(".globl upf_insn, upf_after\nupf_insn: mov (%0), %%eax\nupf_after:"
                     :: "r"(NOT_PRESENT) : "eax", "memory");
    __asm__ volatile("int $0x81" ::: "memory");            /* its frame printed too, then back */
    for (;;) ;
}

static void back_to_kernel(struct frame *f) {
    record(f);
    hits = 0;
    user_resume(f);                                        /* run_user returns, at CPL0 */
}

static volatile int user_step;
static volatile ulong user_frames_sp[3], user_frames_ss[3], user_handler_sp[3];
static volatile struct frame user_seen[3];

static void user_event(struct frame *f) {
    resume_ip = f->vector == 13 ? (ulong)uhlt_after : f->vector == 14 ? (ulong)upf_after : 0;
    record(f);
    hits = 0;
    int i = user_step++;
    if (i < 3) {
        user_seen[i] = seen;
        user_handler_sp[i] = handler_sp;
    }
}

static void user_checks(void) {
    /* 0: int 0x80 from CPL3 through a DPL3 gate */
    const volatile struct frame *a = &user_seen[0];
    check(a->vector == 0x80 && a->ip == (ulong)u80_after && a->cs == USER_CS && a->ss == USER_DS,
          "int 0x80 from CPL3: vec=%lu ip=%#lx cs=%#lx ss=%#lx", a->vector, a->ip, a->cs, a->ss);
    check(a->sp > user_stack_bottom() && a->sp <= user_stack_end(), "int 0x80 saved the user stack pointer %#lx",
          a->sp);
    check(user_handler_sp[0] >= kernel_stack_bottom() && user_handler_sp[0] < kernel_stack_end(),
          "int 0x80 handler ran on the TSS ring-0 stack (sp=%#lx)", user_handler_sp[0]);
    /* 1: hlt at CPL3 is privileged: #GP(0) */
    const volatile struct frame *b = &user_seen[1];
    check(b->vector == 13 && b->error == 0 && b->ip == (ulong)uhlt_insn && b->cs == USER_CS,
          "#GP from CPL3 (hlt): vec=%lu err=%#lx ip=%#lx cs=%#lx", b->vector, b->error, b->ip, b->cs);
    /* 2: a user read of a not-present page: #PF with U/S set */
    const volatile struct frame *c = &user_seen[2];
    check(c->vector == 14 && c->error == 4 && c->ip == (ulong)upf_insn && c->cs == USER_CS,
          "#PF from CPL3: vec=%lu err=%#lx ip=%#lx cs=%#lx", c->vector, c->error, c->ip, c->cs);
    check(read_cs() == KERNEL_CS, "back at CPL0 (CS=%#x)", read_cs());
    test_result();
}

void kmain(void) {
    printf("exceptions%d: checking exception frames\n", (int)sizeof(ulong) * 8);
    for (int v = 0; v < 256; v++)
        set_handler(v, record);
    test_de();
    test_ud();
    test_bp();
    test_int();
    test_gp_selector();
    test_gp_noncanonical();
    test_pf();
    test_ist();
    test_df();
    /* CPL3 round trip: user code raises events; handlers run at CPL0. */
    set_handler(0x80, user_event);
    set_handler(13, user_event);
    set_handler(14, user_event);
    set_handler(0x81, back_to_kernel);
    set_gate(0x80, isr_entry(0x80), 3, 0, 0);
    set_gate(0x81, isr_entry(0x81), 3, 0, 0);
    run_user(user_main);
    user_checks();
}
