"""Which device sits where: the PC's I/O ports, memory-mapped ranges and PCI slots.

=================  =========================================================
where              device
=================  =========================================================
ports 0x20, 0xA0   8259 master and slave; 0x4D0-0x4D1 their ELCRs
ports 0x40-0x43    8254 PIT; 0x61 the speaker/channel-2 gate
ports 0x70-0x71    MC146818 RTC and CMOS
port 0x64          keyboard controller (only its reset command, 0xFE)
ports 0x3F8-0x3FF  16550 UART (COM1, IRQ 4)
port 0xE9, 0xF4    Bochs/QEMU debug console, QEMU's isa-debug-exit
0xE0-0xE7, 0x2000  QEMU's pc-testdev (and 0xFF000000), with -device pc-testdev only
ports 0x600, 0x604 ACPI PM1a event and control blocks (S5 = power off)
port 0x60C         ACPI PM timer (3.579545 MHz, machine time)
ports 0xCF8-0xCFF  PCI configuration mechanism #1 (and 0xCF9 reset)
0xFEC00000         IOAPIC
0xFED00000         HPET (1 KiB; not with ``--no-hpet``)
0xFEE00000         local APIC
PCI 00:00.0        i440FX host bridge
PCI 00:01.0        PIIX3 ISA bridge (PIRQ routing)
PCI 00:02.0        xen-platform device (with Xen)
=================  =========================================================

The addresses are the PC's (and QEMU's ``pc`` machine's); the firmware's
part, placing the PCI BARs and routing the PIRQs, is played here as
SeaBIOS and Xen's hvmloader do.
"""
from __future__ import annotations

from ..devices.fwcfg import PORT as FWCFG_PORT, FwCfg, items_for as fwcfg_items
from ..devices.console import (DebugCon, DebugExit, AcpiPmControl, AcpiPmEvent, AcpiPmTimer, AcpiSleepRegisters,
                               KeyboardControllerReset)
from ..devices.hpet import HPET_BASE, HPET_SIZE, Hpet, IsaIrq, LegacyGate, ROUTE_GSIS
from ..devices.ioapic import IOAPIC_BASE
from ..devices.lapic import LAPIC_BASE
from ..devices.pci import PciBus, Piix3Isa, host_bridge, CONFIG_ADDRESS
from ..devices.pit8254 import Pit8254, PIT_PORT, SPEAKER_PORT
from ..devices.rtc import INDEX_PORT, Rtc
from ..devices.testdev import PcTestdev
from ..devices.uart16550 import attach_serial
from .wiring import PCI_ISA_IRQS

XEN_PLATFORM_IO_BAR = 0xC000          # where the firmware puts the xen-platform device's BARs
XEN_PLATFORM_MEM_BAR = 0xF0000000


def build_interrupt_controllers(machine) -> None:
    """Put the 8259 pair, the IOAPIC and the local APIC at their ports and addresses."""
    w = machine.wiring
    machine.register_pio(0x20, 2, w.pic.master_ports)
    machine.register_pio(0xA0, 2, w.pic.slave_ports)
    machine.register_pio(0x4D0, 2, w.pic.elcr_ports)
    machine.register_mmio(IOAPIC_BASE, 0x1000, w.ioapic)
    lapic = w.lapic if len(w.lapics) == 1 else LocalApicWindow(w.lapics, lambda: machine.current_vcpu.index)
    machine.register_mmio(LAPIC_BASE, 0x1000, lapic)


class LocalApicWindow:
    """0xFEE00000 on a multiprocessor: each CPU reaches its *own* local APIC there.

    The local APIC page is not on the memory bus: the CPU decodes it
    itself (SDM vol. 3 §10.4.1), so the same address names a different
    APIC on every CPU. The window forwards each access to the APIC of the
    vCPU that made it.
    """

    def __init__(self, lapics: list, current: callable):
        self.lapics = lapics
        self.current = current

    def mmio_read(self, offset: int, size: int) -> int:
        return self.lapics[self.current()].mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.lapics[self.current()].mmio_write(offset, size, value)


