"""PCI configuration mechanism #1, BAR sizing and decode, INTx swizzling."""
import pytest

from xenicorn.devices.pci import PciBus, PciFunction, Piix3Isa, host_bridge
from xenicorn.devices.xen_platform import XenPlatformDevice, MAGIC


def cfg_read(bus, slot, fn, reg, size=4):
    bus.pio_write(0, 4, 0x80000000 | (slot << 11) | (fn << 8) | (reg & 0xFC))
    return bus.pio_read(4 + (reg & 3), size)


def cfg_write(bus, slot, fn, reg, value, size=4):
    bus.pio_write(0, 4, 0x80000000 | (slot << 11) | (fn << 8) | (reg & 0xFC))
    bus.pio_write(4 + (reg & 3), size, value)


@pytest.fixture
def bus():
    b = PciBus()
    b.add(0, 0, host_bridge())
    b.add(1, 0, Piix3Isa())
    b.add(2, 0, XenPlatformDevice())
    return b


def test_enumeration_finds_the_chipset_and_the_xen_platform_device(bus):
    assert cfg_read(bus, 0, 0, 0) == 0x1237_8086
    assert cfg_read(bus, 1, 0, 0) == 0x7000_8086
    assert cfg_read(bus, 2, 0, 0) == 0x0001_5853
    assert cfg_read(bus, 2, 0, 0x08) >> 8 == 0xFF8000                  # class other, subclass 0x80
    assert cfg_read(bus, 2, 0, 0x08) & 0xFF == 1                       # revision
    assert cfg_read(bus, 2, 0, 0x2C) == 0x0001_5853                    # subsystem
    assert cfg_read(bus, 2, 0, 0x3D, 1) == 1                           # INTA
    assert cfg_read(bus, 5, 0, 0) == 0xFFFFFFFF                        # empty slot: master abort
    assert cfg_read(bus, 1, 0, 0x0E, 1) == 0x80                        # PIIX3 is multi-function


def test_config_data_is_ignored_without_the_enable_bit(bus):
    bus.pio_write(0, 4, (2 << 11))
    assert bus.pio_read(4, 4) == 0xFFFFFFFF


def test_bar_sizing_reports_size_and_type(bus):
    cfg_write(bus, 2, 0, 0x10, 0xFFFFFFFF)
    assert cfg_read(bus, 2, 0, 0x10) == 0x0000FF01                     # 256 bytes of I/O
    cfg_write(bus, 2, 0, 0x14, 0xFFFFFFFF)
    assert cfg_read(bus, 2, 0, 0x14) == 0xFF000008                     # 16 MiB prefetchable memory
    cfg_write(bus, 2, 0, 0x18, 0xFFFFFFFF)
    assert cfg_read(bus, 2, 0, 0x18) == 0                              # no BAR2


def test_header_fields_are_read_only(bus):
    cfg_write(bus, 2, 0, 0x00, 0x12345678)
    assert cfg_read(bus, 2, 0, 0) == 0x0001_5853
    cfg_write(bus, 2, 0, 0x3C, 11, 1)                                  # interrupt line is writable
    assert cfg_read(bus, 2, 0, 0x3C, 1) == 11


def test_intx_swizzle_drives_pirq_lines_shared_by_devices():
    seen = []
    bus = PciBus(pirq_sink=lambda pirq, level: seen.append((pirq, level)))
    a = bus.add(2, 0, PciFunction(0x1234, 1, 0xFF0000, pin=1))         # slot 2 INTA -> PIRQB
    b = bus.add(3, 0, PciFunction(0x1234, 2, 0xFF0000, pin=4))         # slot 3 INTD -> PIRQB too
    c = bus.add(4, 0, PciFunction(0x1234, 3, 0xFF0000, pin=1))         # slot 4 INTA -> PIRQD
    a.set_irq(True)
    b.set_irq(True)
    c.set_irq(True)
    assert seen == [(1, True), (3, True)]
    a.set_irq(False)
    assert bus.pirq_levels[1]                                          # b still holds PIRQB high
    b.set_irq(False)
    assert seen[-1] == (1, False)


def test_intx_disable_in_command_register_masks_the_pin():
    seen = []
    bus = PciBus(pirq_sink=lambda pirq, level: seen.append((pirq, level)))
    dev = bus.add(2, 0, PciFunction(0x1234, 1, 0xFF0000, pin=1))
    dev.set_irq(True)
    assert cfg_read(bus, 2, 0, 0x06, 2) & (1 << 3)                     # status: interrupt pending
    cfg_write(bus, 2, 0, 0x04, 1 << 10, 2)
    assert seen == [(1, True), (1, False)]
    cfg_write(bus, 2, 0, 0x04, 0, 2)
    assert seen[-1] == (1, True)


def test_piix3_pirq_route_registers():
    piix = Piix3Isa()
    assert piix.pirq_route(0) is None                                  # 0x80: not routed
    changed = []
    piix.on_route_change = lambda: changed.append(True)
    piix.config_write(0x61, 1, 11)
    assert piix.pirq_route(1) == 11 and changed


def test_xen_platform_fixed_ports_and_log():
    log = []
    dev = XenPlatformDevice(log=log.append)
    ports = dev.fixed_ports
    assert ports.pio_read(0, 2) == MAGIC
    assert ports.pio_read(2, 1) == 1
    ports.pio_write(0, 2, 3)
    assert dev.platform_state.unplugged == 3
    for ch in b"hi\n":
        ports.pio_write(2, 1, ch)
    assert log[-1] == "xen-platform: hi"


def test_machine_places_the_xen_platform_bars_like_firmware(machine):
    bus = machine.pci
    assert cfg_read(bus, 2, 0, 0) == 0x0001_5853
    assert cfg_read(bus, 2, 0, 0x10) == 0xC001 and cfg_read(bus, 2, 0, 0x14) == 0xF0000008
    assert machine.pio.read(0xC000, 1) == 0                            # flags byte, decoded
    assert machine.pio.read(0x10, 2) == MAGIC                          # fixed unplug ports


def test_bars_move_and_stop_decoding_with_the_command_register(machine):
    bus = machine.pci
    cfg_write(bus, 2, 0, 0x10, 0xC101)                                 # move the BAR
    assert machine.pio.read(0xC000, 1) == 0xFF
    assert machine.pio.read(0xC100, 1) == 0
    cfg_write(bus, 2, 0, 0x04, 0, 2)                                   # disable I/O decode
    assert machine.pio.read(0xC100, 1) == 0xFF
    assert machine.xen_platform.save()["config"][:8] == "53580100"
