"""x86 interrupt and exception delivery, done in Python.

Unicorn reports an exception or ``INT n`` to a hook and stops; it never looks
at the guest's IDT. So this module is the CPU's microcode for *event
delivery* (Intel SDM vol. 3, chapter 6, "Interrupt and Exception
Handling"): find the gate, check it, pick the stack, push the frame, load
CS:RIP and RFLAGS. Each step is one function whose docstring names the SDM
section, and every delivery produces a :class:`Delivery` record: what a
person single-stepping interrupt delivery wants to see.

Four kinds of machine state choose the path:

==============  ================  ==========================================
mode            table             frame pushed (lowest address last)
==============  ================  ==========================================
real mode       IVT, 4-byte       FLAGS, CS, IP (16-bit)
                far pointers
protected mode  IDT, 8-byte       [SS, ESP if the privilege changes], EFLAGS,
                gates             CS, EIP, [error code] (32- or 16-bit gate)
virtual-8086    IDT, 8-byte       GS, FS, DS, ES, SS, ESP, EFLAGS, CS, EIP,
                gates             [error code]: always to ring 0 (:mod:`.vm86`)
IA-32e (long)   IDT, 16-byte      SS, RSP, RFLAGS, CS, RIP, [error code],
                gates, IST        all 64-bit, RSP aligned down to 16 bytes
==============  ================  ==========================================

A fault *while* delivering (a gate that is not present, a stack that is not
mapped...) is a new exception; SDM table 6-5 decides whether the two
combine into a double fault (#DF), and a fault while delivering #DF shuts
the processor down (triple fault): :class:`TripleFault`.

Error codes (SDM §6.13): bit 0 EXT = the event was not caused by the
program (external interrupt, or a fault while delivering one); bit 1 IDT =
the index names an IDT gate; bit 2 TI = the index names an LDT entry;
bits 15:3 the index. #PF has its own format (see :mod:`paging`).

The CPU state comes through the vCPU's typed interface (:mod:`.cpu`):
registers and MSRs by name, and ``cpu_state()`` for the segment caches a
delivery reads and loads. Nothing here knows the engine behind it.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from ..machine.memory import GuestMemoryError
from .cpu import Vcpu
from .paging import PageFault, PagingRegs, translate
from .segments import SegmentCache, descriptor_at, DESC_B, DESC_L, DESC_P, DESC_S, DESC_DPL_SHIFT
from .taskswitch import switch_through_gate
from .vm86 import vm86_handler_check, vm86_int_check, vm86_null_segments, vm86_saved_segments

IF, TF, NT, RF, VM, AC = 1 << 9, 1 << 8, 1 << 14, 1 << 16, 1 << 17, 1 << 18
EFER, EFER_LMA = 0xC0000080, 1 << 10

DF = 8
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})        # #DE #TS #NP #SS #GP
FAULTS = frozenset({0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21})
VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}

GATE_TASK = 0x5
GATE_INT16, GATE_TRAP16, GATE_INT32, GATE_TRAP32 = 0x6, 0x7, 0xE, 0xF


class EventType(enum.Enum):
    """What caused the delivery (the VMX "interruption type", SDM vol. 3 §25.8.3)."""

    EXTERNAL = "external interrupt"
    NMI = "NMI"
    HARDWARE_EXCEPTION = "exception"
    SOFTWARE_INTERRUPT = "INT n"
    SOFTWARE_EXCEPTION = "INT3/INTO"
    PRIVILEGED_SOFTWARE_EXCEPTION = "INT1"


class TripleFault(Exception):
    """The processor would shut down; the message explains the chain."""


class _Fault(Exception):
    """An exception raised while delivering another one."""

    def __init__(self, vector: int, error_code: int | None = 0, cr2: int | None = None, why: str = ""):
        super().__init__(why)
        self.vector, self.error_code, self.cr2, self.why = vector, error_code, cr2, why
        self.in_new_task = False          # raised after a task switch committed (:mod:`.taskswitch`)


def vector_name(v: int) -> str:
    return VECTOR_NAMES.get(v, f"vector {v:#x}")


@dataclass
class Delivery:
    """Everything one delivery did: the record the stepper and traces show."""

    vector: int
    etype: EventType
    error_code: int | None
    mode: str = ""                               # real | protected | long
    gate: dict = field(default_factory=dict)     # type, selector, offset, dpl, ist
    old: dict = field(default_factory=dict)      # cs, rip, ss, rsp, rflags, cpl
    new: dict = field(default_factory=dict)
    stack_switched: bool = False
    pushed: list[tuple[str, int]] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)   # earlier events that turned into this one
    loads: dict = field(default_factory=dict)        # other segment registers loaded (vm86: nulls)
    task: dict = field(default_factory=dict)         # a task gate's switch: old_tr, new_tr, tss_bits

    def summary(self) -> str:
        err = f" err={self.error_code:#x}" if self.error_code is not None else ""
        via = " -> ".join(self.chain + [vector_name(self.vector)])
        return (f"{via} ({self.etype.value}){err} via {self.mode} gate {self.gate.get('kind', '?')}: "
                f"{self.old.get('cs', 0):#x}:{self.old.get('rip', 0):#x} cpl{self.old.get('cpl', 0)} -> "
                f"{self.new.get('cs', 0):#x}:{self.new.get('rip', 0):#x} cpl{self.new.get('cpl', 0)}, "
                f"stack {self.new.get('ss', 0):#x}:{self.new.get('rsp', 0):#x}"
                + (" (switched)" if self.stack_switched else "")
                + (f", task switch TR {self.task['old_tr']:#x} -> {self.task['new_tr']:#x}" if self.task else ""))


class _Cpu:
    """A snapshot of the state delivery reads, and linear memory through paging."""

    def __init__(self, vcpu: Vcpu):
        self.vcpu = vcpu
        with vcpu.cpu_state() as state:          # one copy of the whole state, read only
            self.rsp = state.gprs()[4]
            self.rip = state.rip
            self.cr0 = state.cr(0)
            self.cr3 = state.cr(3)
            self.cr4 = state.cr(4)
            self.cs = state.segment("cs")
            self.ss = state.segment("ss")
            self.idt = state.segment("idt")
            self.gdt = state.segment("gdt")
            self.ldt = state.segment("ldt")
            self.tr = state.segment("tr")
            self.selectors = {n: state.segment(n).selector for n in ("es", "ds", "fs", "gs")}
            self.cpl = state.cpl
        self.rflags = vcpu.reg("rflags")
        self.efer = vcpu.msr_read(EFER)
        self.paging = PagingRegs(self.cr0, self.cr3, self.cr4, self.efer)
        self.mem = vcpu.machine.memory

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    def _phys(self, linear: int, write: bool, user: bool) -> int:
        t = translate(self.paging, linear, self.mem.read_int, write=write, user=user,
                      write_phys=self.mem.write_int)
        if isinstance(t, PageFault):
            raise _Fault(14, t.error_code, cr2=t.linear, why=t.reason)
        return t.phys

    def read(self, linear: int, size: int, user: bool = False) -> bytes:
        out = b""
        while size:
            n = min(size, 4096 - (linear & 0xFFF))
            try:
                out += self.mem.read(self._phys(linear, False, user), n)
            except GuestMemoryError as e:
                raise TripleFault(f"interrupt delivery read {linear:#x}, which is not RAM ({e})") from None
            linear += n
            size -= n
        return out

    def check_writable(self, linear: int, size: int, user: bool) -> list[tuple[int, int]]:
        """Translate a whole frame for writing before anything is written."""
        pieces = []
        while size:
            n = min(size, 4096 - (linear & 0xFFF))
            phys = self._phys(linear, True, user)
            if not self.mem.is_ram(phys, n):
                raise TripleFault(f"interrupt stack at {linear:#x} is not RAM")
            pieces.append((phys, n))
            linear += n
            size -= n
        return pieces


def _descriptor(cpu: _Cpu, selector: int, ext: int, fault_vector: int = 13) -> SegmentCache:
    """Read a GDT/LDT descriptor (SDM vol. 3 §3.4.2, §3.5.1); limit → #GP/#TS(sel)."""
    desc = descriptor_at(cpu.read, cpu.ldt if selector & 4 else cpu.gdt, selector)
    if desc is None:
        raise _Fault(fault_vector, (selector & 0xFFFC) | ext, why=f"selector {selector:#x} beyond the table")
    return desc


