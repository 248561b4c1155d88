"""Simple exit and console ports every test kernel can use.

* **Debug console, port 0xE9** (Bochs' "port e9 hack", QEMU's ``-debugcon``):
  a byte written is a character out; reading returns 0xE9 so a guest can
  detect the port is there.
* **isa-debug-exit, port 0xF4** (QEMU ``-device isa-debug-exit``): writing
  ``v`` ends the emulator with status ``(v << 1) | 1``. Test kernels use it to
  report a result even on a machine without Xen.
* **ACPI PM1a control, port 0x604** (QEMU q35/ICH9 PM base 0x600): writing
  SLP_EN (bit 13) with SLP_TYP 0 (S5, soft off) powers the machine off,
  status 0. ``outw(0x604, 0x2000)`` is the classic "power off under QEMU".
"""
from __future__ import annotations

import sys
from typing import BinaryIO, Callable

from ..records import make_record, open_record, uint


class ConsoleSink:
    """Where guest console bytes go: a stream, plus a record for tests."""

    def __init__(self, stream: BinaryIO | None = None, record: bool = True):
        self.stream = stream
        self.record = record
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        if self.record:
            self.data += data
        if self.stream is not None:
            self.stream.write(data)
            if b"\n" in data:
                self.stream.flush()

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def close(self) -> None:
        """Close the stream if the sink opened it (a ``file:PATH`` log)."""
        if self.owned and self.stream is not None:
            self.stream.close()
            self.stream = None

    owned = False                     # the sink opened its stream (log_sink's file:PATH)


def stdout_sink() -> ConsoleSink:
    return ConsoleSink(sys.stdout.buffer)


LOG_TARGETS = "stdout|stderr|file:PATH|none"


def log_sink(spec: str, option: str = "--xen-log") -> ConsoleSink:
    """A sink for ``stdout``, ``stderr``, ``file:PATH`` (created or truncated) or ``none``.

    ``none`` still records (tests read ``.data``) but prints nothing. A bad
    spec or a file that cannot be opened is a ValueError of one line.
    """
    if spec == "stdout":
        return ConsoleSink(sys.stdout.buffer)
    if spec == "stderr":
        return ConsoleSink(sys.stderr.buffer)
    if spec == "none":
        return ConsoleSink(None)
    if spec.startswith("file:") and len(spec) > 5:
        path = spec[5:]
        try:
            f = open(path, "wb")
        except OSError as e:
            raise ValueError(f"{option} {spec}: cannot open {path} ({e.strerror})") from None
        sink = ConsoleSink(f)
        sink.owned = True
        return sink
    raise ValueError(f"{option} {spec}: expected {LOG_TARGETS}")


class DebugCon:
    """Port 0xE9: write a byte to print it; reads return 0xE9."""

    PORT = 0xE9

    def __init__(self, sink: ConsoleSink):
        self.sink = sink

    def pio_read(self, offset: int, size: int) -> int:
        return 0xE9

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.sink.write(bytes([value & 0xFF]))


class DebugExit:
    """Port 0xF4: ``out 0xf4, v`` → exit status (v << 1) | 1."""

    PORT = 0xF4

    def __init__(self, shutdown: Callable[[str, int, str], None]):
        self.shutdown = shutdown

    def pio_read(self, offset: int, size: int) -> int:
        return 0xFFFFFFFF

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF if size == 1 else (0xFFFF if size == 2 else 0xFFFFFFFF)
        status = ((value << 1) | 1) & 0xFF
        self.shutdown("debug-exit", status, f"isa-debug-exit wrote {value:#x}")


class KeyboardControllerReset:
    """Port 0x64 command 0xFE: pull the CPU's reset line, the PC/AT way.

    The 8042 keyboard controller's output port bit 0 is wired to RESET#;
    command 0xFE pulses it. Linux uses it to reboot (and after a panic with
    ``panic=-1``), after the ACPI reset register and before port 0xCF9
    (handled by the PCI bus). The machine has no 8042 otherwise: reads
    float to 0xFF. xenicorn cannot restart a guest (as QEMU's
    ``-no-reboot``), so the reset ends the run with status 0; the console
    already shows why.
    """

    PORT = 0x64
    PULSE_RESET = 0xFE

    def __init__(self, shutdown: Callable[[str, int, str], None]):
        self.shutdown = shutdown

    def pio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == self.PULSE_RESET:
            self.shutdown("reboot", 0, "reset through the keyboard controller (port 0x64)")


