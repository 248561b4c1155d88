"""``sched_op`` (hypercall 29): yield, block, and shut the domain down.

Sub-ops from xen/include/public/sched.h:

=====  ======================  ==============================================
cmd    name                    argument / effect
=====  ======================  ==============================================
0      SCHEDOP_yield           none; the vCPU gives up its time slice
1      SCHEDOP_block           none; sleep until an event is pending (event
                               delivery is re-enabled first, as in Xen)
2      SCHEDOP_shutdown        { uint reason }: poweroff 0, reboot 1,
                               suspend 2, crash 3, watchdog 4, soft_reset 5
3      SCHEDOP_poll            { ports*, uint nr_ports, u64 timeout }
4      SCHEDOP_remote_shutdown { domid_t domain_id; uint reason }
5      SCHEDOP_shutdown_code   { uint reason }: what a later crash reports
6      SCHEDOP_watchdog        { uint32 id; uint32 timeout }
=====  ======================  ==============================================

A shutdown ends the xenicorn run; the process exit status follows the
reason: poweroff, reboot, suspend and soft_reset give 0, crash and watchdog 1.
Block and poll put the vCPU to sleep on the machine clock: it wakes when an
event is pending for it (event channels) or, for poll, at the timeout.
"""
from __future__ import annotations

import struct

from . import errno
from .guest import HypercallError

SCHEDOP_yield, SCHEDOP_block, SCHEDOP_shutdown, SCHEDOP_poll = 0, 1, 2, 3
SCHEDOP_remote_shutdown, SCHEDOP_shutdown_code, SCHEDOP_watchdog = 4, 5, 6

SHUTDOWN_REASONS = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog", 5: "soft_reset"}
STATUS = {"poweroff": 0, "reboot": 0, "suspend": 0, "crash": 1, "watchdog": 1, "soft_reset": 0}
DOMID_SELF = 0x7FF0


MAX_POLL_PORTS = 128
NR_DOMAIN_WATCHDOG_TIMERS = 2


def _poll(call, arg: int) -> int:
    """Sleep until one of ``ports`` is pending or the absolute ``timeout`` (ns) passes."""
    xen = call.xen
    if call.bits == 64:
        ports, nr, timeout = call.guest.read_struct(arg, "<QI4xQ")
    else:
        ports, nr, timeout = call.guest.read_struct(arg, "<IIQ")
    if nr > MAX_POLL_PORTS:
        raise HypercallError(errno.EINVAL, f"{nr} ports")
    raw = call.guest.read(ports, 4 * nr)
    limit = xen.evtchn.nr_ports                     # do_poll: port >= max_evtchns is -EINVAL
    polled = tuple(port for (port,) in struct.iter_unpack("<I", raw))
    for port in polled:
        if port >= limit:
            raise HypercallError(errno.EINVAL, f"port {port}")
    if any(xen.port_pending(p) for p in polled):
        return 0
    vs = xen.vcpu_state(call.vcpu.index)
    vs.poll_done = False
    vs.poll_ports = polled
    # an earlier poll's timeout, if that poll ended another way, must not end this one
    xen.host.clock.cancel(vs.timers.pop("poll", None))
    if timeout:
        vs.timers["poll"] = xen.host.clock.add_timer(xen.machine_deadline(timeout), poll_expired(vs),
                                                     f"vcpu{call.vcpu.index}-poll")
    call.note(f"poll {nr} ports, timeout {timeout} ns")
    xen.host.idle(call.vcpu, "SCHEDOP_poll")
    return 0


def poll_expired(vs):
    """The callback of a SCHEDOP_poll timeout (also re-armed by a snapshot restore)."""
    def expire():
        vs.poll_done = True
        vs.timers.pop("poll", None)
    return expire


def watchdog_bite(xen, wid: int):
    """The callback of domain watchdog ``wid`` (also re-armed by a snapshot restore)."""
    def bite():
        xen.host.shutdown("watchdog", STATUS["watchdog"], f"domain watchdog {wid} expired")
    return bite


def _watchdog(call, arg: int) -> int:
    """Create (id 0), refresh or stop (timeout 0) a domain watchdog; expiry shuts it down."""
    xen = call.xen
    wid, timeout = call.guest.read_struct(arg, "<II")
    dogs = xen.state.watchdogs
    if wid > NR_DOMAIN_WATCHDOG_TIMERS:
        raise HypercallError(errno.EINVAL, f"watchdog {wid}")
    if wid == 0:
        free = [i for i in range(1, NR_DOMAIN_WATCHDOG_TIMERS + 1) if i not in dogs]
        if not free:
            raise HypercallError(errno.EBUSY, "no free watchdog")
        wid = free[0]
    elif wid not in dogs:
        raise HypercallError(errno.EINVAL, f"watchdog {wid} is not running")
    xen.host.clock.cancel(xen.watchdog_timers.pop(wid, None))
    if timeout == 0:
        dogs.pop(wid, None)
        call.note(f"watchdog {wid} stopped")
        return 0
    deadline = xen.host.clock.now_ns() + timeout * 1_000_000_000
    dogs[wid] = deadline
    xen.watchdog_timers[wid] = xen.host.clock.add_timer(deadline, watchdog_bite(xen, wid), f"watchdog{wid}")
    call.note(f"watchdog {wid}: {timeout} s")
    return wid


def sched_op(call, cmd: int, arg: int, *_) -> int:
    """Dispatch a SCHEDOP_* (see the module table)."""
    xen = call.xen
    if cmd == SCHEDOP_yield:
        call.note("yield")
        return 0
    if cmd == SCHEDOP_block:
        call.note("block")
        xen.block(call.vcpu)
        return 0
    if cmd in (SCHEDOP_shutdown, SCHEDOP_shutdown_code):
        (reason,) = call.guest.read_struct(arg, "<I")
        name = SHUTDOWN_REASONS.get(reason)
        if name is None:
            raise HypercallError(errno.EINVAL, f"shutdown reason {reason}")
        if cmd == SCHEDOP_shutdown_code:
            call.note(f"shutdown_code {name}")
            xen.shutdown_code = reason
            return 0
        call.note(f"shutdown {name}")
        xen.host.shutdown(name, STATUS[name], f"SCHEDOP_shutdown({name})")
        call.stop = True
        return 0
    if cmd == SCHEDOP_poll:
        return _poll(call, arg)
    if cmd == SCHEDOP_watchdog:
        return _watchdog(call, arg)
    if cmd == SCHEDOP_remote_shutdown:
        domid, reason = call.guest.read_struct(arg, "<HxxI")
        call.note(f"remote_shutdown dom{domid} reason {reason}")
        if domid in (0, xen.config.domid, DOMID_SELF):
            raise HypercallError(errno.EPERM, "an unprivileged guest cannot shut domains down")
        raise HypercallError(errno.ESRCH, f"no domain {domid}")
    xen.unimplemented(f"sched_op cmd {cmd}")
    raise HypercallError(errno.ENOSYS)
