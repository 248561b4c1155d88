/* long xen_hypercall(nr, a1..a5): call stub nr of the hypercall page with
 * Xen's register convention (64-bit: RDI RSI RDX R10 R8; 32-bit: EBX ECX
 * EDX ESI EDI), result in RAX/EAX. */
        .text
        .globl  xen_hypercall
xen_hypercall:
#ifdef __x86_64__
        mov     %rdi, %rax
        shl     $5, %rax
        lea     hypercall_page(%rip), %r11
        add     %r11, %rax
        mov     %rsi, %rdi
        mov     %rdx, %rsi
        mov     %rcx, %rdx
        mov     %r8, %r10
        mov     %r9, %r8
        call    *%rax
        ret
#else
        push    %ebx
        push    %esi
        push    %edi
        mov     16(%esp), %eax
        shl     $5, %eax
        add     $hypercall_page, %eax
        mov     20(%esp), %ebx
        mov     24(%esp), %ecx
        mov     28(%esp), %edx
        mov     32(%esp), %esi
        mov     36(%esp), %edi
        call    *%eax
        pop     %edi
        pop     %esi
        pop     %ebx
        ret
#endif
