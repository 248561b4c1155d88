"""gdb's threads are the machine's vCPUs: thread ids, their descriptions, and what ``vCont`` asks.

gdb debugs a multiprocessor guest as one process with one thread per
vCPU, as QEMU's system-mode stub shows it (``gdbstub/gdbstub.c``): the
thread id of vCPU ``n`` is ``n + 1``, since gdb keeps 0 for "any thread"
and -1 for "all threads". Ids travel in hex. gdb's ``info threads`` lists
them (``qfThreadInfo``), names each (``qThreadExtraInfo``, QEMU's
``CPU#n [state]``) and asks whether each is alive (``T``); ``thread 2``
selects vCPU 1 for what follows (``Hg2``).

The stub keeps three vCPUs in mind, as QEMU keeps ``c_cpu`` and ``g_cpu``:

=============  ===========================================================
which          what it is for
=============  ===========================================================
stopped        the vCPU the last stop happened on (``thread:NN;`` in the
               stop reply; ``qC``); a stop selects it for both below
registers      ``Hg``: whose registers ``g``/``G``/``p``/``P`` show, and
               whose page tables translate ``m``/``M``/``X`` and watchpoints
resume         ``Hc``: the vCPU the old ``s`` packet steps (``c`` runs all)
=============  ===========================================================

Resuming is *all-stop*: every vCPU stops when one reports. ``vCont``
names an action per thread (gdb manual, "Packets": for each thread the
leftmost action naming it, or naming no thread, applies); this stub
carries out:

- a step (``vCont;s:2``, ``vCont;s:2;c``): that vCPU executes one
  instruction and **the others stay stopped**, whatever action they were
  given. That is gdb's ``set scheduler-locking step``; QEMU's default
  would let the other vCPUs run during the step. Held still, they cannot
  move the stepped vCPU's memory under it, and ``stepi`` in a thread means
  one instruction of the whole machine, which is also what makes a step
  reproducible;
- continues (``vCont;c``): the vCPUs given one run in turn as usual, the
  others (given no action) stay stopped; ``vCont;c:2`` alone runs vCPU 1
  only, as ``set scheduler-locking on`` asks.

A breakpoint is one for every vCPU (QEMU inserts it into every CPU), since
the vCPUs share the engine's code hooks; a watchpoint watches the RAM its
linear range maps to in the selected vCPU's page tables when it is set.
"""
from __future__ import annotations

import dataclasses

from .protocol import BadArgument, parse_hex, parse_thread

ALL, ANY = -1, 0                 # the thread ids gdb reserves


def thread_id(vcpu) -> int:
    """gdb's thread id of a vCPU: its index + 1."""
    return vcpu.index + 1


def vcpu_of(vcpus, tid: int):
    """The vCPU gdb's thread ``tid`` is, or None for an id naming none (0 and -1 name none)."""
    if 1 <= tid <= len(vcpus):
        return vcpus[tid - 1]
    return None


def thread_list(vcpus) -> str:
    """The ``qfThreadInfo`` answer: ``m`` and every thread id (``qsThreadInfo`` then says ``l``)."""
    return "m" + ",".join(f"{thread_id(v):x}" for v in vcpus)


def describe(vcpu) -> str:
    """``qThreadExtraInfo``'s text (QEMU's ``CPU#n [state]``), shown by ``info threads``."""
    if vcpu.wait_for_sipi:
        state = "wait-for-SIPI"                  # an AP before its start-up IPI (or after INIT)
    elif vcpu.halted or vcpu.down:
        state = "halted"
    else:
        state = "running"
    return f"CPU#{vcpu.index} [{state}]"


@dataclasses.dataclass(frozen=True)
class Resume:
    """What a resume packet asks: step one vCPU, or let some (None: all) run."""

    step: object | None              # the vCPU that executes one instruction, or None
    run: frozenset[int] | None       # indexes of the vCPUs that may run; None: every vCPU


def parse_vcont(actions: str, vcpus, default) -> Resume:
    """``vCont``'s actions (after ``vCont;``) -> a :class:`Resume`; :class:`BadArgument` if malformed.

    ``default`` is the vCPU thread 0 ("any thread") means, and the one
    stepped when several are asked to step (gdb steps one at a time in
    all-stop mode).
    """
    parsed: list[tuple[str, int]] = []
    for action in actions.split(";"):
        what, colon, thread = action.partition(":")
        if not what or what[0] not in "cCsS":
            raise BadArgument(action)
        if what[0] in "CS":
            parse_hex(what[1:])                  # a signal: means nothing to a CPU
        elif len(what) != 1:
            raise BadArgument(action)
        tid = parse_thread(thread) if thread else ALL
        if tid > 0 and vcpu_of(vcpus, tid) is None:
            raise BadArgument(thread)            # no such thread
        parsed.append((what[0].lower(), tid))
    given: dict[int, str] = {}
    for vcpu in vcpus:
        for kind, tid in parsed:
            if tid == ALL or tid == thread_id(vcpu) or (tid == ANY and vcpu is default):
                given[vcpu.index] = kind
                break
    if not given:
        raise BadArgument(actions)
    steppers = [i for i, kind in given.items() if kind == "s"]
    if steppers:
        index = default.index if default.index in steppers else steppers[0]
        return Resume(step=vcpus[index], run=frozenset((index,)))   # the others stay stopped
    runs = frozenset(given)
    return Resume(step=None, run=None if len(runs) == len(vcpus) else runs)
