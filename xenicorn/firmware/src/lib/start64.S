/* 64-bit kernels also enter in 32-bit flat protected mode (PVH). The entry
 * builds page tables that identity-map the first 4 GiB with 2 MiB pages
 * (user-accessible, so tests can run CPL3 code anywhere), then switches to
 * long mode: CR4.PAE, CR3, EFER.LME, CR0.PG, and a far jump to a 64-bit
 * code segment (SDM vol. 3 §10.8.5). */
        .code32
        .section .text.start, "ax"
        .globl _start
_start:
        mov     $boot_stack_top, %esp
        mov     %ebx, start_info

        /* PML4[0] -> PDPT; PDPT[0..3] -> four page directories */
        mov     $pml4, %edi
        mov     $pdpt, %eax
        or      $7, %eax
        mov     %eax, (%edi)
        mov     $pdpt, %edi
        mov     $pd, %eax
        or      $7, %eax
        mov     $4, %ecx
1:      mov     %eax, (%edi)
        add     $0x1000, %eax
        add     $8, %edi
        loop    1b
        /* 2048 PDEs: present, writable, user, 2 MiB page */
        mov     $pd, %edi
        mov     $0x87, %eax
        xor     %edx, %edx
        mov     $2048, %ecx
2:      mov     %eax, (%edi)
        mov     %edx, 4(%edi)
        add     $0x200000, %eax
        adc     $0, %edx
        add     $8, %edi
        loop    2b

        mov     %cr4, %eax
        or      $0x20, %eax             /* PAE */
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $0xC0000080, %ecx       /* EFER */
        rdmsr
        or      $0x100, %eax            /* LME */
        wrmsr
        mov     %cr0, %eax
        or      $0x80010000, %eax       /* PG | WP */
        mov     %eax, %cr0
        lgdt    boot_gdtr
        ljmp    $0x10, $long_entry

        .code64
long_entry:
        mov     $0x18, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        xor     %ax, %ax
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $boot_stack_top, %rsp
        call    lib_main
3:      cli
        hlt
        jmp     3b

        .section .rodata
        .balign 8
boot_gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08 code32 */
        .quad   0x00af9a000000ffff      /* 0x10 code64 */
        .quad   0x00cf92000000ffff      /* 0x18 data */
boot_gdtr:
        .word   4 * 8 - 1
        .long   boot_gdt

        .bss
        .balign 4096
        .globl pml4, pdpt, pd
pml4:   .space  4096
pdpt:   .space  4096
pd:     .space  4 * 4096
        .balign 16
        .space  16384
boot_stack_top:
