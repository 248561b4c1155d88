"""Loading a kernel the way Xen's PVH boot does.

A PVH kernel is an ELF file whose ``Xen`` note ``XEN_ELFNOTE_PHYS32_ENTRY``
(type 18) gives a 32-bit physical entry point. Xen (and QEMU's ``-kernel``
for PVH images) loads every ``PT_LOAD`` segment at its *physical* address,
builds an ``hvm_start_info`` in guest memory, and enters in 32-bit flat
protected mode with paging off and ``EBX`` pointing at it
(xen/include/public/arch-x86/hvm/start_info.h):

=========  =====================  ===========================================
offset     field                  meaning
=========  =====================  ===========================================
0x00       magic                  0x336ec578 ("xEn3" with the 0x80 bit set)
0x04       version                1: the memory map fields are present
0x08       flags                  SIF_* (0 for an unprivileged HVM guest)
0x0c       nr_modules             entries in the module list
0x10       modlist_paddr          -> hvm_modlist_entry[] {paddr, size,
                                  cmdline_paddr, reserved} (32 bytes each)
0x18       cmdline_paddr          -> NUL-terminated command line
0x20       rsdp_paddr             ACPI RSDP, 0 = none
0x28       memmap_paddr           -> hvm_memmap_table_entry[] {addr, size,
                                  type, reserved} (24 bytes each, E820 types)
0x30       memmap_entries         entries in the memory map
0x34       reserved               0
=========  =====================  ===========================================

Without the note the ELF entry is used with the same CPU state. A flat
binary is copied to ``--load-addr`` and entered there.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..machine.memory import GuestMemory, PAGE_SIZE

HVM_START_MAGIC = 0x336EC578
XEN_ELFNOTE_PHYS32_ENTRY = 18
EM_386, EM_X86_64 = 3, 62

START_INFO_ADDR = 0x6000         # one page: start_info, then the tables after it
START_INFO_RSDP = 0x20           # offset of rsdp_paddr
MODLIST_ADDR = 0x6100
MEMMAP_ADDR = 0x6200
CMDLINE_ADDR = 0x7000            # one page for the command line
MAX_CMDLINE = 4095


class LoadError(Exception):
    """The kernel or module cannot be loaded (a user input problem)."""


@dataclass
class LoadedKernel:
    """What the loader did, for the vCPU reset and for tests."""

    path: str
    entry: int
    pvh: bool
    bits: int                                  # ELF class: 32 or 64
    segments: list[tuple[int, int]] = field(default_factory=list)   # (paddr, memsz)
    start_info: int = START_INFO_ADDR
    symbols: dict[str, int] = field(default_factory=dict)
    modules: list[tuple[int, int]] = field(default_factory=list)


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoadError(f"{path}: is a directory, not a kernel image") from None
    except OSError as e:
        raise LoadError(f"{path}: cannot read ({e.strerror})") from None


def _pvh_entry(elf: ELFFile) -> int | None:
    """Find XEN_ELFNOTE_PHYS32_ENTRY in the ELF's notes (segments or sections)."""
    notes = []
    for seg in elf.iter_segments():
        if seg.header.p_type == "PT_NOTE":
            notes.extend(seg.iter_notes())
    if not notes:
        for sec in elf.iter_sections():
            if sec.header.sh_type == "SHT_NOTE":
                notes.extend(sec.iter_notes())
    for note in notes:
        ntype = note["n_type"]
        if note["n_name"] == "Xen" and ntype in (XEN_ELFNOTE_PHYS32_ENTRY, "NT_XEN_PHYS32_ENTRY"):
            desc = note["n_desc"]
            raw = desc if isinstance(desc, (bytes, bytearray)) else desc.encode("latin-1")
            if len(raw) >= 8:
                return struct.unpack_from("<Q", raw)[0] & 0xFFFFFFFF
            if len(raw) >= 4:
                return struct.unpack_from("<I", raw)[0]
    return None


