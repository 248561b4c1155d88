"""16550A UART at 0x3F8 (COM1). Transmit path only so far; see the full model below."""
from __future__ import annotations


class Uart16550:
    """Minimal transmitter: THR writes go to the console, LSR says 'empty'."""

    def __init__(self, sink):
        self.sink = sink

    def pio_read(self, offset: int, size: int) -> int:
        return 0x60 if offset == 5 else 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.sink.write(bytes([value & 0xFF]))


def attach_serial(machine) -> None:
    if machine.config.serial == "none":
        return
    machine.pio.register(0x3F8, 8, Uart16550(machine.console))
