"""8259A pair driven the way Linux's i8259.c drives it."""
from xenicorn.devices.i8259 import PicPair


class Cpu:
    """The INTR pin: records every level the PIC drives on it."""

    def __init__(self):
        self.levels = []

    def __call__(self, level):
        self.levels.append(level)


def linux_init(pic):
    """init_8259A(): ICW1-4 for both chips, vectors 0x20 and 0x28, all masked, then unmask."""
    m, s = pic.master_ports, pic.slave_ports
    m.pio_write(1, 1, 0xFF)
    s.pio_write(1, 1, 0xFF)
    m.pio_write(0, 1, 0x11)          # ICW1: edge, cascade, ICW4
    m.pio_write(1, 1, 0x20)          # ICW2: vectors 0x20-0x27
    m.pio_write(1, 1, 0x04)          # ICW3: slave on IRQ2
    m.pio_write(1, 1, 0x01)          # ICW4: 8086 mode, normal EOI
    s.pio_write(0, 1, 0x11)
    s.pio_write(1, 1, 0x28)
    s.pio_write(1, 1, 0x02)
    s.pio_write(1, 1, 0x01)
    m.pio_write(1, 1, 0x00)
    s.pio_write(1, 1, 0x00)


def make():
    cpu = Cpu()
    pic = PicPair(cpu)
    linux_init(pic)
    return pic, cpu


def test_edge_irq_delivers_once_and_needs_eoi():
    pic, cpu = make()
    pic.set_irq(1, True)
    assert pic.pending() and cpu.levels == [True]
    assert pic.acknowledge() == 0x21
    assert pic.master.state.isr == 0x02 and not pic.pending()
    pic.set_irq(1, False)
    pic.set_irq(1, True)                        # a new edge while in service: waits
    assert not pic.pending()
    pic.master_ports.pio_write(0, 1, 0x20)      # non-specific EOI
    assert pic.pending() and pic.acknowledge() == 0x21


def test_level_pin_redelivers_after_eoi_when_still_high():
    pic, _ = make()
    pic.elcr_ports.pio_write(0, 2, 0x0800)      # IRQ 11 level-triggered
    eois = []
    pic.on_eoi.append(eois.append)
    pic.set_irq(11, True)
    assert pic.acknowledge() == 0x28 + 3
    pic.slave_ports.pio_write(0, 1, 0x20)
    pic.master_ports.pio_write(0, 1, 0x20)
    assert eois == [11]
    assert pic.pending() and pic.acknowledge() == 0x2B   # still high: requests again
    pic.set_irq(11, False)
    pic.slave_ports.pio_write(0, 1, 0x20)
    pic.master_ports.pio_write(0, 1, 0x20)
    assert not pic.pending()


def test_priority_nesting_and_masking():
    pic, _ = make()
    pic.set_irq(4, True)
    assert pic.acknowledge() == 0x24
    pic.set_irq(5, True)                        # lower priority than IRQ 4 in service
    assert not pic.pending()
    pic.set_irq(0, True)                        # higher priority: nests
    assert pic.acknowledge() == 0x20
    pic.master_ports.pio_write(1, 1, 0x20)      # mask IRQ 5
    pic.master_ports.pio_write(0, 1, 0x20)      # EOI IRQ 0
    pic.master_ports.pio_write(0, 1, 0x20)      # EOI IRQ 4
    assert not pic.pending()
    pic.master_ports.pio_write(1, 1, 0x00)
    assert pic.acknowledge() == 0x25


def test_cascade_and_read_back_of_irr_isr():
    pic, _ = make()
    pic.set_irq(12, True)
    m = pic.master_ports
    m.pio_write(0, 1, 0x0A)                     # OCW3: read IRR
    assert m.pio_read(0, 1) == 0x04             # IRQ2 (cascade) requested
    assert pic.acknowledge() == 0x2C
    pic.slave_ports.pio_write(0, 1, 0x0B)       # read ISR
    assert pic.slave_ports.pio_read(0, 1) == 0x10
    m.pio_write(0, 1, 0x0B)
    assert m.pio_read(0, 1) == 0x04


def test_spurious_irq7_when_the_request_vanishes():
    pic, _ = make()
    pic.elcr_ports.pio_write(0, 1, 0x08)        # IRQ 3 level
    pic.set_irq(3, True)
    pic.set_irq(3, False)                       # gone before INTA
    assert pic.acknowledge() == 0x27
    assert pic.master.state.isr == 0


def test_specific_eoi_rotation_and_auto_eoi():
    pic, _ = make()
    pic.set_irq(3, True)
    pic.acknowledge()
    pic.master_ports.pio_write(0, 1, 0x60 | 3)  # specific EOI for IRQ 3
    assert pic.master.state.isr == 0
    pic.master_ports.pio_write(0, 1, 0xC0 | 4)  # set priority: IRQ 4 lowest -> IRQ 5 highest
    pic.set_irq(1, True)
    pic.set_irq(6, True)
    assert pic.acknowledge() == 0x26
    pic.master_ports.pio_write(0, 1, 0x11)      # re-init with auto-EOI
    pic.master_ports.pio_write(1, 1, 0x20)
    pic.master_ports.pio_write(1, 1, 0x04)
    pic.master_ports.pio_write(1, 1, 0x03)
    pic.set_irq(0, False)
    pic.set_irq(0, True)
    assert pic.acknowledge() == 0x20 and pic.master.state.isr == 0


def test_poll_mode_and_special_mask_mode():
    pic, _ = make()
    pic.set_irq(5, True)
    pic.master_ports.pio_write(0, 1, 0x0C)      # OCW3 poll
    assert pic.master_ports.pio_read(0, 1) == 0x85
    assert pic.master.state.isr == 0x20
    pic.master_ports.pio_write(0, 1, 0x68)      # special mask mode on
    pic.master_ports.pio_write(1, 1, 0x20)      # mask the in-service IRQ 5
    pic.set_irq(6, True)                        # lower priority, but SMM allows it
    assert pic.acknowledge() == 0x26


def test_elcr_cannot_make_irq0_level_and_save_restore_round_trip():
    pic, _ = make()
    pic.elcr_ports.pio_write(0, 2, 0xFFFF)
    assert pic.elcr_ports.pio_read(0, 2) == 0xDEF8
    pic.set_irq(9, True)
    saved = pic.save()
    other = PicPair(Cpu())
    other.restore(saved)
    assert other.save() == saved and other.pending()


def test_the_eoi_of_a_slave_irq_traces_both_chips_but_reports_one_isa_irq():
    """Linux ends IRQ 12 with an EOI to the slave, then one to the master's IRQ 2 (the cascade)."""
    pic, _ = make()
    lines, eois = [], []
    pic.trace = lines.append
    pic.on_eoi.append(eois.append)
    pic.set_irq(12, True)
    assert pic.acknowledge() == 0x2C
    pic.slave_ports.pio_write(0, 1, 0x20)       # non-specific EOI: slave IRQ 4
    pic.master_ports.pio_write(0, 1, 0x62)      # specific EOI: master IRQ 2
    assert [line for line in lines if "EOI" in line] == ["8259 EOI IRQ 12", "8259 EOI IRQ 2 (cascade)"]
    assert eois == [12] and pic.master.state.isr == pic.slave.state.isr == 0
