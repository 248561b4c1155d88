/* Multiboot v1 entry (no PVH note: the loader must pick multiboot).
 *
 * The header asks for page-aligned modules (flag 0) and the memory
 * information (flag 1). At entry EAX holds the loader's magic and EBX the
 * multiboot information; the stack is the kernel's own business. The
 * entry state is recorded before anything changes it, for mboot.c. */
        .code32
        .section .text.start, "ax"
        .balign 4
mb_header:
        .long 0x1BADB002                        /* magic */
        .long 0x00000003                        /* flags: page-align modules, memory info */
        .long -(0x1BADB002 + 0x00000003)        /* checksum */

        .globl _start
_start:
        mov     %eax, mb_magic
        mov     %ebx, mb_info
        mov     $boot_stack_top, %esp
        pushf
        pop     %eax
        mov     %eax, mb_eflags
        mov     %cr0, %eax
        mov     %eax, mb_cr0
        mov     %cs, %ax
        mov     %ax, mb_cs
        mov     %ds, %ax
        mov     %ax, mb_ds
        call    lib_main
1:      cli
        hlt
        jmp     1b

        .data
        .globl boot_stack_top
        .globl mb_magic, mb_info, mb_eflags, mb_cr0, mb_cs, mb_ds
mb_magic:  .long 0
mb_info:   .long 0
mb_eflags: .long 0
mb_cr0:    .long 0
mb_cs:     .word 0
mb_ds:     .word 0

        .bss
        .balign 16
        .space  16384
boot_stack_top:
