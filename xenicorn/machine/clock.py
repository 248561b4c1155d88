"""The machine's one clock, and the timers that run on it.

Every device and hypervisor timer (Xen's single-shot and periodic vCPU
timers, SCHEDOP_poll timeouts, the watchdog, later the LAPIC and PIT) is a
deadline on this clock. The run loop asks it two questions: *how long may
the guest run before the next deadline?* and, when the vCPU sleeps (HLT,
SCHEDOP_block), *when should it look again?*

Two sources of time:

============== =================================================== =========
mode           guest time is...                                    cost
============== =================================================== =========
host (default) the host's monotonic clock since the machine started none
deterministic  executed instructions x ``ns_per_insn``, plus time   ~3x
               skipped while the vCPU sleeps; the same guest and   slower
               input give the same timer interleaving every run
============== =================================================== =========

Deterministic time needs exact instruction counts, which Unicorn gives only
in its counting mode (see :mod:`icount`), hence the cost; host time keeps
guests at full speed, so it is the default, and the benchmarks use it.
"""
from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from ..records import RecordError, make_record, open_record, uint


@dataclass(order=True)
class Timer:
    """One armed deadline. Cancel it with ``clock.cancel(timer)``."""

    deadline_ns: int
    seq: int
    callback: Callable[[], None] = field(compare=False)
    name: str = field(default="", compare=False)
    cancelled: bool = field(default=False, compare=False)


class VirtualClock:
    """Guest nanoseconds since power-on, and a heap of timers."""

    def __init__(self, mode: str = "host", ns_per_insn: float = 1.0,
                 instructions: Callable[[], int] | None = None):
        if mode not in ("host", "deterministic"):
            raise ValueError(f"clock mode {mode!r}: expected host or deterministic")
        if mode == "deterministic" and instructions is None:
            raise ValueError("deterministic time needs an instruction counter")
        self.mode = mode
        self.ns_per_insn = ns_per_insn
        self._instructions = instructions
        self._start = time.monotonic_ns()
        self._skipped = 0                  # deterministic: time jumped over while asleep
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        # Called when a timer is armed earlier than every other: the run loop
        # bounded the current run by the old first deadline and must look again.
        self.on_new_first: Callable[[], None] | None = None

    @property
    def deterministic(self) -> bool:
        return self.mode == "deterministic"

    def now_ns(self) -> int:
        if self.deterministic:
            return int(self._instructions() * self.ns_per_insn) + self._skipped
        return time.monotonic_ns() - self._start

    def charge(self, ns: int) -> None:
        """Deterministic time: an operation took ``ns`` beyond its instruction.

        Port I/O is charged this way (``IO_PORT_NS``): on a PC an ISA port
        access takes about a microsecond, and without the charge a guest
        that polls a port for 10 ms (PIT calibration) would need millions of
        exits to see the time pass. Host time needs no charge.
        """
        if self.deterministic:
            self._skipped += ns

    # -- timers ------------------------------------------------------------
    def add_timer(self, deadline_ns: int, callback: Callable[[], None], name: str = "") -> Timer:
        timer = Timer(deadline_ns, next(self._seq), callback, name)
        first = self.next_deadline()
        heapq.heappush(self._heap, timer)
        if self.on_new_first is not None and (first is None or deadline_ns < first):
            self.on_new_first()
        return timer

    def cancel(self, timer: Timer | None) -> None:
        if timer is not None:
            timer.cancelled = True

    def next_deadline(self) -> int | None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].deadline_ns if self._heap else None

    def pending(self) -> list[Timer]:
        return sorted(t for t in self._heap if not t.cancelled)

    def run_due(self) -> int:
        """Fire every timer whose deadline has passed, in deadline order."""
        fired = 0
        now = self.now_ns()
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                return fired
            timer = heapq.heappop(self._heap)
            timer.callback()
            fired += 1

    def wait_until(self, deadline_ns: int, limit_s: float | None = None) -> None:
        """Let time pass while the vCPU sleeps: sleep (host) or jump (deterministic)."""
        now = self.now_ns()
        if deadline_ns <= now:
            return
        if self.deterministic:
            self._skipped += deadline_ns - now
            return
        wait = (deadline_ns - now) / 1e9
        if limit_s is not None:
            wait = min(wait, max(0.0, limit_s))
        time.sleep(wait)

    def budget(self, limit_ns: int | None = None) -> int | None:
        """Nanoseconds the guest may run before the next deadline (None: no limit)."""
        deadline = self.next_deadline()
        if deadline is None:
            return limit_ns
        left = max(0, deadline - self.now_ns())
        return left if limit_ns is None else min(left, limit_ns)

    # -- snapshots (a record, see xenicorn.records) ---------------------------------
    RECORD = ("virtual-clock", 1)

    def save_record(self) -> dict:
        """Machine time and the timer sequence counter (the timers belong to their owners).

        Deterministic time is ``instructions x ns_per_insn + skipped``; the
        vCPU saves its instruction count, the clock the skipped part, so
        ``now_ns()`` continues exactly. Host time saves ``now`` and
        continues from it. ``seq`` orders timers with equal deadlines: the
        owners re-arm theirs with the sequence numbers they had
        (:meth:`rearm`), so equal deadlines fire in the same order.
        """
        seq = next(self._seq)
        self._seq = itertools.count(seq)
        return make_record(*self.RECORD, {"mode": self.mode, "now_ns": self.now_ns(), "skipped_ns": self._skipped,
                                          "next_seq": seq})

    def check_record(self, record: dict) -> tuple[int, int, int]:
        """Machine time cannot run backwards from its own origin, nor change mode."""
        st = open_record(record, *self.RECORD)
        if st.get("mode") != self.mode:
            raise RecordError(f"clock mode {st.get('mode')!r}, this machine's is {self.mode!r}")
        return uint(st, "now_ns", 63), uint(st, "skipped_ns", 63), uint(st, "next_seq", 63)

    def apply_record(self, prepared: tuple[int, int, int]) -> None:
        """Continue from a saved time; every timer is dropped (owners re-arm theirs after this)."""
        now, skipped, seq = prepared
        for timer in self._heap:
            timer.cancelled = True
        self._heap = []
        self._seq = itertools.count(seq)
        self._skipped = skipped
        if not self.deterministic:
            self._start = time.monotonic_ns() - now

    def ref(self, timer: Timer | None) -> list | None:
        """What a snapshot keeps of ``timer``: ``[deadline_ns, seq]``, or None once cancelled or fired."""
        if timer is None or timer.cancelled or timer not in self._heap:
            return None
        return [timer.deadline_ns, timer.seq]

    def rearm(self, saved: list | None, callback: Callable[[], None], name: str) -> Timer | None:
        """Re-create a timer from :meth:`ref`: same deadline, same place among equals."""
        if saved is None:
            return None
        timer = Timer(int(saved[0]), int(saved[1]), callback, name)
        heapq.heappush(self._heap, timer)
        return timer
