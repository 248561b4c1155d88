"""QEMU's firmware configuration device (fw_cfg), its legacy I/O interface.

QEMU hands its firmware (SeaBIOS, OVMF) and small test kernels the facts of
the machine it built through one device instead of a BIOS's tables: a list
of *items*, each a key (16 bits) and a blob of bytes. On a PC the legacy
interface is two I/O ports (QEMU docs/specs/fw_cfg.rst):

- **0x510, selector** (16-bit write): choose an item and rewind to its
  first byte;
- **0x511, data** (8-bit read): the item's next byte; past the end, or for
  an item that does not exist, 0.

Writes to the data port do nothing (QEMU removed the write channel), reads
of the selector read 0. Bit 14 of a key once selected the write channel
and bit 15 selects the architecture's own items; they are part of the key.

xenicorn offers it because kvm-unit-tests, the KVM project's suite of x86
test kernels, reads the CPU count and RAM size from it (lib/x86/fwcfg.c).
Xen has no such device: it answers only with the items below, taken from
the machine, in QEMU's encodings (numbers little-endian, the file directory
count big-endian):

====  ================  ==================================================
key   item              value here
====  ================  ==================================================
0x00  signature         ``QEMU``
0x01  id                1: the traditional interface only (no DMA)
0x02  UUID              16 zero bytes
0x03  RAM size          u64 bytes of guest RAM
0x04  nographic         u16 1
0x05  CPU count         u16 vCPUs at boot
0x0d  NUMA              u64 0 nodes
0x0e  boot menu         u16 0
0x0f  max CPUs          u16 vCPUs possible (the same: no hot-plug)
0x19  file directory    u32 big-endian 0: no named files
====  ================  ==================================================
"""
from __future__ import annotations

import struct

from ..records import field, integer, make_record, open_record

PORT = 0x510
SELECTOR, DATA = 0, 1
FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_UUID, FW_CFG_RAM_SIZE = 0x00, 0x01, 0x02, 0x03
FW_CFG_NOGRAPHIC, FW_CFG_NB_CPUS, FW_CFG_NUMA, FW_CFG_BOOT_MENU = 0x04, 0x05, 0x0D, 0x0E
FW_CFG_MAX_CPUS, FW_CFG_FILE_DIR = 0x0F, 0x19


def items_for(ram_bytes: int, cpus: int) -> dict[int, bytes]:
    """The items of a machine with ``ram_bytes`` of RAM and ``cpus`` vCPUs."""
    return {
        FW_CFG_SIGNATURE: b"QEMU",
        FW_CFG_ID: struct.pack("<I", 1),
        FW_CFG_UUID: bytes(16),
        FW_CFG_RAM_SIZE: struct.pack("<Q", ram_bytes),
        FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
        FW_CFG_NB_CPUS: struct.pack("<H", cpus),
        FW_CFG_NUMA: struct.pack("<Q", 0),
        FW_CFG_BOOT_MENU: struct.pack("<H", 0),
        FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
        FW_CFG_FILE_DIR: struct.pack(">I", 0),
    }


class FwCfg:
    """Ports 0x510 (selector) and 0x511 (data) of QEMU's fw_cfg."""

    def __init__(self, items: dict[int, bytes]):
        self.items = items
        self.key = 0               # the selected item
        self.offset = 0            # the next byte of it that a data read returns

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == SELECTOR:
            # A 16-bit write selects; QEMU's port is 16 bits wide, a byte
            # write selects the low byte's key.
            self.key = value & (0xFFFF if size >= 2 else 0xFF)
            self.offset = 0
        # the data port's write channel is gone (QEMU 2.4): ignored

    def pio_read(self, offset: int, size: int) -> int:
        if offset != DATA:
            return 0
        blob = self.items.get(self.key, b"")
        value = 0
        for i in range(size):             # wider reads take consecutive bytes, as QEMU's port does
            byte = blob[self.offset] if self.offset < len(blob) else 0
            if self.offset < len(blob):
                self.offset += 1
            value |= byte << (8 * i)
        return value

    # -- snapshots ------------------------------------------------------------------
    RECORD = ("fw-cfg", 1)

    def save_record(self) -> dict:
        return make_record(*self.RECORD, {"key": self.key, "offset": self.offset})

    def check_record(self, record: dict):
        st = open_record(record, *self.RECORD)
        key = integer(field(st, "key"), "fw_cfg key", 0, 0xFFFF)
        offset = integer(field(st, "offset"), "fw_cfg offset", 0, len(self.items.get(key, b"")))
        return key, offset

    def apply_record(self, prepared) -> None:
        self.key, self.offset = prepared
