"""IOAPIC and local APIC, driven as Linux drives them, with a deterministic clock."""
from xenicorn.devices.i8259 import PicPair
from xenicorn.devices.ioapic import Ioapic, RTE_REMOTE_IRR
from xenicorn.devices.lapic import Lapic
from conftest import deterministic_clock


def rig():
    clock, insns = deterministic_clock()
    kicks = []
    apic = Lapic(clock, notify=lambda: kicks.append(1))
    io = Ioapic(apic)
    apic.ioapics.append(io)
    apic.mmio_write(0xF0, 4, 0x1FF)                       # software enable, spurious 0xFF
    return apic, io, clock, insns, kicks


def write_rte(io, pin, low, high=0):
    io.mmio_write(0x00, 4, 0x10 + 2 * pin + 1)
    io.mmio_write(0x10, 4, high)
    io.mmio_write(0x00, 4, 0x10 + 2 * pin)
    io.mmio_write(0x10, 4, low)


def read_rte(io, pin):
    io.mmio_write(0x00, 4, 0x10 + 2 * pin)
    return io.mmio_read(0x10, 4)


def test_ioapic_id_and_version():
    io = Ioapic()
    io.mmio_write(0x00, 4, 1)
    assert io.mmio_read(0x10, 4) == 0x002F0020                 # 48 pins, as Xen's vIOAPIC
    assert read_rte(io, 5) & (1 << 16)                    # pins start masked


def test_level_pin_redelivers_after_eoi_when_still_high():
    apic, io, *_ = rig()
    eois = []
    io.on_eoi.append(eois.append)
    write_rte(io, 17, 0x8000 | 0x31)                      # level, fixed, vector 0x31, dest 0
    io.set_irq(17, True)
    assert apic.pending() and apic.acknowledge() == 0x31
    assert read_rte(io, 17) & RTE_REMOTE_IRR
    io.set_irq(17, True)                                  # still high: Remote IRR holds it
    assert not apic.pending()
    apic.mmio_write(0xB0, 4, 0)                           # EOI -> broadcast (TMR says level)
    assert eois == [17]
    assert apic.pending() and apic.acknowledge() == 0x31  # redelivered: still asserted
    io.set_irq(17, False)
    apic.mmio_write(0xB0, 4, 0)
    assert not apic.pending() and not read_rte(io, 17) & RTE_REMOTE_IRR


def test_edge_pin_delivers_on_rising_edges_only_and_masked_level_waits():
    apic, io, *_ = rig()
    write_rte(io, 2, 0x30)                                # edge
    io.set_irq(2, True)
    io.set_irq(2, True)
    assert apic.acknowledge() == 0x30 and not apic.pending()
    apic.mmio_write(0xB0, 4, 0)
    write_rte(io, 9, 0x18000 | 0x39)                      # level, masked
    io.set_irq(9, True)
    assert not apic.pending()
    write_rte(io, 9, 0x8000 | 0x39)                       # unmask while high: delivers
    assert apic.acknowledge() == 0x39


def test_eoi_register_clears_remote_irr():
    apic, io, *_ = rig()
    write_rte(io, 4, 0x8000 | 0x44)
    io.set_irq(4, True)
    apic.acknowledge()
    io.set_irq(4, False)
    io.mmio_write(0x40, 4, 0x44)
    assert not read_rte(io, 4) & RTE_REMOTE_IRR


def test_lapic_priorities_tpr_ppr_and_spurious():
    apic, *_ = rig()
    apic.accept(0x41)
    apic.accept(0x82)
    assert apic.acknowledge() == 0x82
    assert apic.mmio_read(0xA0, 4) == 0x80                # PPR = class of ISR
    assert not apic.pending()                             # 0x41 is lower than what runs
    apic.mmio_write(0xB0, 4, 0)
    apic.mmio_write(0x80, 4, 0x50)                        # TPR holds back class <= 5
    assert not apic.pending()
    apic.mmio_write(0x80, 4, 0x30)
    assert apic.acknowledge() == 0x41
    assert apic.mmio_read(0x100 + 0x20, 4) == 1 << 1      # ISR word 2 bit 1 = vector 0x41


