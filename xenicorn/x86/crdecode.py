"""Decode the instruction behind a control-register write exit.

QEMU's CR-write intercept (:mod:`xenicorn.engine.msr`) reports only *which*
CR is being written, with RIP at the instruction; the value is found by
decoding it. Three instructions write CR0 or CR4 (SDM vol. 2):

* ``MOV CRn, r`` (``0F 22 /r``): the register in ModRM.rm (REX.B extends
  it, REX.R the CR number), all 64 bits in 64-bit mode, else 32;
* ``LMSW r/m16`` (``0F 01 /6``): CR0 bits 0-3 from the operand, PE can be
  set but not cleared;
* ``CLTS`` (``0F 06``): CR0.TS cleared.

:func:`decode` is pure: bytes and registers in, a :class:`CrWrite` out.
LMSW's memory operand is given back as a (segment, offset) to read.
"""
from __future__ import annotations

from dataclasses import dataclass

SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
OTHER_PREFIXES = {0x66, 0x67, 0xF0, 0xF2, 0xF3}
SEG_INDEX = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}
RSP, RBP, RSI, RDI, RBX = 4, 5, 6, 7, 3
# 16-bit ModRM.rm: (base, index) registers of the effective address
_EA16 = ((RBX, RSI), (RBX, RDI), (RBP, RSI), (RBP, RDI), (RSI, None), (RDI, None), (RBP, None), (RBX, None))


@dataclass
class CrWrite:
    """A decoded CR write: which CR, how long the instruction is, and what it loads."""

    cr: int
    length: int
    kind: str                       # "mov", "lmsw", "clts"
    source: int | None = None       # MOV: the full register value; LMSW register form: the register
    mem: tuple[str, int] | None = None   # LMSW memory form: (segment, offset) of the 16-bit operand

    def value(self, cr0: int, operand: int | None = None) -> int:
        """The value loaded into the CR (``cr0``: its current value, for LMSW/CLTS)."""
        if self.kind == "mov":
            return self.source
        if self.kind == "clts":
            return cr0 & ~0x8
        src = self.source if operand is None else operand
        return (cr0 & ~0xE) | (src & 0xF)          # PE stays set if it was (SDM LMSW page)


def decode(code: bytes, bits: int, gprs, rip: int = 0) -> CrWrite | None:
    """Decode a MOV-to-CR/LMSW/CLTS at the start of ``code`` (``bits``: 16, 32 or 64; at ``rip``)."""
    pos, seg, rex, addr_override = 0, None, 0, False
    while pos < len(code):
        b = code[pos]
        if b in SEGMENT_PREFIXES:
            seg = SEGMENT_PREFIXES[b]
        elif b == 0x67:
            addr_override = True
        elif b == 0x66:
            pass                                    # operand size: MOV CR ignores it
        elif b not in OTHER_PREFIXES:
            break
        pos += 1
    if bits == 64 and pos < len(code) and 0x40 <= code[pos] <= 0x4F:
        rex = code[pos]
        pos += 1
    if code[pos:pos + 1] != b"\x0f" or len(code) < pos + 2:
        return None
    op = code[pos + 1]
    if op == 0x06:
        return CrWrite(0, pos + 2, "clts")
    if len(code) < pos + 3:
        return None
    modrm = code[pos + 2]
    reg, rm = (modrm >> 3) & 7, modrm & 7
    if op == 0x22:
        src = gprs[rm | (rex & 1) << 3]
        return CrWrite(reg | (rex & 4) << 1, pos + 3, "mov", src if bits == 64 else src & 0xFFFFFFFF)
    if op != 0x01 or reg != 6:
        return None
    if modrm >> 6 == 3:
        return CrWrite(0, pos + 3, "lmsw", gprs[rm | (rex & 1) << 3] & 0xFFFF)
    addr_bits = {16: 32, 32: 16, 64: 32}[bits] if addr_override else bits
    ea = _effective_address(code, pos + 2, addr_bits, rex, gprs)
    if ea is None:
        return None
    offset, end, default_seg = ea
    if isinstance(offset, tuple):                   # RIP-relative
        offset = (rip + end + offset[1]) & ((1 << 64) - 1)
    return CrWrite(0, end, "lmsw", mem=(seg or default_seg, offset))


def _effective_address(code: bytes, pos: int, addr_bits: int, rex: int, gprs):
    """(offset, end of instruction, default segment) of the ModRM memory operand at ``code[pos]``."""
    modrm = code[pos]
    mod, rm = modrm >> 6, modrm & 7
    pos += 1
    if addr_bits == 16:
        if mod == 0 and rm == 6:
            return int.from_bytes(code[pos:pos + 2], "little"), pos + 2, "ds"
        base, index = _EA16[rm]
        disp_len = {0: 0, 1: 1, 2: 2}[mod]
        disp = int.from_bytes(code[pos:pos + disp_len], "little", signed=True)
        off = gprs[base] + (gprs[index] if index is not None else 0) + disp
        return off & 0xFFFF, pos + disp_len, "ss" if base == RBP else "ds"
    mask = (1 << addr_bits) - 1
    default_seg, base_val = "ds", 0
    if rm == 4:                                     # SIB
        sib = code[pos]
        pos += 1
        scale, index, base = sib >> 6, (sib >> 3) & 7 | (rex & 2) << 2, sib & 7 | (rex & 1) << 3
        index_val = 0 if index == 4 else gprs[index] << scale
        if base & 7 == 5 and mod == 0:
            base_val = int.from_bytes(code[pos:pos + 4], "little", signed=True)
            pos += 4
        else:
            base_val = gprs[base]
            default_seg = "ss" if base & 7 in (RSP, RBP) else "ds"
        base_val += index_val
    elif rm == 5 and mod == 0:
        disp = int.from_bytes(code[pos:pos + 4], "little", signed=True)
        pos += 4
        if addr_bits == 64:                         # RIP-relative: from the end of the instruction
            return ("rip", disp), pos, "ds"
        return disp & mask, pos, "ds"
    else:
        base_val = gprs[rm | (rex & 1) << 3]
        default_seg = "ss" if rm == RBP else "ds"
    disp_len = {0: 0, 1: 1, 2: 4}[mod]
    disp = int.from_bytes(code[pos:pos + disp_len], "little", signed=True)
    return (base_val + disp) & mask, pos + disp_len, default_seg
