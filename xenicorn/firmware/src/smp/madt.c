/* Which CPUs there are: the ACPI MADT, as an OS finds it (ACPI 6.5 §5.2.5
 * "Root System Description Pointer", §5.2.12 "Multiple APIC Description
 * Table"): the table with signature "APIC", found through the RSDP as
 * lib/acpi.c does it (QEMU's and xenicorn's tables are found either way). */
#include "smp.h"

struct cpu cpus[MAX_CPUS];
int ncpus = 1;
u32 ioapic_base = 0xFEC00000;

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
    const struct acpi_sdt *madt = acpi_find_table("APIC", sizeof(struct acpi_sdt) + 8);
    if (!madt) {
        printf("cpus: 1 (no ACPI MADT: only the BSP is known)\n");
        return;
    }
    u32 lapic = *(const u32 *)(madt + 1);
    int bsp_listed = 0;
    const u8 *p = (const u8 *)madt + sizeof(struct acpi_sdt) + 8, *end = (const u8 *)madt + madt->len;
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
