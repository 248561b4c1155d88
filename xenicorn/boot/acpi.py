r"""ACPI tables: how the firmware tells an OS which interrupt controllers exist.

An x86 OS cannot probe for a local APIC per CPU or for IOAPICs; firmware
lists them in ACPI's *Multiple APIC Description Table* (MADT). Without it
Linux assumes a uniprocessor PC with only the 8259s ("APIC: ACPI MADT or
MP tables are not detected"), keeps interrupts in virtual-wire mode and,
measured here, never sets up a per-CPU timer at all: not the LAPIC timer
and not Xen's PV timer (``x86_init.timers.setup_percpu_clockev`` is skipped
in that mode), so jiffies never advance. Xen gives PVH guests these tables
(``hvm_start_info.rsdp_paddr``) and hvmloader gives HVM guests theirs.

The chain an OS follows (ACPI 6.5 spec, chapter 5.2):

=======  =========================================================
RSDP     "RSD PTR " on a 16-byte boundary (the OS scans 0xE0000-0xFFFFF,
         or is told the address); checksums; points to the XSDT
XSDT     "XSDT": 64-bit pointers to every other table
FADT     "FACP": fixed hardware; here *hardware-reduced* (flag bit 20: no
         PM timer, no SCI, no fixed events, as Xen's PVH tables), and the
         pointer to the DSDT
DSDT     "DSDT": the AML namespace; here only ``\_S5`` (the sleep type that
         powers off), which with the FADT's sleep control and status
         registers (I/O ports 0x608/0x609) lets the OS power the machine off
MADT     "APIC": the LAPIC address, "PC-AT compatible 8259s present", and
         entries: processor local APIC 0, the IOAPIC (id, 0xFEC00000, GSI
         base 0), the interrupt source override IRQ0 -> GSI 2 (the PIT is
         wired to pin 2, as on every PC), and LINT1 as NMI
HPET     "HPET": the event timer block's ID (its capabilities' low half)
         and address 0xFED00000, as Xen's hvmloader writes it; how Linux
         finds the HPET (left out with ``--no-hpet``). Xen's DSDT also
         has a PNP0103 device for it; Linux needs none (it sets the
         HPET up from this table, "hpet0: at MMIO 0xfed00000")
=======  =========================================================

Every table starts with the same 36-byte header, and the byte sum of each
table (and of the RSDP's first 20 and all 36 bytes) must be 0 mod 256.
"""
from __future__ import annotations

import struct

ACPI_BASE = 0xE0000                # in the BIOS area below 1 MiB: a legacy scan finds the RSDP too
ACPI_SIZE = 0x1000
OEM_ID = b"XENICO"
OEM_TABLE_ID = b"XENICORN"
CREATOR_ID = b"XNCN"

FADT_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags (FADT offset 109). Xen's PVH tables say "no
# VGA, no CMOS RTC" (tools/libacpi), and Linux reads exactly that pair as
# "this is PVH" (xen_hvm_guest_late_init); HVM tables leave the RTC present.
FADT_BOOT_NO_VGA = 1 << 2
FADT_BOOT_NO_CMOS_RTC = 1 << 5
SCI_IRQ = 9                          # as Xen's and QEMU's PCs
PM1A_EVT_PORT = 0x600                # devices/console.py AcpiPmEvent
PM1A_CNT_PORT = 0x604                # devices/console.py AcpiPmControl
SLEEP_CONTROL_PORT = 0x608           # devices/console.py AcpiSleepRegisters; status is the next port
PM_TMR_PORT = 0x60C                  # devices/console.py AcpiPmTimer
FADT_TMR_VAL_EXT = 1 << 8            # the PM timer counts 32 bits
# Name (\_S5, Package (4) {5, 5, 0, 0}): NameOp, "_S5_", PackageOp, PkgLength 8,
# 4 elements: BytePrefix 5, BytePrefix 5, ZeroOp, ZeroOp (ACPI 6.5 §20, AML encoding)
AML_S5 = bytes.fromhex("085f53355f" "1208" "04" "0a05" "0a05" "00" "00")
MADT_PCAT_COMPAT = 1 << 0
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI = 0, 1, 2, 4


# -- a little AML (ACPI 6.5 §20.2): enough for \_SB.PCI0 and its _PRT --------------------
def _pkg_length(content: int) -> bytes:
    """PkgLength: the length of itself plus ``content`` bytes, in 1 to 4 bytes."""
    if content + 1 < 0x40:
        return bytes([content + 1])
    for extra in (1, 2, 3):
        total = content + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0x0F)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError("AML package too long")


