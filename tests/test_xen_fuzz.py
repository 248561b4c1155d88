"""Hostile hypercalls: random numbers, sub-ops, pointers and sizes.

Whatever the guest puts in its registers and memory, a hypercall returns 0,
a positive count, or a negative Xen errno, and never raises in Python.
"""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from xenicorn.devices.console import ConsoleSink
from xenicorn import exits as E
from xenicorn.machine.machine import Machine, MachineConfig
from xenicorn.xen import errno

from test_xen_hypercalls import enter_long_mode

ERRNOS = set(errno.NAMES)
pointers = st.one_of(st.sampled_from([0x3000, 0x3FF8, 0x7FFFF0, 0, 0xC0000000, 0xFFFFFFFF,
                                      0xFFFF_8000_0000_0000, (1 << 64) - 8]),
                     st.integers(0, (1 << 64) - 1))
values = st.one_of(st.integers(0, 64), st.sampled_from([0x7FF0, 0x7FFFFFFF, 0x80000000, (1 << 64) - 1]),
                   st.integers(0, (1 << 64) - 1))


@pytest.fixture(scope="module")
def machines():
    out = {}
    for bits in (32, 64):
        m = Machine(MachineConfig(ram_mib=8, debugcon="none"), console=ConsoleSink(None))
        m.vcpu.reset_to_flat32(0x100000, esp=0x9000)
        if bits == 64:
            enter_long_mode(m)
        out[bits] = m
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bits=st.sampled_from([32, 64]),
       number=st.one_of(st.sampled_from([12, 17, 18, 24, 29, 32, 33, 34]), st.integers(0, 60)),
       args=st.lists(st.one_of(values, pointers), min_size=5, max_size=5),
       junk=st.binary(min_size=64, max_size=64))
def test_random_hypercalls_return_xen_errnos(machines, bits, number, args, junk):
    m = machines[bits]
    m.status = None                                 # a previous example may have "shut down"
    m.memory.write(0x3000, junk)                    # what the pointers mostly point at
    vcpu = m.vcpu
    vcpu.set_reg("rax", number)
    regs = ("rdi", "rsi", "rdx", "r10", "r8") if bits == 64 else ("rbx", "rcx", "rdx", "rsi", "rdi")
    for reg, value in zip(regs, args, strict=False):
        vcpu.set_reg(reg, value & ((1 << bits) - 1))
    m.handle_exit(vcpu, E.Hypercall(0x100000, -1))
    r = vcpu.reg("rax") & ((1 << bits) - 1)
    signed = r - (1 << bits) if r >> (bits - 1) else r
    assert signed >= 0 or -signed in ERRNOS, (number, args, signed)
