/* mboot32: the Multiboot v1 contract, checked from inside the kernel.
 *
 * The loader (xenicorn's, or QEMU's -kernel) must enter with EAX =
 * 0x2BADB002, EBX -> the multiboot information, protected mode without
 * paging, interrupts off, not in virtual-8086 mode; the information must
 * describe memory (mem_lower/mem_upper agreeing with the memory map), the
 * command line, the modules (page-aligned, as the header asks, with their
 * strings) and the loader's name. The test passes "--append mbtest" and
 * two modules whose first bytes name them. */
#include "../lib/kernel.h"

extern u32 mb_magic, mb_info, mb_eflags, mb_cr0;
extern u16 mb_cs, mb_ds;
extern char boot_stack_top[];

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4], mmap_length, mmap_addr, drives_length, drives_addr, config_table;
    u32 boot_loader_name;
};
struct mb_module { u32 start, end, string, reserved; };
struct mb_mmap { u32 size; u64 addr, len; u32 type; } __attribute__((packed));

static int starts_with(const char *s, const char *p) {
    while (*p) if (*s++ != *p++) return 0;
    return 1;
}

static int ends_with(const char *s, const char *p) {
    ulong n = strlen(s), m = strlen(p);
    return n >= m && strcmp(s + n - m, p) == 0;
}

/* QEMU's fw_cfg, legacy I/O: select with a 16-bit write to 0x510, read bytes at 0x511 */
static u64 fw_cfg(u16 key, int bytes) {
    u64 v = 0;
    outw(0x510, key);
    for (int i = 0; i < bytes; i++) v |= (u64)inb(0x511) << (8 * i);
    return v;
}

void kmain(void) {
    check(mb_magic == 0x2BADB002, "EAX at entry is the multiboot loader magic (%x)", mb_magic);
    check((mb_cr0 & 1) && !(mb_cr0 & 0x80000000), "protected mode, paging off (CR0 %x)", mb_cr0);
    check(!(mb_eflags & (1 << 9)) && !(mb_eflags & (1 << 17)), "IF and VM clear (EFLAGS %x)", mb_eflags);
    check(mb_cs != 0 && mb_ds != 0, "CS %x and DS %x are loaded selectors", mb_cs, mb_ds);
    struct mb_info *mbi = (struct mb_info *)(ulong)mb_info;
    check(mb_info != 0 && mb_info < 0x100000, "EBX -> the information at %x, below 1 MiB", mb_info);
    u32 want = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9);
    check((mbi->flags & want) == want, "flags %x: memory, cmdline, modules, mmap, loader name", mbi->flags);

    /* memory: the map's RAM from 0 and from 1 MiB agree with mem_lower/upper */
    u64 low = 0, upper = 0, ram = 0;
    int entries = 0, sizes_ok = 1;
    for (u32 p = mbi->mmap_addr; p < mbi->mmap_addr + mbi->mmap_length; ) {
        struct mb_mmap *e = (struct mb_mmap *)(ulong)p;
        sizes_ok &= e->size == 20;
        if (e->type == 1 && e->addr == 0) low = e->len;
        if (e->type == 1 && e->addr <= 0x100000 && e->addr + e->len > 0x100000)
            upper = e->addr + e->len - 0x100000;
        if (e->type == 1) ram += e->len;
        entries++;
        p += e->size + 4;
    }
    check(entries >= 3 && sizes_ok, "memory map: %d entries of size 20", entries);
    check(mbi->mem_lower == (low > 0xA0000 ? 640 : low >> 10), "mem_lower %u KiB", mbi->mem_lower);
    check(upper && mbi->mem_upper == upper >> 10, "mem_upper %u KiB from 1 MiB", mbi->mem_upper);
    printf("RAM in the map: %u KiB\n", (u32)(ram >> 10));

    /* fw_cfg, as kvm-unit-tests reads it: the signature, then RAM and CPUs */
    u32 sig = (u32)fw_cfg(0x00, 4);
    check(sig == 0x554D4551, "fw_cfg signature 'QEMU' (%x)", sig);
    u64 fw_ram = fw_cfg(0x03, 8);
    printf("fw_cfg: RAM %u MiB, %u CPUs\n", (u32)(fw_ram >> 20), (u32)fw_cfg(0x05, 2));
    check(fw_ram >= ram && fw_ram - ram < (1 << 20), "fw_cfg RAM size matches the memory map's RAM");
    check(fw_cfg(0x05, 2) >= 1 && fw_cfg(0x0f, 2) >= fw_cfg(0x05, 2), "fw_cfg CPU count and max CPUs");
    check(fw_cfg(0x1234, 4) == 0, "an absent fw_cfg item reads 0");

    /* A20: 1 MiB above an address is not the same byte */
    volatile u8 *lo = (u8 *)0x8000, *hi = (u8 *)0x108000;
    u8 saved = *lo;
    *lo = 0x5A; *hi = 0xA5;
    check(*lo == 0x5A, "A20 enabled (0x108000 does not wrap to 0x8000)");
    *lo = saved;

    const char *cmdline = (const char *)(ulong)mbi->cmdline;
    printf("cmdline: %s\n", cmdline);
    check(ends_with(cmdline, " mbtest"), "command line is the kernel's path, then its arguments");

    const char *name = (const char *)(ulong)mbi->boot_loader_name;
    printf("boot loader: %s\n", name);
    check(name[0] != 0, "the loader names itself");

    check(mbi->mods_count == 2, "%u modules", mbi->mods_count);
    struct mb_module *mods = (struct mb_module *)(ulong)mbi->mods_addr;
    u32 kernel_end = (u32)(ulong)boot_stack_top;    /* the last of the kernel's own data we know of */
    if (kernel_stack_end() > kernel_end) kernel_end = (u32)kernel_stack_end();
    for (u32 i = 0; i < mbi->mods_count && i < 2; i++) {
        const char *s = (const char *)(ulong)mods[i].string;
        const char *data = (const char *)(ulong)mods[i].start;
        printf("module %u: %x-%x '%s'\n", i, mods[i].start, mods[i].end, s);
        check(!(mods[i].start & 0xFFF), "module %u page-aligned", i);
        check(mods[i].start >= kernel_end, "module %u above the kernel (ends %x)", i, kernel_end);
        check(mods[i].end - mods[i].start == 16, "module %u is 16 bytes", i);
        check(starts_with(data, i ? "MODULE-TWO" : "MODULE-ONE"), "module %u holds its file", i);
        check(ends_with(s, i ? "two.bin" : "one.bin arg=1"), "module %u string is its --initrd entry", i);
    }
}
