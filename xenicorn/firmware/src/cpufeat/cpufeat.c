/* cpufeat32 / cpufeat64: the CPU model's features, seen from inside.
 *
 * For each feature the kernel asks CPUID, then checks that an offered
 * feature works as the SDM says and that an unoffered one is refused: its
 * CR4 bit is #GP(0) and its instructions #UD (SDM vol. 3 §2.5, §4.6,
 * vol. 2 instruction pages).
 *   SMEP: a supervisor fetch from a user page is #PF, error 0x11 (P, I/D).
 *   SMAP: a supervisor read/write of a user page with EFLAGS.AC=0 is #PF
 *         (0x1 / 0x3); STAC lets it through, CLAC closes it again.
 *   PKU (64-bit): with CR4.PKE, CPUID reports OSPKE; a key whose access-
 *         disable bit PKRU has set makes the read #PF with PK (0x21).
 *   RDTSCP: ECX = IA32_TSC_AUX.
 *   XSAVE: CR4.OSXSAVE sets CPUID's OSXSAVE; XCR0 starts at 1; XSETBV takes
 *         x87|SSE (and PKRU with PKU), #GP for a component leaf 0xD does
 *         not list (AVX here), for x87 clear, for XCR1; leaf 0xD's size
 *         follows XCR0; XSAVE stores MXCSR (0x1F80 after reset) and XSAVEOPT runs.
 *   CLFLUSHOPT, CLWB: run. FSGSBASE (64-bit): WRFSBASE/RDFSBASE round-trip.
 * Each line says "offered" or "not offered" so the test sees which model ran. */
#include "../lib/kernel.h"

#define USER_VA 0x1000000UL                  /* 16 MiB: the one user page region */
#define CR4_PSE (1UL << 4)
#define CR4_FSGSBASE (1UL << 16)
#define CR4_OSXSAVE (1UL << 18)
#define CR4_SMEP (1UL << 20)
#define CR4_SMAP (1UL << 21)
#define CR4_PKE (1UL << 22)

volatile ulong recover;                      /* where a probed fault resumes (0: unexpected) */
static volatile ulong f_vec, f_err, f_cr2;
static volatile int faults;

static void on_fault(struct frame *f) {
    f_vec = f->vector;
    f_err = f->error;
    f_cr2 = f->vector == 14 ? read_cr2() : 0;
    faults++;
    if (!recover) {
        printf("unexpected vector %lu err %#lx at %#lx\n", f->vector, f->error, f->ip);
        check(0, "no unexpected fault");
        test_result();
    }
    f->ip = recover;
    recover = 0;
}

/* ARM sets `recover` to the label 1 that follows the probed instruction. */
#ifdef __x86_64__
#define ARM "lea 1f(%%rip), %%r11\n\tmov %%r11, recover(%%rip)\n\t"
#define ARMED "r11", "memory"
#else
#define ARM "movl $1f, recover\n\t"
#define ARMED "memory"
#endif

static void reset(void) { faults = 0; f_vec = f_err = f_cr2 = 0; recover = 0; }

static void expect_fault(const char *what, ulong vec, ulong err) {
    check(faults == 1 && f_vec == vec && f_err == err, "%s: vector %lu error %#lx (got %d faults, vector %lu "
          "error %#lx)", what, vec, err, faults, f_vec, f_err);
}

static void expect_none(const char *what) {
    check(faults == 0, "%s: no fault (got %d, vector %lu error %#lx)", what, faults, f_vec, f_err);
}

static void cr4_write(ulong v) {
    reset();
    __asm__ volatile(ARM "mov %0, %%cr4\n1:" :: "r"(v) : ARMED);
}

static int cr4_set(const char *name, ulong bit, int offered) {
    ulong before = read_cr4();
    char what[64];
    cr4_write(before | bit);
    snprintf(what, sizeof(what), "CR4.%s set", name);
    if (offered)
        expect_none(what);
    else
        check(faults == 1 && f_vec == 13 && f_err == 0 && read_cr4() == before,
              "%s refused: #GP(0), CR4 unchanged (faults %d vector %lu CR4 %#lx)", what, faults, f_vec, read_cr4());
    return offered;
}

static void cr4_clear(ulong bit) { write_cr4(read_cr4() & ~bit); }

