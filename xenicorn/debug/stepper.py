"""Watching interrupt delivery one step at a time.

An interrupt on a Xen HVM guest crosses many pieces of state before the
guest's handler runs, and each piece is a place where a bug hides:

1. Xen sets a port's bit in ``shared_info.evtchn_pending``, its word's bit in
   the vCPU's ``evtchn_pending_sel`` and ``evtchn_upcall_pending`` (guest RAM)
   -- or, with the FIFO ABI, the port's event word, a queue's head or link
   and the control block's ``ready`` bit, then ``evtchn_upcall_pending``.
2. The callback via turns that into an interrupt: a vector injected directly,
   or a *level* line (the callback GSI or PCI INTx) raised at the IOAPIC pin
   and, below 16, the 8259 input.
3. The IOAPIC sends the pin's vector to the local APIC (level-triggered: it
   sets Remote IRR and sends nothing more until the EOI); the LAPIC latches
   it in IRR. Or the 8259 latches it in IRR and raises INT.
4. The CPU, once RFLAGS.IF = 1, acknowledges: IRR -> ISR (LAPIC), or the
   8259's INTA cycle; it reads the IDT gate, pushes a frame and jumps.
5. The handler clears ``upcall_pending`` and the port bits, then EOIs. The
   level line must drop when the flag is cleared: Xen polls for it at every
   vmexit, or (``--callback-deassert eoi``) resamples it at the EOI.

Every step above is an *event* the platform already reports to its
:class:`~xenicorn.machine.trace.Tracer` (categories ``evtchn``, ``irq``,
``int``). :class:`InterruptWatcher` observes those events and, at each one,
takes a snapshot of the interrupt state (:func:`interrupt_state`) and keeps
the difference from the previous snapshot: *what this event changed*. It
also looks each time the guest stops (an exit, a block-start check, the end
of a run), so what the guest changed by running -- a store to
``upcall_pending`` makes no event -- is told apart, as the guest's. The
events go to sinks: :class:`JsonLines` (``--trace-json`` and ``--record``)
and :class:`Stepper`, the interactive ``xenicorn step`` that stops at each
event and waits for a key.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from ..machine.runloop import Agent
from .symbols import annotate

OBSERVED = {"irq", "evtchn", "int"}
RFLAGS_IF = 1 << 9

# fields shown in hex (vectors, bitmaps); everything else is decimal
_HEX_FIELDS = ("irr", "isr", "imr", "tpr", "ppr", "vector", "pending_sel", "direct")


# ---------------------------------------------------------------------------
# the state and its differences
# ---------------------------------------------------------------------------
def _vectors(bitmap: int) -> list[int]:
    return [v for v in range(bitmap.bit_length()) if bitmap >> v & 1]


def interrupt_state(machine) -> dict:
    """Every piece of interrupt-related state, as flat ``name -> value`` pairs.

    Values are JSON types (ints, strings, lists) so a snapshot can be
    written as it is. IOAPIC pins appear once programmed (a vector or an
    unmasked entry) or while their input is high.
    """
    from ..devices.ioapic import NUM_PINS, RTE_MASK, RTE_LEVEL, RTE_REMOTE_IRR
    s: dict = {}
    vcpu = machine.vcpu
    s["cpu.IF"] = int(bool(vcpu.reg("rflags") & RFLAGS_IF))
    xen = machine.xen
    if xen is not None:
        ports = sorted(xen.evtchn.ports)
        s["evtchn.pending"] = [p for p in ports if xen.evtchn.is_pending(p)]
        s["evtchn.masked"] = [p for p in ports if xen.evtchn.is_masked(p)]
        if xen.evtchn.fifo:                                 # the FIFO ABI: vCPU 0's ready queues
            s["evtchn.fifo.ready"] = xen.evtchn.abi.ready(0)
        info = xen.vcpu_info(0)
        if info is not None:
            s["vcpu0.upcall_pending"] = info.upcall_pending
            s["vcpu0.upcall_mask"] = info.upcall_mask
            s["vcpu0.pending_sel"] = info.pending_sel
        cb = xen.callback
        s["callback.via"] = cb.describe()
        s["callback.line"] = int(cb.level)
        s["callback.poll_hook"] = int(cb.poll_wanted or cb.polling)     # armed (installed before the next run)
        if 0 in cb.direct:
            s["callback.direct"] = cb.direct[0]
    for chip in (machine.pic.master, machine.pic.slave):
        st = chip.state
        s[f"pic.{chip.name}.irr"] = st.irr
        s[f"pic.{chip.name}.isr"] = st.isr
        s[f"pic.{chip.name}.imr"] = st.imr
    io = machine.ioapic.state
    for pin in range(NUM_PINS):
        rte, level = io.redirtbl[pin], io.irr >> pin & 1
        key = f"ioapic.pin{pin}"
        programmed = rte & 0xFF or not rte & RTE_MASK
        if level or programmed:
            s[f"{key}.input"] = level
        if programmed:
            s[f"{key}.vector"] = rte & 0xFF
            s[f"{key}.trigger"] = "level" if rte & RTE_LEVEL else "edge"
            s[f"{key}.masked"] = int(bool(rte & RTE_MASK))
            s[f"{key}.remote_irr"] = int(bool(rte & RTE_REMOTE_IRR))
    lapic = machine.lapic
    s["lapic.irr"] = _vectors(lapic.state.irr)
    s["lapic.isr"] = _vectors(lapic.state.isr)
    s["lapic.tpr"] = lapic.state.tpr
    s["lapic.ppr"] = lapic.ppr()
    return s


def state_diff(old: dict, new: dict) -> dict:
    """``name -> [before, after]`` for every value that changed (None: absent)."""
    return {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys(), key=_order(new, old))
            if old.get(k) != new.get(k)}


def _order(*dicts):
    """Keys in snapshot order (the order a reader follows the path in)."""
    order: dict = {}
    for d in dicts:
        for k in d:
            order.setdefault(k, len(order))
    return lambda k: order[k]


def format_value(name: str, value) -> str:
    if value is None:
        return "-"
    hexa = name.rsplit(".", 1)[-1] in _HEX_FIELDS
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:#x}" if hexa else str(v) for v in value) + "]"
    if isinstance(value, int) and hexa:
        return f"{value:#x}"
    return str(value)


# ---------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------
_KINDS = (   # (category, text fragment, kind): the first match names the event
    ("evtchn", "poll at block", "poll"),
    ("evtchn", "deasserted", "deassert"),
    ("evtchn", " asserted", "assert"),
    ("evtchn", "poll hook", "poll-hook"),
    ("evtchn", "EOI at", "eoi-resample"),
    ("evtchn", "upcall vCPU", "upcall"),
    ("evtchn", "callback via", "via"),
    ("evtchn", "pending", "evtchn-pending"),
    ("irq", "8259 INT output raised", "pic-int"),
    ("irq", "8259 INT output lowered", "pic-int-low"),
    ("irq", " raised", "line-raise"),
    ("irq", " lowered", "line-lower"),
    ("irq", "IOAPIC EOI", "ioapic-eoi"),
    ("irq", "IOAPIC pin", "ioapic-message"),
    ("irq", "IRR gets", "lapic-irr"),
    ("irq", "takes vector", "lapic-ack"),
    ("irq", "ExtINT", "lapic-extint"),
    ("irq", " EOI vector", "lapic-eoi"),
    ("irq", "LAPIC", "lapic"),
    ("irq", "8259 INTA", "pic-inta"),
    ("irq", "8259 EOI", "pic-eoi"),
    ("int", "", "deliver"),
)


def classify(category: str, text: str) -> str:
    return next((k for cat, frag, k in _KINDS if cat == category and frag in text), category)


@dataclass
class IrqEvent:
    """One step of interrupt delivery, and what it changed."""

    seq: int
    insn: int                     # guest instructions executed before it (exact when counting)
    ns: int                       # machine time
    rip: int                      # the instruction (an MMIO access: possibly its block's start)
    category: str
    kind: str
    text: str
    diff: dict = field(default_factory=dict)     # what this event changed
    delivery: dict | None = None
    cpu: int = 0                  # the vCPU that was running (with several, the one that acted)
    guest: dict = field(default_factory=dict)    # what the guest changed since the previous event

    def to_json(self) -> dict:
        out = {"seq": self.seq, "insn": self.insn, "ns": self.ns, "rip": self.rip, "cat": self.category,
               "kind": self.kind, "text": self.text, "diff": self.diff}
        if self.guest:
            out["guest"] = self.guest
        if self.delivery is not None:
            out["delivery"] = self.delivery
        return out


def delivery_record(vcpu, rec) -> dict:
    """A :class:`~xenicorn.x86.interrupts.Delivery` as JSON, with the handler's first instructions."""
    from ..x86.interrupts import vector_name
    from ..machine.trace import disassemble
    new = rec.new
    where = new.get("cs_base", 0) + new.get("rip", 0)
    code = vcpu.fetch_bytes(where, 48)
    handler = disassemble(code, where, vcpu.code_bits(), count=4) if code else []
    return {"vector": rec.vector, "name": vector_name(rec.vector), "type": rec.etype.value,
            "error_code": rec.error_code, "mode": rec.mode, "gate": dict(rec.gate),
            "old": {k: v for k, v in rec.old.items()}, "new": {k: v for k, v in new.items()},
            "stack_switched": rec.stack_switched, "pushed": [[n, v] for n, v in rec.pushed],
            "chain": list(rec.chain), "handler": handler}


