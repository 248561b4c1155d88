"""The human monitor's ``info`` commands: the interrupt controllers and a vCPU, as QEMU prints them.

QEMU's HMP (reached over QMP through ``human-monitor-command``) has an
``info`` command per piece of state. The ones here print in QEMU's layout
so a reader who knows QEMU's monitor reads ours, and a script written for
one works on the other:

- ``info pic``: each 8259 (QEMU's hw/intc/i8259_common.c print_info: IRR,
  IMR, ISR, the rotating priority, the vector base, OCW3's read select, the
  ELCR, special fully nested mode), then the IOAPIC's redirection table
  (hw/intc/ioapic_common.c ioapic_print_redtbl: one line per pin, then the
  pins whose input is high, IRR, and the level pins waiting for an EOI,
  Remote IRR). QEMU prints every interrupt controller there.
- ``info ioapic``: the IOAPIC part alone.
- ``info lapic``: the current vCPU's local APIC (target/i386/cpu-dump.c
  x86_cpu_dump_local_apic_state): each LVT entry decoded, the timer, the
  spurious vector register, the ICR, ISR and IRR vectors (``(level)`` for
  those whose TMR bit is set: they will EOI an IOAPIC pin), TPR and PPR.
- ``info registers``: the current vCPU's registers (cpu-dump.c
  x86_cpu_dump_state: general registers, flags, segment caches, descriptor
  tables, control registers, EFER).
- ``info irq``: how many times each input rose, per controller (QEMU's
  ``x-query-irq``: "IRQ statistics for isa-i8259" / "ioapic").
- ``info evtchn`` (ours): every open event channel port, its kind, vCPU,
  remote end, pending and masked bits, and its FIFO priority.

The *current* vCPU is the monitor's, as in QEMU: vCPU 0 until ``cpu N``
(or ``human-monitor-command``'s ``cpu-index`` argument) picks another.
"""
from __future__ import annotations

import contextlib

from ..devices.ioapic import RTE_LEVEL, RTE_MASK, RTE_REMOTE_IRR
from ..devices.lapic import LVT_ERROR, LVT_LINT0, LVT_LINT1, LVT_MASKED, LVT_PERF, LVT_THERMAL, LVT_TIMER

IOAPIC_VERSION = 0x20
_IOAPIC_DELIVERY = ("fixed", "lowest", "SMI", "...", "NMI", "INIT", "...", "extINT")
_LAPIC_DELIVERY = ("Fixed", "...", "SMI", "...", "NMI", "INIT", "...", "ExtINT")
_SHORTHAND = ("no-shorthand", "self", "all-self", "all")


# -- 8259 and IOAPIC ---------------------------------------------------------------------------
def pic(machine) -> str:
    """``info pic``: both 8259s, then the IOAPIC."""
    out = []
    for n, chip in enumerate((machine.pic.master, machine.pic.slave)):
        st = chip.state
        out.append(f"pic{n}: irr={st.irr:02x} imr={st.imr:02x} isr={st.isr:02x} hprio={st.priority_add} "
                   f"irq_base={st.vector_base:02x} rr_sel={int(st.read_isr)} elcr={st.elcr:02x} fnm=0")
    return "\n".join(out) + "\n" + ioapic(machine)


def _pins(name: str, bitmap: int, pins: int) -> str:
    listed = " ".join(f"{i:<2d}" for i in range(pins) if bitmap >> i & 1)
    return f"{name:<10s} " + (listed + " " if listed else "(none)")


def ioapic(machine) -> str:
    """``info ioapic``: the redirection table, one pin a line, then IRR and Remote IRR."""
    st = machine.ioapic.state
    head = f"ioapic0: ver={IOAPIC_VERSION:#x} id={st.id:#04x} sel={st.ioregsel:#04x}"
    if st.ioregsel >= 0x10:
        head += f" (redir[{(st.ioregsel - 0x10) >> 1}])"
    out = [head]
    remote = 0
    for pin, rte in enumerate(st.redirtbl):
        logical = rte >> 11 & 1
        out.append(f"  pin {pin:<2d} {rte:#018x} dest={(rte >> 56) & (0xff if logical else 0xf):x} "
                   f"vec={rte & 0xff:<3d} {'active-lo' if rte >> 13 & 1 else 'active-hi'} "
                   f"{'level' if rte & RTE_LEVEL else 'edge':<5s} {'masked' if rte & RTE_MASK else '':<6s} "
                   f"{_IOAPIC_DELIVERY[rte >> 8 & 7]:<6s} {'logical' if logical else 'physical'}")
        if rte & RTE_LEVEL and rte & RTE_REMOTE_IRR:
            remote |= 1 << pin
    pins = len(st.redirtbl)
    out += [_pins("  IRR", st.irr, pins), _pins("  Remote IRR", remote, pins)]
    return "\n".join(out) + "\n"


