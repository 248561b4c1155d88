"""Hardware task switching: an event delivered through an IDT *task gate*.

A 32-bit x86 CPU can keep a whole task's register state in memory, in a
*task-state segment* (TSS), and swap it in one step. The TSS is named by a
descriptor in the GDT (type 9 "available 32-bit TSS", 0xB "busy"; 1 and 3
for the old 16-bit TSS); the task register TR holds the current one. An
IDT entry of type 5, a *task gate* (SDM vol. 3 §6.11.1, figure 6-2), names
such a TSS instead of a handler: the event then suspends the running task
and resumes another one, which is how 32-bit Windows takes NMIs and how
many 32-bit kernels take #DF on a fresh, known-good stack. Task gates
exist only in protected mode: in IA-32e mode an IDT entry of type 5 is
invalid, #GP(vector*8+2+EXT) (§6.14.1), which :mod:`.interrupts` checks.

The 32-bit TSS (SDM vol. 3 §7.2.1, figure 7-2), offsets in bytes::

    0x00 previous task link     0x1C CR3 (PDBR)     0x48 ES  0x4C CS  0x50 SS
    0x04 ESP0  0x08 SS0 ...     0x20 EIP            0x54 DS  0x58 FS  0x5C GS
    (stacks for rings 0-2)      0x24 EFLAGS         0x60 LDT selector
                                0x28-0x44 EAX ECX EDX EBX ESP EBP ESI EDI
                                0x64 T (debug trap) 0x66 I/O map base

The 16-bit TSS (figure 7-11) is the same idea in words, without CR3, FS,
GS: IP at 0x0E, FLAGS 0x10, AX..DI 0x12-0x20, ES CS SS DS 0x22-0x28, LDT
0x2A; its limit must be at least 0x2B instead of 0x67.

A switch through a task gate (SDM vol. 3 §7.3, "Task Switching"; the
TASK-GATE branch of INT n's pseudo-code in vol. 2A) goes:

1. the gate's TSS selector must name the GDT (TI=0) within its limit, and
   the descriptor an available TSS: otherwise #GP(selector); a busy TSS
   is #GP too (tasks are not re-entrant); not present: #NP(selector); a
   limit below 0x67 (0x2B): #TS(selector) (table 7-1);
2. everything the switch touches must be mapped: the new TSS is read and
   the old TSS, the new TSS's link field and the new descriptor are
   translated for writing *before* anything changes; a fault so far is
   taken in the old task, as if nothing happened;
3. the old task's EIP (the faulting instruction for a fault, the next one
   for INT n and interrupts, exactly what a stack frame would hold),
   EFLAGS, general registers and segment selectors go into the old TSS.
   Its busy bit stays set: it is suspended, not available;
4. the new TSS's link field gets the old TR selector, its descriptor
   becomes busy, and its EFLAGS image gets NT=1 ("nested task"): that is
   what lets IRET find the way back;
5. *commit*: CR0.TS is set (§2.5: the x87/SSE state may belong to the
   old task), TR is loaded, and from the new TSS: CR3 (only with paging
   on; a 16-bit TSS has none; with PAE hardware reloads the four PDPTEs
   here, which QEMU TCG and :mod:`.paging` read from memory at every walk
   anyway), EFLAGS, EIP, the general registers, LDTR and the segment
   registers. The CPL becomes the new CS selector's RPL;
6. the LDT and segment descriptors are checked and loaded (table 7-1: a
   bad selector is #TS(selector), a not-present segment #NP, or #SS for
   SS). These faults happen *in the new task*: the CPU is already there,
   its state partly loaded, as the SDM warns;
7. an exception with an error code pushes it on the new task's stack
   (nothing else is pushed: no CS:EIP frame), and EIP must lie inside the
   new CS limit, else #GP(EXT).

The way back is IRET with EFLAGS.NT=1: it saves the current task into its
TSS, clears its busy bit, and switches to the task named by the link field,
which must be busy. The CPU engine (QEMU's ``helper_iret_protected`` and
``switch_tss``) does that, and JMP/CALL to a TSS or task gate, itself; this
module is only the delivery direction, which Python owns. External
interrupts that the engine delivers itself also reach task gates through
QEMU's ``switch_tss`` (:mod:`xenicorn.engine.delivery`); the two agree on
the switch, and QEMU's cached TR type is the *available* one where this
module caches the busy type, as hardware does (nothing the guest sees).

Not modelled: the TSS T flag (a #DB after the switch), clearing DR7's
local breakpoint enables, and the accessed bits of loaded descriptors.
The old TSS is written without a limit check, as QEMU does.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .segments import DESC_B, DESC_P, DESC_S, DESC_DPL_SHIFT, SegmentCache, descriptor_at

NT, VM, RF = 1 << 14, 1 << 17, 1 << 16
CR0_PG, CR0_TS = 1 << 31, 1 << 3
TSS_BUSY = 1 << 9                     # the B bit: type 9 -> 0xB, 1 -> 3 (descriptor high dword)
SEG_ORDER = ("es", "cs", "ss", "ds", "fs", "gs")       # the TSS's order of the selectors
LOAD_ORDER = ("cs", "ss", "es", "ds", "fs", "gs")      # the order the CPU checks them in
TYPE_CODE, TYPE_CONFORMING, TYPE_READ_WRITE = 1 << 11, 1 << 10, 1 << 9


@dataclass(frozen=True)
class TssLayout:
    """Where one TSS format keeps each field (SDM vol. 3 figures 7-2 and 7-11)."""

    bits: int
    min_limit: int
    eip: int
    eflags: int
    gprs: int              # EAX first, in encoding order
    segs: int              # ES first, in SEG_ORDER, one slot each (seg_stride bytes)
    nsegs: int
    ldt: int
    cr3: int | None

    @property
    def word(self) -> str:
        return "<I" if self.bits == 32 else "<H"

    @property
    def size(self) -> int:
        return self.min_limit + 1

    @property
    def seg_stride(self) -> int:
        return self.bits // 8


TSS32 = TssLayout(32, 0x67, 0x20, 0x24, 0x28, 0x48, 6, 0x60, 0x1C)
TSS16 = TssLayout(16, 0x2B, 0x0E, 0x10, 0x12, 0x22, 4, 0x2A, None)


def layout(tss_type: int) -> TssLayout:
    """The layout for a TSS descriptor type (bit 3 set: 32-bit)."""
    return TSS32 if tss_type & 8 else TSS16


@dataclass
class NewTask:
    """The new task's state, read from its TSS before the commit."""

    selector: int
    cache: SegmentCache           # the TSS descriptor, with the busy type
    tss: TssLayout
    eip: int
    eflags: int
    gprs: list[int]
    segs: dict[str, int]
    ldt: int
    cr3: int | None


