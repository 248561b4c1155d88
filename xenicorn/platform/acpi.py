"""A minimal set of ACPI tables: RSDP, XSDT and the MADT.

ACPI (Advanced Configuration and Power Interface, spec 6.x, chapter 5)
replaced the MP table (:mod:`.mptable`) as the way firmware describes a
PC's interrupt controllers. Kernels built without ``CONFIG_X86_MPPARSE``,
Debian's ``cloud-amd64`` among them, read *only* ACPI's **MADT** (Multiple
APIC Description Table, signature ``APIC``); without one they keep the
8259 and never use the IOAPIC. xenicorn writes just enough ACPI for that:
no FADT and no DSDT, so there is no AML, no power management and no PCI
interrupt routing (``_PRT``): Linux reports "ACPI: Unable to enable ACPI",
disables the interpreter, and still uses the MADT it has read.

The chain an OS follows:

- **RSDP** (Root System Description Pointer, 36 bytes for revision 2, on a
  16-byte boundary in 0xE0000-0xFFFFF where the OS scans, or handed over
  directly: the zero page's ``acpi_rsdp_addr``): ``"RSD PTR "``, a checksum
  over the first 20 bytes, OEM id, revision 2, the RSDT address (0 here),
  length 36, the **XSDT** address, and an extended checksum over all 36.
- **System description table header** (36 bytes, every table): signature,
  length, revision, checksum (the whole table sums to 0), OEM id, OEM
  table id, OEM revision, creator id and revision.
- **XSDT**: the header, then 64-bit addresses of the other tables (the MADT).
- **MADT**: the header, the local APIC address, flags (bit 0 PCAT_COMPAT:
  the PC also has a pair of 8259s), then *interrupt controller structures*,
  each ``(type, length, ...)``:

  ====  ===  ===============================  =================================
  type  len  structure                        here
  ====  ===  ===============================  =================================
  0     8    processor local APIC             processor uid 0, APIC id 0, enabled
  1     12   I/O APIC                         id 1, 0xFEC00000, GSI base 0
  2     10   interrupt source override        ISA IRQ 0 -> GSI 2 (the PIT's pin)
  4     6    local APIC NMI                   all processors (uid 0xFF), LINT1
  ====  ===  ===============================  =================================

ISA IRQs without an override map to the GSI of the same number, edge and
active high, which is how the machine wires them (``Machine._build_interrupts``).
"""
from __future__ import annotations

import struct

from ..devices.ioapic import IOAPIC_BASE
from ..devices.lapic import LAPIC_BASE
from .mptable import IOAPIC_ID

RSDP_ADDR = 0xF1000                   # the BIOS area, after the MP table; reserved in E820
XSDT_ADDR = RSDP_ADDR + 0x40
MADT_ADDR = RSDP_ADDR + 0x100
OEM_ID, OEM_TABLE_ID, CREATOR_ID = b"XENICO", b"XENICORN", b"XNCN"
MADT_PCAT_COMPAT = 1 << 0
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1 << 0
HEADER = "<4sIBB6s8sI4sI"             # signature, length, revision, checksum, OEM ids, creator


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header with its checksum, then ``body``."""
    out = bytearray(struct.pack(HEADER, signature, 36 + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                                CREATOR_ID, 1) + body)
    out[9] = _checksum(out)
    return bytes(out)


def madt() -> bytes:
    """The MADT for one CPU and the IOAPIC (module doc)."""
    body = struct.pack("<II", LAPIC_BASE, MADT_PCAT_COMPAT)
    body += struct.pack("<BBBBI", MADT_LAPIC, 8, 0, 0, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, IOAPIC_ID, 0, IOAPIC_BASE, 0)
    body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, 0, 2, 0)      # bus ISA, IRQ 0 -> GSI 2, conforms
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, 0, 1)
    return table(b"APIC", 3, body)


def rsdp(xsdt_addr: int) -> bytes:
    """A revision-2 RSDP pointing at the XSDT, both checksums set."""
    out = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0))
    out[8] = _checksum(out[:20])
    out[32] = _checksum(out)
    return bytes(out)


def write(machine) -> int:
    """Write RSDP, XSDT and MADT into the BIOS area; the RSDP's address.

    Also gives the I/O APIC the id the MADT states, as a BIOS assigns it.
    """
    mem = machine.memory
    mem.write(MADT_ADDR, madt())
    mem.write(XSDT_ADDR, table(b"XSDT", 1, struct.pack("<Q", MADT_ADDR)))
    mem.write(RSDP_ADDR, rsdp(XSDT_ADDR))
    machine.ioapic.state.id = IOAPIC_ID
    return RSDP_ADDR


def find_rsdp(read, start: int = 0xE0000, end: int = 0x100000) -> int | None:
    """Scan for the RSDP on 16-byte boundaries, as an OS does without a pointer from its loader."""
    for addr in range(start, end, 16):
        raw = read(addr, 36)
        if raw[:8] == b"RSD PTR " and sum(raw[:20]) & 0xFF == 0:
            return addr
    return None


def parse_madt(read, rsdp_addr: int) -> tuple[int, int, list[tuple[int, bytes]]]:
    """(local APIC address, flags, [(type, structure bytes)]) via RSDP -> XSDT -> APIC; checks checksums."""
    r = read(rsdp_addr, 36)
    if r[:8] != b"RSD PTR " or sum(r[:20]) & 0xFF or sum(r) & 0xFF:
        raise ValueError(f"no valid RSDP at {rsdp_addr:#x}")
    xsdt_addr = struct.unpack_from("<Q", r, 24)[0]
    for addr in _entries(read, xsdt_addr, b"XSDT"):
        head = read(addr, 36)
        if head[:4] == b"APIC":
            length = struct.unpack_from("<I", head, 4)[0]
            t = _checked(read, addr, length)
            lapic, flags = struct.unpack_from("<II", t, 36)
            out, pos = [], 44
            while pos < length:
                kind, size = t[pos], t[pos + 1]
                if size < 2:
                    raise ValueError(f"MADT structure at offset {pos} has length {size}")
                out.append((kind, t[pos:pos + size]))
                pos += size
            return lapic, flags, out
    raise ValueError("the XSDT lists no MADT")


def _checked(read, addr: int, length: int) -> bytes:
    data = read(addr, length)
    if sum(data) & 0xFF:
        raise ValueError(f"{data[:4].decode(errors='replace')} at {addr:#x}: checksum is wrong")
    return data


def _entries(read, xsdt_addr: int, signature: bytes) -> list[int]:
    head = read(xsdt_addr, 36)
    if head[:4] != signature:
        raise ValueError(f"no {signature.decode()} at {xsdt_addr:#x}")
    length = struct.unpack_from("<I", head, 4)[0]
    data = _checked(read, xsdt_addr, length)
    return [struct.unpack_from("<Q", data, off)[0] for off in range(36, length, 8)]
