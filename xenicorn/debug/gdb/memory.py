"""A debugger's view of guest memory: linear addresses, through the guest's page tables.

gdb asks for memory at *linear* addresses (what the guest's code uses).
They are translated with the selected vCPU's CR3 (gdb's ``Hg`` thread, as QEMU's
``g_cpu``: vCPUs may run on different page tables) by the walker in
:mod:`xenicorn.x86.paging`, as a debugger's access should be: no
Accessed/Dirty bits set (reading from gdb is invisible to the guest), no
permission checks (neither write protection nor SMAP refuses the
debugger). With paging off, linear is physical.

Only RAM is reachable: MMIO and holes answer "unreachable" (gdb's E14), so
reading a device register from gdb never has a side effect.
"""
from __future__ import annotations

import dataclasses

from ...machine.memory import PAGE_SIZE, GuestMemoryError
from ...x86.paging import CR4_SMAP, PageFault, translate


class DebugMemory:
    """Linear-address reads and writes of one machine's RAM as one of its vCPUs sees it."""

    def __init__(self, machine, vcpu=None):
        """``vcpu()`` gives the vCPU whose page tables translate (default: vCPU 0)."""
        self.machine = machine
        self.vcpu = vcpu if vcpu is not None else (lambda: machine.vcpus[0])

    def pieces(self, addr: int, length: int) -> list[tuple[int, int]] | None:
        """Physical (address, size) pieces of a linear range, or None if a page is unmapped or not RAM."""
        vcpu = self.vcpu()
        # SMAP would refuse a supervisor read of a user page: not the debugger's business
        regs = dataclasses.replace(vcpu.paging_regs(), cr4=vcpu.reg("cr4") & ~CR4_SMAP)
        mem = self.machine.memory
        out = []
        while length:
            chunk = min(length, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            t = translate(regs, addr, mem.read_int)     # no A/D updates, no permission checks
            if isinstance(t, PageFault):
                return None
            if not mem.is_ram(t.phys, chunk):
                return None
            out.append((t.phys, chunk))
            addr = (addr + chunk) & ((1 << 64) - 1)
            length -= chunk
        return out

    def read(self, addr: int, length: int) -> bytes | None:
        """``length`` bytes at linear ``addr``, or None when any of them is unreachable."""
        pieces = self.pieces(addr, length)
        if pieces is None:
            return None
        try:
            return b"".join(self.machine.memory.read(p, n) for p, n in pieces)
        except GuestMemoryError:
            return None

    def write(self, addr: int, data: bytes) -> bool:
        """Write ``data`` at linear ``addr``; False (nothing written) when any byte is unreachable."""
        pieces = self.pieces(addr, len(data))
        if pieces is None:
            return False
        mem = self.machine.memory
        pos = 0
        for phys, n in pieces:
            mem.write(phys, data[pos:pos + n])
            mem.code_written(phys, n)               # Unicorn must not run stale translations
            pos += n
        return True