def test_software_disabled_apic_masks_lvts_and_drops_interrupts():
    apic, *_ = rig()
    apic.mmio_write(0xF0, 4, 0xFF)
    assert apic.mmio_read(0x350, 4) & (1 << 16)
    apic.accept(0x50)
    assert not apic.pending()


def test_timer_one_shot_and_periodic_with_divider():
    apic, io, clock, insns, _ = rig()
    apic.mmio_write(0x3E0, 4, 0x3)                        # divide by 16
    apic.mmio_write(0x320, 4, 0x40)                       # one-shot, vector 0x40
    apic.mmio_write(0x380, 4, 1000)                       # 16,000 ns
    insns.n = 8000
    assert apic.mmio_read(0x390, 4) == 500
    insns.n = 16000
    clock.run_due()
    assert apic.acknowledge() == 0x40 and apic.timer_fires == 1
    apic.mmio_write(0xB0, 4, 0)
    apic.mmio_write(0x320, 4, 0x20041)                    # periodic, vector 0x41
    apic.mmio_write(0x3E0, 4, 0xB)                        # divide by 1
    apic.mmio_write(0x380, 4, 1_000_000)                  # 1 kHz
    insns.n += 10_000_000                                 # 10 ms
    for _ in range(12):
        clock.run_due()
    assert apic.timer_fires == 1 + 10


def test_extint_through_lint0_takes_the_pic_vector():
    clock, _ = deterministic_clock()
    pic = PicPair()
    apic = Lapic(clock, pic=pic)
    m = pic.master_ports
    for v in (0x11, 0x20, 0x04, 0x01):
        m.pio_write(0 if v == 0x11 else 1, 1, v)
    m.pio_write(1, 1, 0)
    pic.set_irq(1, True)
    assert apic.pending() and apic.acknowledge() == 0x21   # works with the APIC software-disabled


def test_extint_survives_the_guest_reprogramming_lint0():
    """Linux with ``noapic`` writes LINT0 = ExtINT (0x700) itself: the delivery mode must stick."""
    clock, _ = deterministic_clock()
    pic = PicPair()
    apic = Lapic(clock, pic=pic)
    apic.mmio_write(0xF0, 4, 0x1FF)
    apic.mmio_write(0x350, 4, 0x10000)                    # clear_local_APIC: masked
    apic.mmio_write(0x350, 4, 0x700)                      # setup_local_APIC: ExtINT, unmasked
    apic.mmio_write(0x360, 4, 0x400)                      # LINT1: NMI
    assert apic.mmio_read(0x350, 4) == 0x700 and apic.mmio_read(0x360, 4) == 0x400
    m = pic.master_ports
    for v in (0x11, 0x30, 0x04, 0x01):
        m.pio_write(0 if v == 0x11 else 1, 1, v)
    m.pio_write(1, 1, 0)
    pic.set_irq(4, True)
    assert apic.pending() and apic.acknowledge() == 0x34


def test_lvt_read_only_and_reserved_bits_do_not_stick():
    apic, *_ = rig()
    apic.mmio_write(0x370, 4, 0xFFFFFFFF)                 # error LVT: vector and mask only
    assert apic.mmio_read(0x370, 4) == 0x100FF
    apic.mmio_write(0x350, 4, 0xFFFFFFFF)                 # LINT0: no delivery status, no remote IRR
    assert apic.mmio_read(0x350, 4) == 0x1A7FF
    apic.mmio_write(0x320, 4, 0xFFFFFFFF)                 # timer: mode, mask, vector
    assert apic.mmio_read(0x320, 4) == 0x700FF


