"""Booting a bzImage the way a boot loader does: the Linux/x86 boot protocol.

A PVH kernel is an ELF that Xen enters with ``hvm_start_info`` (see
:mod:`.loader`). A *bzImage* is what GRUB, SYSLINUX or QEMU's ``-kernel``
load on an ordinary PC, and what Xen's HVM guests boot through their
firmware: a 16-bit setup program, then the protected-mode kernel, which is
itself a small decompressor carrying the real kernel (see
:mod:`xenicorn.linux.bzimage`). Booting it this way makes Linux run as an
**HVM guest**: it finds Xen through CPUID, but discovers the rest of the PC
(memory, interrupt controllers, timers) the way it does on hardware.

Facts here are from Linux's ``Documentation/arch/x86/boot.rst`` ("The
Linux/x86 Boot Protocol") and ``zero-page.rst``.

**The setup header.** At offset 0x1F1 of the image, in the boot sector and
setup code, sits the *setup header*: what the kernel tells the loader
(``HdrS`` at 0x202, the protocol version at 0x206, how many setup sectors
precede the protected-mode part, where it wants to be loaded, how large a
command line it takes, how high the initrd may go) and fields the loader
fills in. Its length is in the image: it ends at ``0x202 + byte[0x201]``.

**The zero page** (``struct boot_params``, one 4 KiB page, traditionally at
physical 0 in the real-mode setup's segment) is everything the kernel
learns from its loader. The 16-bit setup code normally fills it from BIOS
calls (E820, video mode, EDD) before switching to protected mode; a loader
that uses the **32-bit entry** skips that code and must fill the page
itself. That is what xenicorn does, because there is no BIOS to call:

==========  ===================  ==============================================
offset      field                what xenicorn puts there
==========  ===================  ==============================================
0x070       acpi_rsdp_addr       the ACPI RSDP (:mod:`.acpi`), or 0 for none
0x0C0       ext_ramdisk_image    ramdisk_image bits 63:32
0x0C4       ext_ramdisk_size     ramdisk_size bits 63:32
0x0C8       ext_cmd_line_ptr     cmd_line_ptr bits 63:32
0x1E8       e820_entries         number of entries at 0x2D0
0x1EF       sentinel             0 (a loader that copies 0x1F0+ blindly leaves
                                 it non-zero, and Linux then distrusts the page)
0x1F1       hdr                  the image's setup header, copied, then:
0x210       hdr.type_of_loader   0xFF: "undefined" loader
0x211       hdr.loadflags        LOADED_HIGH (bit 0) as the image says
0x214       hdr.code32_start     where the protected-mode kernel was put
0x218       hdr.ramdisk_image    initrd address (bits 31:0), 0 if none
0x21C       hdr.ramdisk_size     initrd size (bits 31:0)
0x228       hdr.cmd_line_ptr     NUL-terminated command line (bits 31:0)
0x2D0       e820_table           up to 128 entries {u64 addr, u64 size, u32 type}
==========  ===================  ==============================================

Protocol 2.12 (Linux 3.8) is the oldest accepted: it is where
``xloadflags`` and the ``ext_*`` halves of the 64-bit fields appear, and
with 2.10's ``pref_address`` and ``init_size`` they say everything a
loader needs to place a relocatable kernel. Every x86-64 kernel since 2013
has it.

**Why the 32-bit entry.** The image's first 512-byte sectors are real-mode
code that calls the BIOS (``int 0x15`` for E820, ``int 0x10`` for video);
xenicorn has no BIOS. The protocol's "32-bit boot protocol" section lets a
loader skip them: load the protected-mode part (from file offset
``(setup_sects + 1) * 512``), and jump to its first byte in flat 32-bit
protected mode with paging and interrupts off, a GDT whose selectors 0x10
(``__BOOT_CS``) and 0x18 (``__BOOT_DS``) are 4 GiB flat code and data, CS =
0x10, DS = ES = SS = 0x18, ``ESI`` = the zero page, and ``EBP`` = ``EDI`` =
``EBX`` = 0. From there the decompressor in the image runs inside the guest:
it builds page tables, enters long mode, unpacks ``vmlinux`` (choosing a
KASLR slot unless ``nokaslr``), and jumps to it with the same zero page.

Memory used (all below 640 KiB, which Linux reserves at boot): the GDT at
0x5000, the zero page at 0x6000, the command line at 0x7000; the kernel at
``pref_address`` (16 MiB for distribution kernels) when it is relocatable,
else at 0x100000; the initrd page-aligned at the top of low RAM, below
``initrd_addr_max``; and two words of the BIOS data area (0x40E, the EBDA
segment; 0x413, KiB of base memory) as a PC BIOS leaves them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .loader import LoadedKernel, LoadError, _read_file
from ..machine.memory import PAGE_SIZE, GuestMemory

HDR_MAGIC = b"HdrS"
MIN_VERSION = 0x020C                   # 2.12: xloadflags and the ext_* fields
LOADED_HIGH = 1 << 0                   # loadflags: protected-mode code at 0x100000 (a bzImage)
XLF_KERNEL_64 = 1 << 0                 # xloadflags: has the 64-bit entry at +0x200

# Setup header fields: offsets in the image and, identically, in the zero page.
HDR_START = 0x1F1
SETUP_SECTS, BOOT_FLAG, JUMP, HEADER, VERSION = 0x1F1, 0x1FE, 0x200, 0x202, 0x206
SYSSIZE = 0x1F4
TYPE_OF_LOADER, LOADFLAGS, CODE32_START = 0x210, 0x211, 0x214
RAMDISK_IMAGE, RAMDISK_SIZE, CMD_LINE_PTR, INITRD_ADDR_MAX = 0x218, 0x21C, 0x228, 0x22C
KERNEL_ALIGNMENT, RELOCATABLE_KERNEL, XLOADFLAGS, CMDLINE_SIZE = 0x230, 0x234, 0x236, 0x238
PREF_ADDRESS, INIT_SIZE = 0x258, 0x260

# Zero-page fields outside the setup header (zero-page.rst).
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE, BP_EXT_RAMDISK_SIZE, BP_EXT_CMD_LINE_PTR = 0x0C0, 0x0C4, 0x0C8
BP_E820_ENTRIES, BP_SENTINEL, BP_E820_TABLE = 0x1E8, 0x1EF, 0x2D0
E820_MAX_ENTRIES = 128                 # the zero page has room for 128 (0x2D0..0xCD0)
BOOT_PARAMS_SIZE = 4096

BOOT_GDT_ADDR = 0x5000
ZERO_PAGE_ADDR = 0x6000
CMDLINE_ADDR = 0x7000
CMDLINE_LIMIT = 4095                   # the page at 0x7000, less the NUL
DEFAULT_LOAD_ADDR = 0x100000           # code32_start of a bzImage that cannot move
BOOT_CS, BOOT_DS = 0x10, 0x18
EBDA_SEGMENT = 0x9FC0                  # the EBDA at 0x9FC00, as memory.py's E820 map says
BASE_MEMORY_KIB = 0x9FC00 >> 10        # 639 KiB of conventional memory


@dataclass(frozen=True)
class SetupHeader:
    """The setup header fields a loader reads (boot.rst, "The real-mode kernel header")."""

    raw: bytes                  # the whole header, 0x1F1 up to its end, to copy into the zero page
    version: int                # protocol, major << 8 | minor
    setup_sects: int            # 512-byte setup sectors after the boot sector (0 in the file means 4)
    syssize: int                # protected-mode code size, 16-byte paragraphs
    loadflags: int
    code32_start: int
    initrd_addr_max: int        # highest address the initrd's last byte may have
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int           # longest command line, NUL not counted
    pref_address: int
    init_size: int              # memory from the load address the kernel needs before it looks at E820

    @property
    def setup_size(self) -> int:
        """File offset of the protected-mode kernel."""
        return (self.setup_sects + 1) * 512

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF}"


def parse_header(image: bytes, name: str = "kernel") -> SetupHeader:
    """Read and check a bzImage's setup header; :class:`LoadError` with one line if unusable."""
    if len(image) < 0x270 or image[HEADER:HEADER + 4] != HDR_MAGIC:
        raise LoadError(f"{name}: not a bzImage (no HdrS setup header at 0x202)")
    def u8(off: int) -> int:
        return image[off]

    def u16(off: int) -> int:
        return struct.unpack_from("<H", image, off)[0]

    def u32(off: int) -> int:
        return struct.unpack_from("<I", image, off)[0]

    version = u16(VERSION)
    if version < MIN_VERSION:
        raise LoadError(f"{name}: boot protocol {version >> 8}.{version & 0xFF} is too old "
                        "(the 32-bit entry with 64-bit fields needs 2.12, Linux 3.8 or later)")
    end = HEADER + u8(JUMP + 1)                    # boot.rst: the header ends at 0x202 + byte[0x201]
    hdr = SetupHeader(
        raw=bytes(image[HDR_START:end]), version=version, setup_sects=u8(SETUP_SECTS) or 4,
        syssize=u32(SYSSIZE), loadflags=u8(LOADFLAGS), code32_start=u32(CODE32_START),
        initrd_addr_max=u32(INITRD_ADDR_MAX), kernel_alignment=u32(KERNEL_ALIGNMENT),
        relocatable=bool(u8(RELOCATABLE_KERNEL)), xloadflags=u16(XLOADFLAGS),
        cmdline_size=u32(CMDLINE_SIZE), pref_address=struct.unpack_from("<Q", image, PREF_ADDRESS)[0],
        init_size=u32(INIT_SIZE))
    if end < INIT_SIZE + 4:
        raise LoadError(f"{name}: setup header ends at {end:#x}, before the fields of protocol "
                        f"{hdr.version_text} (corrupt image?)")
    if not hdr.loadflags & LOADED_HIGH:
        raise LoadError(f"{name}: a zImage (loaded at 0x10000), not a bzImage: not supported")
    kernel_bytes = len(image) - hdr.setup_size
    if kernel_bytes <= 0 or kernel_bytes < hdr.syssize * 16:
        raise LoadError(f"{name}: the image is {len(image)} bytes but its header says "
                        f"{hdr.setup_size + hdr.syssize * 16} (truncated?)")
    return hdr