class InterruptWatcher:
    """Turns the platform's interrupt trace into :class:`IrqEvent` records.

    Needs a machine built with ``MachineConfig.observe`` covering
    :data:`OBSERVED` (devices decide at build time whether to report), and
    counting instructions for exact positions.

    Two kinds of change are kept apart. The *guest* changes state by
    running: a store that clears ``upcall_pending``, STI, a handler clearing
    its port bits -- no exit, no event. The *platform* changes state at an
    event. So the watcher takes a snapshot each time the guest stops (at
    every exit, at every block-start check such as the deassert poll, after
    every run): what changed since the last snapshot is the guest's doing
    and goes with the next event as :attr:`IrqEvent.guest`. At the event
    itself, what changed since that snapshot is the event's
    (:attr:`IrqEvent.diff`). Each site reports an event once it has made
    its own change (a line's rise once the receiving pin has latched it),
    so the diff taken at the event is that event's.
    """

    def __init__(self, machine):
        missing = OBSERVED - machine.tracer.observed - machine.tracer.categories
        if missing:
            raise ValueError(f"the machine does not report {', '.join(sorted(missing))} events: "
                             "build it with MachineConfig(observe=stepper.OBSERVED)")
        self.machine = machine
        self.state = interrupt_state(machine)
        self.guest: dict = {}                  # the guest's changes not yet shown with an event
        self.sinks: list[Callable[[IrqEvent], None]] = []
        self.seq = 0
        self._mark = self._position()
        machine.tracer.observers.append(self._observe)
        machine.guest_stop_listeners.append(self.guest_stopped)

    def _position(self) -> tuple[int, int]:
        vcpu = self.machine.current_vcpu
        return vcpu.index, vcpu.instructions_now()

    def guest_stopped(self, vcpu=None) -> None:
        """The guest stopped (an exit, a block-start check, the end of a run): note what it changed."""
        where = self._position()
        if where == self._mark:
            return                             # it has not run since the last look
        self._mark = where
        now = interrupt_state(self.machine)
        self.guest = merge_diffs(self.guest, state_diff(self.state, now))
        self.state = now

    def _observe(self, category: str, text: str, data) -> None:
        if category not in OBSERVED:
            return
        m = self.machine
        # the guest's changes were taken when it stopped (guest_stopped): the rest is this event's
        new = interrupt_state(m)
        diff = state_diff(self.state, new)
        self.state = new
        self._mark = self._position()
        guest, self.guest = self.guest, {}
        vcpu = m.current_vcpu
        self.seq += 1
        ev = IrqEvent(self.seq, vcpu.instructions_now(), m.clock.now_ns(), vcpu.pc, category,
                      classify(category, text), text, diff, cpu=vcpu.index, guest=guest)
        if category == "int" and data is not None:
            ev.delivery = delivery_record(vcpu, data)
        for sink in self.sinks:
            sink(ev)


