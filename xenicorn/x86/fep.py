"""Xen's forced emulation prefix (FEP): ``ud2; .ascii "xen"`` before an instruction.

A debug build of Xen booted with ``hvm_fep`` lets an HVM guest ask for one
instruction to go through Xen's x86 instruction emulator instead of the
hardware: the guest writes the five bytes ``0F 0B 78 65 6E`` (``ud2`` and the
ASCII text "xen") in front of it. The ``ud2`` raises #UD, which Xen
intercepts; ``hvm_ud_intercept()`` (xen/arch/x86/hvm/hvm.c) then

* reads five bytes at CS:RIP through the guest's page tables, as an
  instruction fetch, with the user bit when SS.DPL is 3: FEP works at any
  privilege level, user mode included;
* if they are the prefix: adds 5 to RIP, clears RFLAGS.RF, truncates RIP to
  32 bits outside 64-bit code, and emulates the next instruction;
* otherwise (or with ``hvm_fep`` off, the default, and always in release
  builds) injects a plain #UD at the ``ud2``.

An exception the emulated instruction raises is delivered with RIP at that
instruction, *after* the prefix: RIP was advanced before emulation, and the
emulator commits its register changes only on success. XTF probes FEP in
``test_setup()`` (arch/x86/setup.c: ``FEP; mov $1, reg`` with an exception
table entry that skips it on #UD) and skips the tests that need it.

The point of FEP for tests is that the emulator makes every architectural
check itself. xenicorn's CPU engine (QEMU's TCG) skips some of them at full
speed, notably data-segment limits and null selectors in protected mode.
:func:`forced_emulation` therefore decodes the instruction after the prefix
(capstone), works out each memory operand's segment, offset and size, and
raises #GP(0)/#SS(0) as the SDM says (vol. 3 §5.3 "Limit checking", §3.4.2
null selectors, vol. 1 §3.3.7.1 canonical addresses) before the engine runs
the instruction. With the checks passed, the instruction executes in the
engine at RIP + 5: Unicorn ends its translation block at the ``ud2`` and
starts a new one there, which is what a one-instruction step followed by
"continue" would give.
"""
from __future__ import annotations

from dataclasses import dataclass

from capstone import Cs, CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, CS_AC_READ, CS_AC_WRITE
from capstone import x86_const as CX

from .segments import DESC_B, DESC_P

PREFIX = b"\x0f\x0bxen"             # ud2; .ascii "xen" (Xen's _BIN_XEN_FEP)
MAX_INSN = 15                        # the longest x86 instruction
RFLAGS_RF = 1 << 16
UD, GP, SS_FAULT, XM = 6, 13, 12, 19
# Instructions whose memory operand is not an access: address arithmetic,
# hints, and INVLPG (a linear address, no segment check beyond the base).
NO_ACCESS = frozenset({"lea", "nop", "prefetch", "prefetchw", "prefetchnta", "prefetcht0", "prefetcht1",
                       "prefetcht2", "invlpg"})
SEG_NAMES = {CX.X86_REG_ES: "es", CX.X86_REG_CS: "cs", CX.X86_REG_SS: "ss", CX.X86_REG_DS: "ds",
             CX.X86_REG_FS: "fs", CX.X86_REG_GS: "gs"}
SEG_INDEX = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}
STACK_BASES = frozenset({"sp", "esp", "rsp", "bp", "ebp", "rbp"})

DECODERS = {bits: Cs(CS_ARCH_X86, mode) for bits, mode in ((16, CS_MODE_16), (32, CS_MODE_32), (64, CS_MODE_64))}
for _d in DECODERS.values():
    _d.detail = True


@dataclass
class Forced:
    """What one forced emulation did: the instruction's address and text, and a fault to deliver."""

    rip: int                          # the emulated instruction (after the prefix)
    text: str
    fault: tuple[int, int | None] | None   # (vector, error code or None) the checks raised, or None

    def summary(self) -> str:
        if self.fault is None:
            return f"FEP: {self.rip:#x}: {self.text}: emulated"
        vector, code = self.fault
        name = {GP: "#GP", SS_FAULT: "#SS", UD: "#UD", XM: "#XM"}[vector] + ("" if code is None else f"({code})")
        return f"FEP: {self.rip:#x}: {self.text}: {name} from the emulator"


def _parent(name: str) -> str:
    """The 64-bit register a capstone register name is part of (``ax``/``eax`` -> ``rax``, ``r8d`` -> ``r8``)."""
    if name.startswith("r") and name[1:2].isdigit():
        return name.rstrip("dwb")
    if name in ("ip", "eip", "rip"):
        return "rip"
    if len(name) == 2:
        return "r" + name
    return "r" + name[1:]