class AcpiSleepRegisters:
    r"""The hardware-reduced ACPI sleep control (0x608) and status (0x609) registers.

    A hardware-reduced platform has no PM1 blocks; the FADT points to these
    two byte registers instead (ACPI 6.5 §4.8.3.7). To enter S5 the OS
    writes ``SLP_TYP << 2 | SLP_EN (0x20)`` to the control register, with
    ``SLP_TYP`` from the ``\_S5`` package in the DSDT (5 here); the status
    register's WAK_STS (bit 7) is write-1-to-clear and reads 0.
    """

    PORT = 0x608
    SLP_EN, SLP_TYP_S5 = 1 << 5, 5

    def __init__(self, shutdown: Callable[[str, int, str], None]):
        self.shutdown = shutdown

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and value & self.SLP_EN and (value >> 2) & 7 == self.SLP_TYP_S5:
            self.shutdown("poweroff", 0, "ACPI S5 (sleep control register)")


class AcpiPmEvent:
    """PM1a_EVT_BLK at 0x600 (ACPI 6.5 §4.8.3.1): PM1 status, then PM1 enable.

    A full (not hardware-reduced) ACPI platform has this block; the OS
    clears the status bits by writing ones and sets enable bits for the
    fixed events it wants as SCIs (power button, RTC alarm, ...). This
    machine raises no fixed events: status reads 0, enable is kept.
    """

    PORT = 0x600

    def __init__(self):
        self.enable = 0

    def pio_read(self, offset: int, size: int) -> int:
        value = self.enable << 16                  # bytes 0-1 status (0), 2-3 enable
        return (value >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            if offset + i == 2:
                self.enable = (self.enable & 0xFF00) | byte
            elif offset + i == 3:
                self.enable = (self.enable & 0x00FF) | byte << 8

    RECORD = ("acpi-pm1-event", 1)

    def save_record(self) -> dict:
        """PM1 enable (status always reads 0 here)."""
        return make_record(*self.RECORD, {"enable": self.enable})

    def check_record(self, record: dict) -> int:
        return uint(open_record(record, *self.RECORD), "enable", 16)

    def apply_record(self, prepared: int) -> None:
        self.enable = prepared


class AcpiPmTimer:
    """The ACPI power-management timer, PM_TMR_BLK at 0x60C (ACPI 6.5 §4.8.3.3).

    A free-running counter at 3.579545 MHz (the NTSC colour-burst crystal
    every PC has), read with a 32-bit IN; the FADT's TMR_VAL_EXT flag says
    all 32 bits count (otherwise 24). The OS cannot write it. It advances
    without interrupts and apart from the CPU, which is why Linux takes it
    (when there is no HPET) as the *watchdog* that checks the TSC
    (``clocksource: acpi_pm``): without it the watchdog is the jiffies
    counter, which advances only as timer interrupts are handled, and a
    vCPU that waited its turn behind another looked like a TSC running
    fast ("Marking TSC unstable"), leaving Linux on jiffies. Here it reads
    machine time, so under ``--clock deterministic`` it is deterministic
    too; it has no state of its own. (QEMU's ICH9 puts it at PM base + 8,
    where this machine keeps the hardware-reduced sleep registers; Xen's
    hvmloader at 0x1F48.)
    """

    PORT = 0x60C
    HZ = 3_579_545

    def __init__(self, now_ns: Callable[[], int]):
        self.now_ns = now_ns

    def pio_read(self, offset: int, size: int) -> int:
        ticks = self.now_ns() * self.HZ // 1_000_000_000
        return (ticks >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        """Read-only: writes are ignored, as on hardware."""


class AcpiPmControl:
    r"""PM1a_CNT at 0x604: SLP_EN with the S5 sleep type powers off.

    The sleep type that means S5 is whatever the DSDT's ``\_S5`` package
    says: 5 in xenicorn's DSDT (what Linux writes), 0 in QEMU's PIIX4
    DSDT (the classic ``outw(0x604, 0x2000)``); both are accepted.
    """

    PORT = 0x604
    SLP_EN = 1 << 13
    S5_TYPES = (0, 5)

    def __init__(self, shutdown: Callable[[str, int, str], None]):
        self.shutdown = shutdown
        self.value = 0

    def pio_read(self, offset: int, size: int) -> int:
        return self.value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.value = value & ~self.SLP_EN
        if value & self.SLP_EN and ((value >> 10) & 7) in self.S5_TYPES:
            self.shutdown("poweroff", 0, "ACPI S5 (PM1a_CNT SLP_EN)")

    RECORD = ("acpi-pm1-control", 1)

    def save_record(self) -> dict:
        """PM1a_CNT as last written; SLP_EN is write-only and reads 0."""
        return make_record(*self.RECORD, {"value": self.value})

    def check_record(self, record: dict) -> int:
        return uint(open_record(record, *self.RECORD), "value", 32, reserved=self.SLP_EN)   # a dword OUT reaches it too

    def apply_record(self, prepared: int) -> None:
        self.value = prepared
