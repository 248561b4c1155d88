"""The ACPI tables a PVH guest is given: RSDP -> XSDT -> FADT, DSDT, MADT."""
import struct

from xenicorn import firmware
from xenicorn.devices.console import ConsoleSink
from xenicorn.boot import acpi
from xenicorn import exits as E
from xenicorn.boot.loader import START_INFO_RSDP
from xenicorn.machine.machine import MachineConfig
from xenicorn.boot import boot


def booted(**kw):
    machine, kernel = boot(MachineConfig(debugcon="none", **kw), firmware.find("hello64"), console=ConsoleSink(None))
    return machine, kernel


def madt_entries(madt):
    """The MADT's interrupt controller structures, (type, bytes), after its 44-byte header (ACPI 6.5 §5.2.12)."""
    entries, pos = [], 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        assert length >= 2, f"entry at {pos} has length {length}"
        entries.append((kind, madt[pos:pos + length]))
        pos += length
    assert pos == len(madt)
    return entries


def test_start_info_points_at_valid_tables():
    machine, kernel = booted()
    rsdp = machine.memory.read_int(kernel.start_info + START_INFO_RSDP, 8)
    assert rsdp == acpi.ACPI_BASE and rsdp % 16 == 0            # where a legacy scan also looks
    tables = acpi.parse(machine.memory.read, rsdp)
    assert set(tables) == {b"FACP", b"APIC", b"DSDT", b"HPET"}         # the HPET: tests/test_hpet.py
    fadt = tables[b"FACP"]
    assert struct.unpack_from("<I", fadt, 112)[0] & acpi.FADT_HW_REDUCED_ACPI
    # no RTC and no VGA on this machine: Linux must not poll CMOS ports 0x70/0x71
    assert struct.unpack_from("<H", fadt, 109)[0] == acpi.FADT_BOOT_NO_CMOS_RTC | acpi.FADT_BOOT_NO_VGA
    madt = tables[b"APIC"]
    lapic_base, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_base == 0xFEE00000 and flags & acpi.MADT_PCAT_COMPAT
    entries = madt_entries(madt)
    kinds = [k for k, _ in entries]
    assert kinds == [acpi.MADT_LAPIC, acpi.MADT_IOAPIC, acpi.MADT_ISO, acpi.MADT_LAPIC_NMI]
    _, io = entries[1]
    io_id, io_addr, gsi_base = io[2], *struct.unpack_from("<II", io, 4)
    assert (io_id, io_addr, gsi_base) == (machine.ioapic.state.id, 0xFEC00000, 0)
    assert io_id != 0                                          # not the LAPIC's ID
    _, iso = entries[2]
    assert iso[3] == 0 and struct.unpack_from("<I", iso, 4)[0] == 2    # IRQ0 -> GSI 2, as wired


def test_the_machine_reports_the_ioapic_id_the_madt_gives():
    """The ID in the MADT's IOAPIC entry is the one the chip's ID register holds.

    A 32-bit Linux on an old Intel APIC reads register 0 and rewrites the ID
    when it differs from the firmware's (io_apic_get_unique_id() in
    arch/x86/kernel/apic/io_apic.c); on a real board the two agree.
    """
    machine, kernel = booted()
    rsdp = machine.memory.read_int(kernel.start_info + START_INFO_RSDP, 8)
    madt = acpi.parse(machine.memory.read, rsdp)[b"APIC"]
    ioapics = [body for kind, body in madt_entries(madt) if kind == acpi.MADT_IOAPIC]
    assert len(ioapics) == 1
    io_id, io_addr = ioapics[0][2], struct.unpack_from("<I", ioapics[0], 4)[0]
    # as the guest does it, at the address the MADT gives: IOREGSEL = 0 (ID), then read IOWIN
    machine.handle_exit(machine.vcpu, E.Mmio(-1, io_addr + 0x00, 4, True, 0x00))
    window = E.Mmio(-1, io_addr + 0x10, 4, False)
    machine.handle_exit(machine.vcpu, window)
    assert (window.value >> 24) & 0x0F == io_id              # 82093AA: ID in bits 27:24
    assert io_id != 0                                         # the BSP's LAPIC has 0; APIC IDs are unique


def test_no_acpi_leaves_rsdp_zero():
    machine, kernel = booted(acpi=False)
    assert machine.memory.read_int(kernel.start_info + START_INFO_RSDP, 8) == 0


def test_a_corrupt_table_is_caught_by_the_parser():
    machine, kernel = booted()
    blob = bytearray(machine.memory.read(acpi.ACPI_BASE, acpi.ACPI_SIZE))
    base = acpi.ACPI_BASE
    madt_at = next(i for i in range(0, len(blob), 16) if blob[i:i + 4] == b"APIC")
    blob[madt_at + 40] ^= 1
    try:
        acpi.parse(lambda a, n: bytes(blob[a - base:a - base + n]), base)
    except ValueError as e:
        assert "APIC" in str(e)
    else:
        raise AssertionError("a flipped bit went unnoticed")