def _read_gate(cpu: _Cpu, vector: int, ext: int) -> dict:
    """Fetch and decode the IDT gate (SDM vol. 3 §6.10, §6.11, §6.14.1)."""
    size = 16 if cpu.long_mode else 8
    err = (vector << 3) | 2 | ext
    if vector * size + size - 1 > cpu.idt.limit:
        raise _Fault(13, err, why=f"vector {vector:#x} beyond the IDT limit {cpu.idt.limit:#x}")
    raw = cpu.read(cpu.idt.base + vector * size, size)
    lo, hi = struct.unpack_from("<II", raw)
    gate = {
        "selector": lo >> 16,
        "offset": (lo & 0xFFFF) | (hi & 0xFFFF0000),
        "type": (hi >> 8) & 0x1F,            # includes the S bit (must be 0)
        "dpl": (hi >> 13) & 3,
        "present": bool(hi & (1 << 15)),
        "ist": hi & 7 if cpu.long_mode else 0,
    }
    if cpu.long_mode:
        gate["offset"] |= struct.unpack_from("<I", raw, 8)[0] << 32
    return gate


def _check_gate(cpu: _Cpu, gate: dict, vector: int, etype: EventType, ext: int) -> None:
    """Gate type, DPL for software interrupts, presence (SDM §6.12.1.1, §6.14.1)."""
    err = (vector << 3) | 2 | ext
    kind = gate["type"]
    valid = (GATE_INT32, GATE_TRAP32) if cpu.long_mode else (GATE_TASK, GATE_INT16, GATE_TRAP16,
                                                              GATE_INT32, GATE_TRAP32)
    if kind not in valid:
        raise _Fault(13, err, why=f"IDT entry {vector:#x} is not an interrupt/trap gate (type {kind:#x})")
    if etype in (EventType.SOFTWARE_INTERRUPT, EventType.SOFTWARE_EXCEPTION) and gate["dpl"] < cpu.cpl:
        raise _Fault(13, (vector << 3) | 2, why=f"INT {vector:#x} from CPL{cpu.cpl} through a DPL{gate['dpl']} gate")
    if not gate["present"]:
        raise _Fault(11, err, why=f"IDT gate {vector:#x} not present")


