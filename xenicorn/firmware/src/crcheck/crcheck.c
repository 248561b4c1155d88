/* crcheck32 / crcheck64: control-register writes the CPU must refuse.
 *
 * A MOV to CR0/CR4 that sets a reserved bit, a bit for a feature CPUID
 * does not report (VMX, SMEP, SMAP, PKE, PCID, XSAVE, FSGSBASE), or
 * an inconsistent combination (PG without PE, NW without CD, leaving long
 * mode from 64-bit code...) is #GP(0) with the saved IP at the MOV and the
 * register unchanged (SDM vol. 3 §2.5 and the MOV CR page). Writes that are
 * allowed must take effect, including LMSW (register and memory operand)
 * and CLTS. Each refused write prints one "gp" line with the frame. */
#include "../lib/kernel.h"

#define NOINLINE __attribute__((noinline, noclone))

static volatile struct frame seen;
static volatile int hits;

static void on_gp(struct frame *f) {
    seen = *f;
    hits++;
    printf("gp vec=%lu err=%#lx ip=%#lx\n", f->vector, f->error, f->ip);
    f->ip += 3;                                    /* every MOV CR here is 0F 22 /r: 3 bytes */
}

#ifdef __x86_64__
#define HERE(reg) "lea 1f(%%rip), %" reg "\n"
#else
#define HERE(reg) "mov $1f, %" reg "\n"
#endif

/* Each returns the address of its MOV (where a #GP must point). */
static NOINLINE ulong mov_cr0(ulong v) {
    ulong at;
    __asm__ volatile(HERE("0") "1: mov %1, %%cr0" : "=&r"(at) : "a"(v) : "memory");
    return at;
}

static NOINLINE ulong mov_cr4(ulong v) {
    ulong at;
    __asm__ volatile(HERE("0") "1: mov %1, %%cr4" : "=&r"(at) : "a"(v) : "memory");
    return at;
}

static void refused(const char *what, int cr, ulong value) {
    ulong before = cr ? read_cr4() : read_cr0();
    hits = 0;
    ulong at = cr ? mov_cr4(value) : mov_cr0(value);
    ulong after = cr ? read_cr4() : read_cr0();
    check(hits == 1 && seen.vector == 13 && seen.error == 0 && seen.ip == at && after == before,
          "%s: CR%d=%#lx refused with #GP(0) at the MOV (hits=%d vec=%lu err=%#lx ip=%#lx, mov at %#lx, "
          "CR%d %#lx -> %#lx)", what, cr, value, hits, seen.vector, seen.error, seen.ip, at, cr, before, after);
}

static void accepted(const char *what, int cr, ulong value) {
    hits = 0;
    if (cr)
        mov_cr4(value);
    else
        mov_cr0(value);
    ulong now = cr ? read_cr4() : read_cr0();
    check(hits == 0 && now == value, "%s: CR%d=%#lx taken (hits=%d, now %#lx)", what, cr, value, hits, now);
}

#define CR0_PE 0x1UL
#define CR0_MP 0x2UL
#define CR0_TS 0x8UL
#define CR0_NW (1UL << 29)
#define CR0_CD (1UL << 30)
#define CR0_PG (1UL << 31)
#define CR4_PAE (1UL << 5)
#define CR4_PCE (1UL << 8)

static void cr4_cases(void) {
    ulong cr4 = read_cr4();
    static const struct { const char *name; int bit; } unreported[] = {
        {"VMXE (no VMX)", 13}, {"SMXE", 14}, {"FSGSBASE", 16}, {"PCIDE", 17},
        {"OSXSAVE (no XSAVE)", 18}, {"SMEP", 20}, {"SMAP", 21}, {"PKE", 22}, {"reserved bit 15", 15},
    };
    for (unsigned i = 0; i < sizeof(unreported) / sizeof(unreported[0]); i++)
        refused(unreported[i].name, 4, cr4 | (1UL << unreported[i].bit));
#ifdef __x86_64__
    refused("CR4 bit 32", 4, cr4 | (1UL << 32));
    refused("CR4.PAE cleared in long mode", 4, cr4 & ~CR4_PAE);
#endif
    accepted("CR4.PCE set", 4, cr4 | CR4_PCE);
    accepted("CR4.PCE cleared", 4, cr4);
}

static void cr0_cases(void) {
    ulong cr0 = read_cr0();
    refused("NW without CD", 0, (cr0 & ~CR0_CD) | CR0_NW);
    refused("PG without PE", 0, (cr0 | CR0_PG) & ~CR0_PE);
#ifdef __x86_64__
    refused("CR0 bit 32", 0, cr0 | (1UL << 32));
    refused("PG cleared in 64-bit mode", 0, cr0 & ~CR0_PG);
#else
    /* long mode requested (EFER.LME) but no PAE: enabling paging is #GP */
    wrmsr(0xC0000080, rdmsr(0xC0000080) | (1 << 8));
    refused("PG with EFER.LME and no CR4.PAE", 0, cr0 | CR0_PG);
    wrmsr(0xC0000080, rdmsr(0xC0000080) & ~(1ULL << 8));
#endif
    accepted("CD and NW set", 0, cr0 | CR0_CD | CR0_NW);
    accepted("CD and NW cleared", 0, cr0);
    accepted("TS set", 0, cr0 | CR0_TS);
    __asm__ volatile("clts" ::: "memory");
    check(read_cr0() == cr0, "CLTS cleared TS (CR0=%#lx)", read_cr0());
    u16 msw = (u16)(cr0 | CR0_TS | CR0_MP);
    __asm__ volatile("lmsw %0" :: "r"(msw) : "memory");
    check(read_cr0() == (cr0 | CR0_TS | CR0_MP), "LMSW (register) set TS and MP (CR0=%#lx)", read_cr0());
    static volatile u16 zero_msw;
    __asm__ volatile("lmsw %0" :: "m"(zero_msw) : "memory");
    check(read_cr0() == ((cr0 & ~0xEUL) | CR0_PE), "LMSW (memory) cleared MP/EM/TS, kept PE (CR0=%#lx)",
          read_cr0());
    write_cr0(cr0);
}

void kmain(void) {
    u32 a, b, c, d;
    printf("crcheck%d: control-register writes\n", (int)sizeof(ulong) * 8);
    /* A kernel looks at its CPU's features (leaf 7) before it sets CR4; xenicorn
     * checks CR writes from then until the first SYSCALL (docs/conformance.md). */
    cpuid(7, 0, &a, &b, &c, &d);
    set_handler(13, on_gp);
    cr4_cases();
    cr0_cases();
    test_result();
}
