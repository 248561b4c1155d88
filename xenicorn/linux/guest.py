"""A Debian kernel and a busybox initramfs, ready for ``xenicorn run``.

``--kernel-deb linux-image-cloud-amd64`` resolves the metapackage, downloads
the kernel package and busybox-static with ``apt-get download``, takes the
package's bzImage (:func:`bzimage`, for the Linux boot protocol) or unpacks
the ``vmlinux`` inside it (:func:`kernel`, for PVH), and writes an initramfs whose
``/init`` prints a marker, shows how the Xen upcall is counted in
``/proc/interrupts``, and powers off. Everything is cached under
``$XDG_CACHE_HOME/xenicorn/linux`` (``~/.cache/...``), so only the first run
downloads.
"""
from __future__ import annotations

import os
import time

from . import bzimage as bzimage_format, debian
from .initramfs import busybox_initramfs

MARKER = "XENICORN-USERSPACE-REACHED"
# ttyS0: the 16550 the machine has; panic=-1: a panic ends the run at once;
# cryptomgr.notests: skip the crypto self-tests (RSA alone is ~60% of a boot's
# instructions, measured with QEMU), as test images commonly do.
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 cryptomgr.notests"
# A PVH guest has no 8259 (Xen's hardware-reduced ACPI): the UART's IRQ 4
# cannot be requested and user-mode writes to ttyS0 fail. Its console is
# Xen's PV console, hvc0, as under real Xen.
PVH_CMDLINE = "console=hvc0 panic=-1 cryptomgr.notests"
INIT = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "{MARKER}"
uname -r
echo "nproc: $(nproc)"
grep -i -e xen -e CPU0 -e HYP -e LOC /proc/interrupts
poweroff -f
"""


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "xenicorn", "linux")
    os.makedirs(path, exist_ok=True)
    return path


def _cached(path: str, make) -> str:
    """``path``, written from ``make()`` the first time (whole or not at all: via a .part file)."""
    if not os.path.exists(path):
        _write_whole(path, make())
    return path


def _write_whole(path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all (through a .part file)."""
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


RESOLVE_TTL_S = 24 * 3600


def _resolve(cache: str, package: str) -> str:
    """``debian.resolve``, remembered for a day: ``apt-cache`` takes ~0.8 s a run.

    A remembered answer also serves when ``apt-cache`` fails (offline, the
    package lists gone), as the cached packages themselves do.
    """
    path = os.path.join(cache, f"resolved-{package}")
    try:
        with open(path) as f:
            remembered = f.read().strip()
        fresh = time.time() - os.path.getmtime(path) < RESOLVE_TTL_S
    except OSError:
        remembered, fresh = "", False
    if remembered and fresh:
        return remembered
    try:
        name = debian.resolve(package)
    except debian.PackageError:
        if remembered:
            return remembered
        raise
    _write_whole(path, name.encode())
    return name


def _vmlinuz(cache: str, name: str) -> bytes:
    """The bzImage (``boot/vmlinuz-*``) of kernel package ``name``, downloaded once."""
    deb = debian.download(name, cache)
    with open(deb, "rb") as f:
        files = debian.read_files(f.read(), lambda p: p.startswith("boot/vmlinuz-"))
    if not files:
        raise debian.PackageError(f"{name}: no boot/vmlinuz-* in the package (not a kernel image package?)")
    return next(iter(files.values()))


def bzimage(package: str = "linux-image-cloud-amd64") -> str:
    """Path of the bzImage of a Debian kernel package, for the Linux boot protocol (cached)."""
    cache = cache_dir()
    name = _resolve(cache, package)
    return _cached(os.path.join(cache, f"{name}.vmlinuz"), lambda: _vmlinuz(cache, name))


def kernel(package: str = "linux-image-cloud-amd64") -> str:
    """Path of the ELF vmlinux of a Debian kernel package (downloaded and unpacked once)."""
    cache = cache_dir()
    name = _resolve(cache, package)

    def unpack() -> bytes:
        try:
            return bzimage_format.vmlinux(_vmlinuz(cache, name))
        except bzimage_format.KernelImageError as e:
            raise debian.PackageError(f"{name}: {e}") from None
    return _cached(os.path.join(cache, f"{name}.vmlinux"), unpack)


def initramfs(init: str = INIT) -> str:
    """Path of a busybox initramfs running ``init`` (busybox-static downloaded once)."""
    cache = cache_dir()
    import hashlib
    out = os.path.join(cache, f"initramfs-{hashlib.sha256(init.encode()).hexdigest()[:12]}.cpio")

    def build() -> bytes:
        deb = debian.download("busybox-static", cache)
        with open(deb, "rb") as f:
            files = debian.read_files(f.read(), lambda p: p == "bin/busybox")
        if "bin/busybox" not in files:
            raise debian.PackageError("busybox-static: no bin/busybox in the package")
        return busybox_initramfs(files["bin/busybox"], init)
    return _cached(out, build)