def _target_code_segment(cpu: _Cpu, gate: dict, ext: int) -> SegmentCache:
    """Check the handler's code segment (SDM §6.12.1.1; §6.14.1 in IA-32e mode)."""
    sel = gate["selector"]
    if sel & ~3 == 0:
        raise _Fault(13, ext, why="null code selector in the gate")
    desc = _descriptor(cpu, sel, ext)
    is_code = desc.flags & DESC_S and desc.flags & (1 << 11)
    if not is_code or desc.dpl > cpu.cpl:
        raise _Fault(13, (sel & 0xFFFC) | ext, why=f"gate selector {sel:#x} is not a usable code segment")
    if cpu.long_mode and not (desc.flags & DESC_L and not desc.flags & DESC_B):
        raise _Fault(13, (sel & 0xFFFC) | ext, why=f"gate selector {sel:#x} is not 64-bit code")
    if not desc.flags & DESC_P:
        raise _Fault(11, (sel & 0xFFFC) | ext, why=f"code segment {sel:#x} not present")
    return desc


def _tss_stack(cpu: _Cpu, dpl: int, ist: int, ext: int) -> tuple[int, int]:
    """New stack pointer (and SS selector) from the TSS (SDM §7.2.1, §7.7, §6.14.5)."""
    tr = cpu.tr
    busy_type = (tr.flags >> 8) & 0xF
    if cpu.long_mode:
        off = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * dpl
        if off + 7 > tr.limit:
            raise _Fault(10, (tr.selector & 0xFFFC) | ext, why="TSS too small for the stack pointer")
        return struct.unpack("<Q", cpu.read(tr.base + off, 8))[0], dpl
    if busy_type in (1, 3):                       # 16-bit TSS
        off, size = 2 + 4 * dpl, 2
    else:
        off, size = 4 + 8 * dpl, 4
    if off + 2 * size - 1 > tr.limit:
        raise _Fault(10, (tr.selector & 0xFFFC) | ext, why="TSS too small for the stack pointer")
    raw = cpu.read(tr.base + off, 2 * size)
    sp, ss = struct.unpack("<HH" if size == 2 else "<II", raw)
    return sp, ss & 0xFFFF


