"""Debian packages: download one with apt-get, read files out of it.

A ``.deb`` is an ``ar`` archive (the Unix archiver's format: an 8-byte
``!<arch>`` magic, then members with 60-byte text headers, each padded to
an even size) holding ``debian-binary``, ``control.tar.*`` and
``data.tar.*``; the last is the file tree the package installs. Reading it
needs only :mod:`tarfile`. ``linux-image-cloud-amd64`` itself is a
*metapackage*: it depends on the versioned package that has the kernel,
which :func:`resolve` finds with ``apt-cache depends``.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

AR_MAGIC = b"!<arch>\n"


class PackageError(Exception):
    """A package could not be fetched or read; one line for the user."""


def ar_members(data: bytes) -> dict[str, bytes]:
    if not data.startswith(AR_MAGIC):
        raise PackageError("not a .deb (no ar archive magic)")
    out, pos = {}, len(AR_MAGIC)
    while pos + 60 <= len(data):
        head = data[pos:pos + 60]
        if head[58:60] != b"`\n":
            raise PackageError(f"corrupt ar member header at offset {pos}")
        name = head[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(head[48:58].decode().strip())
        except ValueError:
            raise PackageError(f"corrupt ar member size at offset {pos}") from None
        pos += 60
        if pos + size > len(data):
            raise PackageError(f"ar member {name} runs past the end (truncated download?)")
        out[name] = data[pos:pos + size]
        pos += size + (size & 1)
    return out


def read_files(deb: bytes, wanted) -> dict[str, bytes]:
    """The files of the package's data tree for which ``wanted(path)`` is true (paths without ./)."""
    members = ar_members(deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise PackageError("the .deb has no data.tar member")
    blob = members[data_name]
    if data_name.endswith(".zst"):
        blob = _unzstd(blob)
    try:
        tar = tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
    except tarfile.TarError as e:
        raise PackageError(f"{data_name}: {e}") from None
    out = {}
    with tar:
        for info in tar:
            path = info.name.lstrip("./")
            if info.isfile() and wanted(path):
                out[path] = tar.extractfile(info).read()
    return out


def _unzstd(blob: bytes) -> bytes:
    if shutil.which("zstd") is None:
        raise PackageError("this .deb is zstd-compressed; install zstd")
    return subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, check=True).stdout


def resolve(package: str) -> str:
    """A metapackage's versioned kernel package (or the name itself when it has the kernel)."""
    if shutil.which("apt-cache") is None:
        raise PackageError("apt-cache not found: a Debian or Ubuntu machine is needed to fetch packages")
    r = subprocess.run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise PackageError(f"{package}: {r.stderr.strip() or 'unknown package'}")
    for line in r.stdout.splitlines():
        kind, _, dep = line.strip().partition(": ")
        if kind == "Depends" and dep.startswith("linux-image-") and package.startswith("linux-image-"):
            return dep
    return package


def download(package: str, dest: str) -> str:
    """``apt-get download PACKAGE`` into ``dest``; the .deb's path."""
    if shutil.which("apt-get") is None:
        raise PackageError("apt-get not found: a Debian or Ubuntu machine is needed to fetch packages")
    os.makedirs(dest, exist_ok=True)
    before = set(os.listdir(dest))
    r = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True, check=False)
    new = [n for n in set(os.listdir(dest)) - before if n.endswith(".deb")]
    if r.returncode != 0 or not new:
        existing = [n for n in before if n.startswith(package + "_") and n.endswith(".deb")]
        if existing:
            return os.path.join(dest, sorted(existing)[-1])
        msg = [line for line in r.stderr.splitlines() if line.startswith("E:")] or [r.stderr.strip()]
        raise PackageError(f"apt-get download {package}: {msg[0] if msg else 'failed'}")
    return os.path.join(dest, sorted(new)[-1])