def _field(raw: bytes, off: int, tss: TssLayout, word: bool = False) -> int:
    return struct.unpack_from("<H" if word or tss.bits == 16 else "<I", raw, off)[0]


def check_target(cpu, selector: int, ext: int, fault) -> NewTask:
    """Steps 1 and 2: check the TSS descriptor the gate names, read the new TSS."""
    err = (selector & 0xFFFC) | ext
    index = selector & ~7
    # INT n pseudo-code (vol. 2A), TASK-GATE: "local/global bit set to local or index not within
    # GDT limits: #GP(TSS selector)".
    if selector & 4 or index + 7 > cpu.gdt.limit:
        raise fault(13, err, why=f"task gate selector {selector:#x} is not in the GDT")
    lo, hi = struct.unpack("<II", cpu.read(cpu.gdt.base + index, 8))
    kind = (hi >> 8) & 0x1F                              # with S, which must be 0
    if kind in (0x3, 0xB):
        raise fault(13, err, why=f"task gate names TSS {selector:#x}, which is busy")
    if kind not in (0x1, 0x9):
        raise fault(13, err, why=f"task gate selector {selector:#x} is not a TSS (type {kind:#x})")
    if not hi & DESC_P:
        raise fault(11, err, why=f"TSS {selector:#x} not present")
    cache = SegmentCache.from_descriptor(selector, (hi << 32) | lo)
    tss = layout(kind)
    if cache.limit < tss.min_limit:
        raise fault(10, err, why=f"TSS {selector:#x} limit {cache.limit:#x} is below {tss.min_limit:#x}")
    cache.flags |= TSS_BUSY
    raw = cpu.read(cache.base, tss.size)
    gprs = [_field(raw, tss.gprs + i * tss.bits // 8, tss) for i in range(8)]
    segs = {name: _field(raw, tss.segs + tss.seg_stride * i, tss, word=True) if i < tss.nsegs else 0
            for i, name in enumerate(SEG_ORDER)}
    return NewTask(selector, cache, tss, _field(raw, tss.eip, tss), _field(raw, tss.eflags, tss), gprs, segs,
                   _field(raw, tss.ldt, tss, word=True),
                   _field(raw, tss.cr3, tss) if tss.cr3 is not None else None)


def _write(cpu, pieces, data: bytes) -> None:
    pos = 0
    for phys, n in pieces:
        cpu.mem.write(phys, data[pos:pos + n])
        pos += n


def save_old_task(cpu, new: NewTask, saved_eflags: int) -> None:
    """Steps 2 to 4: translate every write first, then save the old task and link the new one."""
    old = layout((cpu.tr.flags >> 8) & 0xF)
    with cpu.vcpu.cpu_state() as state:
        gprs = state.gprs()[:8]
    word = old.bits // 8
    start, end = cpu.tr.base + old.eip, cpu.tr.base + old.segs + old.seg_stride * old.nsegs
    image = bytearray(cpu.read(start, end - start))     # keeps the reserved words between selectors
    mask = (1 << old.bits) - 1
    struct.pack_into(old.word, image, 0, cpu.rip & mask)
    struct.pack_into(old.word, image, old.eflags - old.eip, saved_eflags & mask)
    for i, v in enumerate(gprs):
        struct.pack_into(old.word, image, old.gprs - old.eip + i * word, v & mask)
    selectors = {"cs": cpu.cs.selector, "ss": cpu.ss.selector, **cpu.selectors}
    for i, name in enumerate(SEG_ORDER[:old.nsegs]):
        struct.pack_into("<H", image, old.segs - old.eip + i * old.seg_stride, selectors[name])
    # Step 5 of §7.3: all of it must be mapped before anything is written.
    old_pieces = cpu.check_writable(start, len(image), user=False)
    link = cpu.check_writable(new.cache.base, 2, user=False)
    busy = cpu.check_writable(cpu.gdt.base + (new.selector & ~7) + 5, 1, user=False)
    byte5 = cpu.read(cpu.gdt.base + (new.selector & ~7) + 5, 1)[0]
    _write(cpu, old_pieces, bytes(image))
    _write(cpu, link, struct.pack("<H", cpu.tr.selector))
    _write(cpu, busy, bytes([byte5 | 2]))


def _read_descriptor(cpu, gdt: SegmentCache, ldt: SegmentCache, selector: int, fault, ext: int, what: str):
    """A descriptor from the GDT or (TI=1) the new LDT; outside the table: #TS(selector)."""
    table = ldt if selector & 4 else gdt
    desc = None if selector & 4 and not table.flags & DESC_P else descriptor_at(cpu.read, table, selector)
    if desc is None:
        raise fault(10, (selector & 0xFFFC) | ext, why=f"{what} {selector:#x} is beyond its table")
    return desc


def load_ldt(cpu, selector: int, fault, ext: int) -> SegmentCache:
    """The new LDTR: null, or an LDT descriptor (type 2) in the GDT, present; else #TS(selector)."""
    err = (selector & 0xFFFC) | ext
    if selector & 4:
        raise fault(10, err, why=f"LDT selector {selector:#x} points into an LDT")
    if selector & 0xFFFC == 0:
        return SegmentCache(selector & ~4, 0, 0, 0)
    desc = _read_descriptor(cpu, cpu.gdt, cpu.gdt, selector, fault, ext, "LDT selector")
    if desc.flags & DESC_S or (desc.flags >> 8) & 0xF != 2 or not desc.flags & DESC_P:
        raise fault(10, err, why=f"LDT selector {selector:#x} is not a present LDT descriptor")
    return desc


def load_segment(cpu, ldt: SegmentCache, name: str, selector: int, cpl: int, fault, ext: int) -> SegmentCache:
    """Check and load one segment register from the new TSS (SDM vol. 3 table 7-1)."""
    err = (selector & 0xFFFC) | ext
    if selector & 0xFFFC == 0:
        if name in ("cs", "ss"):
            raise fault(10, err, why=f"null {name.upper()} in the new TSS")
        return SegmentCache(selector, 0, 0, 0)
    desc = _read_descriptor(cpu, cpu.gdt, ldt, selector, fault, ext, f"new task's {name.upper()}")
    flags, rpl, dpl = desc.flags, selector & 3, desc.dpl
    code = flags & TYPE_CODE
    if not flags & DESC_S:
        bad = "a system segment"
    elif name == "cs":
        bad = ("not code" if not code else
               f"DPL {dpl} > CPL {cpl}" if flags & TYPE_CONFORMING and dpl > cpl else
               f"DPL {dpl} != CPL {cpl}" if not flags & TYPE_CONFORMING and dpl != cpl else None)
    elif name == "ss":
        bad = ("not writable data" if code or not flags & TYPE_READ_WRITE else
               f"DPL {dpl} / RPL {rpl} != CPL {cpl}" if dpl != cpl or rpl != cpl else None)
    else:
        bad = ("execute-only code" if code and not flags & TYPE_READ_WRITE else
               f"DPL {dpl} below CPL {cpl} / RPL {rpl}"
               if (not code or not flags & TYPE_CONFORMING) and dpl < max(cpl, rpl) else None)
    if bad:
        raise fault(10, err, why=f"new task's {name.upper()} {selector:#x}: {bad}")
    if not flags & DESC_P:
        raise fault(12 if name == "ss" else 11, err, why=f"new task's {name.upper()} {selector:#x} not present")
    return desc


def _vm86_segment(selector: int) -> SegmentCache:
    """A virtual-8086 segment: base = selector * 16, 64 KiB, DPL 3 (SDM vol. 3 §20.1.1)."""
    return SegmentCache(selector, selector << 4, 0xFFFF, DESC_P | DESC_S | (3 << DESC_DPL_SHIFT) | (0x3 << 8))


def commit(vcpu, cpu, new: NewTask) -> None:
    """Step 5: CR0.TS, TR, CR3, EFLAGS, EIP, GPRs; selectors with empty caches (QEMU does the same).

    Paging stays as it is if the TSS is 16-bit: it has no CR3 field.
    """
    eflags = new.eflags | NT | 2
    if new.tss.bits == 16:                   # FLAGS only; the upper half stays (QEMU's choice too)
        eflags = (cpu.rflags & ~0xFFFF) | (eflags & 0xFFFF)
    new.eflags = eflags
    with vcpu.cpu_state() as state:
        state.set_segment("tr", new.cache)
        state.set_segment("ldt", SegmentCache(new.ldt & ~4, 0, 0, 0))
        state.load_segments(**{n: (_vm86_segment(s) if eflags & VM else SegmentCache(s, 0, 0, 0))
                               for n, s in new.segs.items()})
    vcpu.set_reg("cr0", cpu.cr0 | CR0_TS)
    if new.cr3 is not None and cpu.cr0 & CR0_PG:
        vcpu.set_reg("cr3", new.cr3)
    for name, value in zip(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"), new.gprs, strict=True):
        vcpu.set_reg(name, value)
    vcpu.set_reg("rflags", eflags)
    vcpu.set_reg("rip", new.eip)


def load_new_segments(vcpu, cpu, new: NewTask, fault, ext: int) -> None:
    """Step 6, in the new task: LDTR, then CS, SS, ES, DS, FS, GS; what loaded stays loaded.

    A virtual-8086 task (EFLAGS.VM=1 in its TSS) got its segments from the
    selectors at the commit; only its LDTR is checked here.
    """
    caches: dict[str, SegmentCache] = {}
    ldt = None
    try:
        ldt = load_ldt(cpu, new.ldt, fault, ext)
        cpl = new.segs["cs"] & 3
        for name in LOAD_ORDER if not new.eflags & VM else ():
            caches[name] = load_segment(cpu, ldt, name, new.segs[name], cpl, fault, ext)
    finally:
        with vcpu.cpu_state() as state:
            if ldt is not None:
                state.set_segment("ldt", ldt)
            if caches:
                state.load_segments(**caches)


def push_error_code(cpu, new: NewTask, error_code: int) -> int:
    """Step 7: the error code alone on the new stack, a dword for a 32-bit TSS (vol. 2A, INT n)."""
    size = new.tss.bits // 8
    mask = 0xFFFFFFFF if cpu.ss.flags & DESC_B else 0xFFFF
    sp = (cpu.rsp - size) & mask
    pieces = cpu.check_writable(cpu.ss.base + sp, size, user=cpu.cpl == 3)
    _write(cpu, pieces, struct.pack(new.tss.word, error_code & ((1 << new.tss.bits) - 1)))
    rsp = (cpu.rsp & ~mask) | sp
    cpu.vcpu.set_reg("rsp", rsp)
    return rsp


def switch_through_gate(cpu, rec, gate: dict, ext: int, saved_eflags: int, fault, snapshot) -> None:
    """Deliver ``rec`` through a task gate: the whole of §7.3 for an interrupt or exception.

    ``fault`` is the delivery's exception class; a fault raised once the
    switch is committed carries ``in_new_task = True`` (its EIP is the new
    task's, never to be rewound). ``snapshot(vcpu)`` re-reads the CPU after
    the commit, so descriptor reads and the error-code push see the new
    task's CR3, CPL and stack.
    """
    vcpu = cpu.vcpu
    new = check_target(cpu, gate["selector"], ext, fault)
    save_old_task(cpu, new, saved_eflags)
    commit(vcpu, cpu, new)
    rec.task = {"old_tr": cpu.tr.selector, "new_tr": new.selector, "tss_bits": new.tss.bits}
    try:
        now = snapshot(vcpu)
        load_new_segments(vcpu, now, new, fault, ext)
        now = snapshot(vcpu)
        if rec.error_code is not None:
            rec.pushed = [("error_code", rec.error_code)]
            push_error_code(now, new, rec.error_code)
            now = snapshot(vcpu)
        if now.rip > now.cs.limit:
            raise fault(13, ext, why=f"new task's EIP {now.rip:#x} is beyond its CS limit {now.cs.limit:#x}")
    except fault as f:
        f.in_new_task = True
        f.why = f"switched to task {new.selector:#x}, then {f.why}"
        raise
    rec.new = {"cs": now.cs.selector, "rip": now.rip, "ss": now.ss.selector, "rsp": now.rsp,
               "rflags": now.rflags, "cpl": now.cpl, "cs_base": now.cs.base}
