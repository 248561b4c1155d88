/* run_user(fn): call fn at CPL3 and come back, as a function call.
 *
 * A kernel that only wants to try some instructions in user mode (and see
 * which fault) needs a round trip: IRET to CPL3, run the code, get back to
 * CPL0 where it left off. run_user() keeps the callee-saved registers and
 * the stack pointer, IRETs to a user trampoline that calls fn and then
 * raises INT USER_RETURN_VECTOR (a DPL3 gate); that handler points the
 * interrupt's return at run_user_resume, at CPL0, which reloads the saved
 * stack and registers and returns to run_user's caller. Faults fn takes go
 * to the kernel's handlers as usual (they may move the saved IP on).
 *
 * fn need not return: a handler of an event fn raises (a fault, or an INT
 * through the kernel's own DPL3 gate) can call user_resume(f) to make that
 * event's IRET land in run_user's caller instead, abandoning fn.
 *
 * Opt-in: list "lib/user.c" among a kernel's sources (build_firmware.py),
 * so kernels that do not use it keep their bytes. */
#include "kernel.h"

void (*volatile user_fn)(void);          /* read by user_trampoline */
ulong run_user_saved_sp;                 /* the kernel stack inside run_user (read by the asm below) */
static u8 user_stack[8192] __attribute__((aligned(16)));
extern char run_user_resume[];

ulong user_stack_bottom(void) { return (ulong)user_stack; }
ulong user_stack_end(void) { return (ulong)(user_stack + sizeof(user_stack)); }

/* The first code at CPL3: call fn, then ask to go back. In assembly so that
 * nothing changes the flags the IRET set before fn runs (a frame fn's
 * events push shows them). The stack is 16-byte aligned here, so after the
 * CALL it is as the ABI has it at a function's entry. */
extern char user_trampoline[];
#define STR_(x) #x
#define STR(x) STR_(x)
#ifdef __x86_64__
__asm__(".text\nuser_trampoline:\n"
        "call *user_fn(%rip)\n"
#else
__asm__(".text\nuser_trampoline:\n"
        "call *user_fn\n"
#endif
        "int $" STR(USER_RETURN_VECTOR) "\n"
        "1: jmp 1b\n");

void user_resume(struct frame *f) {
    f->cs = KERNEL_CS;
    f->ip = (ulong)run_user_resume;
    f->flags &= ~(1UL << 9);                   /* IF as the kernel had it: off */
#ifdef __x86_64__
    f->ss = KERNEL_DS;                         /* 64-bit IRET pops SS:RSP at any level */
    f->sp = run_user_saved_sp;
#endif
}

/* Called from run_user's assembly with the registers saved: never returns. */
void run_user_enter(void (*fn)(void)) {
    user_fn = fn;
    set_handler(USER_RETURN_VECTOR, user_resume);
    set_gate(USER_RETURN_VECTOR, isr_entry(USER_RETURN_VECTOR), 3, 0, 0);
    enter_user((void (*)(void))user_trampoline, (ulong)(user_stack + sizeof(user_stack)));
}

#ifdef __x86_64__
__asm__(".text\n.globl run_user\nrun_user:\n"
        "push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15\n"
        "mov %rsp, run_user_saved_sp(%rip)\n"
        "sub $8, %rsp\n"                       /* the ABI's 16-byte alignment at the call */
        "call run_user_enter\n"
        ".globl run_user_resume\nrun_user_resume:\n"
        "mov run_user_saved_sp(%rip), %rsp\n"
        "pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx\n"
        "ret\n");
#else
__asm__(".text\n.globl run_user\nrun_user:\n"
        "mov 4(%esp), %eax\n"
        "push %ebx; push %ebp; push %esi; push %edi\n"
        "mov %esp, run_user_saved_sp\n"
        "sub $12, %esp\n"
        "push %eax\n"
        "call run_user_enter\n"
        ".globl run_user_resume\nrun_user_resume:\n"
        "mov $0x18, %eax; mov %eax, %ds; mov %eax, %es\n"   /* KERNEL_DS: enter_user loaded the user's */
        "mov run_user_saved_sp, %esp\n"
        "pop %edi; pop %esi; pop %ebp; pop %ebx\n"
        "ret\n");
#endif