static u32 leaf1_ecx(void) { u32 a, b, c, d; cpuid(1, 0, &a, &b, &c, &d); return c; }
static u32 leaf7_ecx(void) { u32 a, b, c, d; cpuid(7, 0, &a, &b, &c, &d); return c; }

/* -- paging: everything supervisor but the user region at USER_VA ----------- */
#ifdef __x86_64__
extern u64 pd[2048];                         /* start64.S: 2 MiB pages, all user */
static volatile u64 *user_pde = &pd[USER_VA >> 21];

static void paging_init(void) {
    for (int i = 0; i < 2048; i++)
        if (i != (int)(USER_VA >> 21))
            pd[i] &= ~4ULL;
    write_cr3(read_cr3());
}
#else
static u32 pd32[1024] __attribute__((aligned(4096)));
static volatile u32 *user_pde = &pd32[USER_VA >> 22];

static void paging_init(void) {
    for (u32 i = 0; i < 1024; i++)
        pd32[i] = (i << 22) | 0x83;          /* 4 MiB, present, writable, supervisor */
    pd32[USER_VA >> 22] |= 4;
    write_cr4(read_cr4() | CR4_PSE);
    write_cr3((ulong)pd32);
    write_cr0(read_cr0() | 0x80010000UL);    /* PG | WP */
}
#endif

/* -- the probes ---------------------------------------------------------------- */
static ulong user_read(void) {
    ulong v = 0;
    reset();
    __asm__ volatile(ARM "mov (%1), %0\n1:" : "+r"(v) : "r"(USER_VA) : ARMED);
    return v;
}

static void user_write(ulong v) {
    reset();
    __asm__ volatile(ARM "mov %0, (%1)\n1:" :: "r"(v), "r"(USER_VA) : ARMED);
}

static void user_fetch(void) {
    reset();
    __asm__ volatile(ARM "jmp *%0\n1:" :: "r"(USER_VA) : ARMED);
}

static void smep(int offered) {
    *(volatile u16 *)USER_VA = 0x0B0F;                   /* ud2, in case the fetch were allowed */
    if (!cr4_set("SMEP", CR4_SMEP, offered))
        return;
    user_fetch();
    expect_fault("SMEP: supervisor fetch from a user page is #PF", 14, 0x11);
    check(f_cr2 == USER_VA, "SMEP: CR2 = %#lx (got %#lx)", USER_VA, f_cr2);
    cr4_clear(CR4_SMEP);
}

static void smap(int offered) {
    reset();
    __asm__ volatile(ARM "stac\n1:" ::: ARMED);
    if (!offered) {
        expect_fault("STAC without SMAP is #UD", 6, 0);
        cr4_set("SMAP", CR4_SMAP, 0);
        return;
    }
    expect_none("STAC");
    __asm__ volatile("clac" ::: "memory");
    *(volatile ulong *)USER_VA = 0x5a5a5a5aUL;
    cr4_set("SMAP", CR4_SMAP, 1);
    user_read();
    expect_fault("SMAP: supervisor read of a user page with AC=0 is #PF", 14, 0x1);
    check(f_cr2 == USER_VA, "SMAP: CR2 = %#lx (got %#lx)", USER_VA, f_cr2);
    user_write(1);
    expect_fault("SMAP: supervisor write of a user page with AC=0 is #PF", 14, 0x3);
    __asm__ volatile("stac" ::: "memory");
    ulong v = user_read();
    expect_none("SMAP: the read after STAC");
    check(v == 0x5a5a5a5aUL && (read_flags() & (1UL << 18)), "STAC set AC, the read gave %#lx", v);
    __asm__ volatile("clac" ::: "memory");
    check(!(read_flags() & (1UL << 18)), "CLAC cleared AC");
    user_read();
    expect_fault("SMAP: after CLAC the read faults again", 14, 0x1);
    cr4_clear(CR4_SMAP);
}

static u32 rdpkru_probe(void) {
    u32 eax = 0, edx = 0;
    reset();
    __asm__ volatile(ARM "rdpkru\n1:" : "+a"(eax), "+d"(edx) : "c"(0) : ARMED);
    return eax;
}

