/* umip32 / umip64: User-Mode Instruction Prevention (SDM vol. 3 §2.5).
 *
 * CPUID.(EAX=7,ECX=0):ECX bit 2 reports UMIP; CR4 bit 11 turns it on. Then
 * SGDT, SIDT, SLDT, STR and SMSW are #GP(0) at CPL > 0, with the saved IP
 * at the instruction and the destination untouched, and run as before at
 * CPL 0. The kernel probes all five (each destination form: memory, and
 * the 16-, 32- and, in 64-bit mode, 64-bit register) four times: at CPL 0
 * with UMIP off (the reference), at CPL 0 with UMIP on (the same values:
 * xenicorn performs these itself then), at CPL 3 with UMIP on (a #GP(0)
 * each), and at CPL 3 with UMIP off again (the same values). MOV from CR0
 * shares SMSW's intercept in xenicorn, so it is checked at CPL 0 too, and,
 * in 64-bit mode, SGDT to a non-canonical address must still be #GP(0).
 *
 * What an instruction stores (SDM vol. 2): SGDT/SIDT 2-byte limit and a
 * 4-byte (8 in 64-bit mode) base; SLDT/STR/SMSW to memory 2 bytes; to a
 * 16-bit register the low word only; SLDT/STR to a 32-bit register
 * zero-extended; SMSW to r32 in 64-bit mode CR0[31:0] zero-extended (bits
 * 31:16 are undefined outside 64-bit mode: only the low word is checked). */
#include "../lib/kernel.h"

#define CR4_UMIP (1UL << 11)
#define GUARD 0xAA
#define PRELOAD ((ulong)-1)
#ifdef __x86_64__
#define MOVP "movq"
#define NREG 3
#else
#define MOVP "movl"
#define NREG 2
#endif

enum { SGDT, SIDT, SLDT, STR, SMSW, NINSN };
static const char *const names[NINSN] = { "SGDT", "SIDT", "SLDT", "STR", "SMSW" };

/* One probe's results: memory images (guard-filled first) and register values. */
struct probe {
    u8 table[2][16];                   /* SGDT, SIDT */
    u8 word[3][4];                     /* SLDT, STR, SMSW to m16 */
    ulong reg[3][NREG];                /* SLDT, STR, SMSW to r16, r32 (, r64) */
    int faults[NINSN];                 /* #GPs taken, per instruction */
    int bad_faults;                    /* #GPs that were not #GP(0) at the instruction from this CPL */
};

static struct probe ref, got;
static volatile ulong at, resume;
static volatile int gp_seen, bad_gp, probe_cpl;

static void on_gp(struct frame *f) {
    gp_seen++;
    if (f->ip != at || f->error != 0 || (f->cs & 3) != (ulong)probe_cpl)
        bad_gp++;
    f->ip = resume;
}

/* insn at label 1; a #GP there resumes at label 2 */
#define TRY(insn, ...) __asm__ volatile(MOVP " $1f, %[at_]\n\t" MOVP " $2f, %[res_]\n1: " insn "\n2:" \
                                        : [at_] "=m"(at), [res_] "=m"(resume), __VA_ARGS__ :: "memory")

static void probe_all(void) {
    struct probe *p = &got;
    memset(p, GUARD, sizeof(*p));
    p->bad_faults = 0;
    for (int i = 0; i < NINSN; i++) p->faults[i] = 0;
    int before = gp_seen, bad = bad_gp;
    TRY("sgdt %[m]", [m] "=m"(p->table[0]));
    p->faults[SGDT] += gp_seen - before; before = gp_seen;
    TRY("sidt %[m]", [m] "=m"(p->table[1]));
    p->faults[SIDT] += gp_seen - before; before = gp_seen;
    ulong r[NREG];
#define REGS(mn, k) do { \
        TRY(mn " %w[m]", [m] "=m"(*(u16 *)p->word[k])); \
        for (int j = 0; j < NREG; j++) r[j] = PRELOAD; \
        TRY(mn " %w[r]", [r] "+r"(r[0])); \
        TRY(mn " %k[r]", [r] "+r"(r[1])); \
        if (NREG > 2) TRY(mn " %[r]", [r] "+r"(r[NREG - 1])); \
        for (int j = 0; j < NREG; j++) p->reg[k][j] = r[j]; } while (0)
    REGS("sldt", 0);
    p->faults[SLDT] += gp_seen - before; before = gp_seen;
    REGS("str", 1);
    p->faults[STR] += gp_seen - before; before = gp_seen;
    REGS("smsw", 2);
    p->faults[SMSW] += gp_seen - before;
    p->bad_faults = bad_gp - bad;
}

static int same(const struct probe *a, const struct probe *b, int insn) {
    switch (insn) {
    case SGDT: case SIDT:
        return !memcmp(a->table[insn], b->table[insn], sizeof(a->table[0]));
    default: {
        int k = insn - SLDT;
        if (memcmp(a->word[k], b->word[k], sizeof(a->word[0])))
            return 0;
        for (int j = 0; j < NREG; j++) {
            ulong mask = (insn == SMSW && j == 1 && sizeof(ulong) == 4) ? 0xFFFF : (ulong)-1;
            if ((a->reg[k][j] & mask) != (b->reg[k][j] & mask))
                return 0;
        }
        return 1;
    }
    }
}

static int untouched(const struct probe *p, int insn) {
    static struct probe g;
    memset(&g, GUARD, sizeof(g));
    if (insn <= SIDT)
        return !memcmp(p->table[insn], g.table[0], sizeof(g.table[0]));
    int k = insn - SLDT;
    for (int j = 0; j < NREG; j++)
        if (p->reg[k][j] != PRELOAD)
            return 0;
    return !memcmp(p->word[k], g.word[0], sizeof(g.word[0]));
}