def _new_stack_segment(cpu: _Cpu, ss_sel: int, dpl: int, ext: int) -> SegmentCache:
    """Checks on the TSS's SS (SDM §6.12.1, "#TS" and "#SS" conditions)."""
    if ss_sel & ~3 == 0:
        raise _Fault(10, ext, why="null SS in the TSS")
    if ss_sel & 3 != dpl:
        raise _Fault(10, (ss_sel & 0xFFFC) | ext, why=f"TSS SS {ss_sel:#x} RPL is not {dpl}")
    desc = _descriptor(cpu, ss_sel, ext, fault_vector=10)
    writable_data = desc.flags & DESC_S and not desc.flags & (1 << 11) and desc.flags & (1 << 9)
    if desc.dpl != dpl or not writable_data:
        raise _Fault(10, (ss_sel & 0xFFFC) | ext, why=f"TSS SS {ss_sel:#x} is not a DPL{dpl} writable data segment")
    if not desc.flags & DESC_P:
        raise _Fault(12, (ss_sel & 0xFFFC) | ext, why=f"stack segment {ss_sel:#x} not present")
    return desc


def _pushed_flags(cpu: _Cpu, vector: int, etype: EventType) -> int:
    """The RFLAGS image saved: RF is 1 for faults (SDM vol. 3 §17.3.1.1)."""
    flags = cpu.rflags
    if etype is EventType.HARDWARE_EXCEPTION and vector in FAULTS:
        flags |= RF
    return flags


def _deliver_real(cpu: _Cpu, rec: Delivery) -> tuple:
    """Real mode: far pointer from the IVT, push FLAGS/CS/IP (SDM vol. 3 §20.1.4)."""
    vector = rec.vector
    if vector * 4 + 3 > cpu.idt.limit:
        raise TripleFault(f"real-mode {vector_name(vector)} beyond the IVT limit")
    ip, seg = struct.unpack("<HH", cpu.read(cpu.idt.base + vector * 4, 4))
    sp = (cpu.rsp - 6) & 0xFFFF
    frame = struct.pack("<HHH", cpu.rip & 0xFFFF, cpu.cs.selector, cpu.rflags & 0xFFFF)
    pieces = cpu.check_writable(cpu.ss.base + sp, 6, user=False)
    rec.mode = "real"
    rec.gate = {"kind": "IVT", "selector": seg, "offset": ip}
    rec.pushed = [("ip", cpu.rip & 0xFFFF), ("cs", cpu.cs.selector), ("flags", cpu.rflags & 0xFFFF)]
    new_cs = SegmentCache(seg, seg << 4, cpu.cs.limit, cpu.cs.flags)
    new_flags = cpu.rflags & ~(IF | TF | AC | RF)
    return frame, pieces, new_cs, None, (cpu.rsp & ~0xFFFF) | sp, new_flags, ip


