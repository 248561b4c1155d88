"""Interrupt lines and the machine's routing: ISA IRQs, GSIs, PCI PIRQs."""
from xenicorn.devices.irq import IrqLine, SharedLine


def test_line_forwards_only_transitions():
    seen = []
    line = IrqLine("x")
    line.connect(seen.append)
    line.raise_()
    line.raise_()
    line.lower()
    line.pulse()
    assert seen == [True, False, True, False] and line.edges == 2


def test_shared_line_is_high_while_any_source_is():
    out = []
    gsi = SharedLine("GSI17")
    gsi.connect(out.append)
    a, b = gsi.source("pci"), gsi.source("xen-callback")
    a.raise_()
    b.raise_()
    assert gsi.assert_count == 2 and out == [True]
    a.lower()
    assert gsi.level and out == [True]
    b.lower()
    assert out == [True, False]


def test_isa_irq0_reaches_ioapic_pin2_and_pic_input0(machine):
    machine.isa_irq[0].raise_()
    assert machine.gsi[2].level and not machine.gsi[0].level
    assert machine.pic.master.state.irr & 1


def test_xen_platform_inta_drives_gsi17_and_the_routed_pic_irq(machine):
    dev = machine.xen_platform
    dev.set_irq(True)                                   # slot 2 INTA -> PIRQB
    assert machine.gsi[17].level
    assert machine.pic.master.state.irr == 0 and machine.pic.slave.state.irr == 0   # not routed yet
    machine.piix3.config_write(0x61, 1, 11)             # PIRQB -> IRQ 11 (what firmware does)
    machine.pic.elcr_ports.pio_write(1, 1, 0x08)        # IRQ 11 level-triggered
    assert machine.pic.slave.state.irr & (1 << 3)
    machine.piix3.config_write(0x61, 1, 10)             # re-route: 11 drops, 10 rises
    assert not machine.pic.slave.state.irr & (1 << 3)
    dev.set_irq(False)
    assert not machine.gsi[17].level


def test_uart_interrupt_reaches_irq4(machine):
    machine.serial.pio_write(4, 1, 0x08)                # OUT2
    machine.serial.pio_write(1, 1, 0x02)                # THRE interrupt
    assert machine.isa_irq[4].level and machine.gsi[4].level
    machine.serial.pio_read(2, 1)                        # IIR acknowledges
    assert not machine.isa_irq[4].level
