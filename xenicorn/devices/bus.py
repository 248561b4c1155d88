"""Port-I/O and MMIO buses: how an access finds its device.

A PC decodes every I/O or memory cycle by address. The chipset forwards it to
whichever device claims the range; when nobody claims it the ISA bus floats
high, so reads return all ones and writes vanish. xenicorn's buses do the
same with an interval tree, and hand the device an *offset* inside its range,
never the absolute address, so a PCI BAR can move (``remap``) without the
device knowing (the shape of rust-vmm's ``vm-device`` and firecracker's bus).
"""
from __future__ import annotations

from typing import Callable, Protocol

from intervaltree import IntervalTree

from ..records import integer, listing, make_record, open_record


class PioDevice(Protocol):
    """A device on the I/O port bus."""

    def pio_read(self, offset: int, size: int) -> int: ...
    def pio_write(self, offset: int, size: int, value: int) -> None: ...


class MmioDevice(Protocol):
    """A device on the memory bus."""

    def mmio_read(self, offset: int, size: int) -> int: ...
    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class BusConflict(ValueError):
    """Two devices claim overlapping ranges."""


class Bus:
    """Address decoding for one address space (ports or physical memory)."""

    def __init__(self, name: str, on_unclaimed: Callable[[str, int, int, int | None], None] | None = None):
        self.name = name
        self.tree = IntervalTree()
        self._cache: dict[int, tuple[int, object]] = {}
        self.on_unclaimed = on_unclaimed
        self._reported: set[int] = set()

    def register(self, base: int, size: int, device: object) -> None:
        """Claim ``[base, base+size)`` for ``device``; overlaps are wiring bugs."""
        if size <= 0:
            raise ValueError(f"{self.name}: empty range at {base:#x}")
        hits = self.tree.overlap(base, base + size)
        if hits:
            other = next(iter(hits))
            raise BusConflict(f"{self.name}: {type(device).__name__} at {base:#x}+{size:#x} overlaps "
                              f"{type(other.data).__name__} at {other.begin:#x}")
        self.tree.addi(base, base + size, device)
        self._cache.clear()

    def unregister(self, device: object) -> None:
        for iv in [iv for iv in self.tree if iv.data is device]:
            self.tree.remove(iv)
        self._cache.clear()

    def remap(self, device: object, base: int, size: int) -> None:
        """Move a device (a PCI BAR being programmed)."""
        self.unregister(device)
        self.register(base, size, device)

    def lookup(self, addr: int) -> tuple[int, object] | None:
        hit = self._cache.get(addr)
        if hit is None:
            ivs = self.tree.at(addr)
            if not ivs:
                return None
            iv = next(iter(ivs))
            hit = self._cache[addr] = (iv.begin, iv.data)
        return hit

    def ranges(self) -> list[tuple[int, int, object]]:
        return sorted((iv.begin, iv.end, iv.data) for iv in self.tree)

    def _unclaimed(self, kind: str, addr: int, size: int, value: int | None) -> None:
        if self.on_unclaimed and addr not in self._reported:
            self._reported.add(addr)          # report each address once, like a log
            self.on_unclaimed(kind, addr, size, value)

    # which device methods an access calls (PioDevice by default, MmioDevice below)
    read_method = "pio_read"
    write_method = "pio_write"

    def read(self, addr: int, size: int) -> int:
        """Read from whichever device claims ``addr``; unclaimed reads float high."""
        ones = (1 << (8 * size)) - 1
        hit = self.lookup(addr)
        if hit is None:
            self._unclaimed("read", addr, size, None)
            return ones
        base, dev = hit
        return getattr(dev, self.read_method)(addr - base, size) & ones

    def write(self, addr: int, size: int, value: int) -> None:
        """Write to whichever device claims ``addr``; unclaimed writes vanish."""
        hit = self.lookup(addr)
        if hit is None:
            self._unclaimed("write", addr, size, value)
            return
        base, dev = hit
        getattr(dev, self.write_method)(addr - base, size, value & ((1 << (8 * size)) - 1))


    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("bus", 1)

    def save_record(self) -> dict:
        """Which unclaimed addresses were reported already (each is reported once, like a log)."""
        return make_record(*self.RECORD, {"reported": sorted(self._reported)})

    def check_record(self, record: dict) -> set[int]:
        return {integer(a, "reported address") for a in listing(open_record(record, *self.RECORD), "reported")}

    def apply_record(self, prepared: set[int]) -> None:
        self._reported = set(prepared)


class PioBus(Bus):
    """The x86 I/O port space: 64 KiB of ports reached with IN/OUT."""


class MmioBus(Bus):
    """Physical addresses that are not RAM: chipset and device registers."""

    read_method = "mmio_read"
    write_method = "mmio_write"
