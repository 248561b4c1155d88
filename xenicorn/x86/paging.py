"""The guest page-table walker: linear address → physical address.

Hypercall arguments, interrupt stack frames and the IDT itself are at
*linear* addresses the guest chose; Unicorn's ``mem_read`` takes physical
ones. This module walks the guest's page tables exactly as the MMU would
(SDM vol. 3 chapter 4) and answers with a :class:`Translation` or a
:class:`PageFault` carrying the error code the CPU would push. It never
raises for the guest's sake: a bad pointer is a fault value, not a Python
exception.

Four modes, chosen by CR0.PG, CR4.PAE and EFER.LMA:

============  =========  ========================  ==========================
mode          levels     entry size / index bits   large pages
============  =========  ========================  ==========================
none          0          (linear == physical)      -
32-bit        2          4 bytes / 10+10           4 MiB if CR4.PSE and PS
PAE           3          8 bytes / 2+9+9           2 MiB (PDE.PS)
4-level       4          8 bytes / 9+9+9+9         1 GiB (PDPTE.PS), 2 MiB
============  =========  ========================  ==========================

Permissions accumulate down the walk: a page is writable only if every level
has R/W=1 (supervisor writes ignore that unless CR0.WP=1), user-accessible
only if every level has U/S=1, and not executable if any level has XD=1 with
EFER.NXE=1. SMEP (CR4 bit 20) forbids supervisor fetches from user pages and
SMAP (CR4 bit 21) supervisor data accesses to them (this walker treats every
supervisor access as SMAP-checked, i.e. EFLAGS.AC=0).

#PF error code bits: P (bit 0) the page was present (a protection fault),
W/R (1) a write, U/S (2) from CPL3, RSVD (3) a reserved bit was set, I/D (4)
an instruction fetch (only reported with NXE or SMEP).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

CR0_PE, CR0_WP, CR0_PG = 1 << 0, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_SMEP, CR4_SMAP = 1 << 4, 1 << 5, 1 << 20, 1 << 21
EFER_LMA, EFER_NXE = 1 << 10, 1 << 11

PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 0x20, 0x40, 0x80
PTE_XD = 1 << 63
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16

MAXPHYADDR = 40                                    # CPUID 0x80000008 says 40 bits
_ADDR_MASK = ((1 << MAXPHYADDR) - 1) & ~0xFFF      # physical frame bits of a 64-bit entry


@dataclass(frozen=True)
class PagingRegs:
    """The control registers that decide how the MMU translates."""

    cr0: int
    cr3: int
    cr4: int
    efer: int

    @property
    def mode(self) -> str:
        if not self.cr0 & CR0_PG:
            return "none"
        if self.efer & EFER_LMA:
            return "4-level"
        if self.cr4 & CR4_PAE:
            return "pae"
        return "32-bit"


@dataclass(frozen=True)
class Translation:
    """A successful walk: where the byte lives and what the page allows."""

    linear: int
    phys: int
    page_size: int
    writable: bool
    user: bool
    executable: bool


@dataclass(frozen=True)
class PageFault:
    """The #PF the CPU would raise: vector 14, CR2 = linear, this error code."""

    linear: int
    error_code: int
    reason: str = ""
    vector: int = 14


ReadPhys = Callable[[int, int], int]
WritePhys = Callable[[int, int, int], None]


