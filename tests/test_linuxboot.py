"""The Linux/x86 boot protocol loader (zero page, 32-bit entry) and the MP table.

The small images here are built in the test: a boot sector and one setup
sector carrying a setup header, then a protected-mode part that is a few
hand-assembled 32-bit instructions. The slow test at the end boots
Debian's bzImage itself.
"""
from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys

import pytest

from xenicorn import firmware
from xenicorn.devices.console import ConsoleSink
from xenicorn.devices.ioapic import IOAPIC_BASE
from xenicorn.devices.ioapic import VERSION as IOAPIC_VERSION
from xenicorn.devices.lapic import LAPIC_BASE
from xenicorn.boot import acpi, mptable
from xenicorn.boot import linuxboot as lb
from xenicorn.boot.loader import LoadError
from xenicorn.machine.machine import Machine, MachineConfig
from xenicorn.boot import boot
from xenicorn.machine.memory import E820_RESERVED, GuestMemory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 32-bit code: check ESI -> "HdrS" at +0x202, print the command line
# (ESI -> cmd_line_ptr) on port 0xE9, exit through isa-debug-exit with 0x10
# (status 0x21), or 0x20 (status 0x41) if the zero page is not there.
ENTRY_CODE = bytes([
    0x8B, 0x86, 0x02, 0x02, 0x00, 0x00,      # mov eax, [esi+0x202]
    0x3D, 0x48, 0x64, 0x72, 0x53,            # cmp eax, "HdrS"
    0x75, 0x14,                              # jne fail
    0x8B, 0xB6, 0x28, 0x02, 0x00, 0x00,      # mov esi, [esi+0x228]   (cmd_line_ptr)
    0xAC,                                    # loop: lodsb
    0x84, 0xC0,                              # test al, al
    0x74, 0x04,                              # jz done
    0xE6, 0xE9,                              # out 0xe9, al
    0xEB, 0xF7,                              # jmp loop
    0xB0, 0x10, 0xE6, 0xF4, 0xF4,            # done: mov al, 0x10; out 0xf4, al; hlt
    0xB0, 0x20, 0xE6, 0xF4, 0xF4,            # fail: mov al, 0x20; out 0xf4, al; hlt
])


