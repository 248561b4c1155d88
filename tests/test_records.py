"""Each component's snapshot record on its own: save -> check -> apply -> save, and refusals.

A record must survive a round trip into a fresh device unchanged, and the
device must then behave as the original does (the same vector, the same
timer firing at the same time). A record describing a state the chip
cannot be in is refused by ``check_record`` with one line, and the device
it was offered to is left as it was. Whole machines (vCPU, wiring, Xen)
are covered in test_snapshot.py.
"""
import json

import pytest

from xenicorn.devices.bus import PioBus
from xenicorn.devices.console import AcpiPmControl, AcpiPmEvent, ConsoleSink
from xenicorn.devices.i8259 import PicPair
from xenicorn.devices.ioapic import Ioapic
from xenicorn.devices.irq import IrqLine
from xenicorn.devices.lapic import Lapic
from xenicorn.devices.pci import BAR_IO, BAR_MEM32, PciBus, PciFunction, Piix3Isa, host_bridge
from xenicorn.devices.pit8254 import Pit8254, ticks_to_ns
from xenicorn.devices.rtc import Rtc
from xenicorn.devices.uart16550 import Uart16550
from xenicorn.devices.xen_platform import XenPlatformDevice
from xenicorn.records import RecordError, make_record
from conftest import deterministic_clock
from test_i8259 import linux_init


def round_trip(a, b) -> dict:
    """``a``'s record into ``b``; both must then save the same JSON record."""
    record = a.save_record()
    assert json.loads(json.dumps(record)) == record           # plain JSON
    b.apply_record(b.check_record(record))
    assert b.save_record() == record
    return record


def refuses(device, record: dict, words: str) -> None:
    """``check_record`` refuses with one line containing ``words``, and changes nothing."""
    before = device.save_record()
    with pytest.raises(RecordError) as e:
        device.check_record(record)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert device.save_record() == before


def changed(record: dict, **fields) -> dict:
    """A copy of ``record`` with some state fields replaced."""
    return make_record(record["type"], record["version"], {**record["state"], **fields})


# -- interrupt controllers --------------------------------------------------------------
def test_8259_pair_record_round_trips_and_refuses_elcr_the_piix_lacks():
    a, b = PicPair(), PicPair()
    linux_init(a)
    a.elcr_ports.pio_write(0, 2, 0x0C20)                  # IRQ 5, 10 and 11 level-triggered
    a.set_irq(10, True)
    rec = round_trip(a, b)
    assert b.pending() and b.int_level and b.acknowledge() == a.acknowledge() == 0x2A
    master = rec["state"]["master"]
    refuses(b, changed(rec, master={**master, "elcr": 0x21}), "ELCR makes IRQ 0 level-triggered")
    refuses(b, changed(rec, master={**master, "elcr": 0x04}), "ELCR makes IRQ 2 level-triggered")
    refuses(b, changed(rec, slave={**rec["state"]["slave"], "elcr": 0x01}), "ELCR makes IRQ 8 level")
    refuses(b, changed(rec, master={**master, "vector_base": 0x24}), "ICW2 vector base 0x24 has bits 2:0 set")
    refuses(b, changed(rec, master={**master, "init_step": 4, "needs_icw4": False}), "step 4 cannot follow")
    refuses(b, changed(rec, master={**master, "auto_eoi": 1}), "auto_eoi is not true/false")
    refuses(b, make_record("i8259-pair", 2, rec["state"]), "i8259-pair record version 2")


def ioapic_rig():
    clock, insns = deterministic_clock()
    apic = Lapic(clock)
    io = Ioapic(apic)
    apic.ioapics.append(io)
    apic.mmio_write(0xF0, 4, 0x1FF)
    return apic, io, clock, insns


def test_ioapic_record_round_trips_remote_irr_and_refuses_entries_it_cannot_hold():
    apic, a, *_ = ioapic_rig()
    _, b, *_ = ioapic_rig()
    a.mmio_write(0x00, 4, 0x10 + 2 * 9)
    a.mmio_write(0x10, 4, 0xA000 | 0x39)                # pin 9: level, active low, vector 0x39
    a.set_irq(9, True)                                   # delivered: Remote IRR set
    rec = round_trip(a, b)
    assert rec["state"]["redirtbl"][9] & (1 << 14) and b.deliveries == a.deliveries == 1
    table = rec["state"]["redirtbl"]
    refuses(b, changed(rec, redirtbl=table[:9] + [table[9] | 1 << 12] + table[10:]), "entry 9")   # delivery status
    refuses(b, changed(rec, redirtbl=table[:2] + [1 << 14] + table[3:]), "entry 2")      # Remote IRR on an edge pin
    refuses(b, changed(rec, redirtbl=table[:4] + [0x10000 | 1 << 33] + table[5:]), "entry 4")   # bits 55:32
    refuses(b, changed(rec, redirtbl=table[:23]), "with 23 redirection entries")
    refuses(b, changed(rec, irr=1 << 48), "irr 0x1000000000000 out of range")


def test_lapic_record_round_trips_its_timer_and_refuses_reserved_lvt_bits():
    a, _, clock_a, insns_a = ioapic_rig()
    b, _, clock_b, insns_b = ioapic_rig()
    a.mmio_write(0x3E0, 4, 0xB)                          # divide by 1
    a.mmio_write(0x320, 4, (1 << 17) | 0xEF)             # periodic, vector 0xEF
    a.mmio_write(0x380, 4, 1000)
    a.accept(0x51, level=True)
    insns_a.n = insns_b.n = 2500
    clock_a.run_due()                                    # two periods gone: the third is armed
    clock_b.apply_record(clock_b.check_record(clock_a.save_record()))   # the clock first, as a load does
    rec = round_trip(a, b)
    assert rec["state"]["timers"] == {"lapic-timer": [3000, a.timer.seq]} and b.timer_fires == 2
    insns_a.n = insns_b.n = 3000
    clock_a.run_due()
    clock_b.run_due()
    assert b.timer_fires == a.timer_fires == 3 and b.save_record() == a.save_record()
    lvt = rec["state"]["lvt"]
    refuses(b, changed(rec, lvt=[lvt[0] | 1 << 12] + lvt[1:]), "LVT entry timer")      # delivery status
    refuses(b, changed(rec, lvt=lvt[:5] + [lvt[5] | 0x700]), "LVT entry error")       # no delivery mode
    refuses(b, changed(rec, lvt=lvt[:5]), "with 5 LVT entries")
    refuses(b, changed(rec, isr=1 << 15), "isr 0x8000 sets reserved bits")             # vectors 0-15
    refuses(b, changed(rec, svr=0x2FF), "svr 0x2ff sets reserved bits")
    refuses(b, changed(rec, initial_count=0), "timer armed with an initial count of 0")
    refuses(b, changed(rec, timers={"pit": [1, 2]}), "timer 'pit' is not one this component arms")


# -- timers and the serial port ---------------------------------------------------------------
def pit_rig():
    clock, insns = deterministic_clock()
    line = IrqLine("IRQ0")
    return Pit8254(clock, irq0=line), clock, insns, line


def test_pit_record_round_trips_the_next_edge_and_refuses_modes_it_lacks():
    a, clock_a, insns_a, line_a = pit_rig()
    b, clock_b, insns_b, line_b = pit_rig()
    a.pio_write(3, 1, 0x34)                              # counter 0: lo/hi, mode 2
    a.pio_write(0, 1, 0x9C)
    a.pio_write(0, 1, 0x2E)
    a.speaker_port.pio_write(0, 1, 3)                    # gate 2 and the speaker on
    a.speaker_port.pio_read(0, 1)
    a.pio_write(3, 1, 0x00)                              # latch counter 0, half read
    a.pio_read(0, 1)
    insns_a.n = insns_b.n = 25_000_000
    clock_a.run_due()
    clock_b.apply_record(clock_b.check_record(clock_a.save_record()))
    rec = round_trip(a, b)
    assert set(rec["state"]["timers"]) == {"pit"} and b.pio_read(0, 1) == a.pio_read(0, 1)
    insns_a.n = insns_b.n = 50_000_000
    clock_a.run_due()
    clock_b.run_due()
    assert b.irq_edges == a.irq_edges > 2 and b.save_record() == a.save_record()
    assert line_b.edges == b.irq_edges - rec["state"]["irq_edges"]     # the line was not re-driven
    counters = rec["state"]["counters"]
    refuses(b, changed(rec, counters=[{**counters[0], "mode": 7}] + counters[1:]), "counter 0 mode 7")
    refuses(b, changed(rec, counters=counters[:1] + [{**counters[1], "latched": 0x10000}] + counters[2:]),
            "latched 0x10000 out of range")
    refuses(b, changed(rec, speaker=4), "speaker 4 out of range")
    refuses(b, changed(rec, timers={"pit": [ticks_to_ns(5), -1]}), "timer pit sequence -1")


def test_uart_record_round_trips_and_derives_its_line_level():
    a, b = Uart16550(ConsoleSink(None), IrqLine("a")), Uart16550(ConsoleSink(None), IrqLine("b"))
    a.pio_write(2, 1, 0xC7)                              # FIFOs on, trigger 14
    a.pio_write(4, 1, 0x0B)                              # OUT2
    a.pio_write(1, 1, 0x01)                              # RX data interrupts
    a.feed(b"hello")
    rec = round_trip(a, b)
    assert b.irq_level and not b.irq.level               # the level is the UART's; the wire is the machine's
    assert bytes(b.pio_read(0, 1) for _ in range(5)) == b"hello"
    refuses(b, changed(rec, rx=list(range(17)), lsr=0x61), "rx is not a list of at most 16 items")
    refuses(b, changed(rec, rx=[]), "line status 0x61 with 0 bytes received")
    refuses(b, changed(rec, fcr=0xC7), "fcr 0xc7 sets reserved bits 0x6")
    refuses(b, changed(rec, mcr=0x20), "mcr 32 out of range")


def test_rtc_record_round_trips_and_refuses_a_time_gmtime_cannot_show():
    clock, insns = deterministic_clock()
    a, b = Rtc(clock.now_ns, deterministic=True), Rtc(clock.now_ns)
    a.pio_write(0, 1, 0x0B)
    a.pio_write(1, 1, 0x82)                              # SET: frozen while software writes
    rec = round_trip(a, b)
    assert b.frozen == a.frozen is not None and b.seconds() == a.seconds()
    refuses(b, changed(rec, base=1 << 60), "RTC time base")
    refuses(b, changed(rec, frozen=None), "SET without one")
    refuses(b, changed(rec, index=0x80), "index 128 out of range")


# -- PCI, ACPI, buses, clock ------------------------------------------------------------------
class Dummy:
    """A device that answers nothing, to fill a bus range."""

    def pio_read(self, offset, size):
        return 0

    def pio_write(self, offset, size, value):
        pass


def pci_rig():
    bus = PciBus()
    bus.add(0, 0, host_bridge())
    piix = bus.add(1, 0, Piix3Isa())
    xp = bus.add(2, 0, XenPlatformDevice())
    nic = PciFunction(0x8086, 0x100E, 0x020000, pin=1)
    nic.add_bar(0, BAR_MEM32, 0x20000, Dummy())
    nic.add_bar(1, BAR_IO, 0x40, Dummy())
    bus.add(3, 0, nic)
    return bus, piix, xp, nic


