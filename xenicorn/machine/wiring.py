"""The PC's interrupt wiring: which line reaches which controller input.

A PC has three kinds of interrupt wires, and this module is where they meet:

===============  ==========================================================
wire             reaches
===============  ==========================================================
ISA IRQ n        8259 input n and GSI n, except IRQ 0 (the PIT), which the
                 IOAPIC sees on pin 2: the PC's interrupt source override
                 (Xen's ``hvm_isa_irq_to_gsi``, the MADT's ISO entry)
PCI PIRQ A-D     GSI 16-19 (``pci_irqs="apic"``, QEMU q35's wiring) and the
                 8259 input the PIIX3's PIRQ route register names; with
                 ``pci_irqs="isa"`` (SeaBIOS on i440FX) only that ISA IRQ,
                 which then also drives IOAPIC input n like any ISA IRQ
GSI n            IOAPIC pin n, unless a filter takes it first (Xen's
                 physdev delivers a GSI mapped to a PIRQ as an event)
===============  ==========================================================

Every GSI and every 8259 input is a :class:`~xenicorn.devices.irq.SharedLine`
(wired-OR, Xen's ``gsi_assert_count``): a device, a PIRQ and Xen's callback
can each drive the same input through their own sub-line. The controllers
themselves (8259 pair, IOAPIC, local APIC) are built here too, since their
outputs are part of the same wiring: 8259 INT → LAPIC LINT0 (virtual wire),
IOAPIC messages → LAPIC.
"""
from __future__ import annotations

from typing import Callable

from ..devices.i8259 import PicPair
from ..devices.ioapic import Ioapic, NUM_PINS
from ..devices.irq import IrqLine, SharedLine
from ..devices.apicbus import ApicBus
from ..devices.lapic import Lapic, LVT_MASKED

PCI_ISA_IRQS = (10, 10, 11, 11)          # PIRQ A-D with pci_irqs="isa", as SeaBIOS routes them
IOAPIC_ID = 1                            # APIC IDs are unique: LAPIC 0 has 0 (Xen's vIOAPIC is 1 too)


def ioapic_id_for(cpus: int) -> int:
    """The IOAPIC's ID beside LAPICs 0..cpus-1: the first free one (as SeaBIOS numbers it)."""
    return max(IOAPIC_ID, cpus)


