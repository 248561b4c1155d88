"""``vcpu_op`` (hypercall 24): per-vCPU registrations and timers.

Sub-ops from xen/include/public/vcpu.h that an HVM guest may use:

====  ================================  =====================================
cmd   name                              argument
====  ================================  =====================================
0-3   VCPUOP_initialise, up, down,      bringing other vCPUs up (:mod:`.vcpu_up`)
      is_up
4     VCPUOP_get_runstate_info          vcpu_runstate_info out (48 / 44 B)
5     VCPUOP_register_runstate_memory_  { guest pointer }: Xen keeps the
      area                              runstate there up to date
6     VCPUOP_set_periodic_timer         { u64 period_ns } (>= 1 ms)
7     VCPUOP_stop_periodic_timer        none
8     VCPUOP_set_singleshot_timer       { u64 timeout_abs_ns; u32 flags }
9     VCPUOP_stop_singleshot_timer      none
10    VCPUOP_register_vcpu_info         { u64 mfn; u32 offset; u32 rsvd }:
                                        move vcpu_info out of shared_info
13    VCPUOP_register_vcpu_time_memory_ { guest pointer } for a second
      area                              copy of vcpu_time_info
====  ================================  =====================================

A vCPU number the domain does not have is -ENOENT. Timers run on the
machine clock and raise VIRQ_TIMER when they expire (counted in the vCPU's
state until a port is bound to it).
"""
from __future__ import annotations

import struct

from . import errno
from .guest import HypercallError
from .shared_info import VCPU_INFO_SIZE
from .vcpu_up import vcpu_up_op

VCPUOP_initialise, VCPUOP_up, VCPUOP_down = 0, 1, 2
VCPUOP_is_up, VCPUOP_get_runstate_info, VCPUOP_register_runstate_memory_area = 3, 4, 5
VCPUOP_set_periodic_timer, VCPUOP_stop_periodic_timer = 6, 7
VCPUOP_set_singleshot_timer, VCPUOP_stop_singleshot_timer = 8, 9
VCPUOP_register_vcpu_info, VCPUOP_register_vcpu_time_memory_area = 10, 13
VCPU_SSHOTTMR_future = 1
MILLISECS = 1_000_000
STIME_DELTA_MAX = (1 << 62) - 1
RUNSTATE_running = 0


def runstate_bytes(call, now: int) -> bytes:
    """vcpu_runstate_info: state, entry time, time[4] (running/runnable/blocked/offline)."""
    xen = call.xen
    if call.bits == 64:
        return struct.pack("<i4xQ4Q", RUNSTATE_running, xen.boot_ns, now - xen.boot_ns, 0, 0, 0)
    return struct.pack("<iQ4Q", RUNSTATE_running, xen.boot_ns, now - xen.boot_ns, 0, 0, 0)


def vcpu_op(call, cmd: int, vcpuid: int, arg: int, *_) -> int:
    """Dispatch a VCPUOP_* (see the module table)."""
    xen = call.xen
    vcpuid &= 0xFFFFFFFF
    if vcpuid >= len(xen.host.vcpus):
        raise HypercallError(errno.ENOENT, f"vCPU {vcpuid}")
    vs = xen.vcpu_state(vcpuid)
    if cmd in (VCPUOP_initialise, VCPUOP_up, VCPUOP_down, VCPUOP_is_up):
        return vcpu_up_op(xen, call, cmd, vcpuid, arg)
    if cmd == VCPUOP_get_runstate_info:
        call.guest.write(arg, runstate_bytes(call, xen.now_ns()))
        return 0
    if cmd == VCPUOP_register_runstate_memory_area:
        (addr,) = call.guest.read_struct(arg, "<Q")
        vs.runstate_area = addr if call.bits == 64 else addr & 0xFFFFFFFF
        try:
            call.guest.write(vs.runstate_area, runstate_bytes(call, xen.now_ns()))
        except HypercallError:
            call.note("runstate area not writable yet (Xen ignores that)")
        return 0
    if cmd == VCPUOP_register_vcpu_time_memory_area:
        (addr,) = call.guest.read_struct(arg, "<Q")
        vs.time_area = addr if call.bits == 64 else addr & 0xFFFFFFFF
        xen.update_time(vcpuid)
        return 0
    if cmd == VCPUOP_set_periodic_timer:
        (period,) = call.guest.read_struct(arg, "<Q")
        if period < MILLISECS or period > STIME_DELTA_MAX:
            raise HypercallError(errno.EINVAL, f"period {period} ns")
        xen.set_periodic(vcpuid, period)
        call.note(f"periodic timer every {period} ns")
        return 0
    if cmd == VCPUOP_stop_periodic_timer:
        xen.set_periodic(vcpuid, 0)
        return 0
    if cmd == VCPUOP_set_singleshot_timer:
        deadline, flags = call.guest.read_struct(arg, "<QI")
        if flags & VCPU_SSHOTTMR_future and deadline < xen.now_ns():
            raise HypercallError(errno.ETIME, "deadline already passed")
        xen.set_singleshot(vcpuid, deadline)
        call.note(f"single-shot timer at {deadline} ns")
        return 0
    if cmd == VCPUOP_stop_singleshot_timer:
        xen.set_singleshot(vcpuid, None)
        return 0
    if cmd == VCPUOP_register_vcpu_info:
        mfn, offset, rsvd = call.guest.read_struct(arg, "<QII")
        if rsvd or offset > 4096 - VCPU_INFO_SIZE:
            raise HypercallError(errno.EINVAL, f"offset {offset:#x}")
        if vs.vcpu_info_gpa is not None:
            raise HypercallError(errno.EINVAL, "vcpu_info already registered")
        gpa = mfn * 4096 + offset
        if not xen.host.memory.is_ram(gpa, VCPU_INFO_SIZE):
            raise HypercallError(errno.EINVAL, f"frame {mfn:#x} is not RAM")
        xen.register_vcpu_info(vcpuid, gpa, call.bits)
        call.note(f"vcpu_info at {gpa:#x}")
        return 0
    xen.unimplemented(f"vcpu_op cmd {cmd}")
    raise HypercallError(errno.ENOSYS)
