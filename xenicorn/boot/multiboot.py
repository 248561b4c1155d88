"""Multiboot (version 1): how GRUB and QEMU's ``-kernel`` boot most small kernels.

Before PVH and the Linux boot protocol were common, the free-software world
agreed on one contract between a boot loader and a kernel, the Multiboot
Specification (0.6.96). Hobby kernels, test kernels (kvm-unit-tests among
them) and GRUB still speak it. The kernel announces itself with a *header*
in its first 8 KiB, 4-byte aligned::

    0   magic      0x1BADB002
    4   flags      bits 0-15 are requirements (the loader must refuse a
                   kernel asking for one it does not know), 16-31 optional
    8   checksum   magic + flags + checksum == 0 (mod 2**32)
    12  header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr
                   (only with flag 16, "the a.out kludge": where to load a
                   file that is not ELF)

Flag 0 asks for modules on 4 KiB boundaries, flag 1 for the memory
information, flag 2 for a video mode (a text console here: the request is
answered without a framebuffer, as QEMU does). Without flag 16 the file is
an ELF and its ``PT_LOAD`` segments go to their physical addresses.

The loader enters the kernel in 32-bit protected mode, paging off,
interrupts off, flat 4 GiB code and data segments, with ``EAX = 0x2BADB002``
(so the kernel knows who booted it) and ``EBX`` the physical address of the
*multiboot information* it built:

=====  ===========================  ========================================
off    field                        valid when ``flags`` has bit
=====  ===========================  ========================================
0      flags                        (always)
4, 8   mem_lower, mem_upper (KiB)   0: RAM below 640 KiB / from 1 MiB on
16     cmdline                      2: the kernel's command line (C string)
20,24  mods_count, mods_addr        3: modules {start, end, string, 0}
44,48  mmap_length, mmap_addr       6: memory map {size=20, base, length,
                                       type} (``size`` excludes itself)
64     boot_loader_name             9: a C string
=====  ===========================  ========================================

xenicorn builds it as QEMU's hw/i386/multiboot.c does (facts from there):
the information at 0x9000, the command line "<kernel path> <args>", the
modules page-aligned after the kernel, each ``--initrd`` entry
(comma-separated, "FILE ARGS") one module whose string is the entry as
given. The memory map is the machine's E820 map. As under QEMU (whose
option ROM copies the kernel image after writing the information), a kernel
image that overlaps the information area wins: its bytes are what is there.
"""
from __future__ import annotations

import struct

from ..machine.memory import GuestMemory, PAGE_SIZE
from .loader import LoadError, LoadedKernel, _read_file, load_elf

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002             # EAX at entry
SEARCH = 8192                             # the header lies in the first 8 KiB
FLAG_PAGE_ALIGN, FLAG_MEMORY_INFO, FLAG_VIDEO_MODE, FLAG_AOUT_KLUDGE = 1 << 0, 1 << 1, 1 << 2, 1 << 16
KNOWN_REQUIREMENTS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

# multiboot_info.flags bits
MBI_MEMORY, MBI_CMDLINE, MBI_MODS, MBI_MMAP, MBI_LOADER_NAME = 1 << 0, 1 << 2, 1 << 3, 1 << 6, 1 << 9

MBI_ADDR = 0x9000                         # QEMU's MULTIBOOT_STRUCT_ADDR
MBI_SIZE = 0x58                           # up to the VBE fields, which stay 0
MMAP_ADDR = MBI_ADDR + 0x100
MODS_ADDR = MBI_ADDR + 0x400              # 16 bytes each
LOADER_NAME_ADDR = MBI_ADDR + 0x600
STRINGS_ADDR = MBI_ADDR + 0x1000          # the command line, then module strings
STRINGS_END = 0x10000
MAX_MODULES = 32
LOADER_NAME = b"xenicorn\0"