def _aml_int(v: int) -> bytes:
    if v in (0, 1):
        return bytes([v])                                      # ZeroOp, OneOp
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4)):    # Byte/Word/DWordPrefix
        if v < 1 << (8 * size):
            return bytes([prefix]) + v.to_bytes(size, "little")
    return b"\x0E" + v.to_bytes(8, "little")


def _aml_package(*elements: bytes) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + _pkg_length(len(body)) + body


def _aml_name(seg: str, value: bytes) -> bytes:
    return b"\x08" + seg.encode() + value


def _aml_block(op: bytes, name: bytes, body: bytes) -> bytes:
    return op + _pkg_length(len(name) + len(body)) + name + body


EISA_PNP0A03 = 0x030AD041            # EisaId ("PNP0A03"): a PCI host bridge


def _aml_method(name: str, nargs: int, body: bytes) -> bytes:
    """Method (name, nargs, NotSerialized) { body }."""
    return _aml_block(b"\x14", name.encode(), bytes([nargs]) + body)


def _prt_package(entries: list[tuple[int, int, int]]) -> bytes:
    return _aml_package(*(_aml_package(_aml_int((slot << 16) | 0xFFFF), _aml_int(pin), _aml_int(0), _aml_int(irq))
                          for slot, pin, irq in entries))


def pci_root_aml(prt: list[tuple[int, int, int]], prt_pic: list[tuple[int, int, int]] | None = None) -> bytes:
    r"""``\_PIC``, and Scope (\_SB) { Device (PCI0) { _HID PNP0A03, _UID 0, _PRT } }.

    The _PRT (PCI Routing Table) is how an ACPI OS learns where each PCI
    interrupt pin goes: one entry per (slot, pin) with address
    ``slot << 16 | 0xFFFF`` (any function), the pin (0 = INTA), and a
    source of 0, which makes the last field a GSI ("static" routing; in
    8259 mode, an ISA IRQ). Without one Linux reports "can't find IRQ for
    PCI INT A" and the xen-platform device has no interrupt.

    The answer depends on the interrupt model the OS chose, which it tells
    the firmware by calling ``\_PIC`` (0: 8259, 1: IOAPIC): the same PCI
    pin may be IOAPIC input 17 but 8259 input 10 (through the PIIX3's PIRQ
    routing). So, as Xen's and QEMU's DSDTs do, ``_PIC`` stores the model
    in ``PICF`` and ``_PRT`` is a method returning ``PRTA`` (IOAPIC
    model: ``prt``) or ``PRTP`` (8259 model: ``prt_pic``, default ``prt``).
    """
    prt_pic = prt if prt_pic is None else prt_pic
    pick = (_aml_block(b"\xA0", b"", b"\\PICF" + b"\xA4PRTA")     # If (\PICF) { Return (PRTA) }
            + b"\xA4PRTP")                                             # Return (PRTP)
    device = (_aml_name("_HID", _aml_int(EISA_PNP0A03)) + _aml_name("_UID", _aml_int(0))
              + _aml_name("PRTA", _prt_package(prt)) + _aml_name("PRTP", _prt_package(prt_pic))
              + _aml_method("_PRT", 0, pick))
    root = (_aml_name("PICF", _aml_int(0))
            + _aml_method("_PIC", 1, b"\x70\x68PICF"))                  # Store (Arg0, PICF)
    return root + _aml_block(b"\x10", b"\\_SB_", _aml_block(b"\x5b\x82", b"PCI0", device))


def checksum(data: bytes) -> int:
    """The byte that makes the sum of ``data`` plus it zero mod 256."""
    return (-sum(data)) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the common header, the body, a valid checksum."""
    length = 36 + len(body)
    head = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                       CREATOR_ID, 1)
    raw = bytearray(head + body)
    raw[9] = checksum(raw)
    return bytes(raw)


def madt(lapic_base: int, ioapic_id: int, ioapic_base: int, pit_gsi: int = 2, cpus: int = 1) -> bytes:
    """The MADT: one enabled processor local APIC per CPU (UID n, APIC ID n), the IOAPIC, IRQ 0's override."""
    entries = b"".join((
        *(struct.pack("<BBBBI", MADT_LAPIC, 8, n, n, 1) for n in range(cpus)),   # UID n, APIC n, enabled
        struct.pack("<BBBBII", MADT_IOAPIC, 12, ioapic_id, 0, ioapic_base, 0),
        struct.pack("<BBBBIH", MADT_ISO, 10, 0, 0, pit_gsi, 0),               # ISA IRQ0 -> GSI 2
        struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, 0, 1),                 # all CPUs: LINT1 = NMI
    ))
    return table(b"APIC", 4, struct.pack("<II", lapic_base, MADT_PCAT_COMPAT) + entries)


