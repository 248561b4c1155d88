"""PV clock arithmetic and the version protocol (no timing assertions)."""
import pytest
from hypothesis import given, strategies as st

from xenicorn.machine.memory import GuestMemory
from xenicorn.xen import pvclock


@pytest.mark.parametrize("hz", [1e6, 3.3e7, 1e9, 1.19e9, 2.6e9, 4e9, 5.5e9])
def test_scale_converts_one_second_of_ticks_to_one_second(hz):
    mul, shift = pvclock.scale_for(hz)
    assert 0 < mul < 1 << 32 and -31 <= shift <= 31
    ns = pvclock.ticks_to_ns(int(hz), mul, shift)
    assert abs(ns - 1_000_000_000) <= 2


@given(hz=st.floats(min_value=1e6, max_value=1e10), ticks=st.integers(0, 1 << 40))
def test_scale_error_is_below_one_part_per_million(hz, ticks):
    mul, shift = pvclock.scale_for(hz)
    exact = ticks * 1e9 / hz
    assert abs(pvclock.ticks_to_ns(ticks, mul, shift) - exact) <= exact * 1e-6 + 2


def test_publish_follows_the_odd_even_version_protocol():
    mem = GuestMemory(2 << 20)
    first = pvclock.publish(mem, 0x1000, tsc=1000, system_time=5, mul=1 << 31, shift=1)
    assert first.version % 2 == 0
    second = pvclock.publish(mem, 0x1000, tsc=2000, system_time=7, mul=1 << 31, shift=1)
    assert second.version == first.version + 2
    back = pvclock.TimeInfo.unpack(mem.read(0x1000, pvclock.VCPU_TIME_INFO_SIZE))
    assert back == second and back.flags & pvclock.XEN_PVCLOCK_TSC_STABLE_BIT


def test_tsc_source_reads_a_running_counter():
    from xenicorn.engine.tsc import HostTsc
    src = HostTsc()
    a, b = src.read(), src.read()
    assert b > a
    assert src.hz() > 1e6