def test_self_ipi_and_save_restore():
    apic, *_ = rig()
    apic.mmio_write(0x310, 4, 0)
    apic.mmio_write(0x300, 4, 0x40000 | 0x66)             # shorthand self, fixed, 0x66
    assert apic.acknowledge() == 0x66
    saved = apic.save()
    other, *_ = rig()
    other.restore(saved)
    assert other.save() == saved


def test_self_ipi_with_an_illegal_vector_without_a_bus_sets_send_and_receive_illegal():
    apic, *_ = rig()
    apic.mmio_write(0x370, 4, 0x0F)                       # LVT error with an illegal vector
    apic.mmio_write(0x300, 4, 0x40000 | 0x0F)             # self, fixed, vector 15
    assert apic.mmio_read(0x280, 4) == 0                  # nothing until the ESR write
    apic.mmio_write(0x280, 4, 0)
    assert apic.mmio_read(0x280, 4) == 0x60 and not apic.state.irr


def test_writing_the_lvt_timer_does_not_restart_an_expired_one_shot():
    """Only a TMICT write starts the count (SDM vol. 3 §11.5.4): the irq kernel's one-shot → periodic switch."""
    apic, io, clock, insns, _ = rig()
    apic.mmio_write(0x3E0, 4, 0xB)                        # divide by 1
    apic.mmio_write(0x320, 4, 0x41)                       # one-shot, vector 0x41
    apic.mmio_write(0x380, 4, 1000)
    insns.n = 1000
    clock.run_due()
    assert apic.acknowledge() == 0x41
    apic.mmio_write(0xB0, 4, 0)
    insns.n = 5000
    apic.mmio_write(0x320, 4, 0x20042)                    # periodic, vector 0x42: no TMICT yet
    insns.n = 20000
    clock.run_due()
    assert not apic.state.irr and apic.timer_fires == 1
    assert apic.mmio_read(0x390, 4) == 0 and apic.mmio_read(0x380, 4) == 1000
    apic.mmio_write(0x380, 4, 1000)                       # now it starts
    assert apic.mmio_read(0x390, 4) == 1000
    insns.n = 21000
    clock.run_due()
    assert apic.acknowledge() == 0x42 and apic.timer_fires == 2


def test_a_running_timer_keeps_its_deadline_across_lvt_writes_and_tsc_deadline_mode_stops_it():
    apic, io, clock, insns, _ = rig()
    apic.mmio_write(0x3E0, 4, 0xB)
    apic.mmio_write(0x320, 4, 0x41)
    apic.mmio_write(0x380, 4, 1000)
    insns.n = 400
    apic.mmio_write(0x320, 4, 0x20043)                    # periodic now, same deadline
    assert apic.mmio_read(0x390, 4) == 600
    insns.n = 1000
    clock.run_due()
    assert apic.acknowledge() == 0x43 and apic.mmio_read(0x390, 4) == 1000   # reloaded
    apic.mmio_write(0x320, 4, 0x40043)                    # TSC-deadline: TMICT cleared, stopped
    assert apic.mmio_read(0x380, 4) == 0 and apic.timer is None
    insns.n = 5000
    clock.run_due()
    assert apic.timer_fires == 1


def test_a_timer_tick_onto_a_pending_vector_is_traced_as_coalesced():
    apic, io, clock, insns, _ = rig()
    lines = []
    apic.trace = lines.append
    apic.mmio_write(0x3E0, 4, 0xB)
    apic.mmio_write(0x320, 4, 0x20044)                    # periodic, vector 0x44
    apic.mmio_write(0x380, 4, 100)
    insns.n = 100
    clock.run_due()
    assert not any("coalesced" in line for line in lines)
    insns.n = 200
    clock.run_due()                                       # 0x44 still in IRR: the tick is lost
    assert apic.timer_fires == 2 and apic.acknowledge() == 0x44 and not apic.pending()
    assert [line for line in lines if "coalesced" in line] == [
        "LAPIC 0 timer fires: vector 0x44 already in IRR (coalesced)"]
