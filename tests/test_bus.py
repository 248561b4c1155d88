"""Port and MMIO bus decoding: ranges, offsets, conflicts, floating reads."""
import pytest

from xenicorn.devices.bus import BusConflict, MmioBus, PioBus


class Recorder:
    """A device that logs every access it is handed."""

    def __init__(self):
        self.log = []

    def pio_read(self, offset, size):
        self.log.append(("r", offset, size))
        return 0x1234_5678

    def pio_write(self, offset, size, value):
        self.log.append(("w", offset, size, value))

    mmio_read = pio_read
    mmio_write = pio_write


def test_device_sees_offsets_not_addresses():
    bus, dev = PioBus("pio"), Recorder()
    bus.register(0x3F8, 8, dev)
    bus.write(0x3FB, 1, 0x83)
    assert bus.read(0x3FD, 1) == 0x78          # truncated to the access size
    assert dev.log == [("w", 3, 1, 0x83), ("r", 5, 1)]


def test_unclaimed_reads_float_high_and_are_reported_once():
    reports = []
    bus = PioBus("pio", lambda *a: reports.append(a))
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 2) == 0xFFFF
    assert bus.read(0x84, 4) == 0xFFFFFFFF
    bus.write(0x80, 1, 0x55)                    # dropped
    assert [r[:2] for r in reports] == [("read", 0x80), ("read", 0x84)]


def test_overlapping_registration_is_a_wiring_error():
    bus = MmioBus("mmio")
    bus.register(0xFEC00000, 0x1000, Recorder())
    with pytest.raises(BusConflict):
        bus.register(0xFEC00800, 0x10, Recorder())


def test_remap_moves_a_device_like_a_pci_bar():
    bus, dev = MmioBus("mmio"), Recorder()
    bus.register(0xF0000000, 0x100, dev)
    assert bus.read(0xF0000004, 4) == 0x12345678
    bus.remap(dev, 0xF1000000, 0x100)
    assert bus.read(0xF0000004, 4) == 0xFFFFFFFF
    assert bus.read(0xF1000008, 4) == 0x12345678
    assert dev.log == [("r", 4, 4), ("r", 8, 4)]
