"""The I/O APIC: 48 interrupt pins turned into messages for local APICs.

At MMIO 0xFEC00000, registers as in the Intel 82093AA datasheet. Software
selects a register by writing its index to IOREGSEL and then reads or writes
IOWIN:

=========  =========  ======================================================
offset     register   meaning
=========  =========  ======================================================
0x00       IOREGSEL   index of the register IOWIN accesses
0x10       IOWIN      the selected 32-bit register
0x40       EOI        write a vector: clears Remote IRR of level pins with it
                      (version 0x20 only; the 82093AA has no such register)
=========  =========  ======================================================

================  ===========================================================
index             register
================  ===========================================================
0x00              ID (bits 27:24)
0x01              version: 0x20, max redirection entry 23 in bits 23:16
0x02              arbitration ID
0x10 + 2n (+1)    redirection entry n, low (+ high) dword
================  ===========================================================

**Version.** This model reports 0x20, the I/O APIC of Intel's ICH south
bridges, which added the EOI register; it is also QEMU's default
(``IOAPIC_VER_DEF``, the ``version`` property in QEMU's hw/intc/ioapic.c,
which accepts 0x11 or 0x20 and decodes the EOI register only for 0x20). The
stand-alone 82093AA of PIIX-era boards is version 0x11, and so is Xen's
vIOAPIC (``VIOAPIC_VERSION_ID`` in xen/arch/x86/include/asm/hvm/vioapic.h;
xen/arch/x86/hvm/vioapic.c ignores writes to 0x40 below 0x20). The number
matters to Linux: ``__eoi_ioapic_pin()`` (arch/x86/kernel/apic/io_apic.c)
clears a stuck Remote IRR with the EOI register from version 0x20 up, and
below it by masking the entry and flipping it to edge and back, which this
model also honours (an edge entry has no Remote IRR).

Redirection entry: vector (7:0), delivery mode (10:8: fixed, lowest
priority, SMI, NMI, INIT, ExtINT), destination mode (11: physical/logical),
delivery status (12, RO), polarity (13), **Remote IRR** (14, RO), trigger
mode (15: level = 1), mask (16), destination (63:56). All pins start masked.

A level-triggered pin delivers while asserted, then sets Remote IRR and
stays quiet until the local APIC's EOI for that vector comes back (by
broadcast or through the EOI register); if the line is still asserted then,
it delivers again. That EOI is where a "resample" can re-check a source
such as Xen's callback GSI (``on_eoi``). Polarity is taken as already
applied: lines here carry the logical "asserted" state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..records import RecordError, integer, listing, make_record, open_record, uint

NUM_PINS = 48                 # Xen's vIOAPIC: 16 ISA IRQs and 32 PCI ones (VIOAPIC_NUM_PINS,
                              # xen/include/public/arch-x86/hvm/save.h); the 82093AA has 24
IOAPIC_BASE = 0xFEC00000
VERSION = 0x20                  # the ICH I/O APIC, with the EOI register (module doc)
RTE_MASK, RTE_LEVEL, RTE_REMOTE_IRR, RTE_DELIVS = 1 << 16, 1 << 15, 1 << 14, 1 << 12
RTE_RESERVED = 0x00FFFFFF << 32          # bits 55:32 (82093AA: 55:17, but 31:17 are stored as written)


class InterruptSink(Protocol):
    """Where an IOAPIC sends its messages (the local APICs)."""

    def deliver(self, dest: int, logical: bool, mode: int, vector: int, level: bool) -> None: ...


@dataclass
class IoapicState:
    """Registers and input levels (Xen's ``hvm_hw_vioapic``)."""

    id: int = 0
    ioregsel: int = 0
    redirtbl: list[int] = field(default_factory=lambda: [RTE_MASK] * NUM_PINS)
    irr: int = 0                  # input pins currently asserted (bit per pin)


class Ioapic:
    """The IOAPIC model; ``set_irq(pin, level)`` is its input side."""

    def __init__(self, sink: InterruptSink | None = None):
        self.state = IoapicState()
        self.sink = sink
        self.on_eoi: list[Callable[[int], None]] = []       # called with the pin
        self.deliveries = 0
        self.irq_count = [0] * NUM_PINS     # rising input edges per pin (QEMU's "info irq"; not saved)
        self.trace: Callable[[str], None] | None = None     # one line per message sent

    # -- inputs ------------------------------------------------------------------
    def set_irq(self, pin: int, level: bool, latched: Callable[[], None] | None = None) -> None:
        """The pin's input moved to ``level``; ``latched()`` runs once it is latched, before any message."""
        st = self.state
        bit = 1 << pin
        old = bool(st.irr & bit)
        st.irr = st.irr | bit if level else st.irr & ~bit
        if level and not old:
            self.irq_count[pin] += 1
        if latched is not None:
            latched()
        rte = st.redirtbl[pin]
        if rte & RTE_LEVEL:
            if level:
                self._service(pin)
        elif level and not old:
            self._service(pin)                   # edge: only the rising edge delivers

    def _service(self, pin: int) -> None:
        st = self.state
        rte = st.redirtbl[pin]
        if rte & RTE_MASK:
            return
        level = bool(rte & RTE_LEVEL)
        if level:
            if rte & RTE_REMOTE_IRR:
                return
            st.redirtbl[pin] = rte | RTE_REMOTE_IRR
        self.deliveries += 1
        if self.trace is not None:
            self.trace(f"IOAPIC pin {pin} -> vector {rte & 0xFF:#x} ({'level' if level else 'edge'}) "
                       f"to APIC {rte >> 56} ({'logical' if rte & (1 << 11) else 'physical'})")
        if self.sink is not None:
            self.sink.deliver(rte >> 56, bool(rte & (1 << 11)), (rte >> 8) & 7, rte & 0xFF, level)

    def eoi(self, vector: int) -> None:
        """An EOI for ``vector`` (LAPIC broadcast or the EOI register)."""
        st = self.state
        for pin, rte in enumerate(st.redirtbl):
            if rte & RTE_LEVEL and rte & RTE_REMOTE_IRR and rte & 0xFF == vector:
                st.redirtbl[pin] = rte & ~RTE_REMOTE_IRR
                if self.trace is not None:
                    self.trace(f"IOAPIC EOI vector {vector:#x}: pin {pin} Remote IRR cleared")
                for cb in self.on_eoi:
                    cb(pin)
                if st.irr >> pin & 1:
                    self._service(pin)           # still asserted: deliver again

    eoi_broadcast = eoi

    # -- registers -----------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        st = self.state
        if offset == 0x00:
            return st.ioregsel
        if offset != 0x10:
            return 0
        idx = st.ioregsel
        if idx == 0x00:
            return st.id << 24
        if idx == 0x01:
            return ((NUM_PINS - 1) << 16) | VERSION
        if idx == 0x02:
            return st.id << 24
        if 0x10 <= idx < 0x10 + 2 * NUM_PINS:
            rte = st.redirtbl[(idx - 0x10) >> 1]
            return rte >> 32 if idx & 1 else rte & 0xFFFFFFFF
        return 0xFFFFFFFF

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        st = self.state
        if offset == 0x00:
            st.ioregsel = value & 0xFF
        elif offset == 0x40:
            self.eoi(value & 0xFF)
        elif offset == 0x10:
            idx = st.ioregsel
            if idx == 0x00:
                st.id = (value >> 24) & 0x0F
            elif 0x10 <= idx < 0x10 + 2 * NUM_PINS:
                self.write_redirection_entry((idx - 0x10) >> 1, bool(idx & 1), value)

    def write_redirection_entry(self, pin: int, high: bool, value: int) -> None:
        st = self.state
        old = st.redirtbl[pin]
        if high:
            new = (old & 0xFFFFFFFF) | (value & 0xFF000000) << 32
        else:
            ro = RTE_REMOTE_IRR | RTE_DELIVS
            new = (old & ~0xFFFFFFFF) | (value & 0xFFFFFFFF & ~ro) | (old & ro)
            if not new & RTE_LEVEL:
                new &= ~RTE_REMOTE_IRR           # an edge pin has no Remote IRR
        st.redirtbl[pin] = new
        # Unmasking a level pin whose line is still asserted delivers it now.
        if old & RTE_MASK and not new & RTE_MASK and new & RTE_LEVEL and st.irr >> pin & 1:
            self._service(pin)

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("ioapic", 1)

    def save(self) -> dict:
        """Registers and input levels (a copy)."""
        st = self.state
        return {"id": st.id, "ioregsel": st.ioregsel, "redirtbl": list(st.redirtbl), "irr": st.irr}

    def restore(self, data: dict) -> None:
        """Load :meth:`save`'s output, validated (nothing is delivered)."""
        self.apply_record(self.check_record(make_record(*self.RECORD, {**data, "deliveries": self.deliveries})))

    def save_record(self) -> dict:
        return make_record(*self.RECORD, {**self.save(), "deliveries": self.deliveries})

    def check_record(self, record: dict) -> tuple[IoapicState, int]:
        """What Xen's ``ioapic_check`` refuses, and entries this model cannot hold.

        The ID is 4 bits; there are 48 entries of 64 bits; bits 55:32 are
        reserved (an IOWIN write to the high dword keeps only the
        destination), delivery status is never set (delivery is
        instantaneous), and only a level-triggered entry has Remote IRR.
        """
        st = open_record(record, *self.RECORD)
        table = listing(st, "redirtbl", NUM_PINS)
        if len(table) != NUM_PINS:
            raise RecordError(f"IOAPIC with {len(table)} redirection entries, this one has {NUM_PINS}")
        for pin, rte in enumerate(table):
            integer(rte, f"redirection entry {pin}")
            if rte & (RTE_RESERVED | RTE_DELIVS) or (rte & RTE_REMOTE_IRR and not rte & RTE_LEVEL):
                raise RecordError(f"IOAPIC redirection entry {pin} {rte:#018x} is not one the IOAPIC can hold")
        state = IoapicState(uint(st, "id", 4), uint(st, "ioregsel", 8), list(table), uint(st, "irr", NUM_PINS))
        return state, uint(st, "deliveries")

    def apply_record(self, prepared: tuple[IoapicState, int]) -> None:
        state, self.deliveries = prepared
        self.state = IoapicState(state.id, state.ioregsel, list(state.redirtbl), state.irr)
