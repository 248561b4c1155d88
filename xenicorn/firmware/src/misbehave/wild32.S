/* wild32: jumps to physical 0xC0000000, where a 128 MiB machine has nothing. */
        .code32
        .section .text.start, "ax"
        .globl _start
_start: mov     $0x57, %al              /* 'W' */
        out     %al, $0xe9
        mov     $0x0a, %al
        out     %al, $0xe9
        mov     $0xC0000000, %eax
        jmp     *%eax