# -- the local APIC ----------------------------------------------------------------------------
def _lvt(name: str, lvt: int, timer: bool) -> str:
    mode = lvt >> 8 & 7
    kind = ""
    if timer:
        kind = ("one-shot", "periodic", "tsc-deadline", "one-shot")[lvt >> 17 & 3]
    line = (f"{name}\t 0x{lvt:08x} {'active-lo' if lvt >> 13 & 1 else 'active-hi'} "
            f"{'level' if lvt >> 15 & 1 else 'edge':<5s} {'masked' if lvt & LVT_MASKED else '':<6s} "
            f"{'pending' if lvt >> 12 & 1 else '':<7s} {kind:<12s} {_LAPIC_DELIVERY[mode]:<6s}")
    return line + ("" if mode == 4 else f" (vec {lvt & 0xff})")


def _vectors(name: str, bits: int, tmr: int) -> str:
    listed = "".join(f"{v}{'(level)' if tmr >> v & 1 else ''} " for v in range(256) if bits >> v & 1)
    return f"{name}\t {listed or '(none)'}"


def lapic(machine, cpu: int) -> str:
    """``info lapic``: vCPU ``cpu``'s local APIC."""
    apic = machine.lapics[cpu]
    st = apic.state
    dcr = st.divide & 0xB
    code = (dcr >> 1 & 4) | (dcr & 3)
    icr, icr2 = st.icr & 0xFFFFFFFF, st.icr >> 32
    shorthand = icr >> 18 & 3
    out = [f"dumping local APIC state for CPU {cpu:<2d}", "",
           _lvt("LVT0", st.lvt[LVT_LINT0], False), _lvt("LVT1", st.lvt[LVT_LINT1], False),
           _lvt("LVTPC", st.lvt[LVT_PERF], False), _lvt("LVTERR", st.lvt[LVT_ERROR], False),
           _lvt("LVTTHMR", st.lvt[LVT_THERMAL], False), _lvt("LVTT", st.lvt[LVT_TIMER], True),
           f"Timer\t DCR=0x{dcr:x} (divide by {1 if code == 7 else 2 << code}) initial_count = "
           f"{st.initial_count} current_count = {apic.current_count()}",
           f"SPIV\t 0x{st.svr:08x} APIC {'enabled' if st.svr >> 8 & 1 else 'disabled'}, "
           f"focus={'on' if st.svr >> 9 & 1 else 'off'}, spurious vec {st.svr & 0xff}",
           f"ICR\t 0x{icr:08x} {'logical' if icr >> 11 & 1 else 'physical'} "
           f"{'level' if icr >> 15 & 1 else 'edge'} {'assert' if icr >> 14 & 1 else 'de-assert'} "
           f"{_SHORTHAND[shorthand]}"]
    line = f"ICR2\t 0x{icr2:08x}"
    if shorthand == 0:
        dest = icr2 >> 24
        if not icr >> 11 & 1:
            line += f" cpu {dest} (APIC ID)"
        elif st.dfr >> 28 == 0xF:
            line += f" mask {dest:08b} (APIC ID)"
        else:
            line += f" cluster {dest >> 4} mask {dest & 0xf:04b} (APIC ID)"
    out += [line, f"ESR\t 0x{st.esr:08x}", _vectors("ISR", st.isr, st.tmr), _vectors("IRR", st.irr, st.tmr), ""]
    dfr, ldr = st.dfr >> 28, st.ldr >> 24
    tail = f"APR 0x00 TPR 0x{st.tpr & 0xff:02x} DFR 0x{dfr:02x} LDR 0x{ldr:02x}"
    if dfr == 0:
        tail += f"(cluster {ldr >> 4}: id {ldr & 0xf})"
    out.append(tail + f" PPR 0x{apic.ppr():02x}")
    return "\n".join(out) + "\n"


