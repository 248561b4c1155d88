"""The stepper's live state panel: every interrupt controller at one glance.

``xenicorn step`` stops at each interrupt event and prints what happened
as text. On a terminal it also draws this panel at every stop (``--panel``,
the default when stdout is a terminal; ``--no-panel`` keeps plain text):
the whole path an upcall takes, left to right as the interrupt travels,

* **Xen's side**: the event channel ports with their pending and mask bits
  (with the FIFO ABI also vCPU 0's ready queues and the ports on each),
  vCPU 0's ``evtchn_upcall_pending`` / ``evtchn_upcall_mask`` /
  ``evtchn_pending_sel``, the callback via and the level of its line;
* **the IOAPIC**: each programmed pin (vector, trigger, mask, the input's
  level and *Remote IRR*, the bit a level-triggered pin sets when it sends
  its vector and clears only at the EOI);
* **the local APIC** of vCPU 0 (with ``-smp``, the panel follows vCPU 0): IRR (requested) and ISR (in service)
  vectors, TPR and PPR (the processor priority, which holds back every
  vector of a class at or below it), LINT0 (ExtINT: the 8259s' wire), and
  the CPU's RFLAGS.IF;
* **the two 8259s**: IRR, ISR, IMR and the ELCR (which inputs are level
  triggered), each as the IRQ numbers whose bit is set.

A value that changed since the previous stop is highlighted, so the
difference an event made stands out. The panel is a ``rich`` renderable
built from the machine's state (:func:`build`); :class:`LivePanel` draws it
before each prompt of a :class:`~xenicorn.debug.stepper.Stepper`.
``tools/step_panel_svg.py`` renders it to ``docs/img/step-panel.svg``.
"""
from __future__ import annotations

from typing import TextIO

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

RFLAGS_IF = 1 << 9
CHANGED = "bold black on yellow"


# ---------------------------------------------------------------------------
# the state, as the panel shows it: section -> rows of (label, cells)
# ---------------------------------------------------------------------------
def _irqs(bits: int, base: int) -> str:
    """IRQ numbers of the set bits of an 8259 register (``-`` none, ``all`` all eight)."""
    if bits & 0xFF == 0xFF:
        return "all"
    return ",".join(str(base + i) for i in range(8) if bits >> i & 1) or "-"


def _vectors(bitmap: int) -> str:
    return " ".join(f"{v:#x}" for v in range(bitmap.bit_length()) if bitmap >> v & 1) or "-"


def _ports(ports: list[int]) -> str:
    return " ".join(str(p) for p in ports) or "-"


def snapshot(machine) -> dict[str, list[tuple[str, ...]]]:
    """What the panel shows, as text: ``section -> [row, ...]``.

    Each row is a tuple of strings (its first cell names it), so two
    snapshots compare cell by cell and tests can read the panel's content
    without a terminal.
    """
    from ..devices.ioapic import NUM_PINS, RTE_LEVEL, RTE_MASK, RTE_REMOTE_IRR
    out: dict[str, list[tuple[str, ...]]] = {}
    xen = machine.xen
    if xen is not None:
        ev = xen.evtchn
        ports = sorted(ev.ports)
        rows = [("abi", "FIFO" if ev.fifo else "2-level")]
        rows.append(("pending", _ports([p for p in ports if ev.is_pending(p)])))
        rows.append(("masked", _ports([p for p in ports if ev.is_masked(p)])))
        rows.append(("open", _ports(ports)))
        if ev.fifo:                         # FIFO: the non-empty priority queues of vCPU 0, each with its ports
            ready = ev.abi.ready(0)
            rows.append(("ready queues", " ".join(f"q{q}:{','.join(map(str, ev.abi.queue(0, q))) or '?'}"
                                                  for q in range(16) if ready >> q & 1) or "-"))
        info = xen.vcpu_info(0)
        if info is not None:
            rows.append(("upcall_pending", str(info.upcall_pending)))
            rows.append(("upcall_mask", str(info.upcall_mask)))
            rows.append(("pending_sel", f"{info.pending_sel:#x}"))
        cb = xen.callback
        rows.append(("callback via", cb.describe()))
        rows.append(("callback line", "HIGH" if cb.level else "low"))
        rows.append(("poll hook", "armed" if cb.polling else "-"))
        out["Xen: events (vCPU 0)"] = rows
    io = machine.ioapic.state
    pins = []
    for pin in range(NUM_PINS):
        rte, level = io.redirtbl[pin], io.irr >> pin & 1
        if not (level or rte & 0xFF or not rte & RTE_MASK):
            continue                                    # never programmed, input low
        pins.append((str(pin), f"{rte & 0xFF:#04x}", "level" if rte & RTE_LEVEL else "edge",
                     "yes" if rte & RTE_MASK else "-", "HIGH" if level else "low",
                     "SET" if rte & RTE_REMOTE_IRR else "-"))
    out["IOAPIC"] = pins
    lapic = machine.lapic
    st = lapic.state
    from ..devices.lapic import DM_EXTINT, LVT_LINT0, LVT_MASKED
    lint0 = st.lvt[LVT_LINT0]
    out["LAPIC 0"] = [
        ("IRR", _vectors(st.irr)), ("ISR", _vectors(st.isr)),
        ("TPR", f"{st.tpr:#04x}"), ("PPR", f"{lapic.ppr():#04x}"),
        ("LINT0", "masked" if lint0 & LVT_MASKED else ("ExtINT" if (lint0 >> 8) & 7 == DM_EXTINT else "other")),
        ("RFLAGS.IF", str(int(bool(machine.vcpu.reg("rflags") & RFLAGS_IF)))),
    ]
    m, s = machine.pic.master.state, machine.pic.slave.state
    out["8259s"] = [(reg, _irqs(getattr(m, reg.lower()), 0), _irqs(getattr(s, reg.lower()), 8))
                    for reg in ("IRR", "ISR", "IMR", "ELCR")]
    return out