def hpet(block_id: int, address: int) -> bytes:
    """The HPET description table (IA-PC HPET spec 1.0a §3.2.4): event timer block ID, base
    address as a Generic Address Structure in system memory (id 0), HPET number 0, no minimum
    periodic tick, no page protection, as Xen's construct_hpet (tools/libacpi/build.c)."""
    return table(b"HPET", 1, struct.pack("<IBBBBQBHB", block_id, 0, 0, 0, 0, address, 0, 0, 0))


def _gas_io(body: bytearray, off: int, port: int, bits: int, access: int = 1) -> None:
    """A Generic Address Structure in system I/O space (id 1); access size 1 byte, 3 dword."""
    struct.pack_into("<BBBBQ", body, off - 36, 1, bits, 0, access, port)


def fadt(dsdt_addr: int, hw_reduced: bool = True) -> bytes:
    """FADT revision 6 (276 bytes).

    ``hw_reduced``: what Xen gives a PVH guest, no fixed hardware at all,
    sleep through the sleep control register. Otherwise the classic PC
    layout Xen and QEMU give HVM guests, which Linux needs to keep its
    legacy 8259 PIC and ISA IRQs (in hardware-reduced mode it installs a
    null PIC, and a UART's IRQ 4 can no longer be requested): SCI on IRQ 9,
    no SMI command port (the machine is always in ACPI mode), PM1a event
    block at 0x600 and PM1a control at 0x604 (QEMU's PM base), a 32-bit PM
    timer at 0x60C (Linux's watchdog for the TSC).
    """
    body = bytearray(276 - 36)
    struct.pack_into("<I", body, 40 - 36, dsdt_addr)              # DSDT (32-bit pointer)
    struct.pack_into("<H", body, 109 - 36, FADT_BOOT_NO_VGA | (FADT_BOOT_NO_CMOS_RTC if hw_reduced else 0))
    struct.pack_into("<I", body, 112 - 36, FADT_HW_REDUCED_ACPI if hw_reduced else FADT_TMR_VAL_EXT)  # Flags
    if not hw_reduced:
        struct.pack_into("<H", body, 46 - 36, SCI_IRQ)                # SCI_INT
        struct.pack_into("<I", body, 56 - 36, PM1A_EVT_PORT)          # PM1a_EVT_BLK
        struct.pack_into("<I", body, 64 - 36, PM1A_CNT_PORT)          # PM1a_CNT_BLK
        struct.pack_into("<I", body, 76 - 36, PM_TMR_PORT)            # PM_TMR_BLK
        body[88 - 36], body[89 - 36] = 4, 2                           # PM1_EVT_LEN, PM1_CNT_LEN
        body[91 - 36] = 4                                             # PM_TMR_LEN
        _gas_io(body, 148, PM1A_EVT_PORT, 32)                         # X_PM1a_EVT_BLK
        _gas_io(body, 172, PM1A_CNT_PORT, 16)                         # X_PM1a_CNT_BLK
        _gas_io(body, 208, PM_TMR_PORT, 32, access=3)                 # X_PM_TMR_BLK
    body[131 - 36] = 5                                            # FADT minor version: 6.5
    struct.pack_into("<Q", body, 140 - 36, dsdt_addr)             # X_DSDT
    # SLEEP_CONTROL_REG and SLEEP_STATUS_REG: generic addresses in system I/O
    # space (id 1), 8 bits wide, byte access (size 1)
    if hw_reduced:
        for off, port in ((244, SLEEP_CONTROL_PORT), (256, SLEEP_CONTROL_PORT + 1)):
            _gas_io(body, off, port, 8)
    body[268 - 36:276 - 36] = b"XenVMM\0\0"                       # hypervisor vendor identity
    return table(b"FACP", 6, bytes(body))


