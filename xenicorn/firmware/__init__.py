"""Guest kernels shipped with xenicorn, found by name.

The images in ``images/`` are built from ``src/`` by ``tools/build_firmware.py``
(gcc and ld) and committed, as QEMU ships its ``pc-bios/`` blobs, so running a
kernel needs no compiler. ``images/TOOLCHAIN.json`` names the gcc and ld that
built them: with those, a rebuild is byte-identical. ``XENICORN_FIRMWARE_DIR``
points the lookup at another directory (CI uses it to test freshly rebuilt
images).
"""
from __future__ import annotations

import os

IMAGES = os.path.join(os.path.dirname(__file__), "images")


def image_dir() -> str:
    return os.environ.get("XENICORN_FIRMWARE_DIR") or IMAGES


def names() -> list[str]:
    d = image_dir()
    if not os.path.isdir(d):
        return []
    return sorted(f[:-4] for f in os.listdir(d) if f.endswith(".elf"))


def find(name: str) -> str | None:
    path = os.path.join(image_dir(), name + ".elf")
    return path if os.path.isfile(path) else None
