"""PVH loading: segments, entry selection, hvm_start_info, modules, bad files."""
import struct

import pytest

from xenicorn import firmware
from xenicorn.boot.loader import HVM_START_MAGIC, LoadError, load_elf, load_flat, load_module, write_start_info
from xenicorn.machine.memory import GuestMemory


def image(name):
    return open(firmware.find(name), "rb").read()


def strip_pvh_note(data: bytes) -> bytes:
    """Turn the PVH note's type (18) into another so the loader must use e_entry."""
    i = data.index(b"Xen\0")
    return data[:i - 4] + struct.pack("<I", 99) + data[i:]


@pytest.mark.parametrize("name,bits", [("hello32", 32), ("hello64", 64)])
def test_pvh_note_gives_the_entry_and_segments_are_copied(name, bits):
    mem = GuestMemory(16 << 20)
    k = load_elf(mem, firmware.find(name))
    assert k.pvh and k.bits == bits and k.entry == k.symbols["_start"]
    paddr, size = k.segments[0]
    assert paddr == 0x100000 and mem.read(paddr, 4) != b"\0\0\0\0"
    # .bss is zeroed even if the RAM held something before
    bss = k.symbols["boot_stack_top"] - 16
    assert mem.read(bss, 16) == bytes(16)


def test_without_the_note_the_elf_entry_is_used(tmp_path):
    f = tmp_path / "nonote.elf"
    f.write_bytes(strip_pvh_note(image("hello32")))
    k = load_elf(GuestMemory(16 << 20), str(f))
    assert not k.pvh and k.entry == struct.unpack_from("<I", image("hello32"), 24)[0]


def test_64bit_elf_without_note_and_high_entry_is_refused(tmp_path):
    data = bytearray(strip_pvh_note(image("hello64")))
    data[24:32] = struct.pack("<Q", 0xFFFFFFFF81000000)
    f = tmp_path / "high.elf"
    f.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="not a 32-bit physical address"):
        load_elf(GuestMemory(16 << 20), str(f))


def test_start_info_with_cmdline_memory_map_and_module(tmp_path):
    mem = GuestMemory(32 << 20)
    k = load_elf(mem, firmware.find("hello32"))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"INITRD" * 1000)
    addr, size = load_module(mem, k, str(initrd))
    si = write_start_info(mem, k, "root=/dev/xvda quiet")
    magic, version, flags, nr, modlist, cmdline, rsdp, memmap, entries, _ = mem.read_struct(si, "<IIIIQQQQII")
    assert (magic, version, flags, nr, rsdp) == (HVM_START_MAGIC, 1, 0, 1, 0)
    assert mem.read_cstring(cmdline) == b"root=/dev/xvda quiet"
    m_addr, m_size, m_cmd, _ = mem.read_struct(modlist, "<QQQQ")
    assert (m_addr, m_size) == (addr, 6000) and addr % 4096 == 0 and mem.read(addr, 6) == b"INITRD"
    table = [mem.read_struct(memmap + 24 * i, "<QQII") for i in range(entries)]
    assert table[0][:3] == (0, 0x9FC00, 1)
    assert (0x100000, (32 << 20) - 0x100000, 1, 0) in table
    assert any(e[2] == 2 for e in table)                     # the reserved legacy hole


def test_flat_binary_and_bad_files(tmp_path):
    mem = GuestMemory(16 << 20)
    flat = tmp_path / "code.bin"
    flat.write_bytes(b"\x90\xf4")
    k = load_flat(mem, str(flat), 0x200000)
    assert k.entry == 0x200000 and mem.read(0x200000, 2) == b"\x90\xf4"
    with pytest.raises(LoadError, match="do not fit"):
        load_flat(mem, str(flat), 0x7FFFFFFF)
    with pytest.raises(LoadError, match="no such file"):
        load_elf(mem, str(tmp_path / "missing"))
    with pytest.raises(LoadError, match="is a directory"):
        load_elf(mem, str(tmp_path))
    with pytest.raises(LoadError, match="corrupt ELF|no loadable"):
        load_elf(mem, "x.elf", image("hello64")[:64])


def test_segment_that_does_not_fit_ram(tmp_path):
    data = bytearray(image("hello64"))
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    struct.pack_into("<Q", data, phoff + 0x18, 0x7F000000)      # first PT_LOAD's p_paddr
    f = tmp_path / "far.elf"
    f.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="does not fit in guest RAM"):
        load_elf(GuestMemory(16 << 20), str(f))


def test_command_line_limit():
    mem = GuestMemory(16 << 20)
    k = load_elf(mem, firmware.find("hello32"))
    with pytest.raises(LoadError, match="command line"):
        write_start_info(mem, k, "x" * 5000)


def _elf_header_patch(data: bytes, **fields) -> bytes:
    """An ELF with e_type (offset 16) or e_entry (offset 24) changed."""
    out = bytearray(data)
    if "e_type" in fields:
        out[16:18] = struct.pack("<H", fields["e_type"])
    if "e_entry" in fields:
        out[24:28] = struct.pack("<I", fields["e_entry"])
    return bytes(out)


@pytest.mark.parametrize("e_type,what", [(3, "ET_DYN"), (1, "ET_REL"), (4, "ET_CORE")])
def test_an_elf_that_is_no_kernel_is_refused_before_loading(tmp_path, e_type, what):
    f = tmp_path / "prog.elf"
    f.write_bytes(_elf_header_patch(strip_pvh_note(image("hello32")), e_type=e_type))
    mem = GuestMemory(16 << 20)
    with pytest.raises(LoadError, match=f"{what}.*no entry a PC could boot"):
        load_elf(mem, str(f))
    assert mem.read(0x100000, 64) == bytes(64)          # nothing copied
    # with its PVH note the entry is Xen's to choose: the same file type boots
    g = tmp_path / "noted.elf"
    g.write_bytes(_elf_header_patch(image("hello32"), e_type=e_type))
    assert load_elf(GuestMemory(16 << 20), str(g)).pvh


def test_an_entry_outside_every_segment_is_refused(tmp_path):
    f = tmp_path / "stray.elf"
    f.write_bytes(_elf_header_patch(strip_pvh_note(image("hello32")), e_entry=0x50000))
    with pytest.raises(LoadError, match="entry 0x50000 is in none of the ELF's loaded segments"):
        load_elf(GuestMemory(16 << 20), str(f))


@pytest.mark.skipif(not __import__("shutil").which("gcc"), reason="needs gcc")
@pytest.mark.parametrize("flags,what", [(["-no-pie"], r"dynamically linked program \(it names an ELF interpreter"),
                                        (["-static", "-no-pie"], r"program for Linux user space \(NT_GNU_ABI_TAG")])
def test_a_linux_program_linked_at_a_fixed_address_is_no_kernel(tmp_path, flags, what):
    """ET_EXEC with its entry in a segment, yet a user-space program: refused before loading."""
    import subprocess
    src = tmp_path / "prog.c"
    src.write_text("int main(void) { return 0; }\n")
    prog = tmp_path / "prog"
    res = subprocess.run(["gcc", *flags, "-o", str(prog), str(src)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"gcc {' '.join(flags)} failed: {res.stderr.decode()[:200]}")
    with pytest.raises(LoadError, match=what + ".*no entry a PC could boot"):
        load_elf(GuestMemory(64 << 20), str(prog))
