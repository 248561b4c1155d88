"""The initramfs format: a "newc" cpio archive, written in pure Python.

The kernel unpacks the archive given as module 0 (``--initrd``) into its
first root filesystem and runs ``/init`` from it (Documentation/
filesystems/ramfs-rootfs-initramfs.rst). The format (cpio(5), "new ASCII",
magic ``070701``) is a sequence of entries, each a 110-byte header of
thirteen 8-digit hex fields, the NUL-terminated name padded to 4 bytes,
and the data padded to 4 bytes; the entry named ``TRAILER!!!`` ends it.

Only what an initramfs needs: regular files, directories, symlinks and
character devices (``/dev/console`` must exist before ``/init`` runs, or
the first process has no stdout).
"""
from __future__ import annotations

import stat
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass
class Entry:
    """One archive member: a file, directory, symlink or device node."""

    name: str                   # without a leading slash
    mode: int                   # file type and permission bits (stat.S_IF* | 0o755)
    data: bytes = b""           # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)   # major, minor for device nodes


class Initramfs:
    """Collects entries, then :meth:`to_bytes` writes the archive."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _add(self, entry: Entry) -> None:
        name = entry.name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"initramfs: bad path {entry.name!r}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self.entries:
            self.directory(parent)
        entry.name = name
        self.entries[name] = entry

    def directory(self, path: str, perm: int = 0o755) -> None:
        self._add(Entry(path, stat.S_IFDIR | perm))

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._add(Entry(path, stat.S_IFREG | perm, bytes(data)))

    def symlink(self, path: str, target: str) -> None:
        self._add(Entry(path, stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(Entry(path, stat.S_IFCHR | perm, rdev=(major, minor)))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, entry in enumerate(self.entries.values(), start=1):
            out += _entry(ino, entry)
        out += _entry(0, Entry(TRAILER, 0))
        out += b"\0" * (-len(out) % 512)          # cpio pads the archive to its block size
        return bytes(out)


def _entry(ino: int, e: Entry) -> bytes:
    name = e.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
    head = MAGIC + b"".join(b"%08X" % f for f in fields)
    body = head + name
    body += b"\0" * (-len(body) % 4)
    body += e.data
    body += b"\0" * (-len(body) % 4)
    return bytes(body)


def parse(data: bytes) -> dict[str, Entry]:
    """Read a newc archive back (tests, and checking a user's initramfs)."""
    out: dict[str, Entry] = {}
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"initramfs: no newc header at offset {pos}")
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name_at = pos + 110
        name = data[name_at:name_at + namesize - 1].decode()
        pos = name_at + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == TRAILER:
            return out
        out[name] = Entry(name, mode, body, (f[9], f[10]))


def busybox_initramfs(busybox: bytes, init_script: str) -> bytes:
    """A minimal root: busybox, the applet links ``/init`` needs, /dev/console, and ``/init``."""
    fs = Initramfs()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc"):
        fs.directory(d)
    fs.file("bin/busybox", busybox, 0o755)
    for applet in ("sh", "mount", "cat", "echo", "poweroff", "sleep", "ls", "uname", "grep", "head", "nproc"):
        fs.symlink(f"bin/{applet}", "busybox")
    fs.char_device("dev/console", 5, 1)
    fs.char_device("dev/null", 1, 3, 0o666)
    fs.file("init", init_script.encode(), 0o755)
    return fs.to_bytes()