def translate(regs: PagingRegs, linear: int, read_phys: ReadPhys, *, write: bool = False,
              user: bool = False, fetch: bool = False, write_phys: WritePhys | None = None) -> Translation | PageFault:
    """Walk the page tables for one access (SDM vol. 3 §4.3-4.6).

    ``read_phys(addr, size)`` reads a little-endian entry; ``write_phys``, when
    given, sets Accessed and Dirty bits as the MMU does on a successful walk.
    A table that lies outside guest RAM (``read_phys`` raises) is reported as
    a reserved-bit fault: the walk cannot continue and the guest gets a #PF.
    """
    mode = regs.mode
    access = (PF_W if write else 0) | (PF_U if user else 0)
    if mode == "none":
        return Translation(linear, linear & 0xFFFFFFFF if not regs.efer & EFER_LMA else linear,
                           1 << 32, True, True, True)
    nxe = bool(regs.efer & EFER_NXE)
    if fetch and (nxe or regs.cr4 & CR4_SMEP):
        access |= PF_I

    def fault(present: bool, why: str, rsvd: bool = False) -> PageFault:
        code = access | (PF_P if present else 0) | (PF_RSVD if rsvd else 0)
        return PageFault(linear, code, why)

    if mode == "4-level":
        top = linear >> 47
        if top not in (0, (1 << 17) - 1):
            # Non-canonical: real hardware raises #GP, not #PF; callers that
            # care check canonicality first. Report it as a not-present fault.
            return fault(False, "non-canonical address")
        levels = [(39, 8), (30, 8), (21, 8), (12, 8)]
        table = regs.cr3 & _ADDR_MASK
    elif mode == "pae":
        linear &= 0xFFFFFFFF
        try:
            pdpte = read_phys((regs.cr3 & 0xFFFFFFE0) + ((linear >> 30) & 3) * 8, 8)
        except Exception:
            return fault(False, "PDPTE outside RAM", rsvd=True)
        if not pdpte & PTE_P:
            return fault(False, "PDPTE not present")
        if pdpte & (0x1E6 | (~((1 << MAXPHYADDR) - 1) & ((1 << 63) - 1))):
            return fault(True, "reserved bit in PDPTE", rsvd=True)
        levels = [(21, 8), (12, 8)]
        table = pdpte & _ADDR_MASK
    else:
        linear &= 0xFFFFFFFF
        levels = [(22, 4), (12, 4)]
        table = regs.cr3 & 0xFFFFF000

    writable = user_ok = True
    no_exec = False
    entries: list[tuple[int, int]] = []          # (address, value) of entries walked
    page_size = 4096
    frame = 0
    for depth, (shift, size) in enumerate(levels):
        index_bits = 10 if size == 4 else 9
        addr = table + ((linear >> shift) & ((1 << index_bits) - 1)) * size
        try:
            entry = read_phys(addr, size)
        except Exception:
            return fault(False, f"page table at {addr:#x} outside RAM", rsvd=True)
        if not entry & PTE_P:
            return fault(False, f"not present at level {len(levels) - depth}")
        if size == 8:
            if entry & ~_ADDR_MASK & ((1 << 63) - 1) & ~0xFFF & ~(0x7FF << 52):
                return fault(True, "reserved physical-address bit set", rsvd=True)
            if entry & PTE_XD and not nxe:
                return fault(True, "XD set with EFER.NXE=0", rsvd=True)
        entries.append((addr, entry))
        writable &= bool(entry & PTE_RW)
        user_ok &= bool(entry & PTE_US)
        no_exec |= bool(size == 8 and entry & PTE_XD)
        last = shift == 12
        large = not last and entry & PTE_PS and (size == 8 and shift in (21, 30) or
                                                 size == 4 and regs.cr4 & CR4_PSE)
        if size == 8 and shift == 30 and entry & PTE_PS and mode != "4-level":
            large = False
        if size == 8 and shift == 39 and entry & PTE_PS:
            return fault(True, "PS set in PML4E", rsvd=True)
        if last or large:
            page_size = 1 << shift
            if size == 4 and large:
                # PSE-36: bits 13..20 of a 4 MiB PDE are physical bits 32..39
                frame = (entry & 0xFFC00000) | ((entry >> 13) & 0xFF) << 32
                if entry & (1 << 21):
                    return fault(True, "reserved bit 21 in 4 MiB PDE", rsvd=True)
            elif size == 4:
                frame = entry & 0xFFFFF000
            else:
                frame = entry & _ADDR_MASK & ~(page_size - 1)
                if large and entry & _ADDR_MASK & (page_size - 1) & ~0x1FFF:
                    return fault(True, "reserved low bits in a large-page entry", rsvd=True)
            break
        table = entry & (_ADDR_MASK if size == 8 else 0xFFFFF000)

    # permission checks (SDM §4.6)
    if user and not user_ok:
        return fault(True, "user access to a supervisor page")
    if write and not writable and (user or regs.cr0 & CR0_WP):
        return fault(True, "write to a read-only page")
    if fetch and no_exec:
        return fault(True, "fetch from a no-execute page")
    if not user and user_ok:
        if fetch and regs.cr4 & CR4_SMEP:
            return fault(True, "SMEP: supervisor fetch from a user page")
        if not fetch and regs.cr4 & CR4_SMAP:
            return fault(True, "SMAP: supervisor access to a user page")
    if write_phys is not None:
        for i, (addr, entry) in enumerate(entries):
            want = entry | PTE_A
            if i == len(entries) - 1 and write:
                want |= PTE_D
            if want != entry:
                write_phys(addr, 4 if mode == "32-bit" else 8, want)
    phys = frame | (linear & (page_size - 1))
    return Translation(linear, phys, page_size, writable or not (user or regs.cr0 & CR0_WP),
                       user_ok, not no_exec)
