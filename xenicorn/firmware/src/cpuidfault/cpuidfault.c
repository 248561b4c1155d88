/* cpuidfault32 / cpuidfault64: CPUID faulting, as Xen offers it to HVM guests.
 *
 * PLATFORM_INFO (MSR 0xCE) bit 31 says CPUID faulting exists (the MSR is
 * read-only); MISC_FEATURES_ENABLES (MSR 0x140) bit 0 turns it on, every
 * other bit is reserved. While it is on, CPUID at CPL3 is #GP(0) with the
 * saved IP at the CPUID; the kernel's own CPUID still answers. The kernel
 * goes to CPL3 three times (run_user, lib/user.c): faulting off, on, off
 * again. */
#include "../lib/kernel.h"

#define MSR_PLATFORM_INFO 0xCE
#define MSR_MISC_FEATURES_ENABLES 0x140
#define PLATFORM_INFO_CPUID_FAULTING (1ULL << 31)
#define CPUID_FAULTING 1ULL
#ifdef __x86_64__
#define MOVP "movq"
#else
#define MOVP "movl"
#endif

static volatile ulong gp_count, gp_ip, gp_err, gp_cs, resume;
static volatile ulong user_faults[3], user_ebx[3];
static u32 vendor;
static int phase;                        /* which of the three trips to CPL3 */

extern char ucpuid_insn[];

/* #GP: note it and go on at `resume` (set just before each guarded instruction). */
static void on_gp(struct frame *f) {
    gp_count++;
    gp_ip = f->ip;
    gp_err = f->error;
    gp_cs = f->cs;
    f->ip = resume;
}

static int rdmsr_faults(u32 msr, u64 *v) {
    ulong n = gp_count;
    u32 lo = 0, hi = 0;
    __asm__ volatile(MOVP " $1f, %[r]\n\trdmsr\n1:" : [r] "=m"(resume), "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
    *v = ((u64)hi << 32) | lo;
    return gp_count != n;
}

static int wrmsr_faults(u32 msr, u64 v) {
    ulong n = gp_count;
    __asm__ volatile(MOVP " $1f, %[r]\n\twrmsr\n1:" : [r] "=m"(resume)
                     : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
    return gp_count != n;
}

/* CPL3: one CPUID of leaf 0. EBX starts as a marker; CPUID replaces it
 * with the vendor's first four letters ("Genu"), a fault leaves it. */
#define MARKER 0x5A5A5A5A
static void user_main(void) {
    ulong n = gp_count;
    u32 a = 0, b = MARKER, c = 0;
    __asm__ volatile(MOVP " $1f, %[r]\n\t.globl ucpuid_insn\nucpuid_insn: cpuid\n1:"
                     : [r] "=m"(resume), "+a"(a), "+b"(b), "+c"(c) :: "edx", "memory");
    user_faults[phase] = gp_count - n;
    user_ebx[phase] = b;
}

static void kernel_cpuid_works(const char *when) {
    u32 a, b, c, d;
    ulong n = gp_count;
    cpuid(0, 0, &a, &b, &c, &d);
    check(gp_count == n && a >= 1 && b != MARKER, "%s: kernel CPUID answers (max leaf %#x, no #GP)", when, a);
    vendor = b;
}

static void msrs_and_enable(void) {
    u64 v;
    int faulted = rdmsr_faults(MSR_PLATFORM_INFO, &v);
    check(!faulted && (v & PLATFORM_INFO_CPUID_FAULTING), "PLATFORM_INFO %#llx offers CPUID faulting (bit 31)", v);
    check(wrmsr_faults(MSR_PLATFORM_INFO, v) && gp_err == 0, "PLATFORM_INFO is read-only: #GP(0)");
    faulted = rdmsr_faults(MSR_MISC_FEATURES_ENABLES, &v);
    check(!faulted && v == 0, "MISC_FEATURES_ENABLES reads %#llx", v);
    check(wrmsr_faults(MSR_MISC_FEATURES_ENABLES, 2), "MISC_FEATURES_ENABLES bit 1 is reserved: #GP");
    check(wrmsr_faults(MSR_MISC_FEATURES_ENABLES, 1ULL << 63), "MISC_FEATURES_ENABLES bit 63 is reserved: #GP");
    check(!wrmsr_faults(MSR_MISC_FEATURES_ENABLES, CPUID_FAULTING), "CPUID faulting turned on");
    faulted = rdmsr_faults(MSR_MISC_FEATURES_ENABLES, &v);
    check(!faulted && v == CPUID_FAULTING, "MISC_FEATURES_ENABLES reads back %#llx", v);
    kernel_cpuid_works("faulting on");
}

static void user_trips(void) {
    phase = 0;
    run_user(user_main);
    check(user_faults[0] == 0 && user_ebx[0] == vendor, "faulting off: user CPUID answers (EBX %#lx)",
          user_ebx[0]);
    msrs_and_enable();
    phase = 1;
    run_user(user_main);
    check(user_faults[1] == 1 && gp_ip == (ulong)ucpuid_insn && gp_err == 0 && gp_cs == USER_CS
          && user_ebx[1] == MARKER,
          "faulting on: user CPUID is #GP(0) at the CPUID (ip=%#lx err=%#lx cs=%#lx)", gp_ip, gp_err, gp_cs);
    check(!wrmsr_faults(MSR_MISC_FEATURES_ENABLES, 0), "CPUID faulting turned off");
    phase = 2;
    run_user(user_main);
    check(user_faults[2] == 0 && user_ebx[2] == vendor, "faulting off again: user CPUID answers (EBX %#lx)",
          user_ebx[2]);
    kernel_cpuid_works("faulting off");
}

void kmain(void) {
    printf("cpuidfault%d: CPUID faulting through MSRs 0xCE and 0x140\n", (int)sizeof(ulong) * 8);
    /* Look at the features first, as a kernel does before it touches
     * model-specific MSRs (xenicorn catches MSRs once a kernel has read
     * leaf 7: machine/cpuidfault.py). */
    u32 a, b, c, d;
    cpuid(7, 0, &a, &b, &c, &d);
    set_handler(13, on_gp);
    kernel_cpuid_works("faulting off");
    user_trips();
    test_result();
}