def operand_accesses(insn, read_reg, next_rip: int):
    """(segment name, offset, size, write, stack) for each memory operand the instruction touches."""
    if insn.mnemonic.split()[-1] in NO_ACCESS:
        return []
    mask = (1 << (8 * insn.addr_size)) - 1
    out = []
    for op in insn.operands:
        if op.type != CX.X86_OP_MEM:
            continue
        mem = op.mem
        base = insn.reg_name(mem.base) if mem.base else ""
        offset = mem.disp
        if base:
            offset += next_rip if _parent(base) == "rip" else read_reg(_parent(base))
        if mem.index:
            offset += read_reg(_parent(insn.reg_name(mem.index))) * mem.scale
        stack = base in STACK_BASES
        seg = SEG_NAMES.get(mem.segment) or ("ss" if stack else "ds")
        write = bool(op.access & CS_AC_WRITE) or not op.access & (CS_AC_READ | CS_AC_WRITE)
        out.append((seg, offset & mask, max(op.size, 1), write, stack))
    return out


def _canonical(addr: int) -> bool:
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1


def check_long(seg: str, offset: int, size: int, stack: bool, segs) -> tuple[int, int] | None:
    """64-bit mode: only FS/GS have a base, no limits; a non-canonical address faults.

    ES/CS/SS/DS overrides are ignored in 64-bit mode, so the segment is FS or
    GS when named, else the default: SS for an address formed from RSP or
    RBP, DS otherwise. A fault through SS is #SS(0), else #GP(0) (XTF's
    memop-seg asserts this for every base register and override).
    """
    base = segs[SEG_INDEX[seg]].base if seg in ("fs", "gs") else 0
    first = (base + offset) & ((1 << 64) - 1)
    last = (first + size - 1) & ((1 << 64) - 1)
    if _canonical(first) and _canonical(last):
        return None
    return (SS_FAULT if stack and seg not in ("fs", "gs") else GP, 0)


def check_protected(seg: str, offset: int, size: int, write: bool, segs) -> tuple[int, int] | None:
    """Protected mode: null (unusable) selector, type and limit checks (SDM vol. 3 §5.3-5.4, §3.4.2).

    A fault through SS is #SS(0), any other segment #GP(0).
    """
    cache = segs[SEG_INDEX[seg]]
    fault = (SS_FAULT if seg == "ss" else GP, 0)
    if not cache.flags & DESC_P:             # QEMU loads a null selector as an all-zero cache
        return fault
    typ = (cache.flags >> 8) & 0xF
    code = typ & 8
    if code and (write or not typ & 2):      # code: never writable, readable only with R
        return fault
    if not code and write and not typ & 2:   # data: writable only with W
        return fault
    last = offset + size - 1
    if not code and typ & 4:                 # expand-down: valid offsets are limit+1 .. 64K/4G - 1
        top = 0xFFFFFFFF if cache.flags & DESC_B else 0xFFFF
        if offset <= cache.limit or last > top:
            return fault
    elif last > cache.limit:
        return fault
    return None


def _branch_fault(insn, vcpu, read_reg, segs, bits, user: bool) -> tuple[int, int] | None:
    """A near JMP/CALL/RET to a non-canonical target (64-bit) or past CS's limit is #GP(0) at the branch.

    The emulator checks the destination before it branches (XSA-170, and
    SDM vol. 2 JMP/CALL/RET "#GP(0) if the target ... is non-canonical /
    beyond the code segment limit"); QEMU's TCG jumps, then faults on the
    fetch at the target, with RIP already there.
    """
    name = insn.mnemonic.split()[-1]
    if name not in ("jmp", "call", "ret") or (name != "ret" and len(insn.operands) != 1):
        return None
    width = 8 if bits == 64 else bits // 8
    if name == "ret":
        sp = read_reg("rsp") & ((1 << bits) - 1)
        target = _read_data(vcpu, (sp if bits == 64 else segs[2].base + sp), width, user)
    else:
        op = insn.operands[0]
        if op.type == CX.X86_OP_IMM:
            target = op.imm
        elif op.type == CX.X86_OP_REG:
            target = read_reg(_parent(insn.reg_name(op.reg)))
        elif op.type == CX.X86_OP_MEM and op.size == width:
            ((seg, offset, size, _w, _s),) = operand_accesses(insn, read_reg, insn.address + insn.size)
            base = segs[SEG_INDEX[seg]].base if bits != 64 or seg in ("fs", "gs") else 0
            target = _read_data(vcpu, base + offset, size, user)
        else:
            return None                          # far branches: descriptor checks the engine makes
    if target is None:
        return None                              # the read faults: the engine raises the same #PF
    target &= (1 << (8 * width)) - 1
    if bits == 64:
        return None if _canonical(target) else (GP, 0)
    return (GP, 0) if target > segs[1].limit else None


def _read_data(vcpu, linear: int, size: int, user: bool) -> int | None:
    from ..machine.memory import GuestMemoryError
    try:
        data = vcpu.read_linear(linear & ((1 << 64) - 1), size, user=user)
    except GuestMemoryError:
        return None
    return int.from_bytes(data, "little") if isinstance(data, bytes) else None


