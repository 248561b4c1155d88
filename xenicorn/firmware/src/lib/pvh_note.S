/* The PVH entry note (xen/include/public/elfnote.h): type 18,
 * XEN_ELFNOTE_PHYS32_ENTRY, the 32-bit physical address of _start. */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4f - 3f           /* namesz */
        .long 6f - 5f           /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
3:      .asciz "Xen"
4:      .balign 4
5:      .long _start
6:      .balign 4