def make_bzimage(code: bytes = ENTRY_CODE, *, version: int = 0x020F, relocatable: bool = True,
                 pref: int = 0x200000, init_size: int = 0x100000, cmdline_size: int = 0x7FF,
                 initrd_max: int = 0x7FFFFFFF, truncate: int = 0) -> bytes:
    setup_sects = 1
    setup = bytearray(512 * (1 + setup_sects))
    pm = code + b"\0" * (-len(code) % 16)
    setup[lb.SETUP_SECTS] = setup_sects
    struct.pack_into("<I", setup, lb.SYSSIZE, len(pm) // 16)
    struct.pack_into("<H", setup, lb.BOOT_FLAG, 0xAA55)
    setup[lb.JUMP:lb.JUMP + 2] = bytes([0xEB, 0x6A])          # header ends at 0x202 + 0x6A
    setup[lb.HEADER:lb.HEADER + 4] = b"HdrS"
    struct.pack_into("<H", setup, lb.VERSION, version)
    struct.pack_into("<H", setup, 0x20E, 0x1234)              # kernel_version: copied unchanged
    setup[lb.LOADFLAGS] = lb.LOADED_HIGH
    struct.pack_into("<I", setup, lb.CODE32_START, 0x100000)
    struct.pack_into("<I", setup, lb.INITRD_ADDR_MAX, initrd_max)
    struct.pack_into("<I", setup, lb.KERNEL_ALIGNMENT, 0x200000)
    setup[lb.RELOCATABLE_KERNEL] = int(relocatable)
    struct.pack_into("<H", setup, lb.XLOADFLAGS, lb.XLF_KERNEL_64)
    struct.pack_into("<I", setup, lb.CMDLINE_SIZE, cmdline_size)
    struct.pack_into("<Q", setup, lb.PREF_ADDRESS, pref)
    struct.pack_into("<I", setup, lb.INIT_SIZE, init_size)
    image = bytes(setup) + pm
    return image[:len(image) - truncate]


def u32(mem, addr):
    return mem.read_u32(addr)


# -- the zero page -------------------------------------------------------------
def test_zero_page_fields_sit_at_the_protocol_offsets(tmp_path):
    mem = GuestMemory(64 << 20)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"INITRD" * 1000)
    image = make_bzimage()
    kernel, b = lb.load_bzimage(mem, "bz", "console=ttyS0 quiet", str(initrd), data=image)
    zp = b.zero_page
    assert mem.read(zp + lb.HEADER, 4) == b"HdrS"
    # the header is the image's, up to the fields the loader fills in, and after them
    assert mem.read(zp + lb.HDR_START, lb.TYPE_OF_LOADER - lb.HDR_START) == image[lb.HDR_START:lb.TYPE_OF_LOADER]
    assert mem.read(zp + lb.INITRD_ADDR_MAX, 0x26C - lb.INITRD_ADDR_MAX) == image[lb.INITRD_ADDR_MAX:0x26C]
    assert mem.read_struct(zp + 0x20E, "<H") == (0x1234,)
    assert mem.read_u8(zp + lb.TYPE_OF_LOADER) == 0xFF
    assert mem.read_u8(zp + lb.LOADFLAGS) & lb.LOADED_HIGH
    assert mem.read_u8(zp + lb.BP_SENTINEL) == 0
    assert mem.read_cstring(u32(mem, zp + lb.CMD_LINE_PTR)) == b"console=ttyS0 quiet"
    assert u32(mem, zp + lb.BP_EXT_CMD_LINE_PTR) == 0
    rd, size = u32(mem, zp + lb.RAMDISK_IMAGE), u32(mem, zp + lb.RAMDISK_SIZE)
    assert size == 6000 and mem.read(rd, size) == b"INITRD" * 1000
    assert (u32(mem, zp + lb.BP_EXT_RAMDISK_IMAGE), u32(mem, zp + lb.BP_EXT_RAMDISK_SIZE)) == (0, 0)
    assert rd % 4096 == 0 and rd >= b.load_addr + 0x100000 and rd + size <= 64 << 20
    assert mem.read_u64(zp + lb.BP_ACPI_RSDP_ADDR) == 0                 # no tables were given
    # the relocatable kernel went to pref_address, and code32_start says so
    assert b.load_addr == 0x200000 == u32(mem, zp + lb.CODE32_START) == kernel.entry
    assert mem.read(b.load_addr, len(ENTRY_CODE)) == ENTRY_CODE


def test_zero_page_carries_the_e820_map_with_the_bios_area_reserved():
    mem = GuestMemory(64 << 20)
    _, b = lb.load_bzimage(mem, "bz", "", data=make_bzimage())
    n = mem.read_u8(b.zero_page + lb.BP_E820_ENTRIES)
    table = [mem.read_struct(b.zero_page + lb.BP_E820_TABLE + 20 * i, "<QQI") for i in range(n)]
    assert table == [(e.addr, e.size, e.type) for e in mem.e820()] and n >= 3
    assert any(a <= mptable.FLOATING_ADDR and mptable.FLOATING_ADDR + 0x10000 <= a + s and t == E820_RESERVED
               for a, s, t in table)
    assert mem.read_struct(b.zero_page + lb.BP_E820_TABLE + 20 * n, "<QQI") == (0, 0, 0)


def test_initrd_respects_initrd_addr_max(tmp_path):
    mem = GuestMemory(64 << 20)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x" * 5000)
    _, b = lb.load_bzimage(mem, "bz", "", str(initrd), data=make_bzimage(initrd_max=0x1FFFFFF))
    addr, size = b.initrd
    assert addr + size <= 0x2000000 and addr >= b.load_addr + 0x100000


def test_a_kernel_that_cannot_move_loads_at_1mib():
    mem = GuestMemory(64 << 20)
    _, b = lb.load_bzimage(mem, "bz", "", data=make_bzimage(relocatable=False))
    assert b.load_addr == 0x100000


@pytest.mark.parametrize("image, message", [
    (make_bzimage(version=0x020B), "boot protocol 2.11 is too old"),
    (make_bzimage(truncate=16), "truncated"),
    (b"\x7fELF" + bytes(2000), "not a bzImage"),
    (make_bzimage()[:0x300], "the image is 768 bytes but its header says 1072"),
    (make_bzimage()[:0x200], "not a bzImage"),
], ids=["old-protocol", "truncated", "elf", "cut-after-setup", "cut-in-header"])
def test_unusable_images_are_refused_with_one_line(image, message):
    with pytest.raises(LoadError, match=message) as e:
        lb.load_bzimage(GuestMemory(64 << 20), "bz", "", data=image)
    assert "\n" not in str(e.value)


