"""The Linux helpers: newc initramfs, bzImage payloads, .deb reading, and the CLI around them.

All on synthetic inputs built here, so they need no network; booting the
real Debian kernel is the slow test of the Linux issue.
"""
import gzip
import io
import lzma
import os
import stat
import struct
import subprocess
import sys
import tarfile

import pytest

from xenicorn import firmware
from xenicorn.linux import bzimage, debian, initramfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_newc_round_trip_and_alignment():
    fs = initramfs.Initramfs()
    fs.file("bin/busybox", b"\x7fELF" + b"x" * 1001, 0o755)
    fs.symlink("bin/sh", "busybox")
    fs.char_device("dev/console", 5, 1)
    fs.file("init", b"#!/bin/sh\n", 0o755)
    data = fs.to_bytes()
    assert len(data) % 512 == 0 and data.startswith(b"070701")
    back = initramfs.parse(data)
    assert list(back) == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init"]   # parents first
    assert stat.S_ISDIR(back["bin"].mode) and back["bin/busybox"].data.startswith(b"\x7fELF")
    assert stat.S_ISLNK(back["bin/sh"].mode) and back["bin/sh"].data == b"busybox"
    assert stat.S_ISCHR(back["dev/console"].mode) and back["dev/console"].rdev == (5, 1)
    assert back["init"].mode & 0o777 == 0o755


def test_newc_is_what_gnu_cpio_reads(tmp_path):
    if subprocess.run(["which", "cpio"], capture_output=True).returncode:
        pytest.skip("no cpio binary to compare with")
    fs = initramfs.Initramfs()
    fs.file("a/b.txt", b"hello")
    fs.symlink("a/link", "b.txt")
    r = subprocess.run(["cpio", "-it"], input=fs.to_bytes(), capture_output=True)
    assert r.returncode == 0 and r.stdout.split() == [b"a", b"a/b.txt", b"a/link"]


@pytest.mark.parametrize("path", ["", "/", "a/../b"])
def test_newc_refuses_bad_paths(path):
    with pytest.raises(ValueError):
        initramfs.Initramfs().file(path, b"")


def make_bzimage(elf: bytes, kind: str = "gzip", truncate: int = 0) -> bytes:
    if kind == "gzip":
        comp = gzip.compress(elf)
    elif kind == "xz":
        comp = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    else:
        lz4_block = pytest.importorskip("lz4.block")
        block = lz4_block.compress(elf, store_size=False)
        comp = struct.pack("<II", bzimage.LZ4_LEGACY_MAGIC, len(block)) + block
    comp += struct.pack("<I", len(elf))
    setup = bytearray(2 * 512)                 # boot sector + 1 setup sector
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 0x40, len(comp))
    image = bytes(setup) + b"\0" * 0x40 + comp
    return image[:len(image) - truncate]


@pytest.mark.parametrize("kind", ["gzip", "xz", "lz4"])
def test_bzimage_payloads_decompress_to_the_elf(kind):
    elf = open(firmware.find("hello64"), "rb").read()
    assert bzimage.vmlinux(make_bzimage(elf, kind)) == elf
    assert bzimage.vmlinux(elf) == elf                     # an ELF is passed through


def test_bzimage_errors_are_one_line():
    elf = open(firmware.find("hello64"), "rb").read()
    with pytest.raises(bzimage.KernelImageError, match="truncated"):
        bzimage.vmlinux(make_bzimage(elf, truncate=10))
    with pytest.raises(bzimage.KernelImageError, match="not a bzImage"):
        bzimage.vmlinux(b"MZ" + b"\0" * 1000)
    bad = bytearray(make_bzimage(elf))
    bad[-4:] = struct.pack("<I", len(elf) + 1)             # the size the image claims
    with pytest.raises(bzimage.KernelImageError, match="the image says"):
        bzimage.vmlinux(bytes(bad))


