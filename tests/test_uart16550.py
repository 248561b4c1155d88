"""16550A register behaviour, driven as Linux's 8250 driver probes and uses it."""
from xenicorn.devices.console import ConsoleSink
from xenicorn.devices.uart16550 import Uart16550

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


class Line:
    """The UART's interrupt line: records every level it drives."""

    def __init__(self):
        self.levels = []

    def set_level(self, level):
        self.levels.append(level)


def make():
    sink, line = ConsoleSink(None), Line()
    return Uart16550(sink, line), sink, line


def test_scratch_register_and_divisor_latch():
    u, _, _ = make()
    u.pio_write(SCR, 1, 0xA5)
    assert u.pio_read(SCR, 1) == 0xA5
    u.pio_write(LCR, 1, 0x83)                  # DLAB=1, 8N1
    u.pio_write(DLL, 1, 0x01)
    u.pio_write(DLM, 1, 0x00)                  # 115200 baud
    assert (u.pio_read(DLL, 1), u.pio_read(DLM, 1)) == (1, 0)
    u.pio_write(LCR, 1, 0x03)
    assert u.pio_read(IER, 1) == 0             # back to IER, not DLM


def test_fifo_detection_like_autoconfig():
    u, _, _ = make()
    assert u.pio_read(IIR, 1) & 0xC0 == 0      # FIFOs off
    u.pio_write(FCR, 1, 0xC7)
    assert u.pio_read(IIR, 1) & 0xC0 == 0xC0   # a 16550A answers 11


def test_loopback_returns_what_was_sent_and_mirrors_modem_lines():
    u, sink, _ = make()
    u.pio_write(MCR, 1, 0x10 | 0x0A)           # LOOP | RTS | OUT2
    u.pio_write(THR, 1, 0x5A)
    assert sink.data == b""                    # nothing leaves in loopback
    assert u.pio_read(LSR, 1) & 1
    assert u.pio_read(RBR, 1) == 0x5A
    assert u.pio_read(MSR, 1) & 0xF0 == 0x90   # RTS->CTS, OUT2->DCD


def test_transmit_reaches_the_sink_and_thr_stays_empty():
    u, sink, _ = make()
    for b in b"ok\n":
        u.pio_write(THR, 1, b)
    assert sink.data == b"ok\n"
    assert u.pio_read(LSR, 1) & 0x60 == 0x60


def test_thre_interrupt_on_enable_acknowledged_by_reading_iir():
    u, _, line = make()
    u.pio_write(MCR, 1, 0x08)                  # OUT2 lets the IRQ out
    u.pio_write(IER, 1, 0x02)
    assert line.levels == [True]
    assert u.pio_read(IIR, 1) & 0x0F == 0x02   # THR empty is the cause
    assert line.levels == [True, False]
    assert u.pio_read(IIR, 1) & 0x01           # nothing pending any more
    u.pio_write(THR, 1, ord("x"))              # sending re-arms THRE
    assert line.levels[-1] is True


def test_out2_gates_the_interrupt_line():
    u, _, line = make()
    u.pio_write(IER, 1, 0x01)
    u.feed(b"a")
    assert line.levels == []                   # OUT2 clear: line stays low
    u.pio_write(MCR, 1, 0x08)
    assert line.levels == [True]


def test_rx_trigger_level_and_timeout_cause():
    u, _, line = make()
    u.pio_write(MCR, 1, 0x08)
    u.pio_write(FCR, 1, 0x81)                  # FIFO on, trigger 8
    u.pio_write(IER, 1, 0x01)
    u.feed(b"1234")
    assert u.pio_read(IIR, 1) & 0x0F == 0x0C   # below trigger: character timeout
    u.feed(b"5678")
    assert u.pio_read(IIR, 1) & 0x0F == 0x04   # trigger level reached
    assert bytes(u.pio_read(RBR, 1) for _ in range(8)) == b"12345678"
    assert not u.pio_read(LSR, 1) & 1
    assert line.levels == [True, False]


def test_overrun_sets_oe_and_line_status_interrupt():
    u, _, line = make()
    u.pio_write(MCR, 1, 0x08)
    u.pio_write(IER, 1, 0x04)
    u.feed(b"ab")                              # no FIFO: one-byte holding register
    assert u.pio_read(IIR, 1) & 0x0F == 0x06
    assert u.pio_read(LSR, 1) & 0x02
    assert not u.pio_read(LSR, 1) & 0x02       # OE clears on read


def test_save_restore_round_trip():
    u, _, _ = make()
    u.pio_write(FCR, 1, 0xC7)
    u.pio_write(MCR, 1, 0x0B)
    u.pio_write(IER, 1, 0x05)
    u.feed(b"xyz")
    saved = u.save()
    v, _, line = make()
    v.restore(saved)
    assert v.save() == saved
    assert line.levels == [True] and v.pio_read(RBR, 1) == ord("x")
