/* 32-bit PVH entry: flat protected mode, paging off, EBX -> hvm_start_info. */
        .code32
        .section .text.start, "ax"
        .globl _start
_start:
        mov     $boot_stack_top, %esp
        mov     %ebx, start_info
        call    lib_main
1:      cli
        hlt
        jmp     1b

        .bss
        .balign 16
        .space  16384
boot_stack_top:
