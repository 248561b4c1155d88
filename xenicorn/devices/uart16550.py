"""16550A UART: the PC's COM1 at I/O 0x3F8, interrupt IRQ 4.

Eight registers, selected by the port offset and, for offsets 0 and 1, by
the Divisor Latch Access Bit (LCR bit 7) (National PC16550D datasheet):

======  ===========  ===========  ==========================================
offset  read         write        notes
======  ===========  ===========  ==========================================
0       RBR          THR          receive / transmit byte (DLAB=0)
0       DLL          DLL          divisor low byte (DLAB=1)
1       IER          IER          bit 0 RX data, 1 THR empty, 2 line status,
                                  3 modem status (DLAB=0); DLM if DLAB=1
2       IIR          FCR          IIR: bit 0 = no interrupt pending, bits 3:1
                                  the highest pending cause, bits 7:6 = 11
                                  when the FIFOs are on. FCR: bit 0 FIFO
                                  enable, 1/2 clear RX/TX FIFO, 7:6 trigger
3       LCR          LCR          word length, stop bits, parity, DLAB
4       MCR          MCR          DTR, RTS, OUT1, OUT2 (gates the IRQ on a
                                  PC), LOOP (bit 4)
5       LSR          -            DR (0), OE (1), THRE (5), TEMT (6)
6       MSR          -            CTS, DSR, RI, DCD and their delta bits
7       SCR          SCR          scratch byte (a driver's presence test)
======  ===========  ===========  ==========================================

Interrupt causes by priority (IIR bits 3:1): line status 011, received data
010 (or character timeout 110 with FIFOs, approximated here as "data below
the trigger level waiting"), THR empty 001, modem status 000. The THRE
interrupt is cleared by reading IIR when it is the cause, or by writing THR.
The interrupt output reaches the interrupt controller only while MCR.OUT2 is
set, as on PC serial cards. Transmission is instantaneous: the emulated line
has no baud rate, so THR is always empty again when the guest looks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from ..records import RecordError, flag, integer, listing, make_record, open_record, uint

COM1, IRQ_COM1 = 0x3F8, 4
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 1, 2, 4, 8
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 16
IIR_NONE, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_TIMEOUT = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
FIFO_SIZE = 16
TRIGGER = {0: 1, 1: 4, 2: 8, 3: 14}


class _NoLine:
    def set_level(self, level: bool) -> None:
        pass


@dataclass
class UartState:
    """The registers and FIFOs of one 16550A."""

    ier: int = 0            # interrupt enable
    lcr: int = 0            # line control (bit 7: DLAB)
    mcr: int = 0            # modem control
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = 0            # modem status (upper nibble: lines, lower: deltas)
    scr: int = 0            # scratch
    dll: int = 12           # divisor latch (12 = 9600 baud from 1.8432 MHz)
    dlm: int = 0
    fcr: int = 0            # FIFO control as last written (bit 0: FIFOs on)
    thr_ipending: bool = False      # THR-empty interrupt condition latched
    rx: deque = field(default_factory=deque)      # received bytes not yet read


class Uart16550:
    """A 16550A whose transmitter writes to a sink and receiver takes ``feed``."""

    def __init__(self, sink, irq=None):
        self.sink = sink                  # object with write(bytes)
        self.irq = irq or _NoLine()
        self.state = UartState()
        self._level = False

    # -- host side -------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes arriving on the line (host input)."""
        st = self.state
        for b in data:
            if len(st.rx) >= (FIFO_SIZE if st.fcr & 1 else 1):
                st.lsr |= LSR_OE          # overrun: the byte is lost
                continue
            st.rx.append(b)
        if st.rx:
            st.lsr |= LSR_DR
        self._update()

    # -- guest side ---------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        st = self.state
        dlab = st.lcr & 0x80
        if offset == 0:
            if dlab:
                return st.dll
            value = st.rx.popleft() if st.rx else 0
            if not st.rx:
                st.lsr &= ~LSR_DR
            self._update()
            return value
        if offset == 1:
            return st.dlm if dlab else st.ier
        if offset == 2:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                st.thr_ipending = False   # reading IIR acknowledges THR empty
                self._update()
            return iir | (0xC0 if st.fcr & 1 else 0)
        if offset == 3:
            return st.lcr
        if offset == 4:
            return st.mcr
        if offset == 5:
            value = st.lsr
            st.lsr &= ~LSR_OE              # error bits clear on read
            self._update()
            return value
        if offset == 6:
            value = self._msr()
            st.msr &= 0xF0                 # delta bits clear on read
            self._update()
            return value
        return st.scr

    def pio_write(self, offset: int, size: int, value: int) -> None:
        st = self.state
        value &= 0xFF
        dlab = st.lcr & 0x80
        if offset == 0:
            if dlab:
                st.dll = value
                return
            if st.mcr & MCR_LOOP:
                self.feed(bytes([value]))  # loopback: TX wired to RX
            else:
                self.sink.write(bytes([value]))
            st.thr_ipending = True         # the byte left at once: THR is empty again
            self._update()
        elif offset == 1:
            if dlab:
                st.dlm = value
                return
            enabling_thri = value & IER_THRI and not st.ier & IER_THRI
            st.ier = value & 0x0F
            if enabling_thri:
                st.thr_ipending = True     # THR is empty: enabling THRI interrupts at once
            self._update()
        elif offset == 2:
            if value & 0x02 or (value ^ st.fcr) & 1:
                st.rx.clear()
                st.lsr &= ~LSR_DR
            st.fcr = value & 0xC9
            self._update()
        elif offset == 3:
            st.lcr = value
        elif offset == 4:
            old = st.mcr
            st.mcr = value & 0x1F
            if (old ^ st.mcr) & 0x0F and st.mcr & MCR_LOOP:
                st.msr |= 0x01 if (old ^ st.mcr) & MCR_RTS else 0     # delta CTS
                st.msr |= 0x02 if (old ^ st.mcr) & MCR_DTR else 0     # delta DSR
            self._update()
        elif offset == 7:
            st.scr = value

    # -- interrupt logic ------------------------------------------------------
    def _msr(self) -> int:
        st = self.state
        if st.mcr & MCR_LOOP:
            # loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD
            m = st.mcr
            lines = ((m & MCR_RTS) << 3) | ((m & MCR_DTR) << 5) | ((m & MCR_OUT1) << 4) | ((m & MCR_OUT2) << 4)
            return lines | (st.msr & 0x0F)
        return (st.msr & 0x0F) | 0xB0      # CTS, DSR, DCD asserted by the "modem"

    def _iir(self) -> int:
        st = self.state
        if st.ier & IER_RLSI and st.lsr & LSR_OE:
            return IIR_RLSI
        if st.ier & IER_RDI and st.rx:
            trigger = TRIGGER[st.fcr >> 6] if st.fcr & 1 else 1
            return IIR_RDI if len(st.rx) >= trigger else IIR_TIMEOUT
        if st.ier & IER_THRI and st.thr_ipending:
            return IIR_THRI
        if st.ier & IER_MSI and st.msr & 0x0F:
            return IIR_MSI
        return IIR_NONE

    def _update(self) -> None:
        pending = self._iir() != IIR_NONE
        level = pending and bool(self.state.mcr & MCR_OUT2)
        if level != self._level:
            self._level = level
            self.irq.set_level(level)

    @property
    def irq_level(self) -> bool:
        return self._level

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("uart16550", 1)
    REGISTERS = ("ier", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr")

    def save(self) -> dict:
        """Registers and the receive FIFO (a copy)."""
        st = self.state
        data = {k: getattr(st, k) for k in self.REGISTERS}
        data["thr_ipending"] = st.thr_ipending
        data["rx"] = list(st.rx)
        return data

    def restore(self, data: dict) -> None:
        """Load :meth:`save`'s output, validated, and drive the interrupt line from it."""
        self.apply_record(self.check_record(make_record(*self.RECORD, data)))
        self._level = False
        self._update()

    def save_record(self) -> dict:
        return make_record(*self.RECORD, self.save())

    def check_record(self, record: dict) -> UartState:
        """Registers as the writes leave them: IER 4 bits, MCR 5, FCR bits 7:6, 3, 0; LSR's DR
        set exactly when the FIFO holds bytes, THRE and TEMT always (transmission is instant);
        at most 16 bytes received, or 1 with the FIFOs off."""
        st = open_record(record, *self.RECORD)
        regs = {k: uint(st, k, 8) for k in ("lcr", "msr", "scr", "dll", "dlm")}
        regs.update(ier=uint(st, "ier", 4), mcr=uint(st, "mcr", 5), fcr=uint(st, "fcr", 8, reserved=~0xC9),
                    lsr=uint(st, "lsr", 8, reserved=~(LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT)))
        rx = listing(st, "rx", FIFO_SIZE if regs["fcr"] & 1 else 1)
        for b in rx:
            integer(b, "received byte", 0, 0xFF)
        if bool(regs["lsr"] & LSR_DR) != bool(rx) or regs["lsr"] & (LSR_THRE | LSR_TEMT) != LSR_THRE | LSR_TEMT:
            raise RecordError(f"UART line status {regs['lsr']:#x} with {len(rx)} bytes received")
        return UartState(**regs, thr_ipending=flag(st, "thr_ipending"), rx=deque(rx))

    def apply_record(self, prepared: UartState) -> None:
        """Install the registers; the interrupt output follows from them (derived, not re-driven)."""
        self.state = replace(prepared, rx=deque(prepared.rx))
        self._level = self._iir() != IIR_NONE and bool(self.state.mcr & MCR_OUT2)


class _FileSink:
    def __init__(self, f: BinaryIO):
        self.f = f

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()


def attach_serial(mode: str, console, register_pio, irq=None) -> tuple["Uart16550 | None", "BinaryIO | None"]:
    """COM1 per ``MachineConfig.serial``: stdio (``console``), file:PATH, or none.

    ``register_pio(base, size, device)`` puts the UART on the I/O bus.
    Returns the UART (None for "none") and the file it writes, if any.
    """
    if mode == "none":
        return None, None
    f = None
    if mode.startswith("file:"):
        path = mode[5:]
        try:
            f = open(path, "wb")
        except OSError as e:
            raise ValueError(f"--serial {mode}: cannot open {path} ({e.strerror})") from None
        sink = _FileSink(f)
    else:
        sink = console
    uart = Uart16550(sink, irq)
    register_pio(COM1, 8, uart)
    return uart, f