def merge_diffs(first: dict, then: dict) -> dict:
    """Two diffs in a row as one: the first old value, the last new one; a value back where it was drops."""
    out = dict(first)
    for k, (old, new) in then.items():
        before = out[k][0] if k in out else old
        if before == new:
            out.pop(k, None)
        else:
            out[k] = [before, new]
    return out


class JsonLines:
    """``--trace-json FILE`` / ``--record FILE``: one JSON object per line.

    Interrupt events always; with ``exits=True`` also every vCPU exit, the
    guest's stores to ``upcall_pending`` and its console lines
    (:mod:`~xenicorn.debug.guestwatch`): the run's timeline, which
    ``xenicorn plot`` draws. Each line has ``insn`` (guest instructions so
    far) and ``ns`` (machine time).
    """

    def __init__(self, machine, stream: TextIO, exits: bool = False):
        self.machine = machine
        self.stream = stream
        self.seq = 0
        self.watcher = watcher_of(machine)
        self.watcher.sinks.append(self._event)
        self.seen = self.watcher.state           # the state as this file's lines have told it
        if exits:
            machine.exit_listeners.append(self._exit)
        self._write({"kind": "start", "cat": "run", "insn": 0, "ns": 0, "state": self.seen,
                     "clock": machine.clock.mode})
        self.guest = None
        if exits:
            from .guestwatch import GuestWatch
            self.guest = GuestWatch(machine, self._write)

    def _write(self, obj: dict) -> None:
        if len(self.machine.vcpus) > 1:
            obj = {**obj, "cpu": self.machine.current_vcpu.index}     # which vCPU acted
        self.stream.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def _event(self, ev: IrqEvent) -> None:
        self.seen = self.watcher.state
        self._write(ev.to_json())

    def _exit(self, vcpu, ex) -> None:
        fields = {k: v for k, v in vars(ex).items()
                  if k not in ("pc", "snapshot") and isinstance(v, (int, str, bool, type(None)))}
        rec = {"cat": "exit", "kind": ex.kind, "insn": vcpu.instructions_now(),
               "ns": self.machine.clock.now_ns(), "rip": ex.pc, **fields}
        # Each exit is also a sample of the state the guest changes silently
        # (a handler clearing upcall_pending): the timeline's resolution.
        # (the same change may come again in the next event's "guest": values are absolute)
        now = interrupt_state(self.machine)
        diff = state_diff(self.seen, now)
        if diff:
            rec["diff"] = diff
            self.seen = now
        self._write(rec)

    def close(self) -> None:
        m = self.machine
        if self.guest is not None:
            self.guest.close()
        now = interrupt_state(m)
        self._write({"kind": "end", "cat": "run", "insn": m.vcpu.instructions_now(), "ns": m.clock.now_ns(),
                     "status": m.status, "reason": m.shutdown_reason,
                     "diff": state_diff(self.seen, now), "state": now})
        self.stream.flush()