def test_s5_and_the_sleep_registers_power_off():
    machine, kernel = booted()
    tables = acpi.parse(machine.memory.read, acpi.ACPI_BASE)
    assert tables[b"DSDT"][36:].startswith(acpi.AML_S5) and b"PCI0" in tables[b"DSDT"]
    fadt = tables[b"FACP"]
    ctl = struct.unpack_from("<BBBBQ", fadt, 244)
    sts = struct.unpack_from("<BBBBQ", fadt, 256)
    assert ctl == (1, 8, 0, 1, acpi.SLEEP_CONTROL_PORT) and sts == (1, 8, 0, 1, acpi.SLEEP_CONTROL_PORT + 1)
    machine.pio.write(acpi.SLEEP_CONTROL_PORT, 1, (3 << 2) | 0x20)      # S3: not offered, ignored
    assert machine.status is None
    machine.pio.write(acpi.SLEEP_CONTROL_PORT + 1, 1, 0x80)             # clearing WAK_STS: nothing happens
    assert machine.status is None and machine.pio.read(acpi.SLEEP_CONTROL_PORT + 1, 1) == 0
    machine.pio.write(acpi.SLEEP_CONTROL_PORT, 1, (5 << 2) | 0x20)      # what Linux writes for S5
    assert machine.status == 0 and machine.shutdown_reason == "poweroff"


def test_hvm_tables_have_a_full_fadt_with_pm1_blocks_and_an_rtc():
    """What Xen gives HVM guests: without it Linux drops the 8259 and calls the guest PVH; and a PM timer."""
    _, blob = acpi.build(acpi.ACPI_BASE, 1, 0xFEC00000, 0xFEE00000, hw_reduced=False)
    tables = acpi.parse(lambda a, n: blob[a - acpi.ACPI_BASE:a - acpi.ACPI_BASE + n], acpi.ACPI_BASE)
    fadt = tables[b"FACP"]
    assert struct.unpack_from("<I", fadt, 112)[0] == acpi.FADT_TMR_VAL_EXT  # not hardware-reduced; 32-bit timer
    assert struct.unpack_from("<H", fadt, 109)[0] == acpi.FADT_BOOT_NO_VGA  # the RTC is there
    assert struct.unpack_from("<H", fadt, 46)[0] == 9                      # SCI_INT
    assert struct.unpack_from("<II", fadt, 56)[0] == 0x600                 # PM1a_EVT_BLK
    assert struct.unpack_from("<I", fadt, 64)[0] == 0x604                  # PM1a_CNT_BLK
    assert fadt[88:90] == bytes([4, 2])
    assert struct.unpack_from("<BBBBQ", fadt, 172) == (1, 16, 0, 1, 0x604)  # X_PM1a_CNT_BLK
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x60C and fadt[91] == 4   # PM_TMR_BLK, PM_TMR_LEN
    assert struct.unpack_from("<BBBBQ", fadt, 208) == (1, 32, 0, 3, 0x60C)  # X_PM_TMR_BLK, dword access


def test_the_pm_timer_counts_machine_time_at_3_579545_mhz():
    """ACPI's PM timer: 3,579,545 counts per second of machine time, 32 bits, read-only."""
    from xenicorn.machine.machine import Machine, MachineConfig
    m = Machine(MachineConfig(xen=False, debugcon="none", clock="deterministic"))

    def read():
        ex = E.PortIO(-1, 0x60C, 4, False)
        m.handle_exit(m.vcpu, ex)
        return ex.value
    first = read()
    m.clock.wait_until(m.clock.now_ns() + 1_000_000_000)                   # a second passes (asleep)
    second = read()
    assert second == m.clock.now_ns() * 3_579_545 // 10**9 & 0xFFFFFFFF   # machine time, exactly
    assert abs((second - first) - 3_579_545) <= 8          # a port access is 1 us of deterministic time
    m.handle_exit(m.vcpu, E.PortIO(-1, 0x60C, 4, True, 0))                 # ignored
    assert read() >= second


def test_pm1_event_block_and_the_dsdt_s5_type_power_off(machine):
    machine.handle_exit(machine.vcpu, E.PortIO(-1, 0x602, 2, True, 0x0120))   # PM1_EN
    status = E.PortIO(-1, 0x600, 4, False)
    machine.handle_exit(machine.vcpu, status)
    assert status.value == 0x0120 << 16                                       # status 0, enable kept
    machine.handle_exit(machine.vcpu, E.PortIO(-1, 0x604, 2, True, (5 << 10) | (1 << 13)))
    assert machine.shutdown_reason == "poweroff" and machine.status == 0


def test_the_keyboard_controller_reset_ends_the_run(machine):
    """Linux's reboot after a panic (panic=-1) pulses RESET# through the 8042: the run ends."""
    status = E.PortIO(-1, 0x64, 1, False)
    machine.handle_exit(machine.vcpu, status)
    assert status.value == 0xFF and machine.status is None          # no 8042: reads float
    machine.handle_exit(machine.vcpu, E.PortIO(-1, 0x64, 1, True, 0xFE))
    assert machine.shutdown_reason == "reboot" and machine.status == 0
