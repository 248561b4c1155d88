"""Multiboot v1 boot, the protocol choice of ``--boot auto``, and QEMU's fw_cfg.

``mboot32`` (xenicorn/firmware/src/multiboot) checks the loader's contract
from inside: EAX, EBX, the CPU state, memory information against the
memory map, the command line, page-aligned modules with their strings, the
loader's name, and fw_cfg's RAM size and CPU count. QEMU's ``-kernel``
passes the same kernel (checked when writing it).
"""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from xenicorn import firmware
from xenicorn.boot import boot, choose_protocol
from xenicorn.boot import multiboot
from xenicorn.devices.console import ConsoleSink
from xenicorn.devices.fwcfg import FwCfg, items_for
from xenicorn.machine.machine import MachineConfig


def _modules(tmp_path) -> str:
    (tmp_path / "one.bin").write_bytes(b"MODULE-ONE......")
    (tmp_path / "two.bin").write_bytes(b"MODULE-TWO......")
    return f"{tmp_path / 'one.bin'} arg=1,{tmp_path / 'two.bin'}"


def test_mboot32_checks_the_loaders_contract_from_inside(tmp_path):
    kernel = firmware.find("mboot32")
    assert choose_protocol(kernel) == "multiboot"          # no PVH note: the header decides
    sink = ConsoleSink(None)
    machine, loaded = boot(MachineConfig(cmdline="mbtest", smp=2), kernel, initrd=_modules(tmp_path),
                           console=sink, protocol="auto")
    assert machine.boot_protocol == "multiboot"
    vcpu = machine.vcpu
    assert vcpu.reg("rax") == multiboot.BOOTLOADER_MAGIC and vcpu.reg("rbx") == multiboot.MBI_ADDR
    flags, lower, upper = struct.unpack("<III", machine.memory.read(multiboot.MBI_ADDR, 12))
    assert flags == 0x24D and lower == 639 and upper == (128 << 10) - 1024
    assert [a & 0xFFF for a, _ in loaded.modules] == [0, 0]
    machine.run()
    text = sink.text()
    assert "Test result: SUCCESS" in text and "FAIL" not in text, text
    assert "fw_cfg: RAM 128 MiB, 2 CPUs" in text
    assert f"module 0: {loaded.modules[0][0]:x}-" in text and "arg=1'" in text
    assert "boot loader: xenicorn" in text
    assert machine.shutdown_reason == "poweroff"