# ---------------------------------------------------------------------------
# the renderable
# ---------------------------------------------------------------------------
_HEADERS = {
    "IOAPIC": ("pin", "vec", "trigger", "mask", "input", "Remote IRR"),
    "8259s": ("IRQs", "master 0-7", "slave 8-15"),
}


def _table(name: str, rows: list[tuple[str, ...]], before: list[tuple[str, ...]] | None) -> Table:
    headers = _HEADERS.get(name)
    t = Table(title=name, title_style="bold", show_header=headers is not None, expand=False,
              box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for h in headers or ("", ""):
        t.add_column(h, no_wrap=True)
    old = {r[0]: r for r in before or []}
    for row in rows:
        prev = old.get(row[0])
        t.add_row(*(Text(c, style=CHANGED if before is not None and (prev is None or prev[i] != c) and i else "")
                    for i, c in enumerate(row)))
    if not rows:
        t.add_row(*(["(none)"] + [""] * (len(headers or ("", "")) - 1)))
    return t


def build(state: dict, previous: dict | None = None, title: str = "") -> Panel:
    """The panel for ``state`` (a :func:`snapshot`); cells that differ from ``previous`` are highlighted."""
    prev = previous or {}
    tables = {name: _table(name, rows, prev.get(name) if previous is not None else None)
              for name, rows in state.items()}
    left = [tables[n] for n in tables if n.startswith("Xen")]
    right = [tables[n] for n in tables if not n.startswith("Xen")]
    grid = Table.grid(padding=(0, 3))
    grid.add_column(vertical="top")
    grid.add_column(vertical="top")
    grid.add_row(Group(*left) if left else Text("(no Xen)"), Group(*right))
    return Panel(grid, title=Text(title or "interrupt state"), title_align="left", expand=False,
                 subtitle="highlighted: changed since the previous stop", subtitle_align="right")


class LivePanel:
    """Draws the panel before each stepper prompt, titled with the last event shown.

    Attach with :func:`attach`. It keeps the snapshot of the previous draw,
    so each draw highlights what changed between two stops (the events in
    between, and whatever the guest's own instructions did).
    """

    def __init__(self, machine, out: TextIO | None = None, console: Console | None = None):
        from .stepper import watcher_of
        self.machine = machine
        self.console = console or Console(file=out, highlight=False)
        self.previous: dict | None = None
        self.last_event = None
        watcher_of(machine).sinks.append(self._event)

    def _event(self, ev) -> None:
        self.last_event = ev

    def title(self) -> str:
        """The panel shows the machine *now*: possibly after events still queued for display."""
        ev = self.last_event
        after = f", after event #{ev.seq}" if ev is not None else ""
        return f"interrupt state at insn {self.machine.vcpu.instructions_now()}{after}"

    def render(self, state: dict | None = None) -> Panel:
        state = state or snapshot(self.machine)
        panel = build(state, self.previous, self.title())
        self.previous = state
        return panel

    def draw(self) -> None:
        """Draw the panel if anything in it changed since the last draw (a queue of
        events shown one by one is one state: drawn once)."""
        state = snapshot(self.machine)
        if state != self.previous:
            self.console.print(self.render(state))


def attach(stepper, out: TextIO | None = None) -> LivePanel:
    """Draw a :class:`LivePanel` at each of ``stepper``'s prompts."""
    live = LivePanel(stepper.machine, out=out or stepper.out)
    stepper.before_prompt.append(live.draw)
    return live