def _deliver_protected(cpu: _Cpu, rec: Delivery, ext: int) -> tuple | None:
    """Protected mode (SDM vol. 3 §6.12.1): same-privilege or inter-privilege."""
    if cpu.rflags & VM and rec.etype is EventType.SOFTWARE_INTERRUPT and _soft_int_length(cpu, rec.vector) == 2:
        vm86_int_check(cpu.rflags, _Fault)
    gate = _read_gate(cpu, rec.vector, ext)
    _check_gate(cpu, gate, rec.vector, rec.etype, ext)
    if gate["type"] == GATE_TASK:                # no frame: the whole task changes (§6.11.1, §7.3)
        rec.mode, rec.gate = "protected", {"kind": "task", **gate}
        switch_through_gate(cpu, rec, gate, ext, _pushed_flags(cpu, rec.vector, rec.etype), _Fault, _Cpu)
        return None
    code = _target_code_segment(cpu, gate, ext)
    vm86 = bool(cpu.rflags & VM)
    if vm86:
        vm86_handler_check(gate["selector"], code, ext, _Fault)
    gate32 = gate["type"] in (GATE_INT32, GATE_TRAP32)
    word = 4 if gate32 else 2
    conforming = bool(code.flags & (1 << 10))
    new_cpl = cpu.cpl if conforming else code.dpl
    values = []
    if new_cpl < cpu.cpl:
        sp, ss_sel = _tss_stack(cpu, new_cpl, 0, ext)
        ss = _new_stack_segment(cpu, ss_sel, new_cpl, ext)
        ss.selector = ss_sel
        if vm86:
            values += vm86_saved_segments(cpu.selectors)
            rec.loads = vm86_null_segments()
        values += [("ss", cpu.ss.selector), ("esp", cpu.rsp & 0xFFFFFFFF)]
        rec.stack_switched = True
    else:
        ss, sp = None, cpu.rsp
    stack_seg = ss or cpu.ss
    values += [("eflags", _pushed_flags(cpu, rec.vector, rec.etype)), ("cs", cpu.cs.selector),
               ("eip", cpu.rip & 0xFFFFFFFF)]
    if rec.error_code is not None:
        values.append(("error_code", rec.error_code))
    big = stack_seg.flags & DESC_B
    sp_mask = 0xFFFFFFFF if big else 0xFFFF
    new_sp = (sp - word * len(values)) & sp_mask
    fmt = "<" + ("I" if word == 4 else "H") * len(values)
    frame = struct.pack(fmt, *[v & ((1 << (8 * word)) - 1) for _, v in reversed(values)])
    pieces = cpu.check_writable(stack_seg.base + new_sp, len(frame), user=new_cpl == 3)
    new_cs = SegmentCache((gate["selector"] & ~3) | new_cpl, code.base, code.limit, code.flags)
    clear = TF | NT | RF | VM | (IF if gate["type"] in (GATE_INT16, GATE_INT32) else 0)
    rec.mode = "protected"
    rec.gate = {"kind": {GATE_INT16: "int16", GATE_TRAP16: "trap16", GATE_INT32: "int32",
                         GATE_TRAP32: "trap32"}[gate["type"]], **gate}
    rec.pushed = values
    offset = gate["offset"] if gate32 else gate["offset"] & 0xFFFF
    rsp = (sp & ~sp_mask) | new_sp if not rec.stack_switched else new_sp
    return frame, pieces, new_cs, ss, rsp, cpu.rflags & ~clear, offset


