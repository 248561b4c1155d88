/* ACPI tables as an OS finds them (ACPI 6.5 §5.2.5 "Root System Description
 * Pointer", §5.2.7-8 RSDT/XSDT). PVH hands over the RSDP's address in
 * start_info; without it the OS scans the first KiB of the EBDA and
 * 0xE0000-0xFFFFF on 16-byte boundaries for "RSD PTR " with a good checksum.
 * The RSDP points to the RSDT (32-bit entries) and, from revision 2, the
 * XSDT (64-bit entries), which list the other tables by address. Kernels
 * that use it list lib/acpi.c among their sources. */
#include "kernel.h"

static int sum8(const u8 *p, u32 n) { u8 s = 0; while (n--) s += *p++; return s == 0; }

static const u8 *find_rsdp(void) {
    if (start_info && start_info->rsdp_paddr && start_info->rsdp_paddr < 0x100000000ULL)
        return (const u8 *)(ulong)start_info->rsdp_paddr;
    u16 ebda_seg;                                          /* the BDA's word at 0x40E (an asm load: gcc */
    __asm__ volatile("movw 0x40E, %0" : "=r"(ebda_seg));   /* warns about constant addresses) */
    ulong ebda = (ulong)ebda_seg << 4;                     /* first KiB of the EBDA, then the BIOS area */
    ulong ranges[2][2] = { { ebda, ebda + 1024 }, { 0xE0000, 0x100000 } };
    for (int r = 0; r < 2; r++)
        for (ulong a = ranges[r][0]; a && a < ranges[r][1]; a += 16)
            if (!memcmp((const void *)a, "RSD PTR ", 8) && sum8((const u8 *)a, 20))
                return (const u8 *)a;
    return NULL;
}

const struct acpi_sdt *acpi_find_table(const char *sig, u32 min_len) {
    const u8 *rsdp = find_rsdp();
    if (!rsdp)
        return NULL;
    u64 xsdt = 0;
    if (rsdp[15] >= 2)
        memcpy(&xsdt, rsdp + 24, 8);
    int wide = xsdt && xsdt < 0x100000000ULL;
    const struct acpi_sdt *root = (const struct acpi_sdt *)(ulong)(wide ? xsdt : *(const u32 *)(rsdp + 16));
    if (!root || (memcmp(root->sig, "XSDT", 4) && memcmp(root->sig, "RSDT", 4))
        || !sum8((const u8 *)root, root->len))
        return NULL;
    u32 n = (root->len - sizeof(struct acpi_sdt)) / (wide ? 8 : 4);
    for (u32 i = 0; i < n; i++) {
        u64 addr = 0;
        memcpy(&addr, (const u8 *)(root + 1) + i * (wide ? 8 : 4), wide ? 8 : 4);
        const struct acpi_sdt *t = (const struct acpi_sdt *)(ulong)addr;
        if (addr && addr < 0x100000000ULL && !memcmp(t->sig, sig, 4) && t->len >= min_len
            && sum8((const u8 *)t, t->len))
            return t;
    }
    return NULL;
}
