"""QEMU's ``pc-testdev``: the ISA test device kvm-unit-tests' x86 tests expect.

kvm-unit-tests runs every x86 test kernel under QEMU with ``-device
pc-testdev`` (its ``x86/run``). The device (QEMU's hw/misc/pc-testdev.c)
gives a test kernel three things a real PC has no way to do on demand:

==============  ==============================================================
where           what
==============  ==============================================================
ports 0xE0-E3   a 32-bit scratch register: a write of any width stores those
                bytes, a read returns them (the emulator test moves data
                through it with IN/OUT/INS/OUTS)
ports 0xE8-EB   QEMU: the same register, one byte at a time. Not here: port
                0xE9 is xenicorn's Bochs debug console, and no test uses them
port 0xE4       "flush page": a 32-bit write of a guest-physical address. QEMU
                mprotect()s the host page off and on, which under KVM drops
                the guest's mapping so the next access exits; nothing the
                guest can see changes, so here the write is accepted and
                ignored (the eventinj test uses it)
ports 0x2000+n  interrupt line n, n < 24: a byte write sets ISA IRQ n high
                (non-zero) or low (zero). QEMU drives the same ``isa_get_irq``
                line an ISA device does, so the level reaches 8259 input n
                and IOAPIC pin n (IRQ 0: pin 2); the ioapic test toggles IRQ
                14 this way to test edge and level delivery
0xFF000000      64 KiB of scratch memory behind MMIO exits (the suite's
                IORAM_BASE_PHYS): the emulator test maps it and runs
                instructions on it, which a hypervisor must emulate
==============  ==============================================================

QEMU's ISA bus has 16 IRQs and asserts on lines 16-23 (``isa_get_irq``);
here a write to those ports is ignored, as is a line write wider than a byte
(QEMU's ``valid.max_access_size = 1`` refuses it).
"""
from __future__ import annotations

from ..records import blob, integer, field, make_record, open_record

DATA_PORT = 0xE0            # 4 ports: the scratch register
FLUSH_PORT = 0xE4           # 4 ports: flush page (a no-op for the guest)
IRQ_PORT = 0x2000           # 24 ports: interrupt line n at IRQ_PORT + n
IRQ_LINES = 24
IOMEM_BASE, IOMEM_SIZE = 0xFF000000, 0x10000
ISA_IRQS = 16


class PcTestdev:
    """The scratch register and the interrupt lines (see the module table)."""

    def __init__(self, isa_irq: list):
        self.isa_irq = isa_irq         # the machine's ISA IRQ lines 0-15
        self.data = 0                  # the 32-bit scratch register
        self.iomem = _IoMem()          # the 64 KiB at IOMEM_BASE

    def attach(self, register_pio, register_mmio) -> None:
        """Claim the device's ports and its memory window."""
        register_mmio(IOMEM_BASE, IOMEM_SIZE, self.iomem)
        register_pio(DATA_PORT, 4, self)
        register_pio(FLUSH_PORT, 4, _FlushPage())
        register_pio(IRQ_PORT, IRQ_LINES, _IrqLines(self.isa_irq))

    def pio_read(self, offset: int, size: int) -> int:
        # bytes offset..offset+size-1 of the register; past byte 3 reads 0
        return (self.data >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        mask = (((1 << (8 * size)) - 1) << (8 * offset)) & 0xFFFFFFFF
        self.data = (self.data & ~mask) | ((value << (8 * offset)) & mask)

    # -- snapshots ------------------------------------------------------------------
    RECORD = ("pc-testdev", 1)

    def save_record(self) -> dict:
        return make_record(*self.RECORD, {"data": self.data}, {"iomem": bytes(self.iomem.buf)})

    def check_record(self, record: dict) -> tuple[int, bytes]:
        data = integer(field(open_record(record, *self.RECORD), "data"), "pc-testdev data", 0, 0xFFFFFFFF)
        return data, blob(record, "iomem", IOMEM_SIZE)

    def apply_record(self, prepared: tuple[int, bytes]) -> None:
        self.data, mem = prepared
        self.iomem.buf[:] = mem


class _IoMem:
    """0xFF000000: plain memory, little-endian, any width, every access an exit."""

    def __init__(self):
        self.buf = bytearray(IOMEM_SIZE)

    def mmio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.buf[offset:offset + size].ljust(size, b"\0"), "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        end = min(offset + size, IOMEM_SIZE)
        self.buf[offset:end] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[:end - offset]


class _FlushPage:
    """Port 0xE4: write-only; the flush has no effect a guest can observe."""

    def pio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1         # no read side: floats high like an unclaimed port

    def pio_write(self, offset: int, size: int, value: int) -> None:
        pass


class _IrqLines:
    """Ports 0x2000-0x2017: a byte written to port 0x2000+n is ISA IRQ n's level."""

    def __init__(self, isa_irq: list):
        self.isa_irq = isa_irq

    def pio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1         # write-only in QEMU

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if size == 1 and offset < ISA_IRQS:
            self.isa_irq[offset].set_level(value & 0xFF != 0)
