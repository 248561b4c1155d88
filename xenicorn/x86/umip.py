"""User-Mode Instruction Prevention (UMIP): the instructions and what they store.

Five instructions let any privilege level read system state: SGDT and SIDT
(the GDTR/IDTR: limit and base, so where the kernel's tables are), SLDT and
STR (the LDTR and TR selectors) and SMSW (CR0's low word). With CR4.UMIP
(bit 11, reported by CPUID.(EAX=7,ECX=0):ECX bit 2) set, each of them is
#GP(0) when CPL > 0, virtual-8086 mode included; at CPL 0 they run as
before (SDM vol. 3 §2.5, and each instruction's page in vol. 2).

xenicorn catches them through the engine's SVM intercepts
(:mod:`xenicorn.engine.msr` ``intercept_umip``) and decides in
:mod:`xenicorn.machine.umip`. At CPL 0 it performs the instruction itself:
:func:`decode` finds the destination, :func:`stored` the value, both pure.
QEMU checks SMSW as a CR0 *read*, the same intercept as ``MOV r, CR0``, so
that instruction is decoded here too (it is CPL 0 only: at CPL > 0 it is a
#GP before any intercept).

What is stored (SDM vol. 2, SGDT/SIDT/SLDT/STR/SMSW pages):

=============  ==============================================================
SGDT/SIDT m    2-byte limit, then the base: 4 bytes (24 bits, the top byte
               zero, with a 16-bit operand size), 8 bytes in 64-bit mode
SLDT/STR m16   the selector, 16 bits whatever the operand size
SLDT/STR r     16-bit operand: the low word only; 32/64: zero-extended
SMSW m16       CR0[15:0]
SMSW r         64-bit mode: r16 CR0[15:0], r32 CR0[31:0] zero-extended, r64
               all of CR0. Outside 64-bit mode the SDM leaves bits 31:16 of
               an r32 undefined; QEMU's TCG writes the low word only, and
               so does xenicorn, so that the register is the same with UMIP
               on or off.
=============  ==============================================================
"""
from __future__ import annotations

from dataclasses import dataclass

from capstone import x86_const as CX

from .cpuid import LEAF7_ECX_UMIP  # noqa: F401  (the CPUID bit that reports it, for readers and tests)
from .fep import DECODERS, operand_accesses, _parent

CR4_UMIP = 1 << 11
NAMES = frozenset({"sgdt", "sidt", "sldt", "str", "smsw"})


@dataclass
class SystemStore:
    """One decoded UMIP instruction (or MOV from CR0): where it stores, how wide."""

    name: str                       # "sgdt", "sidt", "sldt", "str", "smsw" or "mov"
    length: int
    reg: str | None = None          # register destination: its 64-bit name ("rax", "r8")
    width: int = 2                  # bytes written (register: the operand size)
    mem: tuple[str, int] | None = None   # memory destination: (segment, offset)
    opsize16: bool = False          # SGDT/SIDT: 16-bit operand size (24-bit base)


def decode(code: bytes, bits: int, rip: int, read_reg) -> SystemStore | None:
    """Decode the instruction at the start of ``code``; None if it is none of ours.

    ``read_reg(name)`` gives a register's value (the memory operand's base
    and index); the memory offset is truncated to the address size.
    """
    insn = next(DECODERS[bits].disasm(code, rip), None)
    if insn is None:
        return None
    name = insn.mnemonic.split()[-1]
    if name == "mov":
        ops = insn.operands
        if len(ops) != 2 or ops[1].type != CX.X86_OP_REG or ops[1].reg != CX.X86_REG_CR0:
            return None
        return SystemStore("mov", insn.size, _parent(insn.reg_name(ops[0].reg)), 8 if bits == 64 else 4)
    if name not in NAMES or len(insn.operands) != 1:
        return None
    op = insn.operands[0]
    prefixes = bytes(insn.prefix)
    opsize16 = (bits == 16) != (0x66 in prefixes) if bits != 64 else False
    if op.type == CX.X86_OP_REG:
        if name in ("sgdt", "sidt"):
            return None                          # no register form (#UD)
        reg = insn.reg_name(op.reg)
        return SystemStore(name, insn.size, _parent(reg), op.size)
    ((seg, offset, _size, _w, _stack),) = operand_accesses(insn, read_reg, rip + insn.size)
    width = 2 if name not in ("sgdt", "sidt") else (10 if bits == 64 else 6)
    return SystemStore(name, insn.size, None, width, (seg, offset), opsize16)


def stored(st: SystemStore, *, bits: int, old: int, gdtr: tuple[int, int], idtr: tuple[int, int],
           ldtr: int, tr: int, cr0: int) -> int:
    """The value written: memory, ``st.width`` bytes of it; a register, its new 64-bit value.

    ``old`` is the destination register's current value (a 16-bit write keeps
    the rest of it); ``gdtr``/``idtr`` are (base, limit); ``ldtr``/``tr``
    selectors.
    """
    if st.name in ("sgdt", "sidt"):
        base, limit = gdtr if st.name == "sgdt" else idtr
        base &= 0xFFFFFF if st.opsize16 else (1 << (8 * (st.width - 2))) - 1
        return (base << 16) | (limit & 0xFFFF)
    if st.name == "mov":
        return cr0 & ((1 << (8 * st.width)) - 1)
    value = {"sldt": ldtr, "str": tr, "smsw": cr0}[st.name]
    if st.reg is None:
        return value & 0xFFFF
    if st.width == 2 or (st.name == "smsw" and bits != 64):
        return (old & ~0xFFFF) | (value & 0xFFFF)
    return value & ((1 << (8 * st.width)) - 1)    # a 32-bit destination is zero-extended to 64