/* The reference values are what the architecture says, not just what the CPU gave. */
static void check_reference(void) {
    const struct probe *p = &ref;
    u16 limit = *(u16 *)p->table[0];
    ulong base = *(ulong *)(p->table[0] + 2);
    int base_bytes = sizeof(ulong);
    check(limit == 79 && base > 0x100000 && p->table[0][2 + base_bytes] == GUARD,
          "SGDT stores limit %u, base %#lx in %d bytes", limit, base, 2 + base_bytes);
    limit = *(u16 *)p->table[1];
    check(limit == sizeof(ulong) * 2 * 256 - 1 && p->table[1][2 + base_bytes] == GUARD,
          "SIDT stores limit %u and the base in %d bytes", limit, 2 + base_bytes);
    static const u16 sel[2] = { 0, TSS_SEL };
    for (int k = 0; k < 2; k++) {
        check(*(u16 *)p->word[k] == sel[k] && p->word[k][2] == GUARD, "%s m16 stores %#x in 2 bytes",
              names[SLDT + k], *(u16 *)p->word[k]);
        check(p->reg[k][0] == ((PRELOAD & ~0xFFFFUL) | sel[k]), "%s r16 writes the low word only (%#lx)",
              names[SLDT + k], p->reg[k][0]);
        for (int j = 1; j < NREG; j++)
            check(p->reg[k][j] == sel[k], "%s r%d zero-extends (%#lx)", names[SLDT + k], 32 << (j - 1),
                  p->reg[k][j]);
    }
    ulong cr0 = read_cr0();
    check(*(u16 *)p->word[2] == (u16)cr0 && p->word[2][2] == GUARD, "SMSW m16 stores CR0[15:0] %#x",
          *(u16 *)p->word[2]);
    check(p->reg[2][0] == ((PRELOAD & ~0xFFFFUL) | (u16)cr0), "SMSW r16 writes the low word only (%#lx)",
          p->reg[2][0]);
#ifdef __x86_64__
    check(p->reg[2][1] == (u32)cr0 && p->reg[2][2] == cr0, "SMSW r32/r64: CR0 zero-extended (%#lx, %#lx)",
          p->reg[2][1], p->reg[2][2]);
#else
    check((u16)p->reg[2][1] == (u16)cr0, "SMSW r32: CR0[15:0] in the low word (%#lx)", p->reg[2][1]);
#endif
}

static void compare(const char *when, int want_faults) {
    for (int i = 0; i < NINSN; i++) {
        int n = want_faults ? (i <= SIDT ? 1 : 1 + NREG) : 0;
        if (want_faults)
            check(got.faults[i] == n && untouched(&got, i), "%s: every %s form is #GP (%d of %d), nothing stored",
                  when, names[i], got.faults[i], n);
        else
            check(got.faults[i] == 0 && same(&got, &ref, i), "%s: %s stores what it did at CPL 0 with UMIP off",
                  when, names[i]);
    }
    check(got.bad_faults == 0, "%s: each #GP was #GP(0) at the instruction, from CPL %d (%d were not)", when,
          probe_cpl, got.bad_faults);
}

static ulong cr0_at_start;

static void cpl0_extras(void) {
    ulong cr0 = PRELOAD;
    __asm__ volatile("mov %%cr0, %0" : "+r"(cr0));
    check(cr0 == cr0_at_start, "MOV from CR0 at CPL 0 with UMIP on reads %#lx", cr0);
#ifdef __x86_64__
    int before = gp_seen, bad = bad_gp;
    __asm__ volatile("movq $1f, %[at_]\n\tmovq $2f, %[res_]\n1: sgdt (%[a])\n2:"
                     : [at_] "=m"(at), [res_] "=m"(resume) : [a] "r"(0x8000000000000000UL) : "memory");
    check(gp_seen == before + 1 && bad_gp == bad, "SGDT to a non-canonical address at CPL 0 is #GP(0)");
#endif
}

void kmain(void) {
    printf("umip%d: User-Mode Instruction Prevention\n", (int)sizeof(ulong) * 8);
    u32 a, b, c, d;
    cpuid(7, 0, &a, &b, &c, &d);
    check(c & (1 << 2), "CPUID.(7,0):ECX %#x reports UMIP (bit 2)", c);
    if (!(c & (1 << 2)))
        test_result();                 /* no UMIP: setting CR4.UMIP would be #GP (crcheck's business) */
    set_handler(13, on_gp);
    cr0_at_start = read_cr0();

    probe_cpl = 0;
    probe_all();
    ref = got;
    check(got.bad_faults == 0 && !got.faults[SGDT] && !got.faults[SIDT] && !got.faults[SLDT] &&
          !got.faults[STR] && !got.faults[SMSW], "CPL 0, UMIP off: no #GP");
    check_reference();

    probe_cpl = 3;
    run_user(probe_all);
    compare("CPL 3, UMIP off", 0);

    ulong cr4 = read_cr4();
    write_cr4(cr4 | CR4_UMIP);
    check(read_cr4() == (cr4 | CR4_UMIP), "CR4.UMIP set (CR4 %#lx)", read_cr4());

    probe_cpl = 0;
    probe_all();
    compare("CPL 0, UMIP on", 0);
    cpl0_extras();

    probe_cpl = 3;
    run_user(probe_all);
    compare("CPL 3, UMIP on", 1);

    write_cr4(cr4);
    check(read_cr4() == cr4, "CR4.UMIP cleared (CR4 %#lx)", read_cr4());
    run_user(probe_all);
    compare("CPL 3, UMIP off again", 0);
}
