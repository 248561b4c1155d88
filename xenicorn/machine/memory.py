"""Guest physical memory: the RAM buffer, the PC memory map, typed access.

The guest's RAM is one host buffer (an anonymous ``mmap``) handed to Unicorn
with ``mem_map_ptr``. Unicorn executes guest loads and stores against it, and
Python reads and writes the *same bytes* through a ``memoryview`` without a
call into Unicorn (about 20x cheaper than ``uc.mem_read``). That matters for
the Xen layer, which reads guest structures on every hypercall and, for the
callback GSI, polls a byte of ``vcpu_info``.

One rule comes with it: bytes written from Python are not the guest's own
stores, so Unicorn does not notice when they overwrite code it has already
translated. Writers of code (the loader, the hypercall page) call
:meth:`GuestMemory.code_written`.

The engine side (the buffer's host address, ``mem_map_ptr``, dropping
translated code) belongs to :mod:`xenicorn.engine`: each vCPU maps the RAM
regions into its engine and attaches itself here (:meth:`GuestMemory.attach`)
to hear of pages that come and go and of code Python rewrote.

The physical map follows a PC (and hvmloader's E820):

==========================  ======================================
``0 .. 0x9FC00``            RAM (conventional memory)
``0x9FC00 .. 0x100000``     reserved (EBDA, VGA hole, BIOS ROM)
``0x100000 .. low_end``     RAM, ``low_end`` = min(RAM, 0xE0000000)
``0xE0000000 .. 4 GiB``     PCI MMIO hole: IOAPIC 0xFEC00000,
                            LAPIC 0xFEE00000, BARs
``4 GiB ..``                RAM above the hole, if any
==========================  ======================================
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Protocol

from ..engine.hostmem import buffer_address
from ..records import RecordError, blob, integer, listing, make_record, open_record

PAGE_SIZE = 4096
XEN_FRAMES = 256                 # hypervisor-owned frames a guest can map (grant tables)
# RAM the hypervisor may add where the map has none (Xen's populate_physmap):
# at most libxl's slack above the guest's memory (LIBXL_MAXMEM_CONSTANT, 1 MiB)
EXTRA_FRAMES = 256
LOW_RAM_LIMIT = 0xE0000000       # start of the PCI hole
HIGH_RAM_BASE = 1 << 32
E820_RAM, E820_RESERVED, E820_ACPI, E820_NVS, E820_UNUSABLE = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class E820Entry:
    """One range of the BIOS memory map (type 1 = RAM, 2 = reserved)."""

    addr: int
    size: int
    type: int


class GuestMemoryError(Exception):
    """A physical access outside guest RAM (a guest bug, not ours)."""


class EngineMapping(Protocol):
    """What the memory map asks of each engine that maps it (a vCPU)."""

    def map_overlay(self, gpa: int, host: int) -> None:
        """Show the host page at ``host`` at guest-physical page ``gpa``."""

    def unmap_overlay(self, gpa: int) -> None:
        """Take the overlay page at ``gpa`` away again."""

    def drop_translations(self, start: int, end: int) -> None:
        """Forget code translated from guest-physical ``[start, end)``."""


class GuestMemory:
    """Guest RAM as regions of one host buffer, plus typed accessors."""

    def __init__(self, size: int):
        if size < 2 << 20 or size % PAGE_SIZE:
            raise ValueError(f"RAM size must be a multiple of 4 KiB and at least 2 MiB, not {size:#x}")
        self.size = size
        # RAM, then a pool of frames the hypervisor owns (grant table frames)
        # that appear in the guest only where it maps them (see map_frame)
        # then a pool of pages added later where there was no RAM (add_page);
        # an anonymous mapping costs host memory only where it is touched
        self._mm = mmap.mmap(-1, size + (XEN_FRAMES + EXTRA_FRAMES) * PAGE_SIZE,
                             flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.buf = memoryview(self._mm)
        self.host_addr = buffer_address(self._mm)
        low = min(size, LOW_RAM_LIMIT)
        # (guest physical base, length, offset into the host buffer)
        self.regions: list[tuple[int, int, int]] = [(0, low, 0)]
        if size > low:
            self.regions.append((HIGH_RAM_BASE, size - low, low))
        self.ram_regions = list(self.regions)
        self.frames: dict[int, int] = {}  # hypervisor frame index -> guest-physical address
        self.extra: dict[int, int] = {}   # added page (pool slot) -> guest-physical address
        self.engines: list[EngineMapping] = []   # the vCPUs whose engines map this RAM
        self.reserved: list[E820Entry] = [E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED)]

    # -- the engines that map it -------------------------------------------
    def attach(self, engine: EngineMapping) -> None:
        """Keep ``engine`` in step with the map: it has mapped :attr:`ram_regions` itself.

        Hypervisor frames already placed are shown to it at once; later
        moves, and code that Python rewrites, are told to every attached
        engine.
        """
        self.engines.append(engine)
        for index, gpa in self.frames.items():
            engine.map_overlay(gpa, self.host_addr + self._frame_offset(index))
        for slot, gpa in self.extra.items():
            engine.map_overlay(gpa, self.host_addr + self._extra_offset(slot))

    def _frame_offset(self, index: int) -> int:
        """Where hypervisor frame ``index`` lives in the host buffer (after RAM)."""
        return self.size + index * PAGE_SIZE

    def map_frame(self, index: int, gpa: int) -> None:
        """Show hypervisor frame ``index`` at guest-physical ``gpa`` (page aligned).

        Xen's own pages (grant table frames) enter a guest's physical map
        where the guest asks, typically in the xen-platform device's memory
        BAR. The frame keeps its contents when it moves; a RAM page it
        covers is hidden while it is there, as Xen's p2m replaces it.
        """
        if not 0 <= index < XEN_FRAMES or gpa % PAGE_SIZE:
            raise ValueError(f"frame {index} at {gpa:#x}")
        old = self.frames.get(index)
        if old == gpa:
            return
        if old is not None:
            self.regions.remove((old, PAGE_SIZE, self._frame_offset(index)))
            for engine in self.engines:
                engine.unmap_overlay(old)
        for i, at in list(self.frames.items()):
            if at == gpa and i != index:           # another frame was there: it leaves
                self.regions.remove((gpa, PAGE_SIZE, self._frame_offset(i)))
                del self.frames[i]
                for engine in self.engines:
                    engine.unmap_overlay(gpa)
        self.frames[index] = gpa
        self.regions.insert(0, (gpa, PAGE_SIZE, self._frame_offset(index)))
        for engine in self.engines:
            engine.map_overlay(gpa, self.host_addr + self._frame_offset(index))

    def _extra_offset(self, slot: int) -> int:
        return self.size + (XEN_FRAMES + slot) * PAGE_SIZE

    def add_page(self, gpa: int) -> bool:
        """Put a new zeroed RAM page at ``gpa``, where nothing is mapped; False when the pool is used up.

        The hypervisor's answer to a guest populating a frame outside its
        initial RAM (Xen's populate_physmap): from then on the page is RAM
        like any other (:meth:`is_ram`, the engines map it), but it is not in
        the E820 map, which the guest was given at boot.
        """
        if gpa % PAGE_SIZE or self.is_ram(gpa):
            raise ValueError(f"page at {gpa:#x}")
        free = next((i for i in range(EXTRA_FRAMES) if i not in self.extra), None)
        if free is None:
            return False
        off = self._extra_offset(free)
        self.buf[off:off + PAGE_SIZE] = bytes(PAGE_SIZE)
        self.extra[free] = gpa
        self.regions.append((gpa, PAGE_SIZE, off))
        for engine in self.engines:
            engine.map_overlay(gpa, self.host_addr + off)
        return True

    def remove_page(self, gpa: int) -> None:
        """Take away a page :meth:`add_page` put there: the address is a hole again."""
        slot = next(i for i, at in self.extra.items() if at == gpa)
        del self.extra[slot]
        self.regions.remove((gpa, PAGE_SIZE, self._extra_offset(slot)))
        for engine in self.engines:
            engine.unmap_overlay(gpa)

    def is_added(self, gpa: int) -> bool:
        return gpa in self.extra.values()

    def frame_view(self, index: int) -> memoryview:
        """The 4 KiB of hypervisor frame ``index``, mapped in the guest or not (Xen's own access)."""
        if not 0 <= index < XEN_FRAMES:
            raise ValueError(f"frame {index}")
        off = self._frame_offset(index)
        return self.buf[off:off + PAGE_SIZE]

    def code_written(self, addr: int, size: int) -> None:
        """Drop translated code for a range Python wrote (see module doc)."""
        start = addr & ~(PAGE_SIZE - 1)
        end = (addr + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        for engine in self.engines:
            engine.drop_translations(start, end)

    # -- address translation ----------------------------------------------
    def offset(self, addr: int, size: int) -> int:
        """Host buffer offset of guest-physical ``[addr, addr+size)``."""
        for base, length, off in self.regions:
            if base <= addr and addr + size <= base + length:
                return off + addr - base
        raise GuestMemoryError(f"physical range {addr:#x}+{size:#x} is not RAM")

    def is_ram(self, addr: int, size: int = 1) -> bool:
        """Backed by memory (guest RAM or a mapped hypervisor frame)."""
        return any(base <= addr and addr + size <= base + length for base, length, _ in self.regions)

    # -- access ---------------------------------------------------------
    def read(self, addr: int, size: int) -> bytes:
        o = self.offset(addr, size)
        return bytes(self.buf[o:o + size])

    def write(self, addr: int, data: bytes) -> None:
        o = self.offset(addr, len(data))
        self.buf[o:o + len(data)] = data

    def read_int(self, addr: int, size: int) -> int:
        o = self.offset(addr, size)
        return int.from_bytes(self.buf[o:o + size], "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        o = self.offset(addr, size)
        self.buf[o:o + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read_u8(self, addr: int) -> int:
        return self.buf[self.offset(addr, 1)]

    def read_u32(self, addr: int) -> int:
        return self.read_int(addr, 4)

    def read_u64(self, addr: int) -> int:
        return self.read_int(addr, 8)

    def write_u32(self, addr: int, value: int) -> None:
        self.write_int(addr, 4, value)

    def write_u64(self, addr: int, value: int) -> None:
        self.write_int(addr, 8, value)

    def read_struct(self, addr: int, fmt: str) -> tuple:
        return struct.unpack(fmt, self.read(addr, struct.calcsize(fmt)))

    def write_struct(self, addr: int, fmt: str, *values) -> None:
        self.write(addr, struct.pack(fmt, *values))

    def read_cstring(self, addr: int, limit: int = 4096) -> bytes:
        out = bytearray()
        while len(out) < limit and self.is_ram(addr + len(out)):
            b = self.read_u8(addr + len(out))
            if b == 0:
                break
            out.append(b)
        return bytes(out)

    def fill(self, addr: int, size: int, byte: int = 0) -> None:
        o = self.offset(addr, size)
        self.buf[o:o + size] = bytes([byte]) * size

    # -- the BIOS-style map ------------------------------------------------
    def e820(self) -> list[E820Entry]:
        """The memory map a guest is told about (start_info, XENMEM_memory_map)."""
        out = [E820Entry(0, 0x9FC00, E820_RAM)]
        out += self.reserved
        low_end = self.ram_regions[0][1]
        out.append(E820Entry(0x100000, low_end - 0x100000, E820_RAM))
        if len(self.ram_regions) > 1:
            out.append(E820Entry(HIGH_RAM_BASE, self.ram_regions[1][1], E820_RAM))
        return sorted(out, key=lambda e: e.addr)

    def reserve(self, addr: int, size: int) -> None:
        """Mark a range reserved in the E820 map (special pages, ...)."""
        self.reserved.append(E820Entry(addr, size, E820_RESERVED))

    def close(self) -> None:
        self.buf.release()
        try:
            self._mm.close()
        except BufferError:       # an engine's mapping (a buffer export) may still hold it
            pass

    def unmap_frame(self, index: int) -> None:
        """Take hypervisor frame ``index`` out of the guest's physical map (RAM under it shows again)."""
        gpa = self.frames.pop(index, None)
        if gpa is None:
            return
        self.regions.remove((gpa, PAGE_SIZE, self._frame_offset(index)))
        for engine in self.engines:
            engine.unmap_overlay(gpa)

    # -- snapshots (a record, see xenicorn.records) ---------------------------------
    RECORD = ("guest-memory", 1)

    def save_record(self) -> dict:
        """Where each hypervisor frame is mapped, the reserved E820 ranges, and RAM + frames as a blob."""
        return make_record(*self.RECORD, {"frames": [[i, gpa] for i, gpa in self.frames.items()],
                                          "extra": [[i, gpa] for i, gpa in self.extra.items()],
                                          "reserved": [[e.addr, e.size, e.type] for e in self.reserved]},
                           {"ram": bytes(self.buf)})

    def check_record(self, record: dict):
        """Frames: index < XEN_FRAMES, page aligned, one per page; added pages off RAM; E820 types 1-5; RAM size."""
        st = open_record(record, *self.RECORD)
        frames: dict[int, int] = {}
        for item in listing(st, "frames", XEN_FRAMES):
            if not isinstance(item, list) or len(item) != 2:
                raise RecordError("frame entry is not [index, address]")
            index = integer(item[0], "frame index", 0, XEN_FRAMES - 1)
            gpa = integer(item[1], f"frame {index} address", 0, (1 << 52) - PAGE_SIZE)
            if gpa % PAGE_SIZE or index in frames or gpa in frames.values():
                raise RecordError(f"hypervisor frame {index} at {gpa:#x}: unaligned or mapped twice")
            frames[index] = gpa
        extra: dict[int, int] = {}
        for item in listing(st, "extra", EXTRA_FRAMES):
            if not isinstance(item, list) or len(item) != 2:
                raise RecordError("added page entry is not [slot, address]")
            slot = integer(item[0], "added page slot", 0, EXTRA_FRAMES - 1)
            gpa = integer(item[1], f"added page {slot} address", 0, (1 << 52) - PAGE_SIZE)
            if gpa % PAGE_SIZE or slot in extra or gpa in extra.values() or gpa in frames.values() \
                    or any(base <= gpa < base + length for base, length, _ in self.ram_regions):
                raise RecordError(f"added page {slot} at {gpa:#x}: unaligned, over RAM or mapped twice")
            extra[slot] = gpa
        reserved = []
        for item in listing(st, "reserved", 256):
            if not isinstance(item, list) or len(item) != 3:
                raise RecordError("E820 entry is not [address, size, type]")
            reserved.append(E820Entry(integer(item[0], "E820 address"), integer(item[1], "E820 size", 1),
                                      integer(item[2], "E820 type", E820_RAM, E820_UNUSABLE)))
        return frames, extra, reserved, blob(record, "ram", len(self.buf))

    def apply_record(self, prepared) -> None:
        frames, extra, reserved, ram = prepared
        for index in [i for i in self.frames if i not in frames]:
            self.unmap_frame(index)
        for index, gpa in frames.items():
            self.map_frame(index, gpa)
        for gpa in [gpa for slot, gpa in self.extra.items() if extra.get(slot) != gpa]:
            self.remove_page(gpa)
        for slot, gpa in extra.items():
            if self.extra.get(slot) != gpa:
                self.extra[slot] = gpa
                self.regions.append((gpa, PAGE_SIZE, self._extra_offset(slot)))
                for engine in self.engines:
                    engine.map_overlay(gpa, self.host_addr + self._extra_offset(slot))
        self.reserved = reserved
        self.buf[:] = ram
