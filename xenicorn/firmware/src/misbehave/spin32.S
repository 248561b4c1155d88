/* spin32: prints one line, then loops forever (for --timeout). */
        .code32
        .section .text.start, "ax"
        .globl _start
_start: mov     $msg, %esi
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, $0xe9
        jmp     1b
2:      jmp     2b
msg:    .asciz  "spinning forever\n"
