/* syscall64: SYSCALL/SYSRET round trips between CPL3 and CPL0.
 *
 * IA32_STAR = 0x0020_0010_0000_0000: SYSCALL loads CS=0x10, SS=0x18;
 * SYSRETQ loads CS=0x20+16|3=0x33, SS=0x20+8|3=0x2b. IA32_FMASK clears
 * IF, TF, DF, AC, NT and IOPL on entry. The kernel checks, on each call,
 * that it runs at CPL0 with CS=0x10, that RCX holds the user's return
 * address and R11 the user's RFLAGS, and that FMASK was applied. */
#include "../lib/kernel.h"

#define EFER 0xC0000080
#define STAR 0xC0000081
#define LSTAR 0xC0000082
#define FMASK 0xC0000084
#define CALLS 3

extern void syscall_entry(void);
extern char user_ret[];

static volatile ulong k_cs[CALLS], k_ss[CALLS], k_flags[CALLS], k_rcx[CALLS], k_r11[CALLS], k_nr[CALLS];
static volatile ulong u_flags[CALLS], u_result[CALLS], u_cs[CALLS], u_ss[CALLS];
static volatile int calls;
static u8 user_stack[8192] __attribute__((aligned(16)));
static u8 resume_stack[8192] __attribute__((aligned(16)));

ulong syscall_handler(ulong nr, ulong arg, ulong rcx, ulong r11) {
    int i = calls++;
    if (i < CALLS) {
        k_cs[i] = read_cs(); k_ss[i] = read_ss(); k_flags[i] = read_flags();
        k_rcx[i] = rcx; k_r11[i] = r11; k_nr[i] = nr;
    }
    return arg * 2 + 1;
}

static void user_main(void) {
    for (int i = 0; i < CALLS; i++) {
        ulong result, flags;
        __asm__ volatile("pushfq; pop %1\n"
                         "syscall\n"
                         ".globl user_ret\nuser_ret:"
                         : "=a"(result), "=&r"(flags) : "a"(100 + i), "D"(1000 + i)
                         : "rcx", "r11", "memory");
        u_flags[i] = flags;
        u_result[i] = result;
        u_cs[i] = read_cs();
        u_ss[i] = read_ss();
    }
    __asm__ volatile("int $0x81");
    for (;;) ;
}

static void checks(void) {
    for (int i = 0; i < CALLS; i++) {
        printf("syscall %d: kernel cs=%#lx ss=%#lx flags=%#lx rcx=%#lx r11=%#lx; user got %lu, cs=%#lx ss=%#lx\n",
               i, k_cs[i], k_ss[i], k_flags[i], k_rcx[i], k_r11[i], u_result[i], u_cs[i], u_ss[i]);
        check(k_nr[i] == 100UL + i && u_result[i] == (1000UL + i) * 2 + 1, "call %d: number and result", i);
        check(k_cs[i] == KERNEL_CS64 && k_ss[i] == KERNEL_DS, "call %d: kernel CS/SS from STAR", i);
        check(k_rcx[i] == (ulong)user_ret, "call %d: RCX = user return address", i);
        check(k_r11[i] == u_flags[i], "call %d: R11 = user RFLAGS (%#lx)", i, u_flags[i]);
        check(!(k_flags[i] & 0x47700), "call %d: FMASK cleared IF/TF/DF/AC in the kernel", i);
        check(u_cs[i] == USER_CS64 && u_ss[i] == USER_DS, "call %d: SYSRET back to CPL3", i);
    }
    check(calls == CALLS, "%d system calls", calls);
    check(read_cs() == KERNEL_CS64, "back at CPL0");
    test_result();
}

static void back_to_kernel(struct frame *f) {
    f->cs = KERNEL_CS;
    f->ss = KERNEL_DS;
    f->ip = (ulong)checks;
    f->sp = (ulong)(resume_stack + sizeof(resume_stack)) - 8;
    f->flags &= ~(1UL << 9);
}

void kmain(void) {
    printf("syscall64: SYSCALL/SYSRET round trips\n");
    wrmsr(EFER, rdmsr(EFER) | 1);                              /* SCE */
    wrmsr(STAR, (0x20ULL << 48) | ((u64)KERNEL_CS64 << 32));
    wrmsr(LSTAR, (ulong)syscall_entry);
    wrmsr(FMASK, 0x47700);
    set_handler(0x81, back_to_kernel);
    set_gate(0x81, isr_entry(0x81), 3, 0, 0);
    enter_user(user_main, (ulong)(user_stack + sizeof(user_stack)));
}
