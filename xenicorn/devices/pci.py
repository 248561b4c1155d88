"""PCI: configuration mechanism #1, an i440FX-style host bridge, PIIX3 routing.

**Configuration space.** Every PCI function has 256 bytes of configuration
registers. The CPU reaches them with configuration mechanism #1 (PCI Local
Bus spec 3.0 §3.2.2.3.2): write an address to ``CONFIG_ADDRESS`` (port
0xCF8, 32-bit), then read or write ``CONFIG_DATA`` (0xCFC-0xCFF):

=========  =============================================================
bits       CONFIG_ADDRESS
=========  =============================================================
31         enable: only then does 0xCFC reach configuration space
23:16      bus number (only bus 0 exists here)
15:11      device (slot) number
10:8       function number
7:2        register (dword) number; 0xCFC + (offset & 3) picks the byte
=========  =============================================================

The type-0 header a function starts with:

=======  =========================  =======  =============================
offset   field                      offset   field
=======  =========================  =======  =============================
0x00     vendor ID                  0x02     device ID
0x04     command (I/O, memory,      0x06     status
         bus master, INTx disable)
0x08     revision                   0x09     class code (prog-if, sub, base)
0x0E     header type                0x10     BAR0 .. BAR5 (0x10-0x24)
0x2C     subsystem vendor           0x2E     subsystem ID
0x3C     interrupt line (firmware   0x3D     interrupt pin (1 = INTA)
         scratch: the IRQ used)
=======  =========================  =======  =============================

**BAR sizing.** Software writes all ones to a BAR and reads it back: the
address bits that stay zero give the size; bit 0 tells I/O (1) from memory
(0), bits 2:1 of a memory BAR its type and bit 3 "prefetchable". A BAR is
decoded only while the command register enables its space, and the bus
moves the device when the BAR is reprogrammed.

**INTx routing on a PC.** A device's INTA..INTD pins are swizzled by slot
onto four PIRQ lines, ``pirq = (slot - 1 + pin) & 3`` (i440FX). The PIIX3
routes each PIRQ to an ISA IRQ through registers 0x60-0x63 of its function
0 (bit 7 set = not routed), and, as on QEMU's PC, PIRQ n also drives IOAPIC
input 16 + n. Several devices share a PIRQ, so it is high while any of them
is (a wired-OR of level-triggered, active-low lines).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..records import RecordError, boolean, flag, hexbytes, integer, listing, make_record, open_record, uint

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PCI_COMMAND_INTX_DISABLE = 1 << 0, 1 << 1, 1 << 10
PCI_STATUS_INTERRUPT = 1 << 3
BAR_IO, BAR_MEM32, BAR_MEM_PREFETCH = "io", "mem", "mem-prefetch"


@dataclass
class Bar:
    """One base address register: its kind and size (a power of two)."""

    kind: str
    size: int
    device: object                         # what the bus should route to (PioDevice/MmioDevice)


@dataclass
class PciFunctionState:
    """What a snapshot keeps of a function: its configuration bytes and INTx level."""

    config: bytearray = field(default_factory=lambda: bytearray(256))
    intx_level: bool = False               # the device is asserting its interrupt pin


class PciFunction:
    """A PCI function with a type-0 header, BARs and one INTx pin."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsystem: tuple[int, int] = (0, 0), pin: int = 0, header_type: int = 0):
        self.state = PciFunctionState()
        c = self.state.config
        c[0:2] = vendor.to_bytes(2, "little")
        c[2:4] = device.to_bytes(2, "little")
        c[8] = revision
        c[9:12] = (class_code & 0xFFFFFF).to_bytes(3, "little")
        c[0x0E] = header_type
        c[0x2C:0x2E] = subsystem[0].to_bytes(2, "little")
        c[0x2E:0x30] = subsystem[1].to_bytes(2, "little")
        c[0x3D] = pin
        self.bars: dict[int, Bar] = {}
        self.bus: "PciBus | None" = None
        self.devfn = 0

    # -- configuration registers -------------------------------------------
    def add_bar(self, index: int, kind: str, size: int, device: object) -> None:
        if size & (size - 1) or size < (4 if kind == BAR_IO else 16):
            raise ValueError(f"BAR size {size:#x} must be a power of two")
        self.bars[index] = Bar(kind, size, device)
        flags = 1 if kind == BAR_IO else (0x8 if kind == BAR_MEM_PREFETCH else 0)
        self._set32(0x10 + 4 * index, flags)

    def _get32(self, off: int) -> int:
        return int.from_bytes(self.state.config[off:off + 4], "little")

    def _set32(self, off: int, value: int) -> None:
        self.state.config[off:off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.state.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write with the header's read-only and write-one-to-clear rules."""
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)
        if offset < 0x28 and offset + size > 0x04:
            self.update_mappings()

    def _write_byte(self, off: int, byte: int) -> None:
        c = self.state.config
        if 0x10 <= off < 0x28:
            idx = (off - 0x10) // 4
            bar = self.bars.get(idx)
            if bar is None:
                return                                  # unimplemented BARs read 0
            shift = 8 * ((off - 0x10) % 4)
            cur = self._get32(0x10 + 4 * idx)
            low_flags = 0x1 if bar.kind == BAR_IO else 0xF
            mask = ~(bar.size - 1) & 0xFFFFFFFF & ~low_flags
            if bar.kind == BAR_IO:
                mask &= 0xFFFF
            new = (cur & ~(0xFF << shift)) | (byte << shift)
            self._set32(0x10 + 4 * idx, (new & mask) | (cur & low_flags))
            return
        if off in (0x04, 0x05):                         # command: IO, MEM, master, INTx disable
            writable = 0x07 if off == 0x04 else 0x04
            c[off] = (c[off] & ~writable) | (byte & writable)
            if off == 0x05:
                self._intx_changed()
            return
        if off in (0x06, 0x07):                         # status: write-one-to-clear error bits
            c[off] &= ~(byte & (0xF9 if off == 0x07 else 0x00))
            return
        if off in (0x0C, 0x0D, 0x0F, 0x3C):             # cache line, latency, BIST, interrupt line
            c[off] = byte
            return
        if off >= 0x40:
            self.device_config_write(off, byte)
        # everything else in the header is read-only

    def device_config_write(self, off: int, byte: int) -> None:
        """Device-specific registers (0x40-0xFF); plain storage by default."""
        self.state.config[off] = byte

    @property
    def command(self) -> int:
        return self.config_read(0x04, 2)

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        raw = self._get32(0x10 + 4 * index)
        return raw & (0xFFFC if bar.kind == BAR_IO else 0xFFFFFFF0)

    def update_mappings(self) -> None:
        if self.bus is not None:
            self.bus.map_bars(self)

    # -- interrupts ---------------------------------------------------------
    def set_irq(self, level: bool) -> None:
        """Assert or deassert this function's INTx pin (level-triggered)."""
        self.state.intx_level = bool(level)
        c = self.state.config
        c[0x06] = (c[0x06] | PCI_STATUS_INTERRUPT) if level else (c[0x06] & ~PCI_STATUS_INTERRUPT)
        self._intx_changed()

    def _intx_changed(self) -> None:
        if self.bus is not None:
            self.bus.intx_changed(self)

    @property
    def intx_output(self) -> bool:
        """What the pin drives: the level, unless the command register disables INTx."""
        return self.state.intx_level and not self.command & PCI_COMMAND_INTX_DISABLE

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("pci-function", 1)

    def save(self) -> dict:
        """Configuration space and the INTx level (a copy)."""
        return {"config": bytes(self.state.config).hex(), "intx_level": self.state.intx_level}

    def restore(self, data: dict) -> None:
        """Load :meth:`save`'s output, validated; BARs are decoded and INTx driven from it."""
        PciFunction.apply_record(self, self.check_config(data))
        self.update_mappings()
        self._intx_changed()

    def save_record(self) -> dict:
        return make_record(*self.RECORD, self.save())

    def check_record(self, record: dict) -> PciFunctionState:
        return self.check_config(open_record(record, *self.RECORD))

    def apply_record(self, prepared: PciFunctionState) -> None:
        """Install configuration space silently (the bus decodes BARs and INTx once all are in)."""
        self.state.config[:] = prepared.config
        self.state.intx_level = prepared.intx_level

    def check_config(self, st: dict) -> PciFunctionState:
        """Configuration space as :meth:`config_write` can leave it, from this function's reset state.

        The header's read-only fields (IDs, class, header type, subsystem,
        pin) are this device's; the command register differs only in its
        writable bits, status only by cleared error bits and the interrupt
        status, which is the INTx level; a BAR holds an address aligned to
        its size with its type bits, an unimplemented one 0. Bytes 0x40 and
        up are the device's own registers.
        """
        raw = hexbytes(st, "config", 256)
        intx = flag(st, "intx_level")
        now = self.state.config
        where = f"PCI {self.devfn >> 3:02x}.{self.devfn & 7}"
        if bool(raw[0x06] & PCI_STATUS_INTERRUPT) != intx:
            raise RecordError(f"{where} interrupt status bit and INTx level {intx} disagree")
        for off in range(0x40):
            old, new = now[off], raw[off]
            if 0x10 <= off < 0x28:
                continue
            if off == 0x04:
                ok = (old ^ new) & ~0x07 == 0
            elif off == 0x05:
                ok = (old ^ new) & ~0x04 == 0
            elif off == 0x06:
                ok = (old ^ new) & ~PCI_STATUS_INTERRUPT == 0
            elif off == 0x07:
                ok = new & ~old == 0                        # error bits only ever get cleared
            else:
                ok = off in (0x0C, 0x0D, 0x0F, 0x3C) or old == new
            if not ok:
                raise RecordError(f"{where} configuration byte {off:#04x} is {new:#04x}, "
                                  f"this device's reads {old:#04x}")
        for idx in range(6):
            off = 0x10 + 4 * idx
            value = int.from_bytes(raw[off:off + 4], "little")
            bar = self.bars.get(idx)
            if bar is None:
                ok = value == 0
            else:
                low = 0x1 if bar.kind == BAR_IO else 0xF
                ok = value & low == self._get32(off) & low and not value & ~low & (bar.size - 1) \
                    and (bar.kind != BAR_IO or value < 0x10000)
            if not ok:
                raise RecordError(f"{where} BAR{idx} {value:#x} is not an address this BAR can hold")
        return PciFunctionState(bytearray(raw), intx)


