"""From a bzImage to the ELF ``vmlinux`` inside it.

A bzImage (Documentation/arch/x86/boot.rst, "The Linux/x86 Boot Protocol")
is a real-mode setup program followed by a protected-mode decompressor
carrying the real kernel as a compressed *payload*. The setup header at
0x1F1 says where: ``setup_sects`` (0 meaning 4) 512-byte sectors of setup
follow the boot sector, and from protocol 2.08 ``payload_offset`` /
``payload_length`` (0x248/0x24C) locate the payload inside the protected-
mode part. The payload is the ELF ``vmlinux`` compressed with gzip, xz,
lzma, lz4 (the "legacy" frame of ``lz4 -l``), zstd or bzip2, followed by
its decompressed size as 4 little-endian bytes. The ELF is what a PVH
loader wants: it carries the ``XEN_ELFNOTE_PHYS32_ENTRY`` note.
"""
from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import zlib

HDR_MAGIC = b"HdrS"
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20
MAGICS = (                                   # the decompressor is chosen by the payload's first bytes
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)


class KernelImageError(Exception):
    """Not a kernel image we can unpack; the message is one line for the user."""


def payload(image: bytes) -> tuple[str, bytes]:
    """(compression, compressed bytes) of a bzImage's payload."""
    if len(image) < 0x250 or image[0x202:0x206] != HDR_MAGIC:
        raise KernelImageError("not a bzImage (no HdrS setup header at 0x202)")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x208:
        raise KernelImageError(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields (need 2.08+)")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    data = image[start:start + length]
    if len(data) != length or length < 8:
        raise KernelImageError("bzImage payload runs past the end of the file (truncated?)")
    for magic, name in MAGICS:
        if data.startswith(magic):
            return name, data
    raise KernelImageError(f"unknown payload compression (starts {data[:6].hex()})")


def decompress(kind: str, data: bytes) -> bytes:
    expected = struct.unpack_from("<I", data, len(data) - 4)[0]
    body = data[:-4]                          # the appended size is not part of the stream
    if kind == "gzip":
        out = zlib.decompressobj(wbits=31).decompress(body)
    elif kind in ("xz", "lzma"):
        out = lzma.LZMADecompressor().decompress(body)
    elif kind == "lz4":
        out = _lz4_legacy(body)
    elif kind == "bzip2":
        import bz2
        out = bz2.BZ2Decompressor().decompress(body)
    else:
        out = _tool(["zstd", "-dc"], body, "zstd")
    if len(out) != expected:
        raise KernelImageError(f"{kind} payload decompressed to {len(out)} bytes, the image says {expected}")
    return out


def _lz4_legacy(body: bytes) -> bytes:
    """The legacy LZ4 frame: a magic, then blocks of (4-byte size, LZ4 block) of up to 8 MiB each."""
    try:
        import lz4.block
    except ImportError:
        return _tool(["lz4", "-dc"], body + b"", "lz4 (pip install lz4, or the lz4 command)")
    if struct.unpack_from("<I", body, 0)[0] != LZ4_LEGACY_MAGIC:
        raise KernelImageError("lz4 payload without the legacy frame magic")
    out, pos = [], 4
    while pos + 4 <= len(body):
        size = struct.unpack_from("<I", body, pos)[0]
        pos += 4
        if size == LZ4_LEGACY_MAGIC:          # concatenated frames
            continue
        try:
            out.append(lz4.block.decompress(body[pos:pos + size], uncompressed_size=LZ4_LEGACY_BLOCK))
        except lz4.block.LZ4BlockError as e:
            raise KernelImageError(f"lz4 block at offset {pos}: {e}") from None
        pos += size
    return b"".join(out)


def _tool(cmd: list[str], data: bytes, what: str) -> bytes:
    if shutil.which(cmd[0]) is None:
        raise KernelImageError(f"decompressing this kernel needs {what}")
    r = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if r.returncode != 0 and not r.stdout:
        raise KernelImageError(f"{cmd[0]} failed: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def vmlinux(image: bytes) -> bytes:
    """The ELF kernel inside a bzImage (or the image itself if it already is an ELF)."""
    if image[:4] == b"\x7fELF":
        return image
    kind, data = payload(image)
    out = decompress(kind, data)
    if out[:4] != b"\x7fELF":
        raise KernelImageError(f"the {kind} payload is not an ELF vmlinux")
    return out
