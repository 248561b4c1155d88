"""The Intel MultiProcessor (MP) table: how a BIOS describes the APICs.

Before ACPI's MADT, an OS learned from the *MP table* (Intel
MultiProcessor Specification, version 1.4, 1997) which processors exist,
where the I/O APIC is, and which I/O APIC pin each interrupt source is
wired to. Linux still reads it when it finds no ACPI MADT; with neither,
it says "APIC: ACPI MADT or MP tables are not detected" and drives
interrupts through the 8259 only. Xen's hvmloader writes both for HVM
guests, and so does xenicorn's Linux boot (the MADT is :mod:`.acpi`).
Only kernels built with ``CONFIG_X86_MPPARSE`` look for the MP table;
Debian's ``cloud-amd64`` kernel is not one of them.

**Floating pointer** (16 bytes, on a 16-byte boundary in the first KiB of
the EBDA, the last KiB of base memory, or the BIOS ROM area 0xF0000-0xFFFFF,
where the OS scans for it; spec §4.1):

======  ====  ============================================================
offset  size  field
======  ====  ============================================================
0       4     signature ``_MP_``
4       4     physical address of the configuration table
8       1     length in 16-byte paragraphs: 1
9       1     spec revision: 4 (1.4)
10      1     checksum: all 16 bytes sum to 0 (mod 256)
11      1     feature 1: 0 = a configuration table follows (else a default
              configuration number)
12      1     feature 2: bit 7 IMCRP, set when the IMCR exists and the PC
              starts in PIC mode; clear = virtual wire mode (the 8259's
              INTR goes through the local APIC's LINT0), as here
13      3     reserved
======  ====  ============================================================

**Configuration table**: a 44-byte header (``PCMP``, base table length,
revision, checksum over the base table, OEM and product strings, OEM table
pointer and size, entry count, the local APIC's address, extended table
length and checksum) followed by entries, sorted by type (§4.2-4.3):

====  ====  ========================  =====================================
type  size  entry                     here
====  ====  ========================  =====================================
0     20    processor                 the BSP: LAPIC id 0, its version,
                                      enabled + bootstrap, CPUID signature
                                      and feature flags
1     8     bus (id, 6-char type)     0 ``PCI``, 1 ``ISA``
2     8     I/O APIC                  id, version, enabled, 0xFEC00000
3     8     I/O interrupt assignment  ISA IRQ 0-15 (not 2, the cascade) to
                                      their pins, IRQ 0 to pin 2; every PCI
                                      slot's INTA-D to GSI 16-19
4     8     local interrupt           ExtINT on LINT0, NMI on LINT1, to all
                                      local APICs (id 0xFF)
====  ====  ========================  =====================================

An interrupt entry is (type, interrupt type: 0 INT, 1 NMI, 2 SMI, 3
ExtINT; flags: polarity bits 1:0 and trigger mode bits 3:2, each 0 =
"conforms to the bus", 1 = active high / edge, 3 = active low / level;
source bus id; source IRQ; destination APIC id; destination pin). A PCI
source IRQ is ``device << 2 | pin`` with pin 0 = INTA (§D.3).

The wiring described is the machine's own (:mod:`xenicorn.machine.wiring`,
``devices/pci.py``): ISA IRQ n drives GSI n except IRQ 0 on GSI 2, and a
PCI slot's pins are swizzled onto PIRQ A-D, which drive GSI 16-19
(level-triggered, active low). ISA entries say "conforms": edge, active
high, as the ISA bus is.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..devices.ioapic import IOAPIC_BASE
from ..devices.ioapic import VERSION as IOAPIC_VERSION
from ..devices.lapic import LAPIC_BASE
from .acpi import checksum as _checksum  # the same rule: all bytes sum to 0 mod 256

FLOATING_ADDR = 0xF0000              # start of the BIOS area Linux scans; reserved in E820
CONFIG_ADDR = FLOATING_ADDR + 16
SPEC_REV = 4                         # 1.4
IOAPIC_ID = 1                        # with one CPU; with n, n (APIC IDs share one name space)
PCI_BUS, ISA_BUS = 0, 1
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = range(5)
INT, NMI, SMI, EXTINT = range(4)
CONFORMS, ACTIVE_HIGH_EDGE, ACTIVE_LOW_LEVEL = 0x0, 0x5, 0xF
CPU_ENABLED, CPU_BSP = 1 << 0, 1 << 1


@dataclass(frozen=True)
class IrqEntry:
    """An I/O (type 3) or local (type 4) interrupt assignment."""

    kind: int            # MP_INTSRC or MP_LINTSRC
    irqtype: int         # INT, NMI, SMI, EXTINT
    flags: int           # polarity 1:0, trigger 3:2
    bus: int
    irq: int             # ISA IRQ, or PCI device << 2 | pin
    dest_apic: int       # I/O APIC id, or local APIC id (0xFF: all)
    dest_pin: int        # I/O APIC input, or LINT0/LINT1


def interrupt_entries(pci_slots, gsi_of, ioapic_id: int = IOAPIC_ID) -> list[IrqEntry]:
    """The machine's wiring as type 3 and 4 entries (module doc)."""
    out = []
    for irq in range(16):
        if irq == 2:
            continue                   # the 8259 cascade input: nothing arrives there
        out.append(IrqEntry(MP_INTSRC, INT, CONFORMS, ISA_BUS, irq, ioapic_id, 2 if irq == 0 else irq))
    for slot in sorted(set(pci_slots)):
        for pin in range(4):
            gsi = gsi_of(slot, pin)              # the machine's wiring (Machine.pci_gsi)
            out.append(IrqEntry(MP_INTSRC, INT, ACTIVE_LOW_LEVEL, PCI_BUS, (slot << 2) | pin, ioapic_id, gsi))
    out.append(IrqEntry(MP_LINTSRC, EXTINT, CONFORMS, ISA_BUS, 0, 0xFF, 0))
    out.append(IrqEntry(MP_LINTSRC, NMI, CONFORMS, ISA_BUS, 0, 0xFF, 1))
    return out