def test_too_long_a_command_line_and_too_little_ram_are_refused():
    with pytest.raises(LoadError, match="at most 15"):
        lb.load_bzimage(GuestMemory(64 << 20), "bz", "x" * 16, data=make_bzimage(cmdline_size=15))
    with pytest.raises(LoadError, match="larger -m"):
        lb.load_bzimage(GuestMemory(8 << 20), "bz", "", data=make_bzimage(init_size=16 << 20))


# -- the 32-bit entry ------------------------------------------------------------
def test_the_32bit_entry_state_and_a_guest_that_reads_its_zero_page(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage())
    machine, _ = boot(MachineConfig(ram_mib=64, debugcon="none", cmdline="hello zero page"),
                      str(path), console=ConsoleSink(None), protocol="linux")
    v = machine.vcpu
    assert v.reg("rip") == 0x200000 and v.reg("rsi") == lb.ZERO_PAGE_ADDR
    assert v.reg("rbx") == v.reg("rbp") == v.reg("rdi") == 0
    assert v.reg("cr0") & 1 and not v.reg("cr0") & (1 << 31) and not v.reg("rflags") & (1 << 9)
    assert v.reg("cs") == lb.BOOT_CS and v.reg("ds") == v.reg("ss") == v.reg("es") == lb.BOOT_DS
    gdt = machine.memory.read(lb.BOOT_GDT_ADDR, 32)
    for sel, access in ((lb.BOOT_CS, 0x9B), (lb.BOOT_DS, 0x93)):
        lo, hi = struct.unpack_from("<II", gdt, sel)
        assert lo == 0x0000FFFF and hi == 0x00CF0000 | (access << 8)     # base 0, 4 GiB, G, 32-bit
    status = machine.run()
    text = machine.console.text()
    machine.close()
    assert (status, text) == (0x21, "hello zero page")


