/* fep32 / fep64: Xen's forced emulation prefix (FEP), as XTF uses it.
 *
 * With `hvm_fep` (xenicorn: --hvm-fep), the five bytes `ud2; .ascii "xen"`
 * in front of an instruction make Xen emulate that instruction in its x86
 * emulator (xen/arch/x86/hvm/hvm.c, hvm_ud_intercept). Without it the ud2
 * is a plain #UD at the prefix. The kernel probes it the way XTF's
 * test_setup() does (FEP; mov $1, %al, with the #UD skipped), then:
 *
 *   - a register operation and a memory store and load through FEP;
 *   - a fault through FEP: loading a selector beyond the GDT is #GP(sel) with
 *     the saved IP at the instruction after the prefix (Xen advanced RIP past
 *     the prefix before emulating, and a faulting emulation commits nothing);
 *   - FEP followed by ud2: #UD at that ud2, not a second prefix;
 *   - 32-bit: an access past a data segment's limit and one through a null
 *     selector, natively and through FEP. The architecture says #GP(0) for
 *     both; the CPU engine skips these checks at native speed, the
 *     emulator makes them. The native outcome is printed, not checked here
 *     (hardware faults, the engine does not), FEP's is checked;
 *   - SSE 0.0/0.0 with MXCSR's exceptions unmasked: #XM through FEP, with
 *     MXCSR.IE set (the emulator runs it on the host FPU; the engine has no
 *     SIMD exceptions: natively the outcome is printed, not checked);
 *   - FEP from CPL3 (Xen allows it at any privilege: XTF's user-mode stubs
 *     use it), then back to CPL0 through a DPL3 gate;
 *   - 64-bit: a non-canonical address formed from %rbp is #SS(0) through FEP
 *     (from any other base register, #GP(0)); segment limits do not apply in
 *     64-bit mode, so the 4 KiB-limit segment does not fault through FEP.
 */
#include "../lib/kernel.h"

#define FEP "ud2; .ascii \"xen\"\n"
#define LIMIT_SEL 0x48           /* GDT slot 9, free in the library's GDT */
#define NOT_FAULTED 0xFF
/* Make the handler resume at the asm's local label 1 (the fault's IP is the instruction's). */
#ifdef __x86_64__
#define SET_RESUME "lea 1f(%%rip), %%rcx\n mov %%rcx, %[res]\n"
#else
#define SET_RESUME "lea 1f, %%ecx\n mov %%ecx, %[res]\n"
#endif

static volatile ulong seen_vec = NOT_FAULTED, seen_err, seen_ip;
static volatile ulong resume_ip;

static void record(struct frame *f) {
    seen_vec = f->vector;
    seen_err = f->error;
    seen_ip = f->ip;
    printf("frame vec=%lu err=%#lx ip=%#lx\n", f->vector, f->error, f->ip);
    if (resume_ip) {
        f->ip = resume_ip;
        resume_ip = 0;
    }
}

static void reset(void) { seen_vec = NOT_FAULTED; seen_err = 0; seen_ip = 0; }

extern char probe_insn[], probe_after[], gp_insn[], gp_after[], ud_insn[], ud_after[];

static int probe(void) {
    u8 has = 0;
    reset();
    resume_ip = (ulong)probe_after;
    __asm__ volatile(".globl probe_insn, probe_after\nprobe_insn: " FEP "mov $1, %0\nprobe_after:"
                     : "=q"(has) : "0"(has) : "memory");
    resume_ip = 0;
    if (!has)
        check(seen_vec == 6 && seen_ip == (ulong)probe_insn,
              "no FEP: #UD at the prefix (vec=%lu ip=%#lx, prefix at %#lx)", seen_vec, seen_ip, (ulong)probe_insn);
    return has;
}

static volatile u32 cell;

static void basic(void) {
    ulong r = 0x22;
    __asm__ volatile(FEP "add $0x11, %0" : "+r"(r));
    check(r == 0x33, "FEP register op: add $0x11 -> %#lx", r);
    cell = 0;
    __asm__ volatile(FEP "movl $0x12345678, %0" : "=m"(cell) :: "memory");
    u32 back = 0;
    __asm__ volatile(FEP "movl %1, %0" : "=r"(back) : "m"(cell) : "memory");
    check(cell == 0x12345678 && back == 0x12345678, "FEP memory store and load: %#x %#x", cell, back);
}

static void faults(void) {
    reset();
    resume_ip = (ulong)gp_after;
    __asm__ volatile("mov $0x1230, %%ax\n" FEP ".globl gp_insn, gp_after\ngp_insn: mov %%ax, %%ds\ngp_after:"
                     ::: "eax", "memory");
    __asm__ volatile("mov %0, %%ds" :: "r"((u16)KERNEL_DS));
    check(seen_vec == 13 && seen_err == 0x1230 && seen_ip == (ulong)gp_insn,
          "FEP fault: #GP(%#lx) at %#lx, the instruction after the prefix (%#lx)", seen_err, seen_ip,
          (ulong)gp_insn);
    reset();
    resume_ip = (ulong)ud_after;
    __asm__ volatile(FEP ".globl ud_insn, ud_after\nud_insn: ud2\nud_after:" ::: "memory");
    check(seen_vec == 6 && seen_ip == (ulong)ud_insn, "FEP; ud2: #UD at the ud2 (vec=%lu ip=%#lx)", seen_vec,
          seen_ip);
}

static void limit_segment(void) {
    struct { u16 limit; ulong base; } __attribute__((packed)) g;
    __asm__ volatile("sgdt %0" : "=m"(g));
    /* base 0, limit 0xFFF (bytes), present read/write data, D/B=1 */
    ((volatile u64 *)g.base)[LIMIT_SEL >> 3] = 0x0040920000000FFFULL;
    __asm__ volatile("mov %0, %%fs" :: "r"((u16)LIMIT_SEL));
}