def _deliver_long(cpu: _Cpu, rec: Delivery, ext: int) -> tuple:
    """IA-32e mode (SDM vol. 3 §6.14): 64-bit frame, IST, aligned stack."""
    gate = _read_gate(cpu, rec.vector, ext)
    _check_gate(cpu, gate, rec.vector, rec.etype, ext)
    code = _target_code_segment(cpu, gate, ext)
    offset = gate["offset"]
    if (offset >> 47) not in (0, (1 << 17) - 1):
        raise _Fault(13, ext, why=f"handler address {offset:#x} is not canonical")
    new_cpl = code.dpl if not code.flags & (1 << 10) else cpu.cpl
    ss = None
    if new_cpl < cpu.cpl or gate["ist"]:
        rsp, _ = _tss_stack(cpu, new_cpl, gate["ist"], ext)
        if new_cpl < cpu.cpl:
            # A privilege change loads a NULL SS whose RPL is the new CPL (§6.14.4).
            ss = SegmentCache(new_cpl, 0, 0, new_cpl << DESC_DPL_SHIFT)
        rec.stack_switched = True
    else:
        rsp = cpu.rsp
    rsp &= ~0xF
    values = [("ss", cpu.ss.selector), ("rsp", cpu.rsp), ("rflags", _pushed_flags(cpu, rec.vector, rec.etype)),
              ("cs", cpu.cs.selector), ("rip", cpu.rip)]
    if rec.error_code is not None:
        values.append(("error_code", rec.error_code))
    new_rsp = (rsp - 8 * len(values)) & ((1 << 64) - 1)
    frame = struct.pack("<" + "Q" * len(values), *[v & ((1 << 64) - 1) for _, v in reversed(values)])
    pieces = cpu.check_writable(new_rsp, len(frame), user=new_cpl == 3)
    new_cs = SegmentCache((gate["selector"] & ~3) | new_cpl, 0, code.limit, code.flags)
    clear = TF | NT | RF | VM | (IF if gate["type"] == GATE_INT32 else 0)
    rec.mode = "long"
    rec.gate = {"kind": "int64" if gate["type"] == GATE_INT32 else "trap64", **gate}
    rec.pushed = values
    return frame, pieces, new_cs, ss, new_rsp, cpu.rflags & ~clear, offset


def _apply(vcpu: Vcpu, cpu: _Cpu, frame: bytes, pieces, new_cs, new_ss, rsp: int, rflags: int, rip: int,
           rec: Delivery) -> None:
    """Commit: write the frame, load CS/SS caches, RSP, RFLAGS, RIP (in that order)."""
    pos = 0
    for phys, n in pieces:
        cpu.mem.write(phys, frame[pos:pos + n])
        pos += n
    caches = {**rec.loads, "cs": new_cs}
    if new_ss is not None:
        caches["ss"] = new_ss
    with vcpu.cpu_state() as state:
        state.load_segments(**caches)
    vcpu.set_reg("rsp", rsp)
    vcpu.set_reg("rflags", rflags)
    vcpu.set_reg("rip", rip)
    rec.new = {"cs": new_cs.selector, "rip": rip, "ss": (new_ss or cpu.ss).selector, "rsp": rsp,
               "rflags": rflags, "cpl": new_cs.selector & 3 if cpu.cr0 & 1 else 0, "cs_base": new_cs.base}


def _combine(first: int, second: int) -> bool:
    """Do two exceptions make a #DF? (SDM vol. 3 table 6-5)."""
    first_pf, second_pf = first == 14, second == 14
    if first in CONTRIBUTORY and second in CONTRIBUTORY:
        return True
    return first_pf and (second_pf or second in CONTRIBUTORY)


_LEGACY_PREFIXES = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3")


def icebp_length(vcpu: Vcpu) -> int:
    """The length of the ICEBP (INT1, opcode 0xF1, prefixes included) at RIP, or 0.

    Unicorn's decoder has no 0xF1 and raises #UD; the CPU raises #DB as a
    trap through IDT entry 1 with no gate DPL check (a "privileged software
    exception", SDM vol. 3 §6.15 and the INT1 entry of vol. 2).
    """
    cpu = _Cpu(vcpu)
    start = cpu.cs.base + cpu.rip
    for span in (15, 4096 - (start & 0xFFF)):
        try:
            code = cpu.read(start, min(15, span))
            break
        except (_Fault, TripleFault):
            continue
    else:
        return 0
    n = 0
    while n < len(code) and code[n] in _LEGACY_PREFIXES:
        n += 1
    if n < len(code) and cpu.long_mode and cpu.cs.flags & DESC_L and 0x40 <= code[n] <= 0x4F:
        n += 1
    return n + 1 if n < len(code) and code[n] == 0xF1 else 0