def test_cli_boots_a_multiboot_kernel_with_modules_by_default(tmp_path):
    r = subprocess.run([sys.executable, "-m", "xenicorn", "run", "mboot32", "--append", "mbtest",
                        "--initrd", _modules(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Test result: SUCCESS" in r.stdout and "FAIL" not in r.stdout


def _aout_kernel(flags_extra: int = 0) -> bytes:
    """A flat file with an a.out-kludge header: code at +0x30 prints 'Y' if EAX is the magic, then exits
    with the byte at +0x1000, in the bss. The file has 0xFF there, past load_end_addr: not to be loaded."""
    base = 0x200000
    flags = multiboot.FLAG_AOUT_KLUDGE | multiboot.FLAG_MEMORY_INFO | flags_extra
    header = struct.pack("<3I5I", multiboot.HEADER_MAGIC, flags, -(multiboot.HEADER_MAGIC + flags) & 0xFFFFFFFF,
                         base + 0x10, base, base + 0x50, base + 0x3000, base + 0x30)
    code = bytes.fromhex(
        "3d02b0ad2b"        # cmp eax, 0x2BADB002
        "7504"              # jne +4
        "b059"              # mov al, 'Y'
        "eb02"              # jmp +2
        "b04e"              # mov al, 'N'
        "e6e9"              # out 0xE9, al
        "a1001020" "00"     # mov eax, [base + 0x1000] (in the bss: zeroed)
        "e6f4")             # out 0xF4, al  -> exit status (al << 1) | 1
    image = (bytes(16) + header + bytes(0x30 - 16 - len(header)) + code).ljust(0x1000, b"\0")
    return image + b"\xff"


def test_the_aout_kludge_loads_at_the_headers_addresses_and_zeroes_the_bss(tmp_path):
    path = tmp_path / "aout.bin"
    path.write_bytes(_aout_kernel())
    assert choose_protocol(str(path)) == "multiboot"
    sink = ConsoleSink(None)
    machine, loaded = boot(MachineConfig(), str(path), console=sink, protocol="auto")
    assert loaded.segments == [(0x200000, 0x3000)] and loaded.entry == 0x200030
    machine.run()
    assert sink.text() == "Y" and machine.status == 1      # al = 0 from the zeroed bss


@pytest.mark.parametrize("data, why", [
    (_aout_kernel(flags_extra=1 << 3), "requires features 0x8"),
    (b"\0" * 64, "no multiboot header"),
], ids=["unknown-requirement", "no-header"])
def test_bad_multiboot_images_are_one_line_and_exit_2(tmp_path, data, why):
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    r = subprocess.run([sys.executable, "-m", "xenicorn", "run", "--boot", "multiboot", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_pvh_note_wins_over_nothing_and_a_bzimage_boots_linux(tmp_path):
    assert choose_protocol(firmware.find("hello32")) == "pvh"
    fake = bytearray(0x400)
    fake[0x202:0x206] = b"HdrS"
    (tmp_path / "bz").write_bytes(bytes(fake))
    assert choose_protocol(str(tmp_path / "bz")) == "linux"
    assert choose_protocol(str(tmp_path / "bz"), load_addr=0x100000) == "pvh"


def test_pvh_with_console_on_ttyS0_warns_once():
    r = subprocess.run([sys.executable, "-m", "xenicorn", "run", "hello32", "--append", "console=ttyS0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert r.stderr.count("console=ttyS* in a PVH machine") == 1, r.stderr


def test_fw_cfg_items_and_reads_past_the_end():
    dev = FwCfg(items_for(64 << 20, 3))
    dev.pio_write(0, 2, 0x0003)
    assert sum(dev.pio_read(1, 1) << (8 * i) for i in range(8)) == 64 << 20
    assert dev.pio_read(1, 1) == 0                         # past the end
    dev.pio_write(0, 2, 0x0005)
    assert dev.pio_read(1, 2) == 3
    dev.pio_write(1, 1, 0x55)                              # the write channel is gone
    dev.pio_write(0, 2, 0x0000)
    assert bytes(dev.pio_read(1, 1) for _ in range(4)) == b"QEMU"
    assert dev.pio_read(0, 2) == 0
    saved = dev.save_record()
    other = FwCfg(items_for(64 << 20, 3))
    other.apply_record(other.check_record(saved))
    assert other.pio_read(1, 1) == dev.pio_read(1, 1) == 0  # both at the end of the signature


# A bzImage given as KERNEL booting Linux's way with user space on ttyS0: tests/test_linuxboot.py
# test_debian_kernel_with_fifo_events_off_takes_the_2_level_abi boots it with protocol "auto".


def test_a_kernel_loaded_over_the_information_area_keeps_its_bytes(tmp_path):
    """QEMU's option ROM writes the information first and copies the kernel after it, so a kernel
    linked over 0x9000 (kvm-unit-tests' realmode test: 0x8000-0xA86C) keeps its code there."""
    base = 0x8000
    flags = multiboot.FLAG_AOUT_KLUDGE
    header = struct.pack("<3I5I", multiboot.HEADER_MAGIC, flags, -(multiboot.HEADER_MAGIC + flags) & 0xFFFFFFFF,
                         base, base, base + 0x3000, base + 0x3000, base + 0x20)
    image = bytearray((header + bytes.fromhex("f4")).ljust(0x3000, b"\xcc"))      # hlt; then int3 filler
    path = tmp_path / "low.bin"
    path.write_bytes(bytes(image))
    machine, loaded = boot(MachineConfig(), str(path), console=ConsoleSink(None), protocol="auto")
    assert loaded.segments == [(base, 0x3000)] and loaded.start_info == multiboot.MBI_ADDR
    mem = machine.memory
    for addr in (multiboot.MBI_ADDR, multiboot.MMAP_ADDR, multiboot.LOADER_NAME_ADDR, multiboot.STRINGS_ADDR):
        assert mem.read(addr, 16) == b"\xcc" * 16, hex(addr)
    # a kernel clear of the area still gets its information there
    machine2, _ = boot(MachineConfig(), firmware.find("mboot32"),
                       console=ConsoleSink(None), protocol="auto")
    assert struct.unpack("<I", machine2.memory.read(multiboot.MBI_ADDR, 4))[0] & multiboot.MBI_LOADER_NAME
