/* memseg32 / memseg64: segment faults come before page faults (SDM vol. 3 §5.3, §6.15).
 *
 * Every data access goes through a segment before paging: the offset is
 * checked against the segment's limit (and the selector must not be null)
 * before the linear address is translated. A failed check is #GP(0), or
 * #SS(0) when the segment is SS. In 64-bit mode there are no limits, but an
 * address that is not canonical is the same kind of fault: #SS(0) through
 * SS (an address formed from RSP or RBP, or a push/pop), #GP(0) otherwise;
 * FS/GS overrides add their base, other overrides are ignored.
 *
 * The tests run in user mode (as XTF's memop-seg does), each access aimed at
 * an address that would also page-fault, so a CPU that skipped the segment
 * check would report #PF instead:
 *
 * 32-bit: paging with 4 MiB pages; 0x70000000 and 0x90000000 not present,
 * 0xC0000000 supervisor-only, the rest user. DS, ES, FS, GS and SS hold a
 * DPL3 data segment with a 2 GiB limit (slot 9), as in XTF. Accesses past the
 * limit through DS, FS, SS (explicit, via EBP, ESP, and PUSH's implicit
 * store), a null GS and an expand-down ES (slot 8) are checked; an access
 * inside the limit to a page that is not present is a real #PF, with CR2. CR2
 * is set to a marker first: a segment fault must leave it alone.
 *
 * 64-bit: a non-canonical address (top bit set + 1 GiB) through RAX is
 * #GP(0); through RBP, RSP, a DS override on RBP, and PUSH it is #SS(0);
 * through an FS override on RBP, and FS base + offset overflowing into the
 * non-canonical hole, #GP(0). A canonical but unmapped (RBP) is a #PF.
 *
 * One case is printed, not checked: an offset past the limit that reaches a
 * mapped user page (0x80001000). The CPU faults (#GP(0)); xenicorn's CPU
 * engine raises nothing there, and checking every access to catch it would
 * cost every memory instruction (docs/conformance.md, memop-seg). */
#include "../lib/kernel.h"

#define NOT_FAULTED 0xFF
#define SEG2G_SEL 0x4B                 /* slot 9, RPL 3: base 0, limit 2 GiB - 1, DPL3 data */
#define DOWN_SEL  0x43                 /* slot 8, RPL 3: expand-down, limit 0x7FFFFFFF (32-bit only) */
#define CR2_MARK  0x5A5A5000UL
#define N 12

struct result { ulong vec, err, cr2; };
static volatile struct result res[N];
static volatile ulong seen_vec, seen_err, seen_cr2, resume_ip, resume_sp;

#ifdef __x86_64__
#define SET_RESUME "lea 1f(%%rip), %%rcx\n mov %%rcx, %[res]\n"
#define CLOBBERS "rax", "rbx", "rcx", "rdx", "memory"
#else
#define SET_RESUME "lea 1f, %%ecx\n mov %%ecx, %[res]\n"
#define CLOBBERS "eax", "ebx", "ecx", "edx", "memory"
#endif
/* One access in user mode; the fault handler resumes at the first label 1 after it, with the stack
 * it had (a test that borrows EBP/RBP puts it back at its own label 1, before TRY's). */
#define TRY(n, code) do { seen_vec = NOT_FAULTED; seen_err = 0; seen_cr2 = 0; resume_sp = read_sp(); \
        __asm__ volatile(SET_RESUME code "\n1:" : [res] "=m"(resume_ip) :: CLOBBERS); \
        resume_ip = 0; resume_sp = 0; \
        res[n].vec = seen_vec; res[n].err = seen_err; res[n].cr2 = seen_cr2; } while (0)

static void record(struct frame *f) {
    seen_vec = f->vector;
    seen_err = f->error;
    seen_cr2 = read_cr2();
    if (resume_ip) {
        f->ip = resume_ip;
        f->sp = resume_sp;               /* a test may have pointed the stack anywhere */
    }
}

static void expect(int n, ulong vec, ulong err, const char *what) {
    check(res[n].vec == vec && res[n].err == err, "%s: vec=%lu err=%#lx (expected %lu, %#lx)", what,
          res[n].vec, res[n].err, vec, err);
}

#ifndef __x86_64__
static u32 pd[1024] __attribute__((aligned(4096)));

static u64 desc(u32 base, u32 limit, u8 access, u8 flags) {
    return (limit & 0xFFFF) | ((u64)(base & 0xFFFFFF) << 16) | ((u64)access << 40) |
           ((u64)((limit >> 16) & 0xF) << 48) | ((u64)flags << 52) | ((u64)(base >> 24) << 56);
}

static void setup(void) {
    for (u32 i = 0; i < 1024; i++) {
        u32 a = i << 22;
        if (a == 0x70000000 || a >= 0x84000000)
            pd[i] = 0;                               /* not present */
        else
            pd[i] = a | 0x87;                        /* 4 MiB, user, writable, present */
    }
    pd[0xC0000000 >> 22] = 0xC0000000 | 0x83;        /* supervisor only */
    write_cr3((ulong)pd);
    write_cr4(read_cr4() | 0x10);                    /* PSE */
    write_cr0(read_cr0() | 0x80000000);
    struct { u16 limit; ulong base; } __attribute__((packed)) g;
    __asm__ volatile("sgdt %0" : "=m"(g));
    ((volatile u64 *)g.base)[9] = desc(0, 0x7FFFF, 0xF2, 0xC);      /* DPL3 RW data, 4 KiB units, B */
    ((volatile u64 *)g.base)[8] = desc(0, 0x7FFFF, 0xF6, 0xC);      /* DPL3 RW expand-down, B */
}