class Piix3Isa(PciFunction):
    """PIIX3 function 0, the PCI-to-ISA bridge: PIRQ routing (regs 0x60-0x63)."""

    def __init__(self):
        super().__init__(0x8086, 0x7000, 0x060100, header_type=0x80)   # ISA bridge, multi-function
        for reg in range(0x60, 0x64):
            self.state.config[reg] = 0x80                              # PIRQx not routed
        self.on_route_change: Callable[[], None] = lambda: None

    def device_config_write(self, off: int, byte: int) -> None:
        self.state.config[off] = byte
        if 0x60 <= off <= 0x63:
            self.on_route_change()

    def pirq_route(self, pirq: int) -> int | None:
        """ISA IRQ a PIRQ is routed to, or None (bit 7 set, or IRQ < 3: reserved)."""
        reg = self.state.config[0x60 + pirq]
        if reg & 0x80 or (reg & 0x0F) < 3:
            return None
        return reg & 0x0F


class PciBus:
    """Bus 0: functions by devfn, configuration mechanism #1, BAR decode, INTx.

    ``pirq_sink(pirq, level)`` is called when a PIRQ line changes; the
    machine turns it into IOAPIC GSI 16 + pirq and the PIIX3-routed ISA IRQ.
    """

    def __init__(self, pirq_sink: Callable[[int, bool], None] | None = None,
                 reset: Callable[[], None] | None = None,
                 map_range: Callable[[str, int, int, object], None] | None = None,
                 unmap_range: Callable[[str, object], None] | None = None):
        """Wiring, all optional (a bus on its own decodes configuration cycles only).

        ``pirq_sink(pirq, level)``: a PIRQ line changed. ``reset()``: the
        PIIX3's reset control register (0xCF9) asked for a reset.
        ``map_range(space, addr, size, device)`` / ``unmap_range(space,
        device)``: put a BAR's device on the ``"pio"`` or ``"mmio"`` bus, or
        take it off.
        """
        self.functions: dict[int, PciFunction] = {}
        self.address = 0
        self.pirq_sink = pirq_sink or (lambda pirq, level: None)
        self.reset = reset
        self.map_range, self.unmap_range = map_range, unmap_range
        self.pirq_levels = [False] * 4
        self.extra_intx: dict[tuple[int, int], bool] = {}   # (devfn, pin) -> level, for non-device sources
        self._mapped: dict[tuple[int, int], tuple[str, int]] = {}   # (devfn, bar) -> (space, addr)

    def add(self, slot: int, function: int, dev: PciFunction) -> PciFunction:
        devfn = (slot << 3) | function
        if devfn in self.functions:
            raise ValueError(f"PCI {slot:02x}.{function} is taken")
        dev.bus, dev.devfn = self, devfn
        self.functions[devfn] = dev
        dev.update_mappings()
        return dev

    # -- configuration mechanism #1 (ports 0xCF8-0xCFF) ----------------------
    def pio_read(self, offset: int, size: int) -> int:
        if offset < 4:
            # Only a dword access at 0xCF8 is CONFIG_ADDRESS; narrower ones go to ISA.
            return self.address if offset == 0 and size == 4 else (1 << (8 * size)) - 1
        dev, reg = self._target(offset - 4)
        if dev is None:
            return (1 << (8 * size)) - 1                  # no device: master abort, all ones
        return dev.config_read(reg, size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if size == 4 and offset == 0:
                self.address = value & 0x80FFFFFC
            elif offset == 1 and size == 1 and value & 0x04 and self.reset is not None:
                # PIIX3 reset control register (0xCF9): RST_CPU with SYS_RST/soft reset
                self.reset()
            return
        dev, reg = self._target(offset - 4)
        if dev is not None:
            dev.config_write(reg, size, value)

    def _target(self, byte: int) -> tuple[PciFunction | None, int]:
        a = self.address
        if not a & 0x80000000 or (a >> 16) & 0xFF:
            return None, 0
        return self.functions.get((a >> 8) & 0xFF), (a & 0xFC) + byte

    # -- BAR decoding -------------------------------------------------------
    def map_bars(self, dev: PciFunction) -> None:
        if self.map_range is None:
            return
        for idx, bar in dev.bars.items():
            space = "pio" if bar.kind == BAR_IO else "mmio"
            enabled = dev.command & (PCI_COMMAND_IO if space == "pio" else PCI_COMMAND_MEMORY)
            addr = dev.bar_address(idx)
            want = (space, addr) if enabled and addr else None
            key = (dev.devfn, idx)
            have = self._mapped.get(key)
            if have == want:
                continue
            if have is not None:
                self.unmap_range(have[0], bar.device)
                del self._mapped[key]
            if want is not None:
                self.map_range(space, addr, bar.size, bar.device)
                self._mapped[key] = want

    # -- INTx -----------------------------------------------------------------
    @staticmethod
    def pirq_of(devfn: int, pin: int) -> int:
        """i440FX swizzle: INTA of slot s → PIRQ (s - 1) & 3, INTB the next..."""
        return ((devfn >> 3) - 1 + (pin - 1)) & 3

    def set_extra_intx(self, devfn: int, pin: int, level: bool) -> None:
        """Drive INTx pin ``pin`` (1 = INTA) of slot/function ``devfn`` from outside a device.

        Xen's PCI INTx callback asserts "the INTx of device d, pin p" through
        the same swizzle and PIRQ routing as the device itself would.
        """
        self.extra_intx[(devfn, pin)] = bool(level)
        self.intx_changed()

    def intx_changed(self, _dev: PciFunction | None = None) -> None:
        for pirq, level in enumerate(self._pirq_levels()):
            if level != self.pirq_levels[pirq]:
                self.pirq_levels[pirq] = level
                self.pirq_sink(pirq, level)


    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("pci-bus", 1)

    def save_record(self) -> dict:
        """CONFIG_ADDRESS, INTx driven from outside a device, and each function's own record."""
        return make_record(*self.RECORD, {
            "address": self.address, "extra_intx": [[d, p, lv] for (d, p), lv in self.extra_intx.items()],
            "functions": [[devfn, f.save_record()] for devfn, f in self.functions.items()]})

    def check_record(self, record: dict):
        st = open_record(record, *self.RECORD)
        address = uint(st, "address", 32, reserved=~0x80FFFFFC)
        extra = {}
        for item in listing(st, "extra_intx", 1024):
            if not isinstance(item, list) or len(item) != 3:
                raise RecordError("INTx source is not [devfn, pin, level]")
            extra[(integer(item[0], "INTx devfn", 0, 0xFF), integer(item[1], "INTx pin", 1, 4))] = \
                boolean(item[2], "INTx level")
        functions = {}
        for item in listing(st, "functions", 256):
            if not isinstance(item, list) or len(item) != 2:
                raise RecordError("PCI function entry is not [devfn, record]")
            dev = self.functions.get(item[0]) if type(item[0]) is int else None
            if dev is None or item[0] in functions:
                raise RecordError(f"PCI function {item[0]!r}: no such function on this bus")
            functions[item[0]] = dev.check_record(item[1])
        if set(functions) != set(self.functions):
            raise RecordError(f"PCI functions {sorted(functions)}, this bus has {sorted(self.functions)}")
        return address, extra, functions

    def apply_record(self, prepared) -> None:
        """Install every function, then decode the BARs where the guest put them.

        The PIRQ levels follow from the functions' INTx levels (derived, not
        re-driven). A BAR that lands on another device raises BusConflict:
        the snapshot layer then puts the whole machine back.
        """
        self.address, extra, functions = prepared
        self.extra_intx = dict(extra)
        for devfn, state in functions.items():
            self.functions[devfn].apply_record(state)
        self.pirq_levels = self._pirq_levels()
        for dev in self.functions.values():
            self.map_bars(dev)

    def _pirq_levels(self) -> list[bool]:
        levels = [False] * 4
        for dev in self.functions.values():
            pin = dev.state.config[0x3D]
            if pin and dev.intx_output:
                levels[self.pirq_of(dev.devfn, pin)] = True
        for (devfn, pin), level in self.extra_intx.items():
            if level:
                levels[self.pirq_of(devfn, pin)] = True
        return levels


def host_bridge() -> PciFunction:
    """i440FX host bridge (00:00.0): identifies the chipset, no BARs."""
    return PciFunction(0x8086, 0x1237, 0x060000, revision=2)
