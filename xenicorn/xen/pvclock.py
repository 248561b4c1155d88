"""Xen's PV clock: telling a guest how to turn its TSC into nanoseconds.

Reading a clock through the hypervisor on every ``gettimeofday`` would be
slow, so Xen publishes a *conversion* in each vCPU's ``vcpu_time_info``
(xen/include/public/xen.h) and the guest computes the time itself:

=======  =====================  =============================================
offset   field                  meaning
=======  =====================  =============================================
0x00     version (u32)          odd while Xen is updating the record
0x08     tsc_timestamp (u64)    TSC value at the moment of the update
0x10     system_time (u64)      ns since the domain booted, at that moment
0x18     tsc_to_system_mul      32.32 fixed-point multiplier ...
0x1C     tsc_shift (s8)         ... applied after shifting the TSC delta
0x1D     flags (u8)             XEN_PVCLOCK_TSC_STABLE_BIT (1) ...
=======  =====================  =============================================

``now = system_time + (((rdtsc() - tsc_timestamp) << shift) * mul) >> 32``
(a right shift when ``tsc_shift`` is negative). The guest reads ``version``,
the fields, then ``version`` again, and retries if it changed or was odd.

Under Unicorn, RDTSC returns the host's TSC, which xenicorn cannot set or
trap cheaply. So the hypervisor side *measures* it: the machine hands the
Xen layer a TSC source (``machine.tsc``, an object with ``read()`` and
``hz()``): the engine's host-TSC reader (``xenicorn.engine.tsc``), which
calibrates its rate against the host's monotonic clock once per process,
or :class:`ClockTsc` when the machine traps RDTSC for deterministic time.
This module keeps the arithmetic and the record's layout, nothing that
runs guest code.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

XEN_PVCLOCK_TSC_STABLE_BIT = 1 << 0
VCPU_TIME_INFO_FMT = "<IIQQIbB2x"          # 32 bytes
VCPU_TIME_INFO_SIZE = struct.calcsize(VCPU_TIME_INFO_FMT)


class ClockTsc:
    """Deterministic time: the guest's TSC is the machine clock at 1 GHz."""

    def __init__(self, clock):
        self.clock = clock

    def read(self) -> int:
        return self.clock.now_ns()

    def hz(self) -> float:
        return 1e9


def scale_for(hz: float) -> tuple[int, int]:
    """``(tsc_to_system_mul, tsc_shift)`` converting ticks at ``hz`` to ns.

    We need ``ns = ticks * 2**shift * mul / 2**32`` with ``mul < 2**32``,
    i.e. ``1e9 / hz < 2**shift``; the smallest such shift keeps the most
    precision in ``mul``.
    """
    if hz <= 0:
        raise ValueError("TSC frequency must be positive")
    ratio = 1e9 / hz
    shift = math.floor(math.log2(ratio)) + 1
    mul = int(ratio * 2 ** (32 - shift))
    while mul >= 1 << 32:                # float rounding at a power of two
        shift += 1
        mul = int(ratio * 2 ** (32 - shift))
    if not -31 <= shift <= 31:
        raise ValueError(f"TSC frequency {hz} Hz is out of range")
    return mul, shift


def ticks_to_ns(delta: int, mul: int, shift: int) -> int:
    """What the guest computes: the PV-clock formula (xen.h, pvclock_scale_delta)."""
    delta = delta << shift if shift >= 0 else delta >> -shift
    return (delta * mul) >> 32


@dataclass
class TimeInfo:
    """One ``vcpu_time_info`` record."""

    version: int
    tsc_timestamp: int
    system_time: int
    mul: int
    shift: int
    flags: int = XEN_PVCLOCK_TSC_STABLE_BIT

    def pack(self) -> bytes:
        return struct.pack(VCPU_TIME_INFO_FMT, self.version, 0, self.tsc_timestamp, self.system_time,
                           self.mul, self.shift, self.flags)

    @classmethod
    def unpack(cls, raw: bytes) -> "TimeInfo":
        version, _, tsc, sys_time, mul, shift, flags = struct.unpack(VCPU_TIME_INFO_FMT, raw)
        return cls(version, tsc, sys_time, mul, shift, flags)


def publish(memory, gpa: int, tsc: int, system_time: int, mul: int, shift: int) -> TimeInfo:
    """Write a new record at ``gpa`` with the odd/even version protocol."""
    (version,) = struct.unpack("<I", memory.read(gpa, 4))
    version = (version + 1) | 1                      # odd: update in progress
    memory.write(gpa, struct.pack("<I", version))
    info = TimeInfo(version + 1, tsc, system_time, mul, shift)
    memory.write(gpa + 4, info.pack()[4:])
    memory.write(gpa, struct.pack("<I", info.version))   # even: consistent again
    return info
