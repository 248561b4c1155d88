/* Which CPUs there are: the ACPI MADT, as an OS finds it (ACPI 6.5 §5.2.5
 * "Root System Description Pointer", §5.2.12 "Multiple APIC Description
 * Table"). PVH hands over the RSDP's address in start_info; without it the
 * OS scans the first KiB of the EBDA and 0xE0000-0xFFFFF on 16-byte
 * boundaries for "RSD PTR " with a good checksum (QEMU's and xenicorn's
 * tables are found either way). The RSDP points to the RSDT (32-bit
 * entries) and, from revision 2, the XSDT (64-bit entries); one of their
 * tables is the MADT, signature "APIC". */
#include "smp.h"

struct cpu cpus[MAX_CPUS];
int ncpus = 1;
u32 ioapic_base = 0xFEC00000;

struct __attribute__((packed)) sdt {
    char sig[4]; u32 len; u8 rev, csum; char oem[6], table[8]; u32 oem_rev, creator, creator_rev;
};

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

static const struct sdt *find_madt(void) {
    const u8 *rsdp = find_rsdp();
    if (!rsdp)
        return NULL;
    u32 rsdt = *(const u32 *)(rsdp + 16);
    u64 xsdt = 0;
    if (rsdp[15] >= 2)
        memcpy(&xsdt, rsdp + 24, 8);
    const struct sdt *root = (const struct sdt *)(ulong)(xsdt && xsdt < 0x100000000ULL ? xsdt : rsdt);
    int wide = xsdt && xsdt < 0x100000000ULL;
    if (!root || (memcmp(root->sig, "XSDT", 4) && memcmp(root->sig, "RSDT", 4)))
        return NULL;
    u32 n = (root->len - sizeof(struct sdt)) / (wide ? 8 : 4);
    for (u32 i = 0; i < n; i++) {
        u64 addr = 0;
        memcpy(&addr, (const u8 *)(root + 1) + i * (wide ? 8 : 4), wide ? 8 : 4);
        const struct sdt *t = (const struct sdt *)(ulong)addr;
        if (addr && addr < 0x100000000ULL && !memcmp(t->sig, "APIC", 4) && sum8((const u8 *)t, t->len))
            return t;
    }
    return NULL;
}

static void add_cpu(u32 apic_id, u32 uid) {
    if (apic_id == cpus[0].apic_id) {
        cpus[0].acpi_uid = uid;
        return;
    }
    if (ncpus == MAX_CPUS) {
        printf("more than %d CPUs: APIC ID %u left out\n", MAX_CPUS, apic_id);
        return;
    }
    cpus[ncpus].apic_id = apic_id;
    cpus[ncpus].acpi_uid = uid;
    cpus[ncpus].vcpu_id = ~0u;
    ncpus++;
}

/* MADT entries (ACPI 6.5 §5.2.12): type 0 processor local APIC {uid, APIC
 * ID, flags}, type 9 processor local x2APIC {x2APIC ID, flags, uid}, type 1
 * IOAPIC {id, address, GSI base}. Flags bit 0: enabled; a disabled entry
 * (bit 1 "online capable" only) is a CPU that is not there yet. */
void read_madt(void) {
    cpus[0].apic_id = apic_read(APIC_ID) >> 24;            /* the BSP is slot 0 */
    cpus[0].vcpu_id = ~0u;
    const struct sdt *madt = find_madt();
    if (!madt) {
        printf("cpus: 1 (no ACPI MADT: only the BSP is known)\n");
        return;
    }
    u32 lapic = *(const u32 *)(madt + 1);
    int bsp_listed = 0;
    const u8 *p = (const u8 *)madt + sizeof(struct sdt) + 8, *end = (const u8 *)madt + madt->len;
    for (; p + 2 <= end && p[1] >= 2 && p + p[1] <= end; p += p[1]) {
        u32 flags, id, uid;
        if (p[0] == 0 && p[1] >= 8) {
            memcpy(&flags, p + 4, 4);
            id = p[3]; uid = p[2];
        } else if (p[0] == 9 && p[1] >= 16) {
            memcpy(&id, p + 4, 4); memcpy(&flags, p + 8, 4); memcpy(&uid, p + 12, 4);
            if (id > 0xFE)
                continue;                                  /* not reachable in xAPIC mode */
        } else {
            if (p[0] == 1 && p[1] >= 12 && !*(const u32 *)(p + 8))
                ioapic_base = *(const u32 *)(p + 4);
            continue;
        }
        if (!(flags & 1))
            continue;
        bsp_listed |= id == cpus[0].apic_id;
        add_cpu(id, uid);
    }
    printf("cpus: %d (APIC IDs", ncpus);
    for (int i = 0; i < ncpus; i++)
        printf(" %u", cpus[i].apic_id);
    printf("; MADT local APIC address %#x)\n", lapic);
    check(bsp_listed, "the MADT lists the BSP (APIC ID %u)", cpus[0].apic_id);
    check(lapic == LAPIC, "local APICs at %#lx", LAPIC);
}