def test_cli_boot_linux_errors_are_one_line(tmp_path):
    bad = tmp_path / "bzImage"
    bad.write_bytes(make_bzimage(truncate=16))
    for args, message in (([str(bad)], "truncated"),
                          ([firmware.find("hello64")], "not a bzImage"),
                          ([str(bad), "--load-addr", "0x100000"], "--load-addr")):
        r = subprocess.run([sys.executable, "-m", "xenicorn", "run", "--boot", "linux", *args],
                           capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
        assert r.returncode == 2 and r.stderr.startswith("xenicorn: error: ") and message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1


# -- the MP table ------------------------------------------------------------------
def read_table(machine):
    read = machine.memory.read
    addr = mptable.find(read)
    assert addr == mptable.FLOATING_ADDR
    return mptable.parse(read, addr)


def test_mp_table_describes_the_machine(machine):
    mptable.write(machine)
    t = read_table(machine)
    assert machine.memory.read(t.floating_addr, 4) == b"_MP_" and t.config_addr == t.floating_addr + 16
    assert not t.imcr and t.lapic_addr == LAPIC_BASE and t.oem == "XENICORN"
    assert t.processors == [(0, machine.lapic.mmio_read(0x30, 4) & 0xFF, mptable.CPU_ENABLED | mptable.CPU_BSP)]
    assert t.buses == {mptable.PCI_BUS: "PCI", mptable.ISA_BUS: "ISA"}
    assert t.ioapics == [(mptable.IOAPIC_ID, IOAPIC_VERSION, 1, IOAPIC_BASE)]
    machine.ioapic.mmio_write(0x00, 4, 0)                               # IOREGSEL = ID
    assert machine.ioapic.mmio_read(0x10, 4) >> 24 == mptable.IOAPIC_ID
    lint = {(e.irqtype, e.dest_pin, e.dest_apic) for e in t.irqs if e.kind == mptable.MP_LINTSRC}
    assert lint == {(mptable.EXTINT, 0, 0xFF), (mptable.NMI, 1, 0xFF)}


def test_mp_table_checksums_are_checked(machine):
    mptable.write(machine)
    t = read_table(machine)
    raw = bytearray(machine.memory.read(t.config_addr, 64))
    raw[50] ^= 1
    machine.memory.write(t.config_addr, bytes(raw))
    with pytest.raises(mptable.MpTableError, match="checksum"):
        mptable.parse(machine.memory.read, t.floating_addr)
    machine.memory.write(t.floating_addr + 4, b"\0\0\0\0")            # floating pointer corrupted
    assert mptable.find(machine.memory.read) is None


def test_mp_table_isa_entries_match_the_wiring(machine):
    mptable.write(machine)
    t = read_table(machine)
    assert mptable.gsi_of_isa_irq(t, 0) == 2 and mptable.gsi_of_isa_irq(t, 2) is None
    for irq in (0, 1, 3, 4, 8, 12, 14, 15):
        pin = mptable.gsi_of_isa_irq(t, irq)
        machine.isa_irq[irq].raise_()
        high = [n for n, line in enumerate(machine.gsi) if line.level]
        machine.isa_irq[irq].lower()
        assert high == [pin], f"ISA IRQ {irq}: table says pin {pin}, the machine drives {high}"


def test_mp_table_pci_entries_match_the_wiring(machine):
    mptable.write(machine)
    t = read_table(machine)
    pci = [e for e in t.irqs if e.kind == mptable.MP_INTSRC and e.bus == mptable.PCI_BUS]
    slots = {devfn >> 3 for devfn in machine.pci.functions}
    assert {e.irq >> 2 for e in pci} == slots and len(pci) == 4 * len(slots)
    assert all(e.flags == mptable.ACTIVE_LOW_LEVEL and e.dest_apic == mptable.IOAPIC_ID for e in pci)
    for e in pci:
        devfn, pin = (e.irq >> 2) << 3, (e.irq & 3) + 1
        machine.pci.set_extra_intx(devfn, pin, True)
        high = [n for n, line in enumerate(machine.gsi) if line.level]
        machine.pci.set_extra_intx(devfn, pin, False)
        assert high == [e.dest_pin], f"slot {e.irq >> 2} INT{'ABCD'[e.irq & 3]}: table {e.dest_pin}, wired {high}"
    # the xen-platform device's INTA, the one Xen's PCI INTx callback uses
    assert [e.dest_pin for e in pci if e.irq == (2 << 2)] == [17]


@pytest.mark.parametrize("name", ["irq64", "evtchn32"])
def test_the_firmware_tables_are_harmless_to_the_pvh_kernels(name):
    path = firmware.find(name)
    outs = []
    for with_table in (False, True):
        machine, _ = boot(MachineConfig(debugcon="none"), path, console=ConsoleSink(None))
        if with_table:
            mptable.write(machine)
            acpi.write(machine)
        status = machine.run()
        outs.append((status, machine.console.text().count("Test result: SUCCESS")))
        machine.close()
    assert outs == [(0, 1), (0, 1)]


def test_the_linux_boot_writes_the_mp_table(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage())
    machine, _ = boot(MachineConfig(ram_mib=64, debugcon="none"), str(path), console=ConsoleSink(None),
                      protocol="linux")
    assert read_table(machine).ioapics
    machine.close()
    m2 = Machine(MachineConfig(ram_mib=16, debugcon="none"), console=ConsoleSink(None))
    assert mptable.find(m2.memory.read) is None          # a PVH machine gets none
    m2.close()


# -- the ACPI MADT -----------------------------------------------------------------
def test_acpi_madt_describes_the_cpu_the_ioapic_and_irq0(machine):
    rsdp = acpi.write(machine)
    read = machine.memory.read
    assert acpi.find_rsdp(read) == rsdp == acpi.RSDP_ADDR
    lapic, flags, structures = acpi.parse_madt(read, rsdp)
    assert lapic == LAPIC_BASE and flags & acpi.MADT_PCAT_COMPAT
    by_type = {}
    for kind, raw in structures:
        by_type.setdefault(kind, []).append(raw)
    assert [struct.unpack("<BBBBI", r) for r in by_type[acpi.MADT_LAPIC]] == [(0, 8, 0, 0, 1)]
    assert [struct.unpack("<BBBBII", r) for r in by_type[acpi.MADT_IOAPIC]] == \
        [(1, 12, mptable.IOAPIC_ID, 0, IOAPIC_BASE, 0)]
    # the one override is the PIT's: ISA IRQ 0 arrives on GSI 2, as the machine wires it
    (iso,) = by_type[acpi.MADT_ISO]
    _, _, bus, irq, gsi, _ = struct.unpack("<BBBBIH", iso)
    machine.isa_irq[irq].raise_()
    assert (bus, irq, gsi) == (0, 0, 2) and [n for n, line in enumerate(machine.gsi) if line.level] == [gsi]
    assert [struct.unpack("<BBBHB", r)[-1] for r in by_type[acpi.MADT_LAPIC_NMI]] == [1]     # LINT1
    machine.ioapic.mmio_write(0x00, 4, 0)
    assert machine.ioapic.mmio_read(0x10, 4) >> 24 == mptable.IOAPIC_ID


def test_acpi_checksums_are_checked(machine):
    rsdp = acpi.write(machine)
    machine.memory.write(acpi.MADT_ADDR + 40, b"\x07")
    with pytest.raises(ValueError, match="checksum"):
        acpi.parse_madt(machine.memory.read, rsdp)
    machine.memory.write(rsdp + 9, b"Z")                     # OEM id: the RSDP's checksum breaks
    assert acpi.find_rsdp(machine.memory.read) is None


def test_the_linux_boot_hands_over_the_rsdp(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage())
    machine, _ = boot(MachineConfig(ram_mib=64, debugcon="none"), str(path), console=ConsoleSink(None),
                      protocol="linux")
    assert machine.memory.read_u64(lb.ZERO_PAGE_ADDR + lb.BP_ACPI_RSDP_ADDR) == acpi.RSDP_ADDR
    assert acpi.parse_madt(machine.memory.read, acpi.RSDP_ADDR)[2]
    machine.close()


# -- Debian's kernel, booted through the protocol --------------------------------------
def debian_bzimage() -> str:
    from xenicorn.linux import debian, guest
    cache = guest.cache_dir()
    found = sorted(glob.glob(os.path.join(cache, "linux-image-*-cloud-amd64.vmlinuz")))
    if found:
        return found[-1]
    try:
        return guest.bzimage("linux-image-cloud-amd64")
    except (debian.PackageError, OSError) as e:
        pytest.skip(f"Debian's kernel is not cached and cannot be downloaded: {e}")


USERSPACE = "XENICORN-USERSPACE-REACHED"              # busybox's /init (xenicorn.linux.guest.MARKER)


def _interrupt_lines(text: str) -> dict[str, tuple[int, str]]:
    """name -> (count over all CPUs, chip), from the /proc/interrupts lines /init printed after the marker."""
    out = {}
    assert USERSPACE in text, text[-3000:]
    for line in text.split(USERSPACE, 1)[1].splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith(":") and parts[1].isdigit():
            counts = [int(p) for p in parts[1:] if p.isdigit()]
            out[parts[-1]] = (sum(counts), parts[1 + len(counts)])
    return out


def boot_debian(tmp_path, *, append: str = "", pci_irqs: str = "apic", smp: int = 1, protocol: str = "linux",
                cpu: str = "default"):
    """Boot the Debian bzImage with the busybox initramfs until its /init powers off.

    In this process, so the test can look at the machine afterwards:
    returns (machine, serial output). Runs at most 240 s.
    """
    image = debian_bzimage()
    from xenicorn.linux import debian, guest
    try:
        initrd = guest.initramfs()
    except (debian.PackageError, OSError) as e:
        pytest.skip(f"no busybox initramfs: {e}")
    out = tmp_path / "ttyS0"
    config = MachineConfig(ram_mib=512, cmdline=(guest.DEFAULT_CMDLINE + " " + append).strip(),
                           serial=f"file:{out}", timeout=240, pci_irqs=pci_irqs, debugcon="none", smp=smp, cpu=cpu)
    machine, _ = boot(config, image, initrd=initrd, protocol=protocol)
    machine.run()
    machine.console.flush()
    return machine, out.read_text(errors="replace")


def check_common_boot(machine, text: str, abi: str = "FIFO") -> None:
    """What every callback path shares: Xen found, HVM not PVH, PC firmware tables, a clean power-off.

    ``abi``: the event-channel ABI Linux took -- FIFO when Xen offers it
    (its default), 2-level with ``xen.fifo_events=0``.
    """
    assert machine.shutdown_reason == "poweroff" and machine.status == 0, (
        f"{machine.shutdown_reason}: {machine.shutdown_message}\n" + "\n".join(machine.crash_report())
        + text[-3000:])
    assert "Hypervisor detected: Xen HVM" in text
    assert "Booting paravirtualized kernel on Xen HVM" in text
    assert "Xen PVH" not in text
    assert "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved" in text
    assert "RAMDISK: [mem " in text                        # the initrd the zero page points at
    if abi == "FIFO":
        assert "xen:events: Using FIFO-based ABI" in text
        fifo = machine.xen.evtchn.abi
        assert fifo.name == "FIFO" and fifo.pages and set(fifo.control) == set(range(len(machine.vcpus)))
    else:
        assert "xen:events: Using 2-level ABI" in text and machine.xen.evtchn.abi.name == "2-level"
    # The FADT is a full PC one (SCI, PM1 blocks, RTC present), so Linux keeps the
    # 8259 and the 16 ISA IRQs and calls the guest HVM, not PVH.
    assert "preallocated irqs: 16" in text
    assert "MADT or MP tables are not detected" not in text
    assert "Run /init as init process" in text and USERSPACE in text
    assert machine.xen.hypercall_counts.get("hvm_op", 0) > 0    # HVM_PARAM_CALLBACK_IRQ at least
    # xenbus talked to xenstore through its event channel, delivered by the path under test
    counts = _interrupt_lines(text)
    assert counts.get("xenbus", (0, ""))[0] > 0, text[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_debian_kernel_reaches_userspace_through_the_callback_vector(tmp_path):
    """The stock bzImage, its decompressor and all, through the 32-bit entry, to busybox.

    Xen's per-CPU timer (VIRQ_TIMER) and xenstore's event channel arrive
    through the callback vector (HVMOP_set_evtchn_upcall_vector / the
    vector via), which Linux counts as "HYP" and per event channel.
    """
    machine, text = boot_debian(tmp_path)
    check_common_boot(machine, text)
    assert "Xen HVM callback vector for event delivery is enabled" in text
    assert "installing Xen timer for CPU 0" in text
    # Debian's cloud kernel has no CONFIG_X86_MPPARSE: the IOAPIC comes from the MADT;
    # IRQ 0 through its pin 2 (the timer check passed)
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in text
    assert "IOAPIC[0]: apic_id 1, version 32, address 0xfec00000, GSI 0-47" in text
    assert "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)" in text
    assert "APIC: Switch to symmetric I/O mode setup" in text
    assert "ACPI: Using IOAPIC for interrupt routing" in text      # _PIC(1): the _PRT's IOAPIC answer
    assert "..TIMER: vector=0x30 apic1=0 pin1=2" in text
    assert "timer not connected" not in text and "..MP-BIOS bug" not in text
    counts = _interrupt_lines(text)
    assert counts["timer0"][0] > 0 and counts["timer0"][1] == "xen-percpu", text[-2000:]
    # Linux 6.1 registers a per-vCPU upcall vector (HVMOP_set_evtchn_upcall_vector,
    # offered by CPUID leaf 4) and then sets HVM_PARAM_CALLBACK_IRQ to GSI 1 only
    # "to trick the toolstack" into seeing an enlightened guest: the vector wins,
    # as in Xen, and the GSI line never moves.
    cb = machine.xen.callback
    assert machine.xen.state.upcall_vectors.get(0, 0) >= 0x10
    assert cb.stats["vectors"] > 0 and cb.stats["asserts"] == 0, (cb.describe(), cb.stats)
    assert machine.xen.vcpu_state(0).timer_events > 0
    # with the FIFO ABI, Linux puts its timer VIRQ on the most urgent queue (xen_setup_timer)
    assert machine.xen.evtchn.abi.priority.get(machine.xen.evtchn.virqs[(0, 0)]) == 0


# Without the vector callback Linux has no Xen clock (the LAPIC timer and TSC
# serve), and the xen-platform PCI driver asks for the callback through its
# interrupt: a GSI below 16 when the PCI line is wired to an ISA IRQ, PCI INTx
# when it is an IOAPIC pin of its own, the 8259 with noapic.
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("append, pci_irqs, kind, gsi, chip", [
    ("xen_no_vector_callback", "isa", "gsi", 10, "IO-APIC"),
    ("xen_no_vector_callback", "apic", "intx", 17, "IO-APIC"),
    ("xen_no_vector_callback noapic", "apic", "gsi", 10, "XT-PIC"),
], ids=["gsi-ioapic", "pci-intx", "intx-pic-noapic"])
def test_debian_kernel_reaches_userspace_through_the_platform_pci_interrupt(tmp_path, append, pci_irqs,
                                                                           kind, gsi, chip):
    machine, text = boot_debian(tmp_path, append=append, pci_irqs=pci_irqs)
    check_common_boot(machine, text)
    assert "Xen HVM callback vector for event delivery is enabled" not in text
    cb = machine.xen.callback
    assert (cb.kind, cb.gsi) == (kind, gsi), cb.describe()
    count, shown = _interrupt_lines(text)["xen-platform-pci"]
    assert count > 0 and shown == chip, text[-2000:]
    # the line went up for events and came down once the guest had taken them
    assert cb.stats["asserts"] > 0 and cb.stats["deasserts"] > 0
    assert not cb.level
    if chip == "XT-PIC":
        # the DSDT's _PRT answered for the 8259 model: PIRQB through the PIIX3 to IRQ 10
        assert "Skipping IOAPIC probe due to 'noapic' option" in text
        assert "ACPI: Using PIC for interrupt routing" in text
    else:
        assert "ACPI: Using IOAPIC for interrupt routing" in text
    if kind == "gsi" and chip == "IO-APIC":
        check_hpet(machine, text)


def check_hpet(machine, text: str) -> None:
    """Without the vector callback Linux has no Xen clock. Before the HPET, the TSC's early
    watchdog was jiffies, and a loaded host (lost ticks) got the TSC marked unstable. With it,
    Linux registers the HPET from the ACPI table before ``tsc-early``, which makes it the
    watchdog, and uses timer 0 in legacy replacement mode as its early clockevent on IRQ 0."""
    assert "ACPI: HPET id: 0x8086a201 base: 0xfed00000" in text
    assert "clocksource: hpet: mask: 0xffffffff" in text
    assert text.index("clocksource: hpet:") < text.index("clocksource: tsc-early:")
    assert "hpet0: at MMIO 0xfed00000, IRQs 2, 8, 0" in text
    assert "hpet0: 3 comparators, 64-bit 62.500000 MHz counter" in text
    assert "as unstable" not in text and "..TIMER: vector=0x30 apic1=0 pin1=2" in text
    # the early clockevent: timer 0's edges on IRQ 0, and the PIT never needed
    w, h = machine.wiring, machine.hpet
    assert h.fired[0] > 10 and w.pic_input(0, "hpet").edges == w.isa_gsi_input(0, "hpet").edges == h.fired[0]
    assert machine.isa_irq[0].edges == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_debian_kernel_with_fifo_events_off_takes_the_2_level_abi(tmp_path):
    """``xen.fifo_events=0`` (events_base.c's module parameter, prefix "xen."): Linux never calls
    init_control, and the 2-level ABI carries every event."""
    # given as KERNEL with no protocol named, a bzImage boots Linux's way (QEMU's habit) and
    # user space prints on ttyS0 (check_common_boot looks for /init's marker there)
    machine, text = boot_debian(tmp_path, append="xen.fifo_events=0", protocol="auto")
    assert machine.boot_protocol == "linux"
    check_common_boot(machine, text, abi="2-level")
    assert "Using FIFO-based ABI" not in text
    assert machine.xen.callback.stats["vectors"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_debian_kernel_reaches_userspace_as_a_pvh_guest(tmp_path):
    """The vmlinux inside the bzImage, through its PVH entry, with Xen's PV console.

    A PVH guest has no 8259 (hardware-reduced ACPI), so its console is hvc0:
    Linux's hvc driver over the console ring and its event channel.
    """
    from xenicorn.devices.console import ConsoleSink
    from xenicorn.linux import debian, guest
    try:
        vmlinux, initrd = guest.kernel(), guest.initramfs()
    except (debian.PackageError, OSError) as e:
        pytest.skip(f"Debian's kernel is not cached and cannot be downloaded: {e}")
    sink = ConsoleSink(None)
    config = MachineConfig(ram_mib=512, cmdline=guest.PVH_CMDLINE, serial="none", timeout=240, debugcon="none")
    machine, _ = boot(config, vmlinux, initrd=initrd, protocol="pvh", console=sink)
    machine.run()
    text = bytes(sink.data).decode(errors="replace")
    assert machine.shutdown_reason == "poweroff", machine.shutdown_message + text[-3000:]
    assert "Booting kernel on Xen PVH" in text, text[:3000]
    counts = _interrupt_lines(text)
    assert counts["hvc_console"][0] > 0 and counts["timer0"][0] > 0, text[-2000:]
