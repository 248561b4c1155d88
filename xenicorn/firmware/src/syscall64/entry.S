/* The SYSCALL entry point (IA32_LSTAR). SYSCALL does not switch stacks:
 * the entry saves the user RSP, switches to its own stack, and calls C with
 * (number, argument, RCX, R11); SYSRETQ returns to RCX with RFLAGS = R11.
 * Every user register except RAX (the result), RCX and R11 is preserved. */
        .text
        .globl  syscall_entry
syscall_entry:
        mov     %rsp, user_rsp(%rip)
        lea     syscall_stack_top(%rip), %rsp
        push    %rcx
        push    %r11
        push    %rdi
        push    %rsi
        push    %rdx
        push    %r8
        push    %r9
        push    %r10
        sub     $8, %rsp                /* keep the stack 16-byte aligned */
        mov     %rdi, %rsi
        mov     %rax, %rdi
        mov     %rcx, %rdx
        mov     %r11, %rcx
        call    syscall_handler
        add     $8, %rsp
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdx
        pop     %rsi
        pop     %rdi
        pop     %r11
        pop     %rcx
        mov     user_rsp(%rip), %rsp
        sysretq

        .bss
        .balign 16
user_rsp:
        .quad   0
        .space  8192
syscall_stack_top:
