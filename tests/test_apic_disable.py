"""The local APIC's global disable: IA32_APIC_BASE bit 11 (SDM vol. 3 §10.4.3).

``apicoff32``/``apicoff64`` show it from inside a guest (CPUID, the MMIO page,
IPIs, the power-up state after re-enabling); the unit tests below pin down
the device model's side: nothing accepted or presented, the 8259's ExtINT
included, and the state carried by snapshot records.
"""
import pytest

from xenicorn.devices.i8259 import PicPair
from xenicorn.devices.lapic import Lapic

from conftest import deterministic_clock
from test_firmware import run


@pytest.mark.parametrize("name", ["apicoff32", "apicoff64"])
def test_global_disable_as_a_guest_sees_it(name):
    machine, _, status, text = run(name)
    assert status == 0 and text.rstrip().endswith("Test result: SUCCESS"), text
    assert "FAIL" not in text
    for line in ("ok CPUID.1:EDX.APIC reads 0 while disabled",
                 "ok the APIC page reads all ones (version 0xffffffff, SVR 0xffffffff)",
                 "ok power-up state: LVT timer 0x10000 and LINT0 0x10000 masked"):
        assert line in text
    lapic = machine.lapic
    assert lapic.hw_enabled and lapic.enabled and lapic.state.isr == 0


def test_a_globally_disabled_apic_takes_nothing_and_hides_its_page():
    clock, _ = deterministic_clock()
    pic = PicPair()
    apic = Lapic(clock, pic=pic)
    apic.mmio_write(0xF0, 4, 0x1FF)
    m = pic.master_ports
    for v in (0x11, 0x20, 0x04, 0x01):                        # 8259 at 0x20, IRQ 1 raised
        m.pio_write(0 if v == 0x11 else 1, 1, v)
    m.pio_write(1, 1, 0)
    pic.set_irq(1, True)
    assert apic.pending()
    apic.set_hw_enabled(False)
    assert not apic.pending() and apic.acknowledge() is None     # the ExtINT wire too (Xen: vlapic_accept_pic_intr)
    apic.accept(0x40)
    assert apic.state.irr == 0
    assert apic.mmio_read(0x30, 4) == 0xFFFFFFFF and apic.mmio_read(0x30, 2) == 0xFFFF
    apic.mmio_write(0x80, 4, 0x30)                              # not the APIC's page: dropped
    apic.raise_nmi()
    assert apic.nmi_pending                                     # NMIs still arrive
    apic.set_hw_enabled(True)
    assert apic.state.tpr == 0 and apic.state.svr == 0xFF and apic.nmi_pending
    assert apic.mmio_read(0x350, 4) == 0x10000                  # LINT0 masked at power-up


def test_the_global_enable_is_in_the_snapshot_record():
    clock, _ = deterministic_clock()
    apic = Lapic(clock)
    apic.set_hw_enabled(False)
    record = apic.save_record()
    assert record["state"]["hw_enabled"] is False
    other = Lapic(clock)
    other.apply_record(other.check_record(record))
    assert not other.hw_enabled and other.mmio_read(0x30, 4) == 0xFFFFFFFF
    del record["state"]["hw_enabled"]                           # a record from before the field: enabled
    other.apply_record(other.check_record(record))
    assert other.hw_enabled