/* Read fs:offset natively (fep = 0) or through FEP; returns the vector raised, NOT_FAULTED if none. */
static ulong fs_read(ulong offset, int fep) {
    reset();
    u32 v;
    if (fep)
        __asm__ volatile(SET_RESUME FEP "mov %%fs:(%[off]), %[v]\n1:"
                         : [v] "=r"(v), [res] "=m"(resume_ip) : [off] "r"(offset) : "ecx", "memory");
    else
        __asm__ volatile(SET_RESUME "mov %%fs:(%[off]), %[v]\n1:"
                         : [v] "=r"(v), [res] "=m"(resume_ip) : [off] "r"(offset) : "ecx", "memory");
    resume_ip = 0;
    return seen_vec;
}

static void segments32(void) {
#ifndef __x86_64__
    limit_segment();
    ulong inside = fs_read(0xFFC, 1);
    check(inside == NOT_FAULTED, "FEP read inside the limit: no fault (vec=%lu)", inside);
    ulong native = fs_read(0x2000, 0);
    printf("native read past the limit: %s\n", native == NOT_FAULTED ? "no fault" : "faulted");
    ulong emulated = fs_read(0x2000, 1);
    check(emulated == 13 && seen_err == 0, "FEP read past the limit: #GP(0) (vec=%lu err=%#lx)", emulated,
          seen_err);
    ulong straddle = fs_read(0xFFE, 1);
    check(straddle == 13, "FEP 4-byte read straddling the limit: #GP(0) (vec=%lu)", straddle);
    __asm__ volatile("mov %0, %%fs" :: "r"((u16)0));
    native = fs_read(0x100, 0);
    printf("native read through a null selector: %s\n", native == NOT_FAULTED ? "no fault" : "faulted");
    emulated = fs_read(0x100, 1);
    check(emulated == 13 && seen_err == 0, "FEP read through a null selector: #GP(0) (vec=%lu err=%#lx)",
          emulated, seen_err);
#endif
}

static void segments64(void) {
#ifdef __x86_64__
    limit_segment();
    ulong r = fs_read(0x2000, 1);
    check(r == NOT_FAULTED, "64-bit: no limit check through FEP (vec=%lu)", r);
    reset();
    __asm__ volatile("push %%rbp\n mov %[a], %%rbp\n" SET_RESUME FEP "mov (%%rbp), %%eax\n1: pop %%rbp"
                     : [res] "=m"(resume_ip) : [a] "r"(0x8000000040000000UL) : "rax", "rcx", "memory");
    resume_ip = 0;
    check(seen_vec == 12 && seen_err == 0, "FEP non-canonical (%%rbp): #SS(0) (vec=%lu err=%#lx)", seen_vec,
          seen_err);
    reset();
    __asm__ volatile(SET_RESUME FEP "mov (%[a]), %%eax\n1:"
                     : [res] "=m"(resume_ip) : [a] "r"(0x8000000040000000UL) : "rax", "rcx", "memory");
    resume_ip = 0;
    check(seen_vec == 13 && seen_err == 0, "FEP non-canonical (other base): #GP(0) (vec=%lu err=%#lx)",
          seen_vec, seen_err);
#endif
}

static ulong divss_zero(int fep, u32 *mxcsr) {
    u32 mx = 0;
    __asm__ volatile("ldmxcsr %0" :: "m"(mx));
    reset();
    if (fep)
        __asm__ volatile("xorps %%xmm0, %%xmm0\n" SET_RESUME FEP "divss %%xmm0, %%xmm0\n1:"
                         : [res] "=m"(resume_ip) :: "ecx", "memory");
    else
        __asm__ volatile("xorps %%xmm0, %%xmm0\n" SET_RESUME "divss %%xmm0, %%xmm0\n1:"
                         : [res] "=m"(resume_ip) :: "ecx", "memory");
    resume_ip = 0;
    __asm__ volatile("stmxcsr %0" : "=m"(mx));
    *mxcsr = mx;
    mx = 0x1F80;                                  /* all masked again, the reset value */
    __asm__ volatile("ldmxcsr %0" :: "m"(mx));
    return seen_vec;
}

static void simd(void) {
    write_cr4(read_cr4() | 0x600);                /* OSFXSR | OSXMMEXCPT */
    u32 mx;
    ulong v = divss_zero(0, &mx);
    printf("native divss 0/0 unmasked: %s, mxcsr=%#x\n", v == NOT_FAULTED ? "no fault" : "faulted", mx);
    v = divss_zero(1, &mx);
    check(v == 19 && (mx & 0x3F) == 1, "FEP divss 0/0 unmasked: #XM with IE (vec=%lu mxcsr=%#x)", v, mx);
}

/* ---- CPL3 -------------------------------------------------------------- */
static volatile ulong user_result, user_cs;

static void user_main(void) {
    ulong r = 5;
    __asm__ volatile(FEP "add %0, %0" : "+r"(r));
    user_result = r;
    user_cs = read_cs();
}

static void cpl3(void) {
    run_user(user_main);
    check(user_result == 10 && (user_cs & 3) == 3, "FEP at CPL3: add -> %lu (cs=%#lx)", user_result, user_cs);
}

void kmain(void) {
    printf("fep%d: the forced emulation prefix\n", (int)sizeof(ulong) * 8);
    for (int v = 0; v < 32; v++)
        set_handler(v, record);
    if (!probe()) {
        printf("FEP unavailable\n");
        test_result();
    }
    printf("FEP available\n");
    basic();
    faults();
    simd();
    segments32();
    segments64();
    cpl3();
    test_result();
}
