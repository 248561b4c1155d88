"""``set_timer_op`` (hypercall 15): the old single-shot timer interface.

``HYPERVISOR_set_timer_op(timeout)`` sets vCPU's single-shot timer to the
absolute system time ``timeout`` (ns); 0 stops it. The 64-bit argument is
split over EBX (low) and ECX (high) for 32-bit guests. Xen works around an
old Linux bug: a deadline that is negative or more than 2^50 ns away is
replaced by "100 ms from now".
"""
from __future__ import annotations

TOO_FAR = 1 << 50
FALLBACK_NS = 100_000_000


def set_timer_op(call, lo: int, hi: int = 0, *_) -> int:
    xen = call.xen
    timeout = lo if call.bits == 64 else (lo & 0xFFFFFFFF) | ((hi & 0xFFFFFFFF) << 32)
    if timeout >= 1 << 63:
        timeout -= 1 << 64                  # s_time_t is signed
    index = call.vcpu.index
    if timeout == 0:
        xen.set_singleshot(index, None)
        call.note("stop")
        return 0
    now = xen.now_ns()
    if timeout < 0 or timeout - now > TOO_FAR:
        timeout = now + FALLBACK_NS
        call.note("out of range: 100 ms from now")
    xen.set_singleshot(index, timeout)
    call.note(f"deadline {timeout} ns")
    return 0
