/* One entry stub per vector. Vectors without a hardware error code push a
 * dummy 0 so every handler sees the same struct frame (kernel.h). */
#define HAS_ERROR(n) ((n) == 8 || (n) == 10 || (n) == 11 || (n) == 12 || (n) == 13 || \
                      (n) == 14 || (n) == 17 || (n) == 21 || (n) == 29 || (n) == 30)

        .text
        .macro  stub n
        .balign 16
isr_\n:
        .if !((\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30))
        push    $0
        .endif
        push    $\n
        jmp     isr_common
        .endm

        .globl  isr_stubs
        .balign 16
isr_stubs:
        .altmacro
        .set    i, 0
        .rept   256
        stub    %i
        .set    i, i + 1
        .endr

#ifdef __x86_64__
isr_common:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %rbp
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        mov     %rsp, %rdi
        cld
        call    isr_dispatch
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rbp
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rbx
        pop     %rax
        add     $16, %rsp
        iretq
#else
isr_common:
        push    %eax
        push    %ebx
        push    %ecx
        push    %edx
        push    %esi
        push    %edi
        push    %ebp
        mov     %esp, %eax
        push    %eax
        cld
        call    isr_dispatch
        add     $4, %esp
        pop     %ebp
        pop     %edi
        pop     %esi
        pop     %edx
        pop     %ecx
        pop     %ebx
        pop     %eax
        add     $8, %esp
        iret
#endif