def watcher_of(machine) -> InterruptWatcher:
    """The machine's one watcher (created on first use), shared by every sink."""
    w = getattr(machine, "interrupt_watcher", None)
    if w is None:
        w = machine.interrupt_watcher = InterruptWatcher(machine)
    return w


# ---------------------------------------------------------------------------
# the interactive stepper
# ---------------------------------------------------------------------------
HELP = """keys:  Enter or n  next interrupt event
       s          one guest instruction (what it changed, the events it caused)
       c          continue to the end without stopping
       i          the whole interrupt state now
       q          power the machine off and quit
       h or ?     this help
reading a stop:
  "the guest changed" lists what changed since the last event without an
  event of its own: the guest's code (STI, the handler's store clearing
  upcall_pending), its port writes (masking the 8259). The lines under the
  event's text are what that event changed.
  before -> after: "-" is "not there": an IOAPIC pin appears once programmed
  (a vector or unmasked) or while its input is high, so an unprogrammed pin
  goes "-" -> value the first time it is shown.
  IRQ n is ISA line n, into 8259 input n; GSI n is IOAPIC pin n. ISA IRQ n
  also drives GSI n, except IRQ 0 (the PIT), which reaches GSI 2 (the
  MADT's interrupt source override, as on every PC); GSIs 16-23 are PCI.
  Stepping with s shows more block polls than running does: the deassert
  poll looks at upcall_pending at the start of each translated block, and
  an instruction stepped alone is a block of its own, so each step polls."""

