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


def _prt(machine) -> list[tuple[int, int, int]]:
    """(slot, pin, GSI) entries of the _PRT in the machine's DSDT, decoded from the AML."""
    from xenicorn.platform import acpi
    rsdp = acpi.write(machine, hw_reduced=False)
    dsdt = acpi.parse(machine.memory.read, rsdp)[b"DSDT"]
    body = dsdt[dsdt.index(b"_PRT") + 4:]
    assert body[0] == 0x12                               # PackageOp
    out, pos = [], body.index(b"\x12", 1)
    while pos < len(body) and body[pos] == 0x12:
        # Package(4) { DWord addr, pin, Zero, GSI }: PkgLength is one byte here
        n = body[pos + 1]
        entry = body[pos + 3:pos + 1 + n]
        assert entry[0] == 0x0C
        addr = int.from_bytes(entry[1:5], "little")
        rest = entry[5:]
        vals = []
        while rest:
            if rest[0] in (0, 1):
                vals.append(rest[0])
                rest = rest[1:]
            else:
                assert rest[0] == 0x0A
                vals.append(rest[1])
                rest = rest[2:]
        out.append((addr >> 16, vals[0], vals[2]))
        pos += 1 + n
    return out


def _wired(machine, slot, pin):
    machine.pci.set_extra_intx(slot << 3, pin + 1, True)
    gsis = [n for n, line in enumerate(machine.gsi) if line.level]
    pics = [n for n, line in enumerate(machine.pic_inputs) if line.level]
    machine.pci.set_extra_intx(slot << 3, pin + 1, False)
    return gsis, pics


def test_prt_matches_the_apic_wiring(machine):
    """apic (default): each PCI interrupt has its own IOAPIC input 16-19; the _PRT says which."""
    prt = _prt(machine)
    assert len(prt) == 31 * 4
    assert (2, 0, 17) in prt                             # xen-platform INTA -> PIRQB -> GSI 17
    for slot, pin, gsi in prt[:12]:
        assert _wired(machine, slot, pin) == ([gsi], [])  # PIIX3 routes nothing: no 8259 input


def test_isa_wiring_routes_pci_interrupts_to_irq_10_and_11():
    """isa: SeaBIOS's routing on QEMU's i440FX; the PIRQ reaches the 8259 and IOAPIC input 10/11 only."""
    from xenicorn.platform.machine import Machine, MachineConfig
    m = Machine(MachineConfig(ram_mib=16, debugcon="none", pci_irqs="isa"))
    assert [m.piix3.pirq_route(p) for p in range(4)] == [10, 10, 11, 11]
    prt = _prt(m)
    assert (2, 0, 10) in prt
    for slot, pin, gsi in prt[:12]:
        assert _wired(m, slot, pin) == ([gsi], [gsi])
    assert m.xen_platform.state.config[0x3C] == 10       # Interrupt Line, as the firmware writes it
    m.close()