def _soft_int_length(cpu: _Cpu, vector: int) -> int:
    """Length of the INT3 / INT imm8 / INTO / ICEBP that ended just before RIP, prefixes included.

    Unicorn hands software interrupts over with RIP already past the
    instruction and the start forgotten, so it is found backwards: the
    opcode (0xCC, 0xCE, or 0xCD with this vector), then any legacy prefixes
    before it (XTF's swint-emulation uses ``67 cc``), and in 64-bit mode a
    REX byte between them and the opcode. A previous instruction whose last
    byte happens to equal a prefix byte is taken for one (the bytes alone
    cannot tell); it only matters when the delivery itself faults.
    """
    end = cpu.cs.base + cpu.rip
    window = b""
    for span in (min(15, end), min(15, end & 0xFFF)):   # the page before may be unmapped
        try:
            window = cpu.read(end - span, span) if span else b""
            break
        except (_Fault, TripleFault):
            continue
    if len(window) < 2:
        return len(window) or 2
    if window[-1] == {1: 0xF1, 3: 0xCC, 4: 0xCE}.get(vector, -1):
        n = 1
    elif window[-2] == 0xCD and window[-1] == vector:
        n = 2
    else:
        return 2
    if len(window) > n and cpu.long_mode and cpu.cs.flags & DESC_L and 0x40 <= window[-n - 1] <= 0x4F:
        n += 1                                   # REX: only right before the opcode
    while n < len(window) and window[-n - 1] in _LEGACY_PREFIXES:
        n += 1
    return n


def deliver(vcpu: Vcpu, vector: int, etype: EventType, error_code: int | None = None) -> Delivery:
    """Deliver one event through the guest's IVT/IDT, handling nested faults."""
    chain: list[str] = []
    pending_cr2 = None
    while True:
        cpu = _Cpu(vcpu)
        rec = Delivery(vector, etype, error_code)
        rec.old = {"cs": cpu.cs.selector, "rip": cpu.rip, "ss": cpu.ss.selector, "rsp": cpu.rsp,
                   "rflags": cpu.rflags, "cpl": cpu.cpl}
        rec.chain = list(chain)
        ext = 0 if etype in (EventType.SOFTWARE_INTERRUPT, EventType.SOFTWARE_EXCEPTION) else 1
        try:
            if not cpu.cr0 & 1:
                parts = _deliver_real(cpu, rec)
            elif cpu.long_mode:
                parts = _deliver_long(cpu, rec, ext)
            else:
                parts = _deliver_protected(cpu, rec, ext)
        except _Fault as f:
            chain.append(f"{vector_name(vector)} ({f.why})")
            if etype in (EventType.SOFTWARE_INTERRUPT, EventType.PRIVILEGED_SOFTWARE_EXCEPTION) \
                    and not f.in_new_task:
                # A fault while delivering INT n / INT3 / INTO / ICEBP is the instruction's
                # fault: its frame points at the instruction, not past it (SDM
                # vol. 3 §6.5: a fault's saved EIP is the faulting instruction),
                # so a handler that fixes the IDT and returns runs it again.
                vcpu.set_reg("rip", cpu.rip - _soft_int_length(cpu, vector))
            if vector == DF and etype is EventType.HARDWARE_EXCEPTION:      # not INT 8: its fault is a #GP
                raise TripleFault("triple fault: " + " -> ".join(chain)) from None
            if etype is EventType.HARDWARE_EXCEPTION and _combine(vector, f.vector):
                vector, error_code = DF, 0
            else:
                vector, error_code = f.vector, f.error_code
            etype = EventType.HARDWARE_EXCEPTION
            pending_cr2 = f.cr2 if f.vector == 14 else pending_cr2
            if vector == 14 and pending_cr2 is not None:
                vcpu.set_reg("cr2", pending_cr2)
            continue
        if parts is not None:                    # None: a task switch, already committed
            _apply(vcpu, cpu, *parts, rec)
        tracer = vcpu.machine.tracer
        if tracer.on("int") or tracer.listeners:
            tracer.emit("int", rec.summary(), rec)
        vcpu.last_delivery = rec
        return rec