def build_legacy_devices(machine) -> None:
    """The ISA devices: PIT, RTC, UART, the debug ports and ACPI's PM registers."""
    m = machine
    m.hpet = build_hpet(m) if m.config.hpet else None
    m.pit = Pit8254(m.clock, irq0=m.isa_irq[0] if m.hpet is None else LegacyGate(m.isa_irq[0], m.hpet))
    m.register_pio(PIT_PORT, 4, m.pit)
    m.register_pio(SPEAKER_PORT, 1, m.pit.speaker_port)
    m.register_pio(DebugCon.PORT, 1, DebugCon(m.console))
    m.register_pio(DebugExit.PORT, 1, DebugExit(m.shutdown))
    m.register_pio(AcpiPmEvent.PORT, 4, AcpiPmEvent())
    m.register_pio(KeyboardControllerReset.PORT, 1, KeyboardControllerReset(m.shutdown))
    m.register_pio(AcpiPmControl.PORT, 2, AcpiPmControl(m.shutdown))
    m.register_pio(AcpiSleepRegisters.PORT, 2, AcpiSleepRegisters(m.shutdown))
    m.register_pio(AcpiPmTimer.PORT, 4, AcpiPmTimer(m.clock.now_ns))
    m.fw_cfg = FwCfg(fwcfg_items(m.config.ram_mib << 20, m.config.smp))
    m.register_pio(FWCFG_PORT, 2, m.fw_cfg)
    m.rtc = Rtc(m.clock.now_ns, deterministic=m.clock.deterministic)
    m.register_pio(INDEX_PORT, 2, m.rtc)
    m.testdev = None
    if m.config.testdev:
        m.testdev = PcTestdev(m.isa_irq)
        m.testdev.attach(m.register_pio, m.register_mmio)
    m.serial, m.serial_file = attach_serial(m.config.serial, m.console, m.register_pio, irq=m.isa_irq[4])


def build_hpet(machine) -> Hpet:
    """The HPET at 0xFED00000: its own sub-lines into GSIs 20-23 (its routes) and, for legacy
    replacement mode, into IRQ 0 (8259 input 0, IOAPIC pin 2) and IRQ 8 (input 8, pin 8)."""
    w = machine.wiring
    legacy = tuple(IsaIrq(w.pic_input(irq, "hpet"), w.isa_gsi_input(irq, "hpet")) for irq in (0, 8))
    hpet = Hpet(machine.clock, {gsi: w.gsi_input(gsi, "hpet") for gsi in ROUTE_GSIS}, legacy)
    machine.register_mmio(HPET_BASE, HPET_SIZE, hpet)
    return hpet


def build_pci(machine, xen: bool) -> None:
    """Bus 0: i440FX host bridge 00:00.0, PIIX3 00:01.0, xen-platform 00:02.0.

    xenicorn plays the firmware's part for BARs as SeaBIOS/hvmloader do
    (I/O from 0xC000, memory from 0xF0000000, decoding enabled), so a guest
    that only reads the BARs finds its device already placed.
    """
    m = machine
    w = m.wiring
    m.pci = PciBus(pirq_sink=w.pirq_changed, reset=lambda: m.shutdown("reboot", 0, "reset through port 0xCF9"),
                   map_range=m.map_device_range, unmap_range=m.unmap_device_range)
    m.register_pio(CONFIG_ADDRESS, 8, m.pci)
    m.pci.add(0, 0, host_bridge())
    m.piix3 = w.piix3 = m.pci.add(1, 0, Piix3Isa())
    m.piix3.on_route_change = w.route_pirqs
    m.xen_platform = None
    if xen:
        from ..devices.xen_platform import XenPlatformDevice, FIXED_IOPORT
        dev = XenPlatformDevice(log=lambda text: m.tracer.emit("io", text))
        m.xen_platform = m.pci.add(2, 0, dev)
        m.register_pio(FIXED_IOPORT, 16, dev.fixed_ports)
        dev.config_write(0x10, 4, XEN_PLATFORM_IO_BAR)
        dev.config_write(0x14, 4, XEN_PLATFORM_MEM_BAR)
    # What SeaBIOS does on QEMU's i440FX: PIRQ A-D -> IRQ 10, 10, 11, 11 in
    # the PIIX3. With the isa wiring that is the PCI interrupts' only path;
    # with apic it is their 8259 path, for an OS that keeps the PIC
    # (Linux's noapic; the DSDT's _PRT answers per interrupt model).
    for pirq, irq in enumerate(PCI_ISA_IRQS):
        m.piix3.config_write(0x60 + pirq, 1, irq)
    # each function's Interrupt Line register says where its pin went
    for devfn, dev in m.pci.functions.items():
        pin = dev.state.config[0x3D]
        if pin:
            dev.state.config[0x3C] = m.pci_gsi(devfn >> 3, pin - 1)