def _pvh_entry_of_file(path: str) -> int | None:
    """The PVH entry of an ELF file, None without the note (or when it is no readable ELF)."""
    try:
        with open(path, "rb") as f:
            return _pvh_entry(ELFFile(f))
    except (OSError, ELFError, struct.error, ValueError):
        return None


def _check_plain_entry(elf: ELFFile, path: str) -> None:
    """Refuse an ELF without a PVH note that no PC loader could enter.

    Without the note (and without a multiboot or bzImage header, which
    :func:`~xenicorn.boot.choose_protocol` looks for first) the kernel is
    entered at ``e_entry`` in flat 32-bit mode with paging off, so the entry
    is a physical address and must be code the file puts somewhere. That
    rules out a program for an operating system (``/bin/ls``): a position
    independent executable or shared object (``ET_DYN``) has no load
    address at all, an object file or core dump (``ET_REL``, ``ET_CORE``) no
    entry, a program that names an interpreter (``PT_INTERP``) or carries
    the GNU ABI tag note is a user-space program; and an executable whose entry lies in none of its ``PT_LOAD``
    segments would run whatever RAM holds there. QEMU's ``-kernel`` is
    stricter (it boots no ELF without the PVH note, hw/i386/x86.c
    load_elfboot); a plain ``ET_EXEC`` kernel linked at its physical
    address (hello32 without its note) still boots here.
    """
    kind = elf.header.e_type
    if kind != "ET_EXEC":
        what = {"ET_DYN": "a position-independent executable or shared object (ET_DYN)",
                "ET_REL": "an object file (ET_REL)", "ET_CORE": "a core dump (ET_CORE)"}.get(kind, str(kind))
        raise LoadError(f"{path}: {what} with no PVH note, multiboot or bzImage header: "
                        "no entry a PC could boot")
    for seg in elf.iter_segments():
        if seg.header.p_type == "PT_INTERP":
            raise LoadError(f"{path}: a dynamically linked program (it names an ELF interpreter, PT_INTERP) "
                            "with no PVH note, multiboot or bzImage header: no entry a PC could boot")
        if seg.header.p_type == "PT_NOTE" and any(n["n_name"] == "GNU" and n["n_type"] == "NT_GNU_ABI_TAG"
                                                  for n in seg.iter_notes()):
            # the note a static Linux program carries (which kernel ABI it needs); no kernel has one
            raise LoadError(f"{path}: a program for Linux user space (NT_GNU_ABI_TAG note) with no PVH note, "
                            "multiboot or bzImage header: no entry a PC could boot")
    entry = elf.header.e_entry
    if entry >= 1 << 32:
        raise LoadError(f"{path}: entry {entry:#x} is not a 32-bit physical address "
                        "and the ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    for seg in elf.iter_segments():
        h = seg.header
        if h.p_type == "PT_LOAD" and h.p_paddr <= entry < h.p_paddr + h.p_filesz:
            return
    raise LoadError(f"{path}: entry {entry:#x} is in none of the ELF's loaded segments and there is no "
                    "PVH note, multiboot or bzImage header: no entry a PC could boot")


def load_elf(mem: GuestMemory, path: str, data: bytes | None = None, pvh_note: bool = True) -> LoadedKernel:
    """Copy an ELF kernel's PT_LOAD segments to guest-physical memory.

    The entry is the PVH note's when there is one (``pvh_note``), else the ELF's.
    """
    data = _read_file(path) if data is None else data
    if data[0x202:0x206] == b"HdrS":
        # a bzImage: boot the ELF vmlinux inside it (its PVH note is there)
        from ..linux.bzimage import vmlinux, KernelImageError
        try:
            data = vmlinux(data)
        except KernelImageError as e:
            raise LoadError(f"{path}: {e}") from None
    if data[:4] != b"\x7fELF":
        raise LoadError(f"{path}: not an ELF file (use --load-addr for a flat binary)")
    try:
        elf = ELFFile(io.BytesIO(data))
        machine = elf.header.e_machine
        if machine not in ("EM_386", "EM_X86_64"):
            raise LoadError(f"{path}: ELF for {machine}, not x86 (EM_386 or EM_X86_64)")
        pvh = _pvh_entry(elf) if pvh_note else None
        if pvh is None:
            _check_plain_entry(elf, path)
        kernel = LoadedKernel(path, 0, False, elf.elfclass)
        for seg in elf.iter_segments():
            if seg.header.p_type != "PT_LOAD" or seg.header.p_memsz == 0:
                continue
            paddr, filesz, memsz = seg.header.p_paddr, seg.header.p_filesz, seg.header.p_memsz
            if filesz > memsz or not mem.is_ram(paddr, memsz) or paddr < 0x100000 and paddr + memsz > 0x9FC00:
                raise LoadError(f"{path}: segment at {paddr:#x}+{memsz:#x} does not fit in guest RAM "
                                f"({mem.size >> 20} MiB; try a larger -m)")
            mem.write(paddr, seg.data()[:filesz])
            mem.fill(paddr + filesz, memsz - filesz)
            mem.code_written(paddr, memsz)
            kernel.segments.append((paddr, memsz))
        if not kernel.segments:
            raise LoadError(f"{path}: ELF has no loadable segments")
        kernel.pvh = pvh is not None
        kernel.entry = pvh if pvh is not None else elf.header.e_entry
        symtab = elf.get_section_by_name(".symtab")
        if symtab is not None:
            kernel.symbols = {s.name: s["st_value"] for s in symtab.iter_symbols() if s.name}
    except (ELFError, struct.error, ValueError) as e:
        raise LoadError(f"{path}: corrupt ELF file ({e})") from None
    return kernel


def load_flat(mem: GuestMemory, path: str, load_addr: int) -> LoadedKernel:
    """Copy a raw binary to ``load_addr`` and enter at its first byte."""
    data = _read_file(path)
    if not data:
        raise LoadError(f"{path}: empty file")
    if not mem.is_ram(load_addr, len(data)):
        raise LoadError(f"{path}: {len(data)} bytes at {load_addr:#x} do not fit in guest RAM")
    mem.write(load_addr, data)
    mem.code_written(load_addr, len(data))
    return LoadedKernel(path, load_addr, False, 32, [(load_addr, len(data))])


def load_module(mem: GuestMemory, kernel: LoadedKernel, path: str) -> tuple[int, int]:
    """Place a module (initrd) page-aligned near the top of low RAM, above the kernel."""
    data = _read_file(path)
    low_end = mem.ram_regions[0][1]
    below = min([a for a, _ in kernel.modules] or [low_end])
    addr = (below - len(data)) & ~(PAGE_SIZE - 1)
    kernel_end = max(p + s for p, s in kernel.segments)
    if addr < kernel_end:
        raise LoadError(f"{path}: {len(data)} bytes do not fit in guest RAM next to the kernel")
    mem.write(addr, data)
    kernel.modules.append((addr, len(data)))
    return addr, len(data)


def write_start_info(mem: GuestMemory, kernel: LoadedKernel, cmdline: str, rsdp: int = 0) -> int:
    """Build hvm_start_info (version 1) with the command line, modules, E820 map and ACPI RSDP."""
    raw = cmdline.encode()
    if len(raw) > MAX_CMDLINE:
        raise LoadError(f"command line is {len(raw)} bytes; the limit is {MAX_CMDLINE}")
    mem.write(CMDLINE_ADDR, raw + b"\0")
    for i, (addr, size) in enumerate(kernel.modules):
        mem.write_struct(MODLIST_ADDR + 32 * i, "<QQQQ", addr, size, 0, 0)
    e820 = mem.e820()
    for i, e in enumerate(e820):
        mem.write_struct(MEMMAP_ADDR + 24 * i, "<QQII", e.addr, e.size, e.type, 0)
    mem.write_struct(START_INFO_ADDR, "<IIIIQQQQII",
                     HVM_START_MAGIC, 1, 0, len(kernel.modules),
                     MODLIST_ADDR if kernel.modules else 0, CMDLINE_ADDR, rsdp,
                     MEMMAP_ADDR, len(e820), 0)
    kernel.start_info = START_INFO_ADDR
    return START_INFO_ADDR

