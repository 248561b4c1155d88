/* triple32: an empty IDT, then a divide error: #DE -> #DF -> shutdown. */
        .code32
        .section .text.start, "ax"
        .globl _start
_start: mov     $0x54, %al              /* 'T' */
        out     %al, $0xe9
        mov     $0x0a, %al
        out     %al, $0xe9
        lidt    empty_idtr
        xor     %ecx, %ecx
        div     %ecx
        hlt
        .balign 8
empty_idtr:
        .word   0
        .long   0
