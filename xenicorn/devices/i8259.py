"""The 8259A programmable interrupt controller pair (PC/AT "XT-PIC").

Two 8259As: the master at ports 0x20/0x21 takes IRQ 0-7, the slave at
0xA0/0xA1 takes IRQ 8-15 and signals through the master's IRQ 2 (cascade).
The PIIX's ELCR registers (0x4D0/0x4D1) make individual inputs
level-triggered (Intel 8259A datasheet; PIIX3 datasheet §2.2.5).

Each chip keeps three 8-bit registers: **IRR** (requests waiting), **ISR**
(being serviced: acknowledged, not yet EOI'd) and **IMR** (masked). An
input's request reaches the CPU's INTR pin when it is not masked and has
higher priority than everything in service. The CPU's INTA cycle returns a
vector (ICW2 base + IRQ) and moves the request from IRR to ISR; the handler
ends it with an EOI.

=====================  =========================================================
write (port)           meaning
=====================  =========================================================
cmd, bit 4 = 1         ICW1: start initialisation (bit 0: ICW4 follows, bit 1:
                       single, bit 3: all inputs level); clears IMR and ISR
data, during init      ICW2 vector base (bits 7:3), ICW3 cascade, ICW4 (bit 1
                       auto-EOI)
data                   OCW1: IMR
cmd, bits 4:3 = 00     OCW2: bits 7:5 = 001 non-specific EOI, 011 specific EOI
                       (IRQ in bits 2:0), 101/111 rotate on (specific) EOI,
                       100/000 set/clear rotate in auto-EOI, 110 set priority
cmd, bits 4:3 = 01     OCW3: bits 1:0 = 10 read IRR, 11 read ISR; bit 2 poll;
                       bits 6:5 = 11/10 set/clear special mask mode
=====================  =========================================================

Edge-triggered inputs latch a rising edge in IRR; level-triggered ones
request while held high and re-request after EOI if still high. A request
that vanishes before INTA yields the spurious IRQ 7 (or 15) vector without
setting ISR, which is how real hardware behaves and what Linux checks for.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict, replace
from typing import Callable

from ..records import RecordError, field, flag, make_record, open_record, uint


@dataclass
class PicState:
    """One 8259A (the fields of Xen's ``struct hvm_hw_vpic``)."""

    irr: int = 0                # interrupt request register
    isr: int = 0                # in-service register
    imr: int = 0                # interrupt mask register
    last_input: int = 0         # input levels, for edge detection
    elcr: int = 0               # 1 = level-triggered input (from the PIIX ELCR)
    vector_base: int = 0        # ICW2
    priority_add: int = 0       # the IRQ with the highest priority after rotation
    init_step: int = 0          # 0 = not initialising; 2..4 = the ICW expected next
    needs_icw4: bool = False
    single: bool = False
    level_all: bool = False     # ICW1.LTIM
    auto_eoi: bool = False      # ICW4.AEOI
    rotate_on_auto_eoi: bool = False
    special_mask: bool = False
    read_isr: bool = False      # OCW3: the command port reads ISR (else IRR)
    poll: bool = False          # OCW3: the next command-port read is a poll
    icw3: int = 0


class I8259:
    """One chip. ``output`` is called with its INT pin level when it changes."""

    def __init__(self, name: str, elcr_mask: int, output: Callable[[bool], None]):
        self.name = name
        self.elcr_mask = elcr_mask            # inputs that may be level-triggered
        self.output = output
        self.state = PicState()
        self.int_level = False
        self.on_eoi: list[Callable[[int], None]] = []   # called with the chip-local IRQ

    # -- priority logic --------------------------------------------------------
    def _level(self, irq: int) -> bool:
        return self.state.level_all or bool(self.state.elcr >> irq & 1)

    def _highest(self, mask: int) -> int | None:
        """The highest-priority IRQ in ``mask`` (rotation starts at priority_add)."""
        if not mask:
            return None
        for i in range(8):
            irq = (self.state.priority_add + i) & 7
            if mask >> irq & 1:
                return irq
        return None

    def _priority(self, irq: int) -> int:
        return (irq - self.state.priority_add) & 7

    def pending_irq(self) -> int | None:
        """The IRQ the chip would signal now, honouring ISR and special mask mode."""
        st = self.state
        irq = self._highest(st.irr & ~st.imr)
        if irq is None:
            return None
        in_service = st.isr & ~st.imr if st.special_mask else st.isr
        cur = self._highest(in_service)
        if cur is not None and self._priority(cur) <= self._priority(irq):
            return None
        return irq

    def update(self) -> None:
        level = self.pending_irq() is not None
        if level != self.int_level:
            self.int_level = level
            self.output(level)

    # -- inputs ------------------------------------------------------------------
    def set_irq(self, irq: int, level: bool) -> None:
        st = self.state
        bit = 1 << irq
        if self._level(irq):
            if level:
                st.irr |= bit
                st.last_input |= bit
            else:
                st.irr &= ~bit
                st.last_input &= ~bit
        elif level:
            if not st.last_input & bit:
                st.irr |= bit                 # rising edge latched
            st.last_input |= bit
        else:
            st.last_input &= ~bit
        self.update()

    def acknowledge(self) -> int | None:
        """INTA: the IRQ being serviced (or None when the request vanished)."""
        st = self.state
        irq = self.pending_irq()
        if irq is None:
            return None
        bit = 1 << irq
        if not self._level(irq):
            st.irr &= ~bit
        if st.auto_eoi:
            if st.rotate_on_auto_eoi:
                st.priority_add = (irq + 1) & 7
        else:
            st.isr |= bit
        self.update()
        return irq

    # -- registers ---------------------------------------------------------------
    def write_command(self, value: int) -> None:
        st = self.state
        if value & 0x10:                                  # ICW1
            elcr = st.elcr
            self.state = st = PicState(elcr=elcr, last_input=0)
            st.init_step = 2
            st.needs_icw4 = bool(value & 1)
            st.single = bool(value & 2)
            st.level_all = bool(value & 8)
        elif value & 0x08:                                # OCW3
            if value & 0x04:
                st.poll = True
            if value & 0x02:
                st.read_isr = bool(value & 1)
            if value & 0x40:
                st.special_mask = bool(value & 0x20)
        else:                                             # OCW2
            cmd = value >> 5
            if cmd in (1, 5):                             # non-specific EOI (and rotate)
                irq = self._highest(st.isr)
                if irq is not None:
                    self._eoi(irq, rotate=cmd == 5)
            elif cmd in (3, 7):                           # specific EOI (and rotate)
                self._eoi(value & 7, rotate=cmd == 7)
            elif cmd == 6:                                # set priority: IRQ L is lowest
                st.priority_add = (value + 1) & 7
            elif cmd in (0, 4):
                st.rotate_on_auto_eoi = cmd == 4
        self.update()

    def _eoi(self, irq: int, rotate: bool) -> None:
        st = self.state
        st.isr &= ~(1 << irq)
        if rotate:
            st.priority_add = (irq + 1) & 7
        for cb in self.on_eoi:
            cb(irq)

    def write_data(self, value: int) -> None:
        st = self.state
        if st.init_step == 2:
            st.vector_base = value & 0xF8
            if st.single:
                st.init_step = 4 if st.needs_icw4 else 0
            else:
                st.init_step = 3
        elif st.init_step == 3:
            st.icw3 = value
            st.init_step = 4 if st.needs_icw4 else 0
        elif st.init_step == 4:
            st.auto_eoi = bool(value & 2)
            st.init_step = 0
        else:
            st.imr = value
        self.update()

    def read_command(self) -> int:
        st = self.state
        if st.poll:
            st.poll = False
            irq = self.acknowledge()
            return 0x80 | irq if irq is not None else 0
        return st.isr if st.read_isr else st.irr

    def read_data(self) -> int:
        return self.state.imr


class PicPair:
    """Master and slave 8259A, cascaded on IRQ 2, plus the ELCR.

    ``output`` receives the master's INT level (the CPU's INTR pin, or the
    LAPIC's LINT0 in virtual-wire mode). Port devices: ``master_ports``,
    ``slave_ports`` (two ports each) and ``elcr_ports`` (0x4D0, two ports).
    """

    def __init__(self, output: Callable[[bool], None] = lambda level: None):
        self.output = output
        self.master = I8259("master", 0xF8, self._master_out)
        self.slave = I8259("slave", 0xDE, lambda level: self.master.set_irq(2, level))
        self.int_level = False
        self.on_eoi: list[Callable[[int], None]] = []     # called with the ISA IRQ 0-15
        self.master.on_eoi.append(self._master_eoi)
        self.slave.on_eoi.append(lambda irq: self._eoi(irq + 8))
        self.trace: Callable[[str], None] | None = None
        self.master_ports = _ChipPorts(self.master)
        self.slave_ports = _ChipPorts(self.slave)
        self.elcr_ports = _Elcr(self)
        self.irq_count = [0] * 16             # rising edges per ISA IRQ (QEMU's "info irq"; not saved)

    def _master_eoi(self, irq: int) -> None:
        if irq != 2:
            self._eoi(irq)
        elif self.trace is not None:
            # the master's IRQ 2 is the slave's INT line: its EOI ends the
            # cascade, no ISA IRQ (the slave's own EOI reported that one)
            self.trace("8259 EOI IRQ 2 (cascade)")

    def _eoi(self, irq: int) -> None:
        if self.trace is not None:
            self.trace(f"8259 EOI IRQ {irq}")
        for cb in self.on_eoi:
            cb(irq)

    def _master_out(self, level: bool) -> None:
        self.int_level = level
        if self.trace is not None:
            self.trace(f"8259 INT output {'raised' if level else 'lowered'}")
        self.output(level)

    def set_irq(self, irq: int, level: bool) -> None:
        chip = self.master if irq < 8 else self.slave
        if level and not chip.state.last_input >> (irq & 7) & 1:
            self.irq_count[irq] += 1
        chip.set_irq(irq & 7, level)

    def pending(self) -> bool:
        return self.master.int_level

    def acknowledge(self) -> int:
        """The INTA cycle: the vector for the highest request (spurious IRQ 7/15 if gone)."""
        vector = self._inta()
        if self.trace is not None:
            self.trace(f"8259 INTA -> vector {vector:#x}")
        return vector

    def _inta(self) -> int:
        irq = self.master.acknowledge()
        if irq is None:
            return self.master.state.vector_base + 7            # spurious master IRQ 7
        if irq == 2:
            sirq = self.slave.acknowledge()
            if sirq is None:
                return self.slave.state.vector_base + 7          # spurious IRQ 15
            return self.slave.state.vector_base + sirq
        return self.master.state.vector_base + irq

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("i8259-pair", 1)

    def save(self) -> dict:
        """Both chips' registers (a copy)."""
        return {"master": asdict(self.master.state), "slave": asdict(self.slave.state)}

    def restore(self, data: dict) -> None:
        """Load :meth:`save`'s output (validated) and drive the INT output from it."""
        self.apply_record(self.check_record(make_record(*self.RECORD, data)))
        self.master.int_level = self.int_level = False
        self.slave.update()
        self.master.update()

    def save_record(self) -> dict:
        return make_record(*self.RECORD, self.save())

    def check_record(self, record: dict) -> tuple[PicState, PicState]:
        """What Xen's ``vpic_check`` refuses, and what else no 8259A can be in.

        ELCR bits only where the PIIX has them (master 0xF8, slave 0xDE:
        IRQ 0, 1, 2, 8 and 13 are edge-only; Xen's ``vpic_elcr_mask``,
        QEMU's ``elcr_mask``); an ICW2 vector base has bits 2:0 clear (the
        chip puts the IRQ number there); an initialisation step the ICW1
        bits say comes next (ICW3 only in cascade mode, ICW4 only if asked).
        """
        st = open_record(record, *self.RECORD)
        return tuple(_check_chip(field(st, name), name, chip.elcr_mask)
                     for chip, name in ((self.master, "master"), (self.slave, "slave")))

    def apply_record(self, prepared: tuple[PicState, PicState]) -> None:
        """Install both chips; their INT outputs follow from the registers (derived, not re-driven)."""
        self.master.state, self.slave.state = (replace(s) for s in prepared)
        for chip in (self.slave, self.master):
            chip.int_level = chip.pending_irq() is not None
        self.int_level = self.master.int_level


def _check_chip(st: dict, name: str, elcr_mask: int) -> PicState:
    try:
        regs = {k: uint(st, k, 8) for k in ("irr", "isr", "imr", "last_input", "elcr", "icw3", "vector_base")}
        flags = {k: flag(st, k) for k in ("needs_icw4", "single", "level_all", "auto_eoi", "rotate_on_auto_eoi",
                                          "special_mask", "read_isr", "poll")}
        priority_add = uint(st, "priority_add", 3)
        init_step = uint(st, "init_step", 3)
    except RecordError as e:
        raise RecordError(f"8259 {name}: {e}") from None
    if regs["vector_base"] & 7:
        raise RecordError(f"8259 {name}: ICW2 vector base {regs['vector_base']:#x} has bits 2:0 set "
                          "(the chip puts the IRQ number there)")
    if regs["elcr"] & ~elcr_mask:
        bad = regs["elcr"] & ~elcr_mask
        irqs = [i + (8 if name == "slave" else 0) for i in range(8) if bad >> i & 1]
        raise RecordError(f"8259 {name}: ELCR makes IRQ {', '.join(map(str, irqs))} level-triggered, "
                          "which the PIIX keeps edge-triggered")
    if init_step not in (0, 2, 3, 4) or (init_step == 3 and flags["single"]) \
            or (init_step == 4 and not flags["needs_icw4"]):
        raise RecordError(f"8259 {name}: initialisation step {init_step} cannot follow its ICW1")
    return PicState(**regs, **flags, priority_add=priority_add, init_step=init_step)


class _ChipPorts:
    def __init__(self, chip: I8259):
        self.chip = chip

    def pio_read(self, offset: int, size: int) -> int:
        return self.chip.read_command() if offset == 0 else self.chip.read_data()

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.chip.write_command(value & 0xFF)
        else:
            self.chip.write_data(value & 0xFF)


class _Elcr:
    def __init__(self, pair: PicPair):
        self.pair = pair

    def pio_read(self, offset: int, size: int) -> int:
        chips = (self.pair.master, self.pair.slave)
        if size == 2 and offset == 0:
            return chips[0].state.elcr | chips[1].state.elcr << 8
        return chips[offset].state.elcr

    def pio_write(self, offset: int, size: int, value: int) -> None:
        chips = (self.pair.master, self.pair.slave)
        for i, chip in enumerate(chips[offset:offset + size]):
            chip.state.elcr = (value >> (8 * i)) & chip.elcr_mask
            chip.update()