def find_header(data: bytes) -> tuple[int, tuple[int, ...]] | None:
    """(file offset, the header's eight words) of the first valid header, or None."""
    for off in range(0, min(len(data), SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            words = struct.unpack_from("<8I", data.ljust(off + 32, b"\0"), off)
            return off, words
    return None


def is_multiboot(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return find_header(f.read(SEARCH)) is not None
    except OSError:
        return False


def _load_aout(mem: GuestMemory, path: str, data: bytes, off: int, words: tuple[int, ...]) -> LoadedKernel:
    """The a.out kludge: the header's own addresses say what to load where."""
    header_addr, load_addr, load_end, bss_end, entry = words[3:8]
    if header_addr < load_addr or header_addr - load_addr > off:
        raise LoadError(f"{path}: multiboot header_addr {header_addr:#x} is not inside the image "
                        f"loaded at {load_addr:#x}")
    start = off - (header_addr - load_addr)            # file offset of load_addr
    size = (load_end - load_addr) if load_end else len(data) - start
    if size <= 0 or start + size > len(data):
        raise LoadError(f"{path}: multiboot load_end_addr {load_end:#x} lies outside the file")
    end = max(load_addr + size, bss_end)
    if bss_end and bss_end < load_addr + size:
        raise LoadError(f"{path}: multiboot bss_end_addr {bss_end:#x} is below load_end_addr")
    if not mem.is_ram(load_addr, end - load_addr) or load_addr < 0x100000 and end > 0x9FC00:
        raise LoadError(f"{path}: image at {load_addr:#x}+{end - load_addr:#x} does not fit in guest RAM "
                        f"({mem.size >> 20} MiB; try a larger -m)")
    mem.write(load_addr, data[start:start + size])
    mem.fill(load_addr + size, end - load_addr - size)
    mem.code_written(load_addr, end - load_addr)
    return LoadedKernel(path, entry, False, 32, [(load_addr, end - load_addr)])


def load(mem: GuestMemory, path: str, cmdline: str, modules: list[str]) -> LoadedKernel:
    """Load a multiboot kernel and its modules; write the information; return the kernel.

    ``kernel.start_info`` is the information's address (EBX at entry).
    """
    data = _read_file(path)
    found = find_header(data)
    if found is None:
        raise LoadError(f"{path}: no multiboot header in its first 8 KiB")
    off, words = found
    flags = words[1]
    unknown = flags & 0xFFFF & ~KNOWN_REQUIREMENTS
    if unknown:
        raise LoadError(f"{path}: multiboot header requires features {unknown:#x} this loader does not know")
    if not flags & FLAG_AOUT_KLUDGE and data[:4] != b"\x7fELF":
        raise LoadError(f"{path}: multiboot kernel without the a.out kludge (flag 16) must be an ELF file")

    def place_kernel() -> LoadedKernel:
        if flags & FLAG_AOUT_KLUDGE:
            return _load_aout(mem, path, data, off, words)
        return load_elf(mem, path, data, pvh_note=False)

    kernel = place_kernel()
    if len(modules) > MAX_MODULES:
        raise LoadError(f"{len(modules)} multiboot modules: at most {MAX_MODULES}")
    strings = _Strings(mem)
    cmdline_addr = strings.add(f"{path} {cmdline}")
    next_addr = _page_up(max(p + s for p, s in kernel.segments))
    for i, spec in enumerate(modules):
        file = spec.split(" ", 1)[0]
        blob = _read_file(file)
        if not mem.is_ram(next_addr, max(1, len(blob))):
            raise LoadError(f"{file}: {len(blob)} bytes do not fit in guest RAM after the kernel")
        mem.write(next_addr, blob)
        mem.write_struct(MODS_ADDR + 16 * i, "<IIII", next_addr, next_addr + len(blob), strings.add(spec), 0)
        kernel.modules.append((next_addr, len(blob)))
        next_addr = _page_up(next_addr + len(blob))
    e820 = mem.e820()
    for i, e in enumerate(e820):
        mem.write_struct(MMAP_ADDR + 24 * i, "<IQQI", 20, e.addr, e.size, e.type)
    low, upper = _mem_lower_upper(e820)
    mem.write(LOADER_NAME_ADDR, LOADER_NAME)
    info = bytearray(MBI_SIZE)
    struct.pack_into("<III", info, 0, MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME,
                     low, upper)
    struct.pack_into("<III", info, 16, cmdline_addr, len(modules), MODS_ADDR)
    struct.pack_into("<II", info, 44, 24 * len(e820), MMAP_ADDR)
    struct.pack_into("<I", info, 64, LOADER_NAME_ADDR)
    mem.write(MBI_ADDR, bytes(info))
    # QEMU's multiboot option ROM writes the information first and copies the
    # kernel image after it (pc-bios/optionrom/multiboot.S): a kernel linked
    # over the information area (kvm-unit-tests' realmode test runs from
    # 0x8000 to 0xA86C) keeps its own bytes there, and its information is
    # what is left of it. Loading the image again gives the same result.
    if any(p < STRINGS_END and p + size > MBI_ADDR for p, size in kernel.segments):
        place_kernel()
    kernel.start_info = MBI_ADDR
    return kernel


def _page_up(addr: int) -> int:
    return (addr + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _mem_lower_upper(e820) -> tuple[int, int]:
    """KiB of usable RAM from 0 (at most 640) and contiguous from 1 MiB (the spec's two numbers)."""
    low = upper = 0
    for e in e820:
        if e.type == 1 and e.addr == 0:
            low = min(e.size, 640 << 10) >> 10
        if e.type == 1 and e.addr <= 0x100000 < e.addr + e.size:
            upper = (e.addr + e.size - 0x100000) >> 10
    return low, upper


class _Strings:
    """C strings packed in the page after the information."""

    def __init__(self, mem: GuestMemory):
        self.mem, self.next = mem, STRINGS_ADDR

    def add(self, text: str) -> int:
        raw = text.encode() + b"\0"
        if self.next + len(raw) > STRINGS_END:
            raise LoadError(f"multiboot command line and module strings exceed {STRINGS_END - STRINGS_ADDR} bytes")
        addr = self.next
        self.mem.write(addr, raw)
        self.next += len(raw)
        return addr
