"""8254 PIT on a deterministic clock: modes, latching, read-back, port 0x61."""
from xenicorn.devices.irq import IrqLine
from xenicorn.devices.pit8254 import PIT_HZ, Pit8254, ticks_to_ns
from conftest import deterministic_clock


def rig():
    clock, insns = deterministic_clock()
    line = IrqLine("IRQ0")
    pit = Pit8254(clock, irq0=line)
    return pit, clock, insns, line


def advance(clock, insns, ns):
    insns.n += ns
    clock.run_due()


def test_mode2_rate_generator_ticks_like_linux_init_8253():
    pit, clock, insns, line = rig()
    latch = (PIT_HZ + 50) // 100                # HZ=100
    pit.pio_write(3, 1, 0x34)                   # counter 0, lo/hi, mode 2
    pit.pio_write(0, 1, latch & 0xFF)
    pit.pio_write(0, 1, latch >> 8)
    for _ in range(10):
        advance(clock, insns, 10_000_000)       # 10 ms
    assert pit.irq_edges in (9, 10) and line.edges == pit.irq_edges


def test_mode0_fires_once_and_latch_reads_the_count():
    pit, clock, insns, _ = rig()
    pit.pio_write(3, 1, 0x30)                   # counter 0, lo/hi, mode 0
    pit.pio_write(0, 1, 0x00)
    pit.pio_write(0, 1, 0x10)                   # 4096 ticks
    insns.n += ticks_to_ns(1000) + 1
    pit.pio_write(3, 1, 0x00)                   # latch counter 0
    v = pit.pio_read(0, 1) | pit.pio_read(0, 1) << 8
    assert 3090 <= v <= 3096
    for _ in range(5):
        advance(clock, insns, ticks_to_ns(4096))
    assert pit.irq_edges == 1


def test_mode3_square_wave_and_readback_status():
    pit, clock, insns, _ = rig()
    pit.pio_write(3, 1, 0x36)                   # mode 3
    pit.pio_write(0, 1, 100)
    pit.pio_write(0, 1, 0)
    pit.pio_write(3, 1, 0xE2)                   # read-back: status only, counter 0
    status = pit.pio_read(0, 1)
    assert status & 0x3F == 0x36 and status & 0x80
    for _ in range(10):
        advance(clock, insns, ticks_to_ns(100))
    assert 9 <= pit.irq_edges <= 10


def test_channel2_gate_and_out2_on_port_0x61_like_pit_calibrate():
    pit, clock, insns, _ = rig()
    pit.speaker_port.pio_write(0, 1, 0x00)      # gate low
    pit.pio_write(3, 1, 0xB0)                   # counter 2, lo/hi, mode 0
    pit.pio_write(2, 1, 0xFF)
    pit.pio_write(2, 1, 0xFF)
    pit.speaker_port.pio_write(0, 1, 0x01)      # gate high: counting starts
    assert not pit.speaker_port.pio_read(0, 1) & 0x20
    insns.n += ticks_to_ns(0x10000)
    assert pit.speaker_port.pio_read(0, 1) & 0x20   # OUT2 high at terminal count


def test_save_restore_round_trip():
    pit, *_ = rig()
    pit.pio_write(3, 1, 0x34)
    pit.pio_write(0, 1, 0x9C)
    pit.pio_write(0, 1, 0x2E)
    saved = pit.save()
    other, *_ = rig()
    other.restore(saved)
    assert other.save() == saved
