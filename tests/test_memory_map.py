"""Changing Unicorn's memory map while the guest has paging on.

Unicorn takes the *physical* address of ``mem_unmap`` and ``ctl_remove_cache``
as a *virtual* one: it walks the guest's page tables for it and flushes the
TLB entry of that virtual address. ``VCpu.physical_view`` turns paging off
in the engine for such changes. These tests map a page over RAM at run time
(what a grant frame or overlay does) in a paged long-mode guest.
"""
import ctypes
import mmap
import struct

from unicorn import x86_const as X

from xenicorn import exits as E
from xenicorn.machine.machine import Machine, MachineConfig

# PML4 0x10000 -> PDPT 0x11000 -> PD 0x12000: [0] = 2 MiB identity page,
# [3] (virtual 0x600000) -> PT 0x13000 whose first entry maps physical 0x5000
READ_ALIAS = bytes.fromhex("488b042500006000" "f4")       # mov rax, [0x600000] ; hlt
FAULT = bytes.fromhex("488b042500008000" "f4")            # mov rax, [0x800000] ; hlt (not mapped)


def paged_machine():
    m = Machine(MachineConfig(xen=False, debugcon="none"))
    mem, uc = m.memory, m.vcpu.uc
    mem.write_struct(0x10000, "<Q", 0x11000 | 3)
    mem.write_struct(0x11000, "<Q", 0x12000 | 3)
    mem.write_struct(0x12000, "<Q", 0x83)
    mem.write_struct(0x12000 + 3 * 8, "<Q", 0x13000 | 3)
    mem.write_struct(0x13000, "<Q", 0x5000 | 3)
    mem.write_struct(0x5000, "<Q", 0x1111)
    mem.write(0x1000, READ_ALIAS)
    mem.write(0x1100, FAULT)
    uc.reg_write(X.UC_X86_REG_CR3, 0x10000)
    uc.reg_write(X.UC_X86_REG_CR4, 0x20)
    uc.msr_write(0xC0000080, 0x500)
    uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
    return m


def host_page(value):
    page = mmap.mmap(-1, 4096)
    page[:8] = struct.pack("<Q", value)
    return page, ctypes.addressof(ctypes.c_char.from_buffer(page))


def run_at(m, pc):
    m.vcpu.pc = pc
    return m.vcpu.run()


def test_an_overlay_is_seen_through_every_virtual_alias():
    m = paged_machine()
    assert isinstance(run_at(m, 0x1000), E.Hlt) and m.vcpu.reg("rax") == 0x1111   # the TLB holds 0x600000
    page, host = host_page(0x2222)
    m.vcpu.map_overlay(0x5000, host)
    run_at(m, 0x1000)
    assert m.vcpu.reg("rax") == 0x2222            # not the stale translation to the old RAM page
    m.vcpu.unmap_overlay(0x5000)
    run_at(m, 0x1000)
    assert m.vcpu.reg("rax") == 0x1111


def test_a_map_change_leaves_cr2_and_the_next_page_fault_alone():
    m = paged_machine()
    uc = m.vcpu.uc
    uc.reg_write(X.UC_X86_REG_CR2, 0xC0FFEE000)
    page, host = host_page(0)
    m.vcpu.map_overlay(0x400000, host)              # its "virtual" address is not mapped
    m.memory.code_written(0x700000, 4096)           # nor is this one
    assert uc.reg_read(X.UC_X86_REG_CR2) == 0xC0FFEE000
    faults = []

    def record(vcpu, ex):
        faults.append(ex)
        vcpu.stop_with(ex)
        return E.Action.STOP
    m.dispatch._handlers[E.Exception_] = record
    ex = run_at(m, 0x1100)
    assert isinstance(ex, E.Exception_) and ex.vector == 14 and ex.cr2 == 0x800000   # a #PF, not a #DF