def rsdp(xsdt_addr: int) -> bytes:
    raw = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def build(base: int, ioapic_id: int, ioapic_base: int, lapic_base: int,
          hw_reduced: bool = True, prt: list[tuple[int, int, int]] | None = None,
          prt_pic: list[tuple[int, int, int]] | None = None, cpus: int = 1,
          hpet_at: int | None = None) -> tuple[int, bytes]:
    """All tables laid out from ``base``: (RSDP address, the bytes to write at ``base``)."""
    out = bytearray()

    def place(blob: bytes) -> int:
        out.extend(b"\0" * (-len(out) % 16))
        addr = base + len(out)
        out.extend(blob)
        return addr

    rsdp_at = place(b"\0" * 36)                                   # filled in last
    dsdt_at = place(table(b"DSDT", 2, AML_S5 + (pci_root_aml(prt, prt_pic) if prt else b"")))
    fadt_at = place(fadt(dsdt_at, hw_reduced))
    madt_at = place(madt(lapic_base, ioapic_id, ioapic_base, cpus=cpus))
    tables = [fadt_at, madt_at]
    if hpet_at is not None:
        from ..devices.hpet import CAPABILITIES
        tables.append(place(hpet(CAPABILITIES & 0xFFFFFFFF, hpet_at)))
    xsdt_at = place(table(b"XSDT", 1, struct.pack(f"<{len(tables)}Q", *tables)))
    out[rsdp_at - base:rsdp_at - base + 36] = rsdp(xsdt_at)
    if len(out) > ACPI_SIZE:
        raise ValueError("ACPI tables outgrew their area")
    return rsdp_at, bytes(out)


def write(machine, hw_reduced: bool = True) -> int:
    """Write the machine's tables at :data:`ACPI_BASE`; return the RSDP's address.

    ``hw_reduced`` for a PVH guest (as Xen); a full FADT for an HVM guest.
    """
    from ..devices.ioapic import IOAPIC_BASE
    from ..devices.lapic import LAPIC_BASE
    slots = [(slot, pin) for slot in range(1, 32) for pin in range(4)]
    prt = [(slot, pin, machine.pci_gsi(slot, pin)) for slot, pin in slots]
    prt_pic = [(slot, pin, machine.pci_pic_irq(slot, pin)) for slot, pin in slots]
    from ..devices.hpet import HPET_BASE
    addr, blob = build(ACPI_BASE, machine.ioapic.state.id, IOAPIC_BASE, LAPIC_BASE, hw_reduced, prt, prt_pic,
                       cpus=len(machine.vcpus), hpet_at=None if getattr(machine, "hpet", None) is None else HPET_BASE)
    machine.memory.write(ACPI_BASE, blob)
    return addr


def _is_rsdp(raw: bytes) -> bool:
    """The signature, and both checksums (the first 20 bytes, all 36) right."""
    return raw[:8] == b"RSD PTR " and not sum(raw[:20]) & 0xFF and not sum(raw) & 0xFF


def parse(read, rsdp_addr: int) -> dict[bytes, bytes]:
    """Follow RSDP -> XSDT -> tables (tests); ValueError on a bad checksum or signature."""
    r = read(rsdp_addr, 36)
    if not _is_rsdp(r):
        raise ValueError("bad RSDP")
    xsdt_addr = struct.unpack_from("<Q", r, 24)[0]
    tables = {}

    def load(addr: int) -> bytes:
        length = struct.unpack("<I", read(addr + 4, 4))[0]
        raw = read(addr, length)
        if sum(raw) & 0xFF:
            raise ValueError(f"bad checksum in {raw[:4]!r}")
        return raw
    xsdt = load(xsdt_addr)
    for (ptr,) in struct.iter_unpack("<Q", xsdt[36:]):
        raw = load(ptr)
        tables[raw[:4]] = raw
        if raw[:4] == b"FACP":
            dsdt = load(struct.unpack_from("<Q", raw, 140)[0])
            tables[b"DSDT"] = dsdt
    return tables


# -- the names the Linux boot and its tests use ------------------------------------
RSDP_ADDR = ACPI_BASE


def _madt_offset() -> int:
    _, blob = build(ACPI_BASE, 1, 0xFEC00000, 0xFEE00000)
    return next(i for i in range(0, len(blob), 16) if blob[i:i + 4] == b"APIC")


MADT_ADDR = ACPI_BASE + _madt_offset()      # the layout does not depend on the values


def find_rsdp(read, start: int = 0xE0000, end: int = 0x100000) -> int | None:
    """The legacy scan: an "RSD PTR " on a 16-byte boundary with both checksums right."""
    for addr in range(start, end, 16):
        if _is_rsdp(read(addr, 36)):
            return addr
    return None


def parse_madt(read, rsdp_addr: int) -> tuple[int, int, list[tuple[int, bytes]]]:
    """(local APIC address, flags, [(structure type, bytes)]) of the MADT; ValueError on bad checksums."""
    madt = parse(read, rsdp_addr)[b"APIC"]
    lapic, flags = struct.unpack_from("<II", madt, 36)
    out, pos = [], 44
    while pos + 2 <= len(madt):
        kind, length = madt[pos], madt[pos + 1]
        if length < 2 or pos + length > len(madt):
            raise ValueError("MADT structure runs past the table")
        out.append((kind, bytes(madt[pos:pos + length])))
        pos += length
    return lapic, flags, out