class InterruptWiring:
    """The 8259 pair, IOAPIC and local APIC, and every line between devices and them.

    ``kick(why)`` is called when a controller's output rises, so the run
    loop looks for an interrupt to inject. ``gsi_filters`` are consulted
    before a GSI reaches its IOAPIC pin: a filter that returns True has
    taken the change (Xen's PIRQ events).
    """

    def __init__(self, clock, kick: Callable[[str], None], pci_irqs: str = "apic",
                 trace: Callable[[str], None] | None = None, cpus: int = 1,
                 lapic_notify: Callable[[int], None] | None = None,
                 on_init: Callable[[int], None] | None = None, on_sipi: Callable[[int, int], None] | None = None):
        self.pci_irqs = pci_irqs
        self.gsi_filters: list[Callable[[int, bool], bool]] = []
        line_trace = (lambda name, level: trace(f"{name} {'raised' if level else 'lowered'}")) if trace else None
        self.pic = PicPair(output=lambda level: kick("PIC INT") if level else None)
        notify = lapic_notify or (lambda index: kick("LAPIC"))
        # One local APIC per CPU, APIC ID = CPU index; the 8259 reaches the
        # BSP's LINT0 (the virtual wire the firmware sets up there only:
        # an AP's LVT entries come out of reset masked, SDM §10.4.7.1).
        self.lapics = [Lapic(clock, notify=lambda i=i: notify(i), apic_id=i, pic=self.pic if i == 0 else None)
                       for i in range(cpus)]
        for lapic in self.lapics[1:]:
            lapic.state.lvt = [LVT_MASKED] * 6
        self.lapic = self.lapics[0]
        self.bus = ApicBus(on_init=on_init, on_sipi=on_sipi, trace=trace)
        if cpus > 1:               # one CPU keeps its ICR to itself (INIT and SIPI reach nobody)
            for lapic in self.lapics:
                self.bus.attach(lapic)
        # the IOAPIC's messages go on the APIC bus (with one CPU straight to its LAPIC, as before)
        self.ioapic = Ioapic(self.bus if cpus > 1 else self.lapic)
        self.ioapic.state.id = ioapic_id_for(cpus)
        for lapic in self.lapics:
            lapic.ioapics.append(self.ioapic)
        if trace is not None:
            self.pic.trace = self.ioapic.trace = trace
            for lapic in self.lapics:
                lapic.trace = trace
        # a GSI's edges are traced where its IOAPIC pin latches them (_gsi_changed)
        self._line_trace = line_trace
        self.gsi = [SharedLine(f"GSI{n}") for n in range(NUM_PINS)]
        for n, line in enumerate(self.gsi):
            line.connect(lambda level, n=n: self._gsi_changed(n, level))
        # each 8259 input is wired-OR: its ISA IRQ, a PIRQ the PIIX3 routes
        # there, Xen's callback GSI n < 16
        self.pic_inputs = [SharedLine(f"PIC{n}") for n in range(16)]
        for n, line in enumerate(self.pic_inputs):
            line.connect(lambda level, n=n: self.pic.set_irq(n, level))
        # sub-lines by (input, source): 8259 inputs under keys >= 0, the
        # ISA-IRQ GSIs a PIRQ drives (isa wiring) under -1 - irq
        self.pic_sources: dict[tuple[int, str], IrqLine] = {}
        self.isa_irq = []
        for irq in range(16):
            line = IrqLine(f"IRQ{irq}", line_trace)
            line.connect(self.pic_input(irq, "isa").set_level)
            line.connect(self.gsi[2 if irq == 0 else irq].source(f"isa{irq}").set_level)
            self.isa_irq.append(line)
        self.pirq_gsi = [self.gsi[16 + i].source(f"pirq{'ABCD'[i]}") for i in range(4)]
        self.pirq_pic: list[int | None] = [None] * 4     # the 8259 input each PIRQ drives now
        self.pirq_level = [False] * 4
        self.piix3 = None                    # the PIIX3 function, whose registers route PIRQs

    def _gsi_changed(self, gsi: int, level: bool) -> None:
        """A GSI line moved: to its IOAPIC pin, unless a filter takes it.

        Traced once the pin has latched the new level and before it sends a
        message, so the line's event shows the pin's input change and the
        message follows it (a line a filter takes: once the filter has).
        """
        trace = self._line_trace
        latched = (lambda: trace(f"GSI{gsi}", level)) if trace is not None else None
        for taken in self.gsi_filters:
            if taken(gsi, level):
                if latched is not None:
                    latched()
                return
        self.ioapic.set_irq(gsi, level, latched)

    def pic_input(self, irq: int, source: str) -> IrqLine:
        """One source's sub-line into 8259 input ``irq`` (created on first use)."""
        key = (irq, source)
        if key not in self.pic_sources:
            self.pic_sources[key] = self.pic_inputs[irq].source(source)
        return self.pic_sources[key]

    def isa_gsi_input(self, irq: int, source: str) -> IrqLine:
        """A PIRQ's sub-line into the GSI of ISA IRQ ``irq`` (the isa wiring; created on first use)."""
        key = (-1 - irq, source)                 # beside the 8259 sources, keyed apart
        if key not in self.pic_sources:
            self.pic_sources[key] = self.gsi[2 if irq == 0 else irq].source(source)
        return self.pic_sources[key]

    def gsi_input(self, gsi: int, source: str) -> IrqLine:
        """A device's own sub-line into GSI ``gsi`` >= 16 (the HPET's timers; created on first use)."""
        if gsi < 16:
            raise ValueError(f"GSI {gsi} is an ISA IRQ's: isa_gsi_input")
        key = (-1 - gsi, source)                 # after the ISA GSIs' keys (-1..-16)
        if key not in self.pic_sources:
            self.pic_sources[key] = self.gsi[gsi].source(source)
        return self.pic_sources[key]

    # -- PCI --------------------------------------------------------------------------
    def pirq_changed(self, pirq: int, level: bool) -> None:
        """A PCI PIRQ line changed: GSI 16+n (apic wiring), and the ISA IRQ the PIIX3 routes it to."""
        self.pirq_level[pirq] = level
        if self.pci_irqs == "apic":
            self.pirq_gsi[pirq].set_level(level)
        self.route_pirqs()

    def route_pirqs(self) -> None:
        """Re-drive the ISA IRQ lines after a PIRQ level or a PIIX3 route change.

        A PIRQ the PIIX3 routes to ISA IRQ n drives 8259 input n; with the
        isa wiring it is an ISA IRQ like any other and drives IOAPIC input n
        too (the IOAPIC's first 16 inputs are the ISA IRQs).
        """
        isa = self.pci_irqs == "isa"
        for pirq in range(4):
            irq = self.piix3.pirq_route(pirq) if self.piix3 is not None else None
            name = f"pirq{'ABCD'[pirq]}"
            old = self.pirq_pic[pirq]
            if old not in (None, irq):
                self.pic_input(old, name).set_level(False)
                if isa:
                    self.isa_gsi_input(old, name).set_level(False)
            self.pirq_pic[pirq] = irq
            if irq is not None:
                self.pic_input(irq, name).set_level(self.pirq_level[pirq])
                if isa:
                    self.isa_gsi_input(irq, name).set_level(self.pirq_level[pirq])

    def pci_gsi(self, slot: int, pin: int, pirq_of: Callable[[int, int], int]) -> int:
        """The GSI (= ISA IRQ below 16) that INTA+``pin`` of ``slot`` reaches: what the _PRT says."""
        if self.pci_irqs == "isa":
            return self.pci_pic_irq(slot, pin, pirq_of)
        return 16 + pirq_of(slot << 3, pin + 1)

    def pci_pic_irq(self, slot: int, pin: int, pirq_of: Callable[[int, int], int]) -> int:
        """The 8259 input (ISA IRQ) that INTA+``pin`` of ``slot`` reaches through the PIIX3."""
        pirq = pirq_of(slot << 3, pin + 1)
        route = self.piix3.pirq_route(pirq) if self.piix3 is not None else None
        return route or PCI_ISA_IRQS[pirq]

    # -- snapshots: which lines exist, for the machine's record -------------------------
    def lines(self) -> list[IrqLine]:
        """Every named line of the wiring (GSIs, 8259 inputs, ISA IRQs)."""
        return list(self.gsi) + list(self.pic_inputs) + list(self.isa_irq)