# -- registers ---------------------------------------------------------------------------------
_SYS_TYPES = (("Reserved", "TSS16-avl", "LDT", "TSS16-busy", "CallGate16", "TaskGate", "IntGate16",
               "TrapGate16", "Reserved", "TSS32-avl", "Reserved", "TSS32-busy", "CallGate32", "Reserved",
               "IntGate32", "TrapGate32"),
              ("<hiword>", "Reserved", "LDT", "Reserved", "Reserved", "Reserved", "Reserved", "Reserved",
               "Reserved", "TSS64-avl", "Reserved", "TSS64-busy", "CallGate64", "Reserved", "IntGate64",
               "TrapGate64"))


def _segment(name: str, seg, cs64: bool, pe: bool, lma: bool) -> str:
    """One segment cache: selector, base, limit, the descriptor's flags (QEMU's flags & 0x00ffff00)."""
    f = seg.flags
    base = f"{seg.base:016x}" if cs64 else f"{seg.base & 0xFFFFFFFF:08x}"
    line = f"{name:<3s}={seg.selector & 0xffff:04x} {base} {seg.limit & 0xFFFFFFFF:08x} {f & 0x00FFFF00:08x}"
    if not pe or not f >> 15 & 1:                      # real mode, or not present
        return line
    line += f" DPL={f >> 13 & 3} "
    if f >> 12 & 1:                                    # code or data
        if f >> 11 & 1:
            line += "CS64" if f >> 21 & 1 else ("CS32" if f >> 22 & 1 else "CS16")
            line += f" [{'C' if f >> 10 & 1 else '-'}{'R' if f >> 9 & 1 else '-'}"
        else:
            line += "DS  " if f >> 22 & 1 or lma else "DS16"
            line += f" [{'E' if f >> 10 & 1 else '-'}{'W' if f >> 9 & 1 else '-'}"
        return line + f"{'A' if f >> 8 & 1 else '-'}]"
    return line + _SYS_TYPES[1 if lma else 0][f >> 8 & 15]


def _flags(rfl: int) -> str:
    return "".join(c if rfl >> b & 1 else "-" for c, b in (("D", 10), ("O", 11), ("S", 7), ("Z", 6),
                                                          ("A", 4), ("P", 2), ("C", 0)))


@contextlib.contextmanager
def _hidden_state(vcpu):
    """The vCPU's saved CPU state (segment caches, hflags) whether or not it is the one loaded."""
    if vcpu.core.current is vcpu:
        with vcpu.cpu_state() as s:                    # read only: nothing is written back
            yield s
        return
    from ..engine.rawctx import RawContext
    raw = RawContext.view(vcpu._ctx)
    yield raw