def test_pci_record_round_trips_functions_routing_and_xen_platform():
    a, piix, xp, nic = pci_rig()
    b, *_ = pci_rig()
    piix.config_write(0x60, 1, 10)                       # PIRQA -> IRQ 10
    nic.config_write(0x10, 4, 0xFEBC0000)
    nic.config_write(0x14, 4, 0xC041)
    nic.config_write(0x04, 2, 0x0403)                    # I/O + memory decode, INTx disabled
    nic.set_irq(True)
    xp.fixed_ports.pio_write(0, 2, 3)                    # unplug disks and NICs
    xp.log_byte(ord("x"))
    a.set_extra_intx(0x10, 1, True)
    a.pio_write(0, 4, 0x80001810)
    rec = round_trip(a, b)
    assert b.pirq_levels == a.pirq_levels == [False, True, False, False]   # INTx off; Xen's on slot 2 -> PIRQB
    assert b.functions[0x10].platform_state == xp.platform_state and b.functions[8].pirq_route(0) == 10
    functions = rec["state"]["functions"]
    nic_rec = functions[3][1]

    def with_nic_config(patch):
        cfg = bytearray.fromhex(nic_rec["state"]["config"])
        patch(cfg)
        return changed(rec, functions=functions[:3] + [[0x18, changed(nic_rec, config=cfg.hex())]])

    refuses(b, with_nic_config(lambda c: c.__setitem__(slice(0x10, 0x14), (0xFEBC8000).to_bytes(4, "little"))),
            "BAR0 0xfebc8000 is not an address this BAR can hold")             # 128 KiB BAR, 32 KiB aligned
    refuses(b, with_nic_config(lambda c: c.__setitem__(slice(0x14, 0x18), (0x1C040).to_bytes(4, "little"))),
            "BAR1 0x1c040")                                                    # I/O BAR: no I/O type bit, > 64K
    refuses(b, with_nic_config(lambda c: c.__setitem__(0x3D, 2)), "byte 0x3d is 0x02, this device's reads 0x01")
    refuses(b, with_nic_config(lambda c: c.__setitem__(6, 0)), "PCI 03.0 interrupt status bit and INTx level True")
    refuses(b, changed(rec, functions=functions[:3]), "PCI functions [0, 8, 16], this bus has [0, 8, 16, 24]")
    xp_rec = functions[2][1]
    refuses(b, changed(rec, functions=functions[:2] + [[0x10, changed(xp_rec, platform={
        **xp_rec["state"]["platform"], "log_line": "\u20ac"})]] + functions[3:]), "log line holds characters")
    refuses(b, changed(rec, functions=functions[:2] + [[0x10, changed(nic_rec)]] + functions[3:]),
            "a 'pci-function' record where a 'xen-platform' record belongs")


def test_acpi_pm_registers_bus_reports_and_clock_round_trip():
    ev, ctl = AcpiPmEvent(), AcpiPmControl(lambda *a: None)
    ev.pio_write(2, 2, 0x0121)
    ctl.pio_write(0, 2, 0x1400 | 0x2000)                 # SLP_TYP 5, SLP_EN: powers off, reads back without
    round_trip(ev, AcpiPmEvent())
    rec = round_trip(ctl, AcpiPmControl(lambda *a: None))
    assert rec["state"]["value"] == 0x1400
    refuses(ctl, changed(rec, value=0x3400), "value 0x3400 sets reserved bits 0x2000")
    refuses(ev, make_record("acpi-pm1-event", 1, {"enable": 1 << 16}), "enable 0x10000 out of range")
    bus = PioBus("pio", lambda *a: None)
    bus.read(0x80, 1)
    bus.write(0x3F8, 1, 0)
    assert round_trip(bus, PioBus("pio"))["state"]["reported"] == [0x80, 0x3F8]
    refuses(bus, make_record("bus", 1, {"reported": [-1]}), "reported address -1 out of range")
    a, insns_a = deterministic_clock()
    b, insns_b = deterministic_clock()
    insns_a.n = 5000
    a.charge(700)
    a.add_timer(9000, lambda: None, "gone after a load")  # owners re-arm their timers; the clock drops all
    b.add_timer(10, lambda: None, "dropped")
    b.apply_record(b.check_record(a.save_record()))
    insns_b.n = 5000
    assert b.now_ns() == a.now_ns() == 5700 and b.pending() == []
    assert b.add_timer(1, lambda: None).seq == a.add_timer(1, lambda: None).seq
    refuses(b, changed(a.save_record(), mode="host"), "clock mode 'host', this machine's is 'deterministic'")
    refuses(b, changed(a.save_record(), skipped_ns=-5), "skipped_ns -5 out of range")
