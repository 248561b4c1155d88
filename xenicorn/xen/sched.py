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
"""
from __future__ import annotations

from . import errno
from .guest import HypercallError

SCHEDOP_yield, SCHEDOP_block, SCHEDOP_shutdown, SCHEDOP_poll = 0, 1, 2, 3
SCHEDOP_remote_shutdown, SCHEDOP_shutdown_code, SCHEDOP_watchdog = 4, 5, 6

SHUTDOWN_REASONS = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog", 5: "soft_reset"}
STATUS = {"poweroff": 0, "reboot": 0, "suspend": 0, "crash": 1, "watchdog": 1, "soft_reset": 0}
DOMID_SELF = 0x7FF0


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
        xen.machine.shutdown(name, STATUS[name], f"SCHEDOP_shutdown({name})")
        call.stop = True
        return 0
    if cmd == SCHEDOP_remote_shutdown:
        domid, reason = call.guest.read_struct(arg, "<HxxI")
        call.note(f"remote_shutdown dom{domid} reason {reason}")
        if domid in (0, xen.config.domid, DOMID_SELF):
            raise HypercallError(errno.EPERM, "an unprivileged guest cannot shut domains down")
        raise HypercallError(errno.ESRCH, f"no domain {domid}")
    xen.unimplemented(f"sched_op cmd {cmd}")
    raise HypercallError(errno.ENOSYS)