@dataclass
class LinuxBoot:
    """Where the loader put things (for the vCPU reset, the MP table and tests)."""

    header: SetupHeader
    load_addr: int              # the protected-mode kernel; the 32-bit entry point
    kernel_size: int            # bytes copied there
    zero_page: int = ZERO_PAGE_ADDR
    cmdline: int = CMDLINE_ADDR
    initrd: tuple[int, int] | None = None     # (address, size)


def _choose_load_addr(mem: GuestMemory, hdr: SetupHeader, name: str) -> int:
    """pref_address for a relocatable kernel that fits there, else the fixed 0x100000."""
    low_end = mem.ram_regions[0][1]
    need = max(hdr.init_size, hdr.syssize * 16)
    align = hdr.kernel_alignment or PAGE_SIZE
    pref = hdr.pref_address
    if hdr.relocatable and pref and pref % align == 0 and pref + need <= low_end:
        return pref
    if DEFAULT_LOAD_ADDR + need > low_end:
        raise LoadError(f"{name}: the kernel needs {need >> 20} MiB from {DEFAULT_LOAD_ADDR:#x} "
                        f"(init_size) but the guest has {mem.size >> 20} MiB; try a larger -m")
    return DEFAULT_LOAD_ADDR


def load_bzimage(mem: GuestMemory, path: str, cmdline: str, initrd: str | None = None,
                 data: bytes | None = None, rsdp: int = 0) -> tuple[LoadedKernel, LinuxBoot]:
    """Load a bzImage, its command line and initrd, and build the zero page (see module doc)."""
    image = _read_file(path) if data is None else data
    hdr = parse_header(image, path)
    raw_cmdline = cmdline.encode()
    limit = min(hdr.cmdline_size, CMDLINE_LIMIT)
    if len(raw_cmdline) > limit:
        raise LoadError(f"command line is {len(raw_cmdline)} bytes; this kernel takes at most {limit}")
    e820 = mem.e820()
    if len(e820) > E820_MAX_ENTRIES:
        raise LoadError(f"the memory map has {len(e820)} entries; the zero page holds {E820_MAX_ENTRIES}")

    load_addr = _choose_load_addr(mem, hdr, path)
    kernel = bytes(image[hdr.setup_size:])
    mem.write(load_addr, kernel)
    mem.code_written(load_addr, len(kernel))
    boot = LinuxBoot(hdr, load_addr, len(kernel))

    if initrd:
        blob = _read_file(initrd)
        top = min(mem.ram_regions[0][1], hdr.initrd_addr_max + 1)
        addr = (top - len(blob)) & ~(PAGE_SIZE - 1)
        kernel_end = load_addr + max(hdr.init_size, len(kernel))
        if addr < kernel_end:
            raise LoadError(f"{initrd}: {len(blob)} bytes do not fit between the kernel (ends at "
                            f"{kernel_end:#x}) and {top:#x}; try a larger -m")
        mem.write(addr, blob)
        boot.initrd = (addr, len(blob))

    mem.write(CMDLINE_ADDR, raw_cmdline + b"\0")
    mem.write(ZERO_PAGE_ADDR, build_zero_page(hdr, load_addr, CMDLINE_ADDR, boot.initrd, e820, rsdp))
    mem.write(BOOT_GDT_ADDR, boot_gdt())
    # The BIOS data area, as a PC BIOS leaves it: the EBDA's segment and the
    # KiB of conventional memory (Linux's early code reads both to keep the
    # EBDA and its own real-mode trampoline apart).
    mem.write_struct(0x40E, "<H", EBDA_SEGMENT)
    mem.write_struct(0x413, "<H", BASE_MEMORY_KIB)
    loaded = LoadedKernel(path, load_addr, False, 64 if hdr.xloadflags & XLF_KERNEL_64 else 32,
                          segments=[(load_addr, max(hdr.init_size, len(kernel)))], start_info=ZERO_PAGE_ADDR)
    if boot.initrd:
        loaded.modules.append(boot.initrd)
    return loaded, boot


