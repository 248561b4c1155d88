"""Segment descriptors and the hidden segment registers they load.

An x86 segment register has a visible part, the 16-bit *selector*, and a
hidden part the CPU fills from the descriptor the selector names: base,
limit and attributes (SDM vol. 3 §3.4.3, "Segment Registers"). Loading DS
from a selector reads the 8-byte descriptor from the GDT (TI = 0) or the LDT
(TI = 1) at ``selector & ~7``; afterwards the CPU uses only the hidden
copy, so changing the GDT entry changes nothing until the next load.

The 8-byte descriptor (SDM vol. 3 §3.4.5, figure 3-8)::

    63      56 55 54 53 52 51  48 47 46 45 44 43  40 39      32
    base 31:24  G D/B L AVL limit  P  DPL  S  type   base 23:16
    31                         16 15                          0
    base 15:0                     limit 15:0

=====  =========================================================
bit    meaning (in the high dword)
=====  =========================================================
8-11   type: code/data (S=1) execute/read/write/accessed bits;
       system (S=0): LDT 0x2, TSS 0x9/0xB (available/busy), gates
12     S: code or data (1), system segment (0)
13-14  DPL: the privilege a segment or gate asks for
15     P: present (a not-present load is #NP, or #SS for SS)
21     L: 64-bit code (IA-32e mode)
22     D/B: 32-bit default operand size (code) / big stack (SS)
23     G: limit counted in 4 KiB pages
=====  =========================================================

:class:`SegmentCache` keeps the attributes as the descriptor's high dword
with base and limit bits masked out (``hi & 0x00FFFF00``); QEMU keeps its
segment caches the same way, which is why the engine can store these
values into the CPU state as they are.
"""
from __future__ import annotations

import struct

from dataclasses import dataclass

DESC_TYPE_SHIFT = 8
DESC_S = 1 << 12          # code/data (1) or system (0)
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_L = 1 << 21          # 64-bit code
DESC_B = 1 << 22          # 32-bit default size
DESC_G = 1 << 23

TYPE_CODE_EXEC_READ = 0xB     # code, execute/read, accessed
TYPE_DATA_READ_WRITE = 0x3    # data, read/write, accessed


@dataclass
class SegmentCache:
    """One hidden segment register: what the CPU loaded from a descriptor."""

    selector: int
    base: int
    limit: int
    flags: int            # descriptor high dword attributes (DESC_* bits)

    @property
    def dpl(self) -> int:
        """The descriptor privilege level (bits 13-14)."""
        return (self.flags >> DESC_DPL_SHIFT) & 3

    @classmethod
    def from_descriptor(cls, selector: int, raw: int) -> "SegmentCache":
        """Decode an 8-byte GDT/LDT descriptor (SDM vol. 3 §3.4.5)."""
        lo, hi = raw & 0xFFFFFFFF, raw >> 32
        base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
        limit = (lo & 0xFFFF) | (hi & 0x000F0000)
        if hi & DESC_G:
            limit = (limit << 12) | 0xFFF
        return cls(selector, base, limit, hi & 0x00FFFF00)


def flat_code32(selector: int, dpl: int = 0) -> SegmentCache:
    """A flat 32-bit execute/read code segment, as the PVH ABI asks for CS."""
    return SegmentCache(selector, 0, 0xFFFFFFFF, DESC_G | DESC_B | DESC_P | DESC_S | (dpl << DESC_DPL_SHIFT)
                        | (TYPE_CODE_EXEC_READ << DESC_TYPE_SHIFT))


def flat_code64(selector: int, dpl: int = 0) -> SegmentCache:
    """A 64-bit code segment (L=1, D=0)."""
    return SegmentCache(selector, 0, 0xFFFFFFFF, DESC_G | DESC_L | DESC_P | DESC_S | (dpl << DESC_DPL_SHIFT)
                        | (TYPE_CODE_EXEC_READ << DESC_TYPE_SHIFT))


def flat_data(selector: int, dpl: int = 0) -> SegmentCache:
    """A flat read/write data segment (accessed)."""
    return SegmentCache(selector, 0, 0xFFFFFFFF, DESC_G | DESC_B | DESC_P | DESC_S | (dpl << DESC_DPL_SHIFT)
                        | (TYPE_DATA_READ_WRITE << DESC_TYPE_SHIFT))


def descriptor_at(read, table: SegmentCache, selector: int) -> SegmentCache | None:
    """The descriptor ``selector`` names in ``table`` (the GDT or an LDT, SDM vol. 3 §3.4.2, §3.5.1),
    read with ``read(linear, size)``; None when its entry lies beyond the table's limit."""
    index = selector & ~7
    if index + 7 > table.limit:
        return None
    return SegmentCache.from_descriptor(selector, struct.unpack("<Q", read(table.base + index, 8))[0])