static void user_main(void) {
    __asm__ volatile("mov %0, %%ds; mov %0, %%es; mov %0, %%fs; mov %0, %%gs; mov %0, %%ss"
                     :: "r"((u16)SEG2G_SEL));
    TRY(0, "mov $0xC0000000, %%ebx\n movb (%%ebx), %%al");
    TRY(1, "mov $0x90000000, %%ebx\n movb %%al, %%fs:(%%ebx)");
    TRY(2, "mov %%ebp, %%edx\n mov $0xC0000000, %%ebp\n movb (%%ebp), %%al\n1: mov %%edx, %%ebp");
    TRY(3, "mov $0xC0000000, %%ebx\n movb %%ss:(%%ebx), %%al");
    TRY(4, "mov %%esp, %%edx\n mov $0xC0000000, %%esp\n movb (%%esp), %%al");
    TRY(5, "mov $0xC0000004, %%esp\n push %%eax");
    TRY(6, "mov $0x70000000, %%ebx\n movb (%%ebx), %%al");
    TRY(7, "xor %%eax, %%eax\n mov %%ax, %%gs\n mov $0x70000000, %%ebx\n movb %%gs:(%%ebx), %%al");
    __asm__ volatile("mov %0, %%gs; mov %1, %%es" :: "r"((u16)SEG2G_SEL), "r"((u16)DOWN_SEL));
    TRY(8, "mov $0x70000000, %%ebx\n movb %%es:(%%ebx), %%al");
    TRY(9, "mov $0x90000000, %%ebx\n movb %%es:(%%ebx), %%al");
    __asm__ volatile("mov %0, %%es" :: "r"((u16)SEG2G_SEL));
    TRY(10, "mov $0x80001000, %%ebx\n movb (%%ebx), %%al");
}

static void results(void) {
    expect(0, 13, 0, "DS past the 2 GiB limit, supervisor page: #GP(0), not #PF");
    check(res[0].cr2 == CR2_MARK, "CR2 untouched by the segment fault (%#lx)", res[0].cr2);
    expect(1, 13, 0, "FS write past the limit, page not present: #GP(0)");
    expect(2, 12, 0, "(%ebp) past SS's limit: #SS(0)");
    expect(3, 12, 0, "SS override past the limit: #SS(0)");
    expect(4, 12, 0, "(%esp) past SS's limit: #SS(0)");
    expect(5, 12, 0, "push with ESP past SS's limit: #SS(0)");
    expect(6, 14, 4, "inside the limit, page not present: #PF(user read)");
    check(res[6].cr2 == 0x70000000, "CR2 of the real #PF: %#lx", res[6].cr2);
    expect(7, 13, 0, "through a null GS: #GP(0)");
    check(res[7].cr2 == 0x70000000, "CR2 still the last #PF's (%#lx)", res[7].cr2);
    expect(8, 13, 0, "expand-down ES, offset inside its limit (invalid): #GP(0)");
    expect(9, 14, 4, "expand-down ES, offset above its limit (valid), not present: #PF");
    printf("past the limit onto a mapped user page: %s\n",
           res[10].vec == NOT_FAULTED ? "no fault (the engine does not check; hardware: #GP(0))" : "faulted");
}
#else
#define NONCANON "0x8000000040000000"
static void setup(void) {
    wrmsr(0xC0000100, 0x00007FFFFFFFF000ULL);        /* FS base: + 0x2000 is past the canonical top */
}

static void user_main(void) {
    TRY(0, "mov $" NONCANON ", %%rax\n movb (%%rax), %%al");
    TRY(1, "mov %%rbp, %%rdx\n mov $" NONCANON ", %%rbp\n movb (%%rbp), %%al\n1: mov %%rdx, %%rbp");
    TRY(2, "mov $" NONCANON ", %%rsp\n movb (%%rsp), %%al");
    TRY(3, "mov %%rbp, %%rdx\n mov $" NONCANON ", %%rbp\n movb %%ds:(%%rbp), %%al\n1: mov %%rdx, %%rbp");
    TRY(4, "mov %%rbp, %%rdx\n mov $" NONCANON ", %%rbp\n movb %%fs:(%%rbp), %%al\n1: mov %%rdx, %%rbp");
    TRY(5, "xor %%ebx, %%ebx\n movb %%fs:0x2000(%%rbx), %%al");
    TRY(6, "mov $0x8000000040000008, %%rsp\n push %%rax");
    TRY(7, "mov %%rbp, %%rdx\n mov $0x10000000000, %%rbp\n movb (%%rbp), %%al\n1: mov %%rdx, %%rbp");
}

static void results(void) {
    expect(0, 13, 0, "non-canonical (%rax): #GP(0)");
    expect(1, 12, 0, "non-canonical (%rbp): #SS(0)");
    expect(2, 12, 0, "non-canonical (%rsp): #SS(0)");
    expect(3, 12, 0, "non-canonical %ds:(%rbp), the override ignored: #SS(0)");
    expect(4, 13, 0, "non-canonical %fs:(%rbp): #GP(0)");
    expect(5, 13, 0, "FS base + offset past the canonical top: #GP(0)");
    expect(6, 12, 0, "push with a non-canonical RSP: #SS(0)");
    expect(7, 14, 4, "canonical but unmapped (%rbp): #PF(user read)");
    check(res[7].cr2 == 0x10000000000UL, "CR2 of the real #PF: %#lx", res[7].cr2);
    check(res[1].cr2 == CR2_MARK, "CR2 untouched by #SS (%#lx)", res[1].cr2);
}
#endif

void kmain(void) {
    printf("memseg%d: segment checks before paging\n", (int)sizeof(ulong) * 8);
    for (int v = 0; v < 32; v++)
        set_handler(v, record);
    setup();
    __asm__ volatile("mov %0, %%cr2" :: "r"(CR2_MARK));
    run_user(user_main);
    results();
    test_result();
}