def build_zero_page(hdr: SetupHeader, load_addr: int, cmdline: int, initrd: tuple[int, int] | None,
                    e820, rsdp: int = 0) -> bytes:
    """``struct boot_params`` for the 32-bit entry (module doc has the fields)."""
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[HDR_START:HDR_START + len(hdr.raw)] = hdr.raw
    bp[BP_SENTINEL] = 0
    bp[TYPE_OF_LOADER] = 0xFF
    bp[LOADFLAGS] = hdr.loadflags | LOADED_HIGH            # no heap: the 16-bit setup does not run
    struct.pack_into("<I", bp, CODE32_START, load_addr)
    addr, size = initrd or (0, 0)
    struct.pack_into("<II", bp, RAMDISK_IMAGE, addr & 0xFFFFFFFF, size & 0xFFFFFFFF)
    struct.pack_into("<II", bp, BP_EXT_RAMDISK_IMAGE, addr >> 32, size >> 32)
    struct.pack_into("<I", bp, CMD_LINE_PTR, cmdline & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline >> 32)
    struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, e.addr, e.size, e.type)
    return bytes(bp)


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """An 8-byte segment descriptor (SDM vol. 3 §3.4.5)."""
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((limit >> 16) & 0x0F) | (flags << 4), base >> 24)


def boot_gdt() -> bytes:
    """Null, null, then __BOOT_CS (0x10: 4 GiB execute/read) and __BOOT_DS (0x18: 4 GiB read/write)."""
    code = _descriptor(0, 0xFFFFF, 0x9B, 0xC)        # present, DPL0, code exec/read accessed; G, D
    data = _descriptor(0, 0xFFFFF, 0x93, 0xC)        # present, DPL0, data read/write accessed; G, B
    return bytes(16) + code + data


def enter_32bit(vcpu, boot: LinuxBoot) -> None:
    """The CPU state of the protocol's 32-bit entry (module doc)."""
    vcpu.reset_to_flat32(boot.load_addr)             # flat CS 0x10 / DS 0x18, PE only, IF = 0
    vcpu.set_reg("rsi", boot.zero_page)              # EBX, EBP, EDI and the rest stay 0
    vcpu.set_descriptor_table("gdtr", BOOT_GDT_ADDR, 4 * 8 - 1)