static void wrpkru(u32 v) { __asm__ volatile("wrpkru" :: "a"(v), "c"(0), "d"(0) : "memory"); }

static void pku(int offered) {
    rdpkru_probe();
    expect_fault("RDPKRU with CR4.PKE clear is #UD", 6, 0);
    check(!(leaf7_ecx() & 16), "CPUID OSPKE clear while CR4.PKE is clear");
    if (!cr4_set("PKE", CR4_PKE, offered))
        return;
    check(leaf7_ecx() & 16, "CPUID OSPKE set with CR4.PKE");
    wrpkru(1 << 2);                                          /* key 1: access disable */
    check(rdpkru_probe() == 4, "RDPKRU returns what WRPKRU wrote");
#ifdef __x86_64__
    *user_pde |= 1ULL << 59;                                 /* the user region gets key 1 */
    write_cr3(read_cr3());
    user_read();
    expect_fault("PKU: read of a page whose key is access-disabled is #PF with PK", 14, 0x21);
    wrpkru(0);
    user_read();
    expect_none("PKU: the read once PKRU allows it");
    *user_pde &= ~(15ULL << 59);
    write_cr3(read_cr3());
#else
    (void)user_pde;
#endif
    wrpkru(0);
    cr4_clear(CR4_PKE);
    check(!(leaf7_ecx() & 16), "CPUID OSPKE clear again");
}

static void rdtscp(int offered) {
    u32 lo = 0, hi = 0, aux = 0;
    if (offered)
        wrmsr(0xC0000103, 0x1234);                            /* IA32_TSC_AUX */
    reset();
    __asm__ volatile(ARM "rdtscp\n1:" : "+a"(lo), "+d"(hi), "+c"(aux) :: ARMED);
    if (!offered) {
        expect_fault("RDTSCP not offered is #UD", 6, 0);
        return;
    }
    expect_none("RDTSCP");
    check(aux == 0x1234 && (lo | hi), "RDTSCP: ECX = TSC_AUX 0x1234 (got %#x), TSC %#x%08x", aux, hi, lo);
}

static u64 xgetbv_probe(u32 index) {
    u32 lo = 0, hi = 0;
    reset();
    __asm__ volatile(ARM "xgetbv\n1:" : "+a"(lo), "+d"(hi) : "c"(index) : ARMED);
    return ((u64)hi << 32) | lo;
}

static void xsetbv_probe(u32 index, u64 v) {
    reset();
    __asm__ volatile(ARM "xsetbv\n1:" :: "a"((u32)v), "d"((u32)(v >> 32)), "c"(index) : ARMED);
}

static u8 xsave_area[4096] __attribute__((aligned(64)));

