"""Interrupt lines: wires with a level, from a source to the pins they drive.

An interrupt request on a PC is a voltage on a wire. Whether the receiver
reacts to the *edge* (a 0→1 transition, ISA devices like the PIT) or to the
*level* (held high until the device is serviced, PCI INTx and Xen's callback
GSI) is decided by the receiving pin: the 8259's ELCR bit, the IOAPIC
entry's trigger mode. So a line only reports transitions; its sinks decide
what they mean (QEMU's ``qemu_irq``, Xen's ``vpic``/``vioapic`` do the same).

A GSI ("global system interrupt") can be driven by several sources at once
(a PCI PIRQ shared by devices, a device and Xen's event-channel callback):
:class:`SharedLine` keeps one sub-line per source and is high while any of
them is, like Xen's ``gsi_assert_count``.
"""
from __future__ import annotations

from typing import Callable

Sink = Callable[[bool], None]


class IrqLine:
    """A wire: ``set_level`` forwards only changes to every connected sink."""

    def __init__(self, name: str = "", trace: Callable[[str, bool], None] | None = None):
        self.name = name
        self.level = False
        self.sinks: list[Sink] = []
        self.trace = trace
        self.edges = 0                       # rising edges seen (for tests and stats)

    def connect(self, sink: Sink) -> "IrqLine":
        self.sinks.append(sink)
        if self.level:
            sink(True)
        return self

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level == self.level:
            return
        self.level = level
        if level:
            self.edges += 1
        # Traced before a rise reaches the sinks and after a fall has: the
        # messages a rise causes (IOAPIC -> LAPIC) then read in causal order,
        # and a fall's line shows the inputs it lowered.
        if level and self.trace is not None:
            self.trace(self.name, level)
        for sink in self.sinks:
            sink(level)
        if not level and self.trace is not None:
            self.trace(self.name, level)

    def raise_(self) -> None:
        self.set_level(True)

    def lower(self) -> None:
        self.set_level(False)

    def pulse(self) -> None:
        """A rising then a falling edge: what an edge-triggered device sends."""
        self.set_level(True)
        self.set_level(False)

    __call__ = set_level


class SharedLine(IrqLine):
    """A line several sources drive (wired-OR): high while any source is high."""

    def __init__(self, name: str = "", trace=None):
        super().__init__(name, trace)
        self.sources: dict[str, bool] = {}

    def source(self, name: str) -> IrqLine:
        """A sub-line for one source; its level feeds this line's count."""
        sub = IrqLine(f"{self.name}<-{name}")
        self.sources[name] = False

        def changed(level: bool) -> None:
            self.sources[name] = level
            self.set_level(any(self.sources.values()))
        sub.connect(changed)
        return sub

    @property
    def assert_count(self) -> int:
        return sum(self.sources.values())