class Stepper(Agent):
    """``xenicorn step``: stop at each interrupt event, show it, wait for a key.

    A run-loop agent (:attr:`Machine.agents`). Events happen inside Unicorn
    hooks (a hypercall, an EOI write) or in the run loop (a delivery); each
    is queued and the guest is stopped at the next instruction boundary,
    where :meth:`before_run` shows the queue one event at a time. ``s``
    runs exactly one instruction (the machine counts instructions), so a
    reader can watch the handler clear ``upcall_pending`` and see the poll
    drop the line at the very next block.

    Polls that change nothing (``poll at block ...: line stays asserted``)
    do not stop; their number is shown with the next stop. Every line
    printed names code addresses by the kernel's symbols
    (:mod:`~xenicorn.debug.symbols`), and starts on a line of its own even
    when the guest's console is in the middle of one. ``from_insn``
    runs the first instructions without stopping (past a kernel's boot).
    """

    def __init__(self, machine, out: TextIO | None = None, read_command: Callable[[], str] | None = None,
                 from_insn: int = 0):
        self.machine = machine
        self.out = out or sys.stdout
        self.read_command = read_command or _stdin_commands()
        self.from_insn = from_insn
        self.mode = "event" if from_insn <= 0 else "skip"     # event | insn | run | skip
        self.queue: list[IrqEvent] = []
        self.quiet_polls = 0
        self.held: dict = {}                     # the guest's changes before events not shown (quiet polls)
        self.shown = 0
        self._console_seen = 0                   # console bytes already out when the stepper last printed
        self._step_from: str | None = None       # the instruction a step is running
        self.before_prompt: list[Callable[[], None]] = []     # e.g. the live panel (debug/panel.py)
        watcher_of(machine).sinks.append(self._event)
        machine.agents.append(self)

    # -- events arrive (inside hooks or the run loop) -------------------------------
    def _event(self, ev: IrqEvent) -> None:
        if self.mode in ("run", "skip"):
            return
        if ev.kind == "poll" and not ev.diff:
            self.quiet_polls += 1
            self.held = merge_diffs(self.held, ev.guest)     # shown with the next stop
            return
        self.queue.append(ev)
        vcpu = self.machine.vcpu
        if self.mode == "event" and vcpu._in_emu:
            vcpu.request_stop("stepper")

    # -- the run loop asks before each guest run --------------------------------------
    def before_run(self, vcpu, count: int) -> int:
        """Show what happened since the last run and wait for a key; bound the next run."""
        most = self._pause(vcpu)
        if most:
            return min(count, most) if count else most
        return count

    def _pause(self, vcpu) -> int:
        if self.mode == "skip":
            left = self.from_insn - vcpu.instructions
            if left > 0:
                return left
            self.mode = "event"
            self._print(f"-- at instruction {vcpu.instructions}: stepping from here (? for keys)")
        if self.mode == "insn" and self._step_from is not None:
            self._show_step(vcpu)
        elif self.mode != "event" or not self.queue:
            return 0
        while self.machine.status is None:
            if self.queue:
                self._show(self.queue.pop(0))
            elif self.mode == "event":
                return 0
            cmd = self._ask()
            if cmd in ("", "n"):
                self.mode = "event"
                if not self.queue:
                    return 0
            elif cmd == "s":
                self.mode = "insn"
                for ev in self.queue:                    # already happened: briefly, each
                    self._print_changes(ev, f"(#{ev.seq} {ev.kind}: {ev.text})")
                self.queue.clear()
                self._step_from = self._insn_text(vcpu, vcpu.pc)
                return 1
            elif cmd == "c":
                self.mode = "run"
                self.queue.clear()
                return 0
            elif cmd == "q":
                from ..machine.machine import STATUS_OK
                self.machine.shutdown("quit", STATUS_OK, "quit from the stepper")
                return 0
            elif cmd == "i":
                vcpu = self.machine.current_vcpu
                self._print(f"-- interrupt state at insn {vcpu.instructions_now()}, rip {vcpu.pc:#x} "
                            "(- : not there)")
                self._print(f"     {'name':28s} value")
                for k, v in interrupt_state(self.machine).items():
                    self._print(f"     {k:28s} {format_value(k, v)}")
            else:
                self._print(HELP)
        return 0

    def _ask(self) -> str:
        self.machine.console.flush()
        for hook in self.before_prompt:
            hook()
        self.out.flush()
        try:
            return self.read_command().strip().lower()[:1]
        except EOFError:
            return "c"

    def _print(self, text: str) -> None:
        """One line of the stepper's, on a line of its own (the guest may be mid-line), code named."""
        data = self.machine.console.data
        if len(data) != self._console_seen and data[-1:] not in (b"", b"\n"):
            self.machine.console.flush()
            self.out.write("\n")
        self._console_seen = len(data)
        self.out.write(annotate(self.machine, text) + "\n")

    @staticmethod
    def _insn_text(vcpu, pc: int) -> str:
        from ..machine.trace import disassemble
        with vcpu.cpu_state() as state:
            linear = state.segment("cs").base + pc
        code = vcpu.fetch_bytes(linear, 16)
        return disassemble(code, pc, vcpu.code_bits())[0] if code else f"{pc:#x}: (unreadable)"

    def _show_step(self, vcpu) -> None:
        text, self._step_from = self._step_from, None
        self._print(f"-- stepped {text}   (insn {vcpu.instructions}, next rip {vcpu.pc:#x})")
        # what the instruction itself changed (a store to upcall_pending, STI...)
        # is no platform event: the watcher noted it when the step's run ended
        # (events the step caused show it as the guest's change before them)
        if not self.queue:
            watcher = watcher_of(self.machine)
            watcher.guest_stopped(vcpu)
            changed, watcher.guest = merge_diffs(self.held, watcher.guest), {}
            self.held = {}
            self._print_diff(changed)
            if not changed:
                self._print("   no interrupt state changed")
        queued, self.queue = self.queue, []
        for ev in queued:
            self._show(ev)

    def _print_diff(self, diff: dict) -> None:
        for name, (old, new) in diff.items():
            self._print(f"     {name:28s} {format_value(name, old):>12s} -> {format_value(name, new)}")

    def _print_changes(self, ev: IrqEvent, text: str) -> None:
        """What the guest changed before ``ev`` (and before events not shown), then ``ev`` and its own."""
        guest, self.held = merge_diffs(self.held, ev.guest), {}
        if guest:
            self._print("   the guest changed, since the last event:")
            self._print_diff(guest)
        self._print(f"   {text}")
        self._print_diff(ev.diff)

    def _show(self, ev: IrqEvent) -> None:
        self.shown += 1
        if self.quiet_polls:
            self._print(f"   ({self.quiet_polls} block poll(s) found upcall_pending still 1)")
            self.quiet_polls = 0
        where = f"vCPU {ev.cpu} " if len(self.machine.vcpus) > 1 else ""
        self._print(f"== #{ev.seq} [{ev.kind}] {where}insn {ev.insn} t={ev.ns / 1e6:.3f}ms rip {ev.rip:#x}")
        self._print_changes(ev, ev.text)
        d = ev.delivery
        if d is not None:
            g = d["gate"]
            self._print(f"   gate: {d['mode']} {g.get('kind', '?')} for {d['name']}: selector "
                        f"{g.get('selector', 0):#x} offset {g.get('offset', 0):#x}"
                        + (f" dpl {g['dpl']}" if "dpl" in g else "") + (f" ist {g['ist']}" if g.get("ist") else ""))
            pushed = " ".join(f"{n}={v:#x}" for n, v in d["pushed"])
            self._print(f"   pushed{' (stack switched)' if d['stack_switched'] else ''}: {pushed}"
                        f"  -> rsp {d['new']['rsp']:#x}")
            self._print("   handler:")
            for line in d["handler"]:
                self._print(f"     {line}")


def _stdin_commands() -> Callable[[], str]:
    """Keys from a terminal (with a prompt) or lines from a pipe (EOF: continue)."""
    if sys.stdin.isatty():
        return lambda: input("step> ")

    def line() -> str:
        text = sys.stdin.readline()
        if not text:
            raise EOFError
        return text
    return line