static void xsave(int offered, int with_xsaveopt) {
    xgetbv_probe(0);
    expect_fault("XGETBV with CR4.OSXSAVE clear is #UD", 6, 0);
    check(!(leaf1_ecx() & (1U << 27)), "CPUID OSXSAVE clear while CR4.OSXSAVE is clear");
    if (!cr4_set("OSXSAVE", CR4_OSXSAVE, offered))
        return;
    check(leaf1_ecx() & (1U << 27), "CPUID OSXSAVE set with CR4.OSXSAVE");
    u32 a, b, c, d;
    cpuid(0xD, 0, &a, &b, &c, &d);
    u64 sup = ((u64)d << 32) | a;
    check((sup & 3) == 3, "leaf 0xD: x87 and SSE supported (XCR0 components %#llx)", sup);
    int absent = 2;                                          /* a component CPUID does not list */
    while (sup >> absent & 1)
        absent++;
    check(xgetbv_probe(0) == 1, "XCR0 is 1 after reset");
    xsetbv_probe(0, 3);
    expect_none("XSETBV x87|SSE");
    check(xgetbv_probe(0) == 3, "XGETBV reads XCR0 = 3");
    cpuid(0xD, 0, &a, &b, &c, &d);
    check(b == 576, "leaf 0xD EBX = 576 bytes for XCR0 x87|SSE (got %u)", b);
    xsetbv_probe(0, 3 | 1ULL << absent);
    expect_fault("XSETBV with a component CPUID does not list is #GP(0)", 13, 0);
    xsetbv_probe(0, 2);
    expect_fault("XSETBV with x87 clear is #GP(0)", 13, 0);
    xsetbv_probe(1, 1);
    expect_fault("XSETBV of XCR1 is #GP(0)", 13, 0);
    if (sup & (1 << 9)) {
        xsetbv_probe(0, 0x203);
        expect_none("XSETBV x87|SSE|PKRU");
        cpuid(0xD, 0, &a, &b, &c, &d);
        check(b == 0xA88 && c == 0xA88, "leaf 0xD: EBX = ECX = %#x with PKRU (got %#x, %#x)", 0xA88, b, c);
    }
    memset(xsave_area, 0, sizeof(xsave_area));
    reset();
    __asm__ volatile(ARM "xsave (%0)\n1:" :: "r"(xsave_area), "a"(3), "d"(0) : ARMED);
    expect_none("XSAVE");
    check(*(u32 *)(xsave_area + 24) == 0x1F80 && !(*(u64 *)(xsave_area + 512) & ~3ULL),
          "XSAVE stored MXCSR %#x (0x1f80 after reset), XSTATE_BV %#llx within x87|SSE",
          *(u32 *)(xsave_area + 24), *(u64 *)(xsave_area + 512));
    reset();
    __asm__ volatile(ARM "xsaveopt (%0)\n1:" :: "r"(xsave_area), "a"(3), "d"(0) : ARMED);
    if (with_xsaveopt)
        expect_none("XSAVEOPT");
    else
        expect_fault("XSAVEOPT not offered is #UD", 6, 0);
    xsetbv_probe(0, 1);
    cr4_clear(CR4_OSXSAVE);
}

static void flushes(int opt, int wb) {
    static volatile u64 line[8] __attribute__((aligned(64)));
    reset();
    __asm__ volatile(ARM "clflushopt (%0)\n1:" :: "r"(line) : ARMED);
    if (opt)
        expect_none("CLFLUSHOPT");
    else
        expect_fault("CLFLUSHOPT not offered is #UD", 6, 0);
    reset();
    __asm__ volatile(ARM "clwb (%0)\n1:" :: "r"(line) : ARMED);
    if (wb)
        expect_none("CLWB");
    else
        expect_fault("CLWB not offered is #UD", 6, 0);
}

static void fsgsbase(int offered) {
    if (!cr4_set("FSGSBASE", CR4_FSGSBASE, offered))
        return;
#ifdef __x86_64__
    ulong v = 0x123456789AUL, got = 0;
    __asm__ volatile("wrfsbase %1\n\trdfsbase %0" : "=r"(got) : "r"(v) : "memory");
    check(got == v, "WRFSBASE/RDFSBASE round-trip (%#lx)", got);
    __asm__ volatile("wrfsbase %0" :: "r"(0UL) : "memory");
#endif
    cr4_clear(CR4_FSGSBASE);
}

static int say(const char *name, int offered) {
    printf("%s: %s\n", name, offered ? "offered" : "not offered");
    return offered;
}

void kmain(void) {
    u32 a, b7, c7, d7, b, c, c1, d1, e1, x1 = 0;
    printf("cpufeat%d: the CPU model's features\n", (int)sizeof(ulong) * 8);
    cpuid(7, 0, &a, &b7, &c7, &d7);            /* xenicorn checks CR writes from the leaf-7 query on */
    cpuid(1, 0, &a, &b, &c1, &d1);
    cpuid(0x80000001, 0, &a, &b, &c, &e1);
    if (c1 & (1U << 26))
        cpuid(0xD, 1, &x1, &b, &c, &d1);
    for (int v = 6; v <= 14; v++)
        set_handler(v, on_fault);
    paging_init();
    smep(say("smep", b7 >> 7 & 1));
    smap(say("smap", b7 >> 20 & 1));
    pku(say("pku", c7 >> 3 & 1));
    rdtscp(say("rdtscp", e1 >> 27 & 1));
    int xs = say("xsave", c1 >> 26 & 1);
    xsave(xs, say("xsaveopt", x1 & 1));
    int opt = say("clflushopt", b7 >> 23 & 1);
    flushes(opt, say("clwb", b7 >> 24 & 1));
    fsgsbase(say("fsgsbase", b7 & 1));
    test_result();
}