def build(*, lapic_version: int, cpu_signature: int, cpu_features: int, pci_slots, gsi_of,
          config_addr: int = CONFIG_ADDR, cpus: int = 1, ioapic_id: int = IOAPIC_ID) -> tuple[bytes, bytes]:
    """(floating pointer, configuration table) for ``cpus`` CPUs (APIC IDs 0..n-1, 0 the BSP),
    one I/O APIC, buses PCI 0 and ISA."""
    entries = [struct.pack("<BBBBII8x", MP_PROCESSOR, n, lapic_version, CPU_ENABLED | (CPU_BSP if n == 0 else 0),
                           cpu_signature, cpu_features) for n in range(cpus)]
    entries.append(struct.pack("<BB6s", MP_BUS, PCI_BUS, b"PCI   "))
    entries.append(struct.pack("<BB6s", MP_BUS, ISA_BUS, b"ISA   "))
    entries.append(struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_BASE))
    for e in interrupt_entries(pci_slots, gsi_of, ioapic_id):
        entries.append(struct.pack("<BBHBBBB", e.kind, e.irqtype, e.flags, e.bus, e.irq, e.dest_apic, e.dest_pin))
    body = b"".join(entries)
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(body), SPEC_REV, 0,
                                   b"XENICORN", b"PC Xen HVM  ", 0, 0, len(entries), LAPIC_BASE, 0, 0, 0))
    table = bytearray(header + body)
    table[7] = _checksum(table)
    floating = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", config_addr, 1, SPEC_REV, 0, 0))
    floating[10] = _checksum(floating)
    return bytes(floating), bytes(table)