def make_deb(files: dict) -> bytes:
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", tar_bytes.getvalue())]
    out = bytearray(debian.AR_MAGIC)
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}".encode() + b"`\n" + data
        if len(data) & 1:
            out += b"\n"
    return bytes(out)


def test_deb_files_are_read_from_the_data_tree():
    deb = make_deb({"boot/vmlinuz-6.1.0-test": b"kernel", "usr/share/doc/x": b"doc"})
    assert debian.read_files(deb, lambda p: p.startswith("boot/")) == {"boot/vmlinuz-6.1.0-test": b"kernel"}
    with pytest.raises(debian.PackageError, match="truncated"):
        debian.read_files(deb[:-100], lambda p: True)
    with pytest.raises(debian.PackageError, match="not a .deb"):
        debian.read_files(b"PK\x03\x04", lambda p: True)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "xenicorn", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_a_bzimage_boots_like_its_vmlinux(tmp_path):
    """With --boot pvh (a bzImage boots through the Linux boot protocol by default)."""
    img = tmp_path / "bzImage"
    img.write_bytes(make_bzimage(open(firmware.find("hello64"), "rb").read(), "xz"))
    r = cli("run", "--boot", "pvh", str(img))
    assert r.returncode == 0 and "Hello from xenicorn hello64 (long mode" in r.stdout, r.stdout + r.stderr


def test_kernel_arguments_are_checked():
    r = cli("run")
    assert r.returncode == 2 and "no kernel" in r.stderr and r.stderr.count("\n") == 1
    r = cli("run", "hello64", "--kernel-deb", "linux-image-cloud-amd64")
    assert r.returncode == 2 and "not both" in r.stderr


def test_a_package_is_unpacked_into_the_cache_once(tmp_path, monkeypatch):
    """guest.kernel/bzimage/initramfs on a fake package set: what --kernel-deb does, minus apt-get."""
    from xenicorn.linux import guest
    elf = open(firmware.find("hello64"), "rb").read()
    image = make_bzimage(elf, "gzip")
    kernel_deb = tmp_path / "kernel.deb"
    kernel_deb.write_bytes(make_deb({"boot/vmlinuz-6.1.0-test": image}))
    busybox_deb = tmp_path / "busybox.deb"
    busybox_deb.write_bytes(make_deb({"bin/busybox": b"\x7fELF fake busybox"}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(debian, "resolve", lambda package: "linux-image-test")
    downloads = []

    def download(name, dest):
        downloads.append(name)
        return str(busybox_deb if name == "busybox-static" else kernel_deb)
    monkeypatch.setattr(debian, "download", download)
    vmlinux = guest.kernel("linux-image-cloud-amd64")
    assert open(vmlinux, "rb").read() == elf
    assert open(guest.bzimage("linux-image-cloud-amd64"), "rb").read() == image
    assert guest.kernel("linux-image-cloud-amd64") == vmlinux            # cached: no second unpack
    fs = initramfs.parse(open(guest.initramfs(), "rb").read())
    assert fs["bin/busybox"].data == b"\x7fELF fake busybox" and guest.MARKER.encode() in fs["init"].data
    assert downloads == ["linux-image-test", "linux-image-test", "busybox-static"]


def test_a_metapackage_is_resolved_once_a_day_and_remembered_offline(tmp_path, monkeypatch):
    """apt-cache costs ~0.8 s a run: its answer is kept a day, and serves when apt-cache fails."""
    from xenicorn.linux import guest
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def resolve(package):
        calls.append(package)
        if len(calls) > 2:
            raise debian.PackageError("apt-cache: no package lists")
        return f"linux-image-{len(calls)}"
    monkeypatch.setattr(debian, "resolve", resolve)
    cache = guest.cache_dir()
    assert guest._resolve(cache, "linux-image-cloud-amd64") == "linux-image-1"
    assert guest._resolve(cache, "linux-image-cloud-amd64") == "linux-image-1" and len(calls) == 1
    path = os.path.join(cache, "resolved-linux-image-cloud-amd64")
    day_old = os.path.getmtime(path) - guest.RESOLVE_TTL_S - 1
    os.utime(path, (day_old, day_old))
    assert guest._resolve(cache, "linux-image-cloud-amd64") == "linux-image-2" and len(calls) == 2
    os.utime(path, (day_old, day_old))
    assert guest._resolve(cache, "linux-image-cloud-amd64") == "linux-image-2"   # apt-cache failed: remembered
    with pytest.raises(debian.PackageError):
        guest._resolve(cache, "linux-image-other")                              # nothing remembered
