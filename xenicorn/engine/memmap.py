"""The guest-physical map inside one engine: RAM, MMIO ranges, overlay pages.

A hypervisor gives the CPU a map of guest-physical memory (KVM's memory
slots, Xen's p2m): which pages are RAM (and where that RAM is on the host),
which belong to devices and must exit on access. Unicorn's map is the same
idea in three calls:

========================  ==================================================
Unicorn call              xenicorn use
========================  ==================================================
``mem_map_ptr``           RAM: the host buffer of
                          :class:`~xenicorn.machine.memory.GuestMemory`,
                          shared with Python; overlay pages (Xen's grant
                          table frames) mapped over RAM or a device BAR
``mmio_map``              device ranges: each access calls back into
                          Python, an :class:`~xenicorn.exits.Mmio` exit
``UC_HOOK_MEM_UNMAPPED``  the gaps: an access where nothing is mapped, an
                          :class:`~xenicorn.exits.UnmappedAccess` exit
========================  ==================================================

Unicorn treats the addresses of its map changes as *virtual* ones when the
guest has paging on (see :meth:`MemoryMap.physical_view`), so every change
happens with paging off in the engine.
"""
from __future__ import annotations

import contextlib

from unicorn import x86_const as X

from .. import exits as E
from .hooks import guarded

PAGE = 4096
CR0_PG = 1 << 31


def paging_off(method):
    """Run a VCpu method that changes Unicorn's memory map inside ``physical_view``."""
    def wrapped(self, *args):
        with self.physical_view():
            return method(self, *args)
    wrapped.__name__ = method.__name__
    wrapped.__doc__ = method.__doc__
    return wrapped


def gaps_in(ram_regions) -> list[tuple[int, int]]:
    """Inclusive physical ranges not covered by RAM, up to 2^64 - 1."""
    gaps, cur = [], 0
    for base, length, _ in sorted(ram_regions):
        if base > cur:
            gaps.append((cur, base - 1))
        cur = max(cur, base + length)
    gaps.append((cur, (1 << 64) - 1))
    return gaps


class MemoryMap:
    """The memory-map half of :class:`~xenicorn.engine.vcpu.VCpu` (a mixin: same object)."""

    _gaps_in = staticmethod(gaps_in)

    def _map_ram(self, memory) -> None:
        """Map guest RAM into this engine and follow the map's later changes."""
        for base, length, off in memory.ram_regions:
            self.uc.mem_map_ptr(base, length, 7, memory.host_addr + off)
        self._mmio_pages: set[int] = set()
        memory.attach(self)                      # overlays now and later, code Python rewrites

    @contextlib.contextmanager
    def physical_view(self):
        """Paging off in the engine while Unicorn changes its memory map.

        Unicorn treats the *physical* addresses of ``mem_unmap`` and
        ``ctl_remove_cache`` as *virtual* ones: it walks the guest's page
        tables for them (to find the translated code to drop) and flushes
        the TLB entries of those virtual addresses. With the guest's paging
        on, that walk can fault: the fault is swallowed, but it leaves CR2
        overwritten and Unicorn's double-fault bookkeeping set, so the
        guest's next real page fault arrives as a #DF (measured: Linux's
        first user-mode fault after it mapped its grant frames); and the
        TLB entries of the virtual addresses that really map the page stay
        stale. With paging off for the change, virtual is physical; writing
        CR0 flushes the whole TLB; the saved context then comes back whole.
        """
        uc = self.uc
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        if not cr0 & CR0_PG:
            yield
            return
        saved = uc.context_save()
        uc.reg_write(X.UC_X86_REG_CR0, cr0 & ~CR0_PG)
        try:
            yield
        finally:
            uc.context_restore(saved)

    def drop_translations(self, start: int, end: int) -> None:
        """Forget code translated from physical ``[start, end)`` (Python rewrote it)."""
        with self.physical_view():
            self.uc.ctl_remove_cache(start, end)

    @paging_off
    def map_overlay(self, gpa: int, host: int) -> None:
        """Put one host page at guest-physical ``gpa``, over RAM or a device range.

        Unicorn can unmap part of a region, but the MMIO callbacks of a split
        region then get offsets from the new start while keeping our old
        base, so an MMIO region is unmapped whole and its two sides mapped
        again on their own.
        """
        uc = self.uc
        if gpa in self._mmio_pages:
            for begin, end, _ in list(uc.mem_regions()):
                if begin <= gpa <= end:
                    uc.mem_unmap(begin, end + 1 - begin)
                    self._mmio_pages -= set(range(begin, end + 1, PAGE))
                    for lo, hi in ((begin, gpa), (gpa + PAGE, end + 1)):
                        if hi > lo:
                            self.map_mmio(lo, hi - lo)
                    break
        elif any(begin <= gpa <= end for begin, end, _ in uc.mem_regions()):
            uc.mem_unmap(gpa, PAGE)                 # a RAM page: Unicorn splits the region
        uc.mem_map_ptr(gpa, PAGE, 7, host)
        self.machine.memory.code_written(gpa, PAGE)

    @paging_off
    def unmap_overlay(self, gpa: int) -> None:
        """Take an overlay page away: RAM under it shows again; elsewhere it floats."""
        self.uc.mem_unmap(gpa, PAGE)
        mem = self.machine.memory
        for base, length, off in mem.ram_regions:
            if base <= gpa < base + length:
                self.uc.mem_map_ptr(gpa, PAGE, 7, mem.host_addr + off + gpa - base)

    @paging_off
    def map_mmio(self, base: int, size: int) -> None:
        """Route physical ``[base, base+size)`` to the machine's MMIO bus.

        Each guest load or store there becomes an :class:`Mmio` exit handled
        inside Unicorn's callback (about 0.5 us on top of a RAM access).
        Unicorn maps whole pages, so the range is widened to 4 KiB bounds.
        """
        start = base & ~(PAGE - 1)
        end = (base + size + PAGE - 1) & ~(PAGE - 1)
        pages = range(start, end, PAGE)
        if all(p in self._mmio_pages for p in pages):
            return
        new = [p for p in pages if p not in self._mmio_pages]
        # map maximal runs of new pages
        run_start = prev = new[0]
        for p in new[1:] + [None]:
            if p != prev + PAGE:
                self.uc.mmio_map(run_start, prev + PAGE - run_start, self.core.hook(self, "_on_mmio_read"),
                                 run_start, self.core.hook(self, "_on_mmio_write"), run_start)
                if p is not None:
                    run_start = p
            prev = p if p is not None else prev
        self._mmio_pages.update(new)

    @guarded(0)
    def _on_mmio_read(self, uc, offset, size, base):
        ex = E.Mmio(self._trace_pc(), base + offset, size, False)
        self.machine.handle_exit(self, ex)
        return ex.value

    @guarded(None)
    def _on_mmio_write(self, uc, offset, size, value, base):
        self.machine.handle_exit(self, E.Mmio(self._trace_pc(), base + offset, size, True, value))