def write(machine, addr: int = FLOATING_ADDR) -> int:
    """Write the MP table for ``machine`` at ``addr`` (floating pointer, then the table); its size.

    Also gives the I/O APIC the id the table states, as a BIOS assigns it.
    """
    eax, _, _, edx = machine.cpuid.query(1, 0, 0)
    slots = {devfn >> 3 for devfn in machine.pci.functions}
    floating, table = build(lapic_version=machine.lapic.mmio_read(0x30, 4) & 0xFF,
                            cpu_signature=eax & 0xFFF, cpu_features=edx, pci_slots=slots,
                            gsi_of=machine.pci_gsi, config_addr=addr + 16, cpus=len(machine.vcpus),
                            ioapic_id=machine.ioapic.state.id)
    machine.memory.write(addr, floating + table)
    return len(floating) + len(table)


# -- reading it back (tests; what an OS does) --------------------------------
@dataclass
class MpTable:
    """A parsed MP table."""

    floating_addr: int
    config_addr: int
    imcr: bool
    lapic_addr: int
    oem: str
    product: str
    processors: list[tuple[int, int, int]]       # (apic id, version, flags)
    buses: dict[int, str]
    ioapics: list[tuple[int, int, int, int]]     # (id, version, flags, address)
    irqs: list[IrqEntry]


class MpTableError(ValueError):
    """The bytes are not a valid MP table (signature, length or checksum)."""


def find(read, start: int = 0xF0000, end: int = 0x100000) -> int | None:
    """Scan ``[start, end)`` on 16-byte boundaries for a valid floating pointer, as an OS does."""
    for addr in range(start, end, 16):
        raw = read(addr, 16)
        if raw[:4] == b"_MP_" and raw[8] == 1 and sum(raw) & 0xFF == 0:
            return addr
    return None


def parse(read, floating_addr: int) -> MpTable:
    """Decode the table whose floating pointer is at ``floating_addr``; checks both checksums."""
    fp = read(floating_addr, 16)
    if fp[:4] != b"_MP_" or sum(fp) & 0xFF:
        raise MpTableError(f"no valid floating pointer at {floating_addr:#x}")
    config = struct.unpack_from("<I", fp, 4)[0]
    head = read(config, 44)
    sig, length, _rev, _, oem, product, _, _, count, lapic, _, _, _ = struct.unpack("<4sHBB8s12sIHHIHBB", head)
    if sig != b"PCMP" or length < 44:
        raise MpTableError(f"no PCMP table at {config:#x}")
    table = read(config, length)
    if sum(table) & 0xFF:
        raise MpTableError("configuration table checksum is wrong")
    out = MpTable(floating_addr, config, bool(fp[12] & 0x80), lapic, oem.decode().strip(),
                  product.decode().strip(), [], {}, [], [])
    pos = 44
    for _ in range(count):
        kind = table[pos]
        if kind == MP_PROCESSOR:
            _, apic, ver, flags = struct.unpack_from("<BBBB", table, pos)
            out.processors.append((apic, ver, flags))
            pos += 20
            continue
        if kind == MP_BUS:
            _, bus, name = struct.unpack_from("<BB6s", table, pos)
            out.buses[bus] = name.decode().strip()
        elif kind == MP_IOAPIC:
            out.ioapics.append(struct.unpack_from("<xBBBI", table, pos))
        elif kind in (MP_INTSRC, MP_LINTSRC):
            out.irqs.append(IrqEntry(*struct.unpack_from("<BBHBBBB", table, pos)))
        else:
            raise MpTableError(f"unknown entry type {kind} at offset {pos}")
        pos += 8
    if pos != length:
        raise MpTableError(f"entries end at {pos}, the header says {length}")
    return out


def gsi_of_isa_irq(table: MpTable, irq: int) -> int | None:
    """The I/O APIC pin an ISA IRQ arrives on, by the table."""
    isa = [b for b, name in table.buses.items() if name == "ISA"]
    for e in table.irqs:
        if e.kind == MP_INTSRC and e.bus in isa and e.irq == irq:
            return e.dest_pin
    return None

