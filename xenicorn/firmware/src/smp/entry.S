/* How an application processor (AP) gets from reset to C, and the code the
 * cross-modifying-code test patches.
 *
 * A STARTUP IPI with vector V takes an AP out of its wait-for-SIPI state in
 * real mode at CS:IP = (V << 8):0, physical address V << 12 (Intel SDM
 * vol. 3, "MP Initialization Protocol Algorithm", "MP Initialization
 * Example"). The trampoline below is real-mode code that runs wherever it
 * is copied: the BSP puts it at TRAMPOLINE (smp.h, 0x8000) and stores the
 * kernel's GDTR in it. It loads that GDT (the operand-size prefix makes
 * LGDT take a 32-bit base), sets CR0.PE (and clears CD/NW, which INIT set)
 * and far-jumps into ap_entry32 in the kernel image: from there on the AP
 * runs in the kernel's flat segments, as the BSP does (SDM vol. 3,
 * "Switching to Protected Mode").
 *
 * ap_entry32 takes a stack by ticket (LOCK XADD on ap_ticket: APs may run
 * it at the same time), and in smp64 turns long mode on with the BSP's own
 * CR4 and CR3 and EFER.LME before the far jump to the 64-bit code segment
 * (SDM vol. 3, "Initializing IA-32e Mode"). Both load the BSP's IDT and
 * call ap_main().
 *
 * Under Xen a vCPU can also start through VCPUOP_initialise + VCPUOP_up
 * with a struct vcpu_hvm_context (xen/include/public/hvm/hvm_vcpu.h):
 * smp32 uses VCPU_HVM_MODE_32B at ap_entry32 (flat segments, paging off),
 * smp64 VCPU_HVM_MODE_64B at ap_entry64_xen (long mode on, CR3 = the
 * BSP's). Xen sets the hidden parts of the segment registers only
 * (xen/arch/x86/hvm/domain.c, arch_set_info_hvm_guest): GDTR and IDTR are
 * as reset left them, so both entries load the GDT first. */
#define KERNEL_CS32 0x08
#define KERNEL_CS64 0x10
#define KERNEL_DS   0x18
#define AP_STACK_SHIFT 14               /* 16 KiB per AP */
#define MAX_APS 7                       /* smp.h MAX_CPUS - 1 */

/* Flat data in DS, ES, SS; FS and GS null (both AP entries, 32- and 64-bit) */
.macro LOAD_DATA_SEGMENTS
        mov     $KERNEL_DS, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        xor     %ax, %ax
        mov     %ax, %fs
        mov     %ax, %gs
.endm

        .section .text, "ax"
        .code16
        .globl  tramp_start, tramp_end, tramp_gdtr
tramp_start:
        cli
        cld
        mov     %cs, %ax
        mov     %ax, %ds
        lgdtl   tramp_gdtr - tramp_start
        mov     %cr0, %eax
        and     $0x9FFFFFFF, %eax       /* CD and NW off: caches on */
        or      $1, %eax                /* PE */
        mov     %eax, %cr0
        ljmpl   $KERNEL_CS32, $ap_entry32
        .balign 4
tramp_gdtr:
        .word   0                       /* limit, filled in by the BSP */
        .long   0                       /* base */
tramp_end:

        .code32
        .globl  ap_entry32
ap_entry32:
        cli
        /* VCPUOP_initialise leaves GDTR unset; after the trampoline DS still
         * has its real-mode base 0x8000: CS is flat either way */
        lgdt    %cs:ap_gdtr
        ljmp    $KERNEL_CS32, $1f
1:      LOAD_DATA_SEGMENTS
        mov     $1, %eax
        lock xadd %eax, ap_ticket
        cmp     $MAX_APS, %eax
        jae     ap_park32               /* more APs than stacks: stay out of the way */
        inc     %eax
        shl     $AP_STACK_SHIFT, %eax
        add     $ap_stacks, %eax
        mov     %eax, %esp              /* top of stack number ticket */
#ifdef __x86_64__
        mov     ap_cr4, %eax            /* the BSP's: PAE */
        mov     %eax, %cr4
        mov     ap_cr3, %eax            /* the BSP's page tables */
        mov     %eax, %cr3
        mov     $0xC0000080, %ecx       /* EFER.LME */
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80010000, %eax       /* PG | WP */
        mov     %eax, %cr0
        ljmp    $KERNEL_CS64, $ap_long

        .code64
ap_long:
        mov     %esp, %eax              /* the upper half of RSP is undefined */
        mov     %rax, %rsp
        lidt    ap_idtr(%rip)
        call    ap_main
ap_park64:
        cli
        hlt
        jmp     ap_park64

        .globl  ap_entry64_xen
ap_entry64_xen:
        /* VCPU_HVM_MODE_64B: long mode, flat segments with selector 0, RSP
         * from the context (a small boot stack), no GDT loaded */
        cli
        lgdt    ap_gdtr(%rip)
        pushq   $KERNEL_CS64
        lea     1f(%rip), %rax
        pushq   %rax
        lretq
1:      LOAD_DATA_SEGMENTS
        mov     $1, %eax
        lock xadd %eax, ap_ticket(%rip)
        cmp     $MAX_APS, %eax
        jae     ap_park64
        inc     %eax
        shl     $AP_STACK_SHIFT, %eax
        lea     ap_stacks(%rip), %rdx
        add     %rdx, %rax
        mov     %rax, %rsp
        lidt    ap_idtr(%rip)
        call    ap_main
        jmp     ap_park64
        .code32
#else
        lidt    ap_idtr
        call    ap_main
#endif
ap_park32:
        cli
        hlt
        jmp     ap_park32

/* int patch_fn(void): "mov $imm32, %eax; ret", alone in its page. The BSP or
 * an AP rewrites imm32 (patch_fn + 1) while other CPUs have run it. */
        .section .text.patch, "ax"
#ifdef __x86_64__
        .code64
#endif
        .balign 4096
        .globl  patch_fn
patch_fn:
        mov     $1, %eax
        ret
        .balign 4096

        .bss
        .balign 4096
        .globl  ap_stacks
ap_stacks:
        .space  MAX_APS << AP_STACK_SHIFT      /* ticket t: the top of stack t */