def registers(machine, cpu: int) -> str:
    """``info registers``: vCPU ``cpu`` as QEMU's x86_cpu_dump_state prints it (no FPU, no DRs)."""
    from ..engine.rawctx import HF_CS64, HF_INHIBIT_IRQ, HF_LMA, HF_PE
    vcpu = machine.vcpus[cpu]
    r = {n: vcpu.reg(n) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
                                  "r11", "r12", "r13", "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3",
                                  "cr4")}
    with _hidden_state(vcpu) as s:
        hflags = s.hflags
        cs64, lma, pe = bool(hflags & HF_CS64), bool(hflags & HF_LMA), bool(hflags & HF_PE)
        segs = [(n.upper(), s.segment(n)) for n in ("es", "cs", "ss", "ds", "fs", "gs")]
        segs += [("LDT", s.segment("ldt")), ("TR", s.segment("tr"))]
        gdt, idt = s.segment("gdt"), s.segment("idt")
    # EFER is an MSR the engine reads only for the vCPU it has loaded
    efer = vcpu.efer() if vcpu.core.current is vcpu else None
    rfl = r["rflags"]
    state = (f"CPL={hflags & 3} II={int(bool(hflags & HF_INHIBIT_IRQ))} A20=1 SMM=0 "
             f"HLT={int(bool(vcpu.halted))}")
    if cs64:
        names = (("RAX", "rax"), ("RBX", "rbx"), ("RCX", "rcx"), ("RDX", "rdx"), ("RSI", "rsi"), ("RDI", "rdi"),
                 ("RBP", "rbp"), ("RSP", "rsp"), ("R8 ", "r8"), ("R9 ", "r9"), ("R10", "r10"), ("R11", "r11"),
                 ("R12", "r12"), ("R13", "r13"), ("R14", "r14"), ("R15", "r15"))
        out = [" ".join(f"{label}={r[n]:016x}" for label, n in names[i:i + 4]) for i in range(0, 16, 4)]
        out.append(f"RIP={r['rip']:016x} RFL={rfl:08x} [{_flags(rfl)}] {state}")
    else:
        names = (("EAX", "rax"), ("EBX", "rbx"), ("ECX", "rcx"), ("EDX", "rdx"), ("ESI", "rsi"), ("EDI", "rdi"),
                 ("EBP", "rbp"), ("ESP", "rsp"))
        out = [" ".join(f"{label}={r[n] & 0xFFFFFFFF:08x}" for label, n in names[i:i + 4]) for i in (0, 4)]
        out.append(f"EIP={r['rip'] & 0xFFFFFFFF:08x} EFL={rfl:08x} [{_flags(rfl)}] {state}")
    out += [_segment(name, seg, cs64, pe, lma) for name, seg in segs]
    if lma:
        out += [f"GDT=     {gdt.base:016x} {gdt.limit:08x}", f"IDT=     {idt.base:016x} {idt.limit:08x}",
                f"CR0={r['cr0'] & 0xFFFFFFFF:08x} CR2={r['cr2']:016x} CR3={r['cr3']:016x} "
                f"CR4={r['cr4'] & 0xFFFFFFFF:08x}"]
    else:
        out += [f"GDT=     {gdt.base & 0xFFFFFFFF:08x} {gdt.limit:08x}",
                f"IDT=     {idt.base & 0xFFFFFFFF:08x} {idt.limit:08x}",
                f"CR0={r['cr0'] & 0xFFFFFFFF:08x} CR2={r['cr2'] & 0xFFFFFFFF:08x} "
                f"CR3={r['cr3'] & 0xFFFFFFFF:08x} CR4={r['cr4'] & 0xFFFFFFFF:08x}"]
    if efer is not None:
        out.append(f"EFER={efer:016x}")
    return "\n".join(out) + "\n"


# -- statistics and event channels -------------------------------------------------------------
def irq(machine) -> str:
    """``info irq``: rising edges per input of the 8259 pair (ISA IRQs) and of the IOAPIC (pins)."""
    out = []
    for name, counts in (("isa-i8259", machine.pic.irq_count), ("ioapic", machine.ioapic.irq_count)):
        out.append(f"IRQ statistics for {name}:")
        out += [f"{i:2d}: {n}" for i, n in enumerate(counts) if n]
    return "\n".join(out) + "\n"


def evtchn_table(machine) -> list[str]:
    """Every open port: kind, vCPU, remote domain and port (or VIRQ/PIRQ number), bits, FIFO priority."""
    lines = [f"{'port':>5s} {'type':12s} {'vcpu':>4s} {'remote':>6s} {'target':>6s} pending masked"]
    for e in machine.xen.evtchn.event_list():
        fifo = f" priority {e['priority']}{' linked' if e['linked'] else ''}" if "priority" in e else ""
        lines.append(f"{e['port']:5d} {e['type']:12s} {e['vcpu']:4d} {e['remote-domain']:>6s} {e['target']:6d} "
                     f"{'yes' if e['pending'] else 'no':7s} {'yes' if e['masked'] else 'no':6s}{fifo}".rstrip())
    return lines


def evtchn(machine) -> str:
    """``info evtchn``: the port table (``evtchn_table``) and the ABI in use."""
    if machine.xen is None:
        return "This machine has no Xen emulation\n"
    abi = "FIFO" if any("priority" in e for e in machine.xen.evtchn.event_list()) else "2-level"
    return "\n".join([f"event channel ABI: {abi}"] + evtchn_table(machine)) + "\n"
