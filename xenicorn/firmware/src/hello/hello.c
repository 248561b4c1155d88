/* hello32 / hello64: the first kernel a newcomer boots.
 * Prints a greeting, the command line and the memory map from the PVH
 * start_info, and powers off. */
#include "../lib/kernel.h"

static const char *const e820_names[] = { "?", "RAM", "reserved", "ACPI", "NVS", "unusable" };

void kmain(void) {
#ifdef __x86_64__
    printf("Hello from xenicorn hello64 (long mode, CS=%#x)\n", read_cs());
#else
    printf("Hello from xenicorn hello32 (protected mode, CS=%#x)\n", read_cs());
#endif
    check(start_info && start_info->magic == HVM_START_MAGIC, "start_info magic %#x",
          start_info ? start_info->magic : 0);
    const char *cmdline = (const char *)(ulong)start_info->cmdline_paddr;
    printf("command line: \"%s\"\n", cmdline ? cmdline : "");
    struct hvm_memmap_entry *map = (struct hvm_memmap_entry *)(ulong)start_info->memmap_paddr;
    u64 ram = 0;
    for (u32 i = 0; i < start_info->memmap_entries; i++) {
        printf("memory map: %#llx-%#llx %s\n", map[i].addr, map[i].addr + map[i].size - 1,
               map[i].type < 6 ? e820_names[map[i].type] : "?");
        if (map[i].type == 1) ram += map[i].size;
    }
    printf("RAM: %llu KiB\n", ram >> 10);
    check(ram > 0, "the memory map lists RAM");
}
