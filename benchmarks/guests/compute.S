/* Compute-bound benchmark guest (32-bit flat, loaded as a flat binary at
 * 1 MiB). Three loops of 8 instructions per iteration, at fixed offsets:
 *   +0x000  registers only
 *   +0x100  one load per iteration
 *   +0x200  one store per iteration
 * ECX holds the iteration count on entry. Each loop ends at its "done"
 * label (+0x80 from its start) with an ACPI poweroff. */
        .code32
        .text
        .globl  _start
_start:
reg_loop:
        add     %eax, %ebx
        xor     %ebx, %edx
        inc     %esi
        add     %edx, %edi
        ror     $3, %eax
        sub     %esi, %eax
        dec     %ecx
        jnz     reg_loop
        jmp     done_reg
        .org    0x80
done_reg:
        mov     $0x2000, %ax
        mov     $0x604, %dx
        out     %ax, %dx
        hlt

        .org    0x100
load_loop:
        mov     0x180000, %eax
        xor     %ebx, %edx
        inc     %esi
        add     %edx, %edi
        ror     $3, %eax
        sub     %esi, %eax
        dec     %ecx
        jnz     load_loop
        jmp     done_load
        .org    0x180
done_load:
        mov     $0x2000, %ax
        mov     $0x604, %dx
        out     %ax, %dx
        hlt

        .org    0x200
store_loop:
        mov     %eax, 0x180000
        xor     %ebx, %edx
        inc     %esi
        add     %edx, %edi
        ror     $3, %eax
        sub     %esi, %eax
        dec     %ecx
        jnz     store_loop
        jmp     done_store
        .org    0x280
done_store:
        mov     $0x2000, %ax
        mov     $0x604, %dx
        out     %ax, %dx
        hlt