def forced_emulation(vcpu, registers) -> Forced | None:
    """On a #UD: if CS:RIP holds the prefix, step over it and check the next instruction.

    Returns None when the bytes are not the prefix (or cannot be read):
    the #UD is then delivered as usual. Otherwise RIP is past the prefix
    and the returned record says whether the emulator's checks raise a
    fault there (the caller delivers it) or the instruction may run.
    ``registers`` reads and writes any register by name (``xmm0``,
    ``mxcsr``: the engine's RegisterAccess), for the SSE checks.
    """
    ctx = vcpu.cpu_state()
    segs = [ctx.segment(i) for i in range(6)]
    cs, ss = segs[1], segs[2]
    rip = ctx.rip
    bits = vcpu.code_bits()
    user = ss.dpl == 3                           # hvm_ud_intercept: PFEC_user_mode when SS.DPL is 3
    if bits != 64 and ctx.cr(0) & 1 and rip + len(PREFIX) - 1 > cs.limit:
        return None                              # hvm_virtual_to_linear_addr: past CS's limit, a plain #UD
    linear = (rip if bits == 64 else cs.base + rip) & ((1 << 64) - 1)
    sig = _read(vcpu, linear, len(PREFIX), user)
    if sig != PREFIX:
        return None
    rip += len(PREFIX)
    if bits != 64:
        rip &= 0xFFFFFFFF                        # "Zero the upper 32 bits of %rip if not in 64bit mode"
    vcpu.pc = rip
    vcpu.set_reg("rflags", vcpu.reg("rflags") & ~RFLAGS_RF)
    linear = (rip if bits == 64 else cs.base + rip) & ((1 << 64) - 1)
    code = b""
    for n in (MAX_INSN, 8, 4, 2, 1):            # near the end of a page the rest may not be mapped
        code = _read(vcpu, linear, n, user)
        if code:
            break
    insn = next(DECODERS[bits].disasm(code, rip), None) if code else None
    if insn is None:
        # The fetch or decode fails: the engine raises the same #PF or #UD at this RIP.
        return Forced(rip, f"(undecodable {code[:8].hex()})", None)
    text = f"{insn.mnemonic} {insn.op_str}".rstrip()
    if insn.bytes[:2] == PREFIX[:2]:
        # The emulator's UD2 is a #UD at once: a second prefix is not looked at again.
        return Forced(rip, text, (UD, None))
    if bits == 64 and insn.mnemonic == "nop" and not _canonical(rip + insn.size):
        # The emulator completes the NOP; the next fetch, at the first non-canonical
        # address, is #GP(0) there (XSA-170's NOP slide). The engine reports that
        # #GP at the NOP instead, so the NOP is done here.
        vcpu.pc = rip + insn.size
        return Forced(rip + insn.size, text, (GP, 0))
    fault = None
    if (insn.mnemonic.split()[-1] in ("sgdt", "sidt", "sldt", "str", "smsw") and ctx.cr(4) & (1 << 11)
            and (ss.dpl > 0 or vcpu.reg("rflags") & (1 << 17))):
        # CR4.UMIP: the emulator's own check (xen/arch/x86/x86_emulate/x86_emulate.c and 0f01.c,
        # umip_active(): CR4.UMIP and CPL > 0 -> #GP(0)), before any operand is looked at
        return Forced(rip, text, (GP, 0))
    if ctx.cr(0) & 1 and not vcpu.reg("rflags") & (1 << 17):     # protected mode, not virtual-8086
        def read_reg(name: str) -> int:
            try:
                return vcpu.reg(name)
            except KeyError:                     # capstone's pseudo registers (eiz/riz: no index)
                return 0
        for seg, offset, size, write, stack in operand_accesses(insn, read_reg, rip + insn.size):
            fault = (check_long(seg, offset, size, stack, segs) if bits == 64
                     else check_protected(seg, offset, size, write, segs))
            if fault:
                break
        fault = fault or _branch_fault(insn, vcpu, read_reg, segs, bits, user)
        fault = fault or _simd_fault(insn, vcpu, registers, read_reg, segs, bits, user)
    return Forced(rip, text, fault)


def _simd_fault(insn, vcpu, registers, read_reg, segs, bits, user: bool):
    """An SSE instruction's floating-point exceptions (:mod:`simdfp`): #XM the engine would not raise."""
    from . import simdfp

    def read_source(size: int) -> int | None:
        accesses = operand_accesses(insn, read_reg, insn.address + insn.size)
        if len(accesses) != 1:
            return None
        seg, offset, _size, _w, _s = accesses[0]
        base = segs[SEG_INDEX[seg]].base if bits != 64 or seg in ("fs", "gs") else 0
        return _read_data(vcpu, base + offset, size, user)
    if not insn.mnemonic.endswith(("ss", "sd", "ps", "pd")):
        return None
    return simdfp.check(insn, registers, read_source)


def _read(vcpu, linear: int, size: int, user: bool) -> bytes:
    from ..machine.memory import GuestMemoryError
    try:
        data = vcpu.read_linear(linear, size, fetch=True, user=user)
    except GuestMemoryError:
        return b""
    return data if isinstance(data, bytes) else b""
