"""shared_info and vcpu_info: the pages Xen and the guest both write.

``shared_info`` is one page the guest places with ``XENMEM_add_to_physmap``
(space ``XENMAPSPACE_shared_info``). Its layout depends on the guest's
width, because several fields are ``unsigned long`` (xen/include/public/
xen.h, arch-x86/xen.h, and the compat layout Xen uses for 32-bit guests):

=====================  =============  =============  ========================
field                  64-bit guest   32-bit guest   meaning
=====================  =============  =============  ========================
vcpu_info[32]          0x000 (64 B)   0x000 (64 B)   one per vCPU (below)
evtchn_pending[]       0x800 (64x8)   0x800 (32x4)   one bit per event port
evtchn_mask[]          0xA00          0x880          one bit per event port
wc_version             0xC00          0x900          odd while being updated
wc_sec, wc_nsec        0xC04, 0xC08   0x904, 0x908   wall clock at boot
=====================  =============  =============  ========================

``vcpu_info`` (64 bytes; at most one per vCPU, and movable out of
shared_info with ``VCPUOP_register_vcpu_info``):

=======================  ======  ======  ====================================
field                    64-bit  32-bit  meaning
=======================  ======  ======  ====================================
evtchn_upcall_pending    0x00    0x00    u8: an event waits for this vCPU
evtchn_upcall_mask       0x01    0x01    u8: the guest's "interrupts off"
evtchn_pending_sel       0x08    0x04    which words of evtchn_pending to scan
arch.cr2                 0x10    0x08
time (vcpu_time_info)    0x20    0x20    the PV clock (see pvclock.py)
=======================  ======  ======  ====================================

These classes are views over guest-physical memory; they hold no state of
their own, so the guest and the hypervisor always see the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

VCPU_INFO_SIZE = 64
MAX_VIRT_CPUS = 32


@dataclass(frozen=True)
class Layout:
    """Offsets for one guest width."""

    bits: int
    pending: int
    mask: int
    wc_version: int
    pending_sel: int

    @property
    def word(self) -> int:
        return self.bits // 8

    @property
    def nr_ports(self) -> int:
        """The 2-level ABI's port count: word bits squared."""
        return self.bits * self.bits


LAYOUT64 = Layout(64, pending=0x800, mask=0xA00, wc_version=0xC00, pending_sel=0x08)
LAYOUT32 = Layout(32, pending=0x800, mask=0x880, wc_version=0x900, pending_sel=0x04)


def layout(bits: int) -> Layout:
    return LAYOUT64 if bits == 64 else LAYOUT32


class VcpuInfo:
    """One vcpu_info, wherever it lives (shared_info or a registered page)."""

    def __init__(self, memory, gpa: int, lay: Layout):
        self.memory, self.gpa, self.layout = memory, gpa, lay

    @property
    def upcall_pending(self) -> int:
        return self.memory.read_u8(self.gpa)

    @upcall_pending.setter
    def upcall_pending(self, value: int) -> None:
        self.memory.write_int(self.gpa, 1, value)

    @property
    def upcall_mask(self) -> int:
        return self.memory.read_u8(self.gpa + 1)

    @upcall_mask.setter
    def upcall_mask(self, value: int) -> None:
        self.memory.write_int(self.gpa + 1, 1, value)

    @property
    def pending_sel(self) -> int:
        return self.memory.read_int(self.gpa + self.layout.pending_sel, self.layout.word)

    @pending_sel.setter
    def pending_sel(self, value: int) -> None:
        self.memory.write_int(self.gpa + self.layout.pending_sel, self.layout.word, value)

    @property
    def time_gpa(self) -> int:
        return self.gpa + 0x20

    def copy_from(self, other: "VcpuInfo") -> None:
        self.memory.write(self.gpa, self.memory.read(other.gpa, VCPU_INFO_SIZE))


class SharedInfo:
    """The shared_info page at ``gpa`` seen with a guest width's layout."""

    def __init__(self, memory, gpa: int, bits: int):
        self.memory, self.gpa, self.layout = memory, gpa, layout(bits)

    def vcpu_info(self, index: int) -> VcpuInfo:
        if not 0 <= index < MAX_VIRT_CPUS:
            raise IndexError(f"vCPU {index} has no vcpu_info in shared_info")
        return VcpuInfo(self.memory, self.gpa + VCPU_INFO_SIZE * index, self.layout)

    def _bit(self, table: int, port: int) -> tuple[int, int]:
        word = self.layout.word
        return self.gpa + table + (port // self.layout.bits) * word, port % self.layout.bits

    def _get(self, table: int, port: int) -> bool:
        addr, bit = self._bit(table, port)
        return bool(self.memory.read_int(addr, self.layout.word) >> bit & 1)

    def _set(self, table: int, port: int, value: bool) -> bool:
        """Set or clear one bit; return its old value (a test-and-set)."""
        addr, bit = self._bit(table, port)
        w = self.memory.read_int(addr, self.layout.word)
        old = bool(w >> bit & 1)
        w = (w | (1 << bit)) if value else (w & ~(1 << bit))
        self.memory.write_int(addr, self.layout.word, w)
        return old

    def pending(self, port: int) -> bool:
        return self._get(self.layout.pending, port)

    def set_pending(self, port: int, value: bool = True) -> bool:
        return self._set(self.layout.pending, port, value)

    def masked(self, port: int) -> bool:
        return self._get(self.layout.mask, port)

    def set_masked(self, port: int, value: bool = True) -> bool:
        return self._set(self.layout.mask, port, value)

    def write_wallclock(self, sec: int, nsec: int) -> None:
        """wc_version odd, fields, wc_version even (the same protocol as the PV clock)."""
        base = self.gpa + self.layout.wc_version
        version = (self.memory.read_u32(base) + 1) | 1
        self.memory.write_u32(base, version)
        self.memory.write_u32(base + 4, sec & 0xFFFFFFFF)
        self.memory.write_u32(base + 8, nsec)
        if self.layout.bits == 64:
            self.memory.write_u32(base + 12, sec >> 32)         # wc_sec_hi
        self.memory.write_u32(base, version + 1)

    def wallclock(self) -> tuple[int, int, int]:
        base = self.gpa + self.layout.wc_version
        version, sec, nsec = (self.memory.read_u32(base + o) for o in (0, 4, 8))
        if self.layout.bits == 64:
            sec |= self.memory.read_u32(base + 12) << 32
        return version, sec, nsec
