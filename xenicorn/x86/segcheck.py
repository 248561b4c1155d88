"""Segment checks the CPU engine skips, made at the exception it raises instead.

An x86 memory access goes through a segment before paging (SDM vol. 3
§3.1): the CPU adds the segment's base to the offset and checks the offset
against the segment's limit and type (§5.3, §5.4) before it translates the
linear address. A failed segment check is #GP(0), or #SS(0) when the
segment is SS (§6.15, "Interrupt 12: stack fault"). In 64-bit mode there are
no limits, but an address that is not canonical is the same kind of
segment fault: #SS(0) if the access goes through SS (an address formed from
RSP or RBP), #GP(0) otherwise (SDM vol. 1 §3.3.7.1, vol. 3 §6.15).

xenicorn's CPU engine (QEMU's TCG in Unicorn) checks neither data segment
limits nor null selectors at access time, and reports every non-canonical
access as #GP(0). Checking each access would cost every memory instruction
(measured in docs/unicorn-notes.md, "Segment limits"). But the engine does
stop at the exception it raises instead, and the exceptions are delivered
in Python: :func:`correct` looks at the faulting instruction there and
turns the engine's answer into the architectural one:

* 64-bit mode, the engine's #GP(0): if the memory operand (or the implicit
  stack access of PUSH/POP/CALL/RET) goes through SS and its address is not
  canonical, the fault is #SS(0).
* 32-bit protected mode, the engine's #PF (or #GP(0)): if an operand's
  offset is outside its segment's limit, or its selector is null, or the
  segment's type forbids the access, the CPU faults on the segment first:
  #GP(0) or #SS(0), and CR2 keeps its value (a #PF never happened). This is
  decoded only when some data segment is not flat (null, a limit below
  4 GiB, or expand-down; the base does not matter), so a flat kernel's page
  faults cost nothing more.

What cannot be corrected this way: an access beyond the limit that reaches
mapped memory raises nothing in the engine, so it succeeds (see
docs/conformance.md, memop-seg). The operand decoding is the forced
emulation's (:mod:`fep`), which makes the same checks before it emulates.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import fep
from .segments import DESC_B, DESC_P

GP, SS_FAULT, PF = 13, 12, 14
FLAT_LIMIT = 0xFFFFFFFF
PUSHES = frozenset({"push", "call", "pushf", "pushfd", "pushfq"})
POPS = frozenset({"pop", "ret", "popf", "popfd", "popfq"})
_NAMES = {GP: "#GP", SS_FAULT: "#SS", PF: "#PF"}
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")     # CPUX86State.regs[] order


@dataclass
class Correction:
    """The engine raised ``old``; the CPU would have raised ``new`` (vector, error code) for ``why``."""

    pc: int
    text: str
    old: tuple[int, int | None]
    new: tuple[int, int]
    why: str

    def summary(self) -> str:
        old = f"{_NAMES.get(self.old[0], self.old[0])}({self.old[1]:#x})"
        new = f"{_NAMES[self.new[0]]}({self.new[1]})"
        return (f"segment check: {self.pc:#x}: {self.text}: the engine raised {old}, "
                f"the CPU raises {new}: {self.why}")


def flat(cache) -> bool:
    """No offset can fail the limit: present, a 4 GiB limit, not expand-down data (any base)."""
    typ = (cache.flags >> 8) & 0xF
    return bool(cache.flags & DESC_P) and cache.limit == FLAT_LIMIT and (typ & 0xC) != 4


def _implicit_stack(insn, bits: int, read_reg, ss_flags: int):
    """The stack slot PUSH/CALL write or POP/RET read: (offset, size, write), or None."""
    name = insn.mnemonic.split()[-1]
    if name not in PUSHES and name not in POPS:
        return None
    width = 8 if bits == 64 else 4
    if insn.operands and name not in ("call", "ret"):
        width = insn.operands[0].size or width
    if name == "call" and insn.operands and insn.operands[0].size > (8 if bits == 64 else 4):
        return None                                  # far CALL: the engine checks its descriptors
    mask = (1 << 64) - 1 if bits == 64 else (0xFFFFFFFF if ss_flags & DESC_B else 0xFFFF)
    sp = read_reg("rsp")
    push = name in PUSHES
    return ((sp - width) & mask if push else sp & mask), width, push


def _fetch(vcpu, linear: int, user: bool) -> bytes:
    for n in (fep.MAX_INSN, 8, 4, 2, 1):            # the instruction may end its page
        data = vcpu.read_linear(linear & ((1 << 64) - 1), n, fetch=True, user=user)
        if isinstance(data, bytes):
            return data
    return b""


def correct(vcpu, vector: int, error_code: int | None, pc: int) -> Correction | None:
    """The segment fault the CPU raises instead of the engine's #GP/#PF at ``pc``, if any.

    Cheap when nothing applies: 64-bit mode decodes only at a #GP(0),
    32-bit protected mode only when a segment is not flat.
    """
    if vector not in (GP, PF) or (vector == GP and error_code):
        return None
    live = vcpu.live                                 # read in place: Unicorn's reg_read is slow
    if not live.has_descriptors:
        return None                                  # real or virtual-8086 mode: no descriptors
    bits = live.code_bits
    segs = [live.segment(i) for i in range(6)]
    if bits == 64:
        if vector != GP:
            return None
    elif all(flat(seg) for seg in segs):
        return None
    code = _fetch(vcpu, pc + (segs[1].base if bits != 64 else 0), live.cpl == 3)
    insn = next(fep.DECODERS[bits].disasm(code, pc), None) if code else None
    if insn is None:
        return None

    gprs = dict(zip(GPR_NAMES, live.gprs(), strict=True))

    def read_reg(name: str) -> int:
        return gprs.get(name, 0)                     # 0: capstone's pseudo registers (eiz/riz)
    accesses = [(seg, off, size, write, stack)
                for seg, off, size, write, stack in fep.operand_accesses(insn, read_reg, pc + insn.size)]
    slot = _implicit_stack(insn, bits, read_reg, segs[2].flags)
    if slot is not None:
        accesses.append(("ss", slot[0], slot[1], slot[2], True))
    for seg, offset, size, write, stack in accesses:
        if bits == 64:
            new = fep.check_long(seg, offset, size, stack, segs)
        else:
            new = fep.check_protected(seg, offset, size, write, segs)
        if new is None:
            continue
        if new == (vector, error_code):
            return None
        return Correction(pc, f"{insn.mnemonic} {insn.op_str}".rstrip(), (vector, error_code), new,
                          _why(seg, offset, size, segs, bits))
    return None


def _why(seg: str, offset: int, size: int, segs, bits: int) -> str:
    cache = segs[fep.SEG_INDEX[seg]]
    if bits == 64:
        base = cache.base if seg in ("fs", "gs") else 0
        return (f"{seg}: linear {(base + offset) & ((1 << 64) - 1):#x} is not canonical"
                + (" (a stack access: #SS)" if seg not in ("fs", "gs") else ""))
    if not cache.flags & DESC_P:
        return f"{seg} holds a null selector ({cache.selector:#x})"
    typ = (cache.flags >> 8) & 0xF
    if not typ & 8 and typ & 4:
        return f"{seg}: offset {offset:#x} (+{size}) is inside expand-down limit {cache.limit:#x}"
    if offset + size - 1 > cache.limit:
        return f"{seg}: offset {offset:#x} (+{size}) is past limit {cache.limit:#x}"
    return f"{seg} (type {typ:#x}) does not allow this access"
