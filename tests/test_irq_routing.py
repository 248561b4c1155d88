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
    assert machine.pic.slave.state.irr == 1 << 2        # the firmware routed PIRQB -> IRQ 10
    machine.piix3.config_write(0x61, 1, 0x80)           # routing off: the 8259 input drops
    assert not machine.pic_inputs[10].level
    machine.piix3.config_write(0x61, 1, 11)             # PIRQB -> IRQ 11
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


def _prt(machine, table: str = "PRTA") -> list[tuple[int, int, int]]:
    """(slot, pin, GSI or IRQ) entries of a routing table in the machine's DSDT, decoded from the AML.

    PRTA is what _PRT returns in the IOAPIC model, PRTP in the 8259 model.
    """
    from xenicorn.boot import acpi
    rsdp = acpi.write(machine, hw_reduced=False)
    dsdt = acpi.parse(machine.memory.read, rsdp)[b"DSDT"]
    body = dsdt[dsdt.index(b"\x08" + table.encode()) + 5:]
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


def test_prt_is_a_method_that_answers_per_interrupt_model(machine):
    """_PIC(0) (8259) or _PIC(1) (IOAPIC) picks the table, as in Xen's and QEMU's DSDTs."""
    from xenicorn.boot import acpi
    dsdt = acpi.parse(machine.memory.read, acpi.write(machine, hw_reduced=False))[b"DSDT"]
    assert b"_PIC\x01\x70\x68PICF" in dsdt                          # Method (_PIC, 1) { PICF = Arg0 }
    assert b"_PRT\x00\xa0\x0b\\PICF\xa4PRTA\xa4PRTP" in dsdt   # If (\PICF) { Return (PRTA) } Return (PRTP)


def _wired(machine, slot, pin):
    machine.pci.set_extra_intx(slot << 3, pin + 1, True)
    gsis = [n for n, line in enumerate(machine.gsi) if line.level]
    pics = [n for n, line in enumerate(machine.pic_inputs) if line.level]
    machine.pci.set_extra_intx(slot << 3, pin + 1, False)
    return gsis, pics


def test_prt_matches_the_apic_wiring(machine):
    """apic (default): each PCI interrupt has its own IOAPIC input 16-19 and, through the PIIX3,
    an 8259 input (10 or 11) for an OS without the IOAPIC; each _PRT table says which."""
    prt, prt_pic = _prt(machine, "PRTA"), _prt(machine, "PRTP")
    assert len(prt) == len(prt_pic) == 31 * 4
    assert (2, 0, 17) in prt and (2, 0, 10) in prt_pic  # xen-platform INTA -> PIRQB -> GSI 17 / IRQ 10
    for (slot, pin, gsi), (_, _, irq) in list(zip(prt, prt_pic, strict=True))[:12]:
        assert _wired(machine, slot, pin) == ([gsi], [irq])


def test_isa_wiring_routes_pci_interrupts_to_irq_10_and_11():
    """isa: SeaBIOS's routing on QEMU's i440FX; the PIRQ reaches the 8259 and IOAPIC input 10/11 only."""
    from xenicorn.machine.machine import Machine, MachineConfig
    m = Machine(MachineConfig(ram_mib=16, debugcon="none", pci_irqs="isa"))
    assert [m.piix3.pirq_route(p) for p in range(4)] == [10, 10, 11, 11]
    prt = _prt(m)
    assert (2, 0, 10) in prt and _prt(m, "PRTP") == prt   # one answer in both models
    for slot, pin, gsi in prt[:12]:
        assert _wired(m, slot, pin) == ([gsi], [gsi])
    assert m.xen_platform.state.config[0x3C] == 10       # Interrupt Line, as the firmware writes it
    m.close()
