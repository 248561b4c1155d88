"""Ending a run at a host-time deadline without paying for it on every run.

``emu_start(timeout=...)`` creates a thread per call that polls with
``usleep(2)`` until the deadline or the end of the run, and ``emu_start``
joins it before returning. Linux rounds those short sleeps up to its timer
slack (50 µs), so every timed run paid ~50 µs just waiting for the join:
at a 1 kHz guest timer that was a fifth of the guest's speed
(``benchmarks/timer.py``).

:class:`StopTimer` is one long-lived thread per vCPU instead. The run loop
arms it with a deadline before ``emu_start`` and disarms it after; at the
deadline the thread calls ``emu_stop()``, which is safe from another
thread and, with :mod:`stopcheck`, lands between two blocks. Python's GIL is
no obstacle: ``emu_start`` releases it while the guest runs.

One race remains and is handled: a stop issued just before ``emu_start``
clears Unicorn's stop flag (at the start of the run) is lost, so once the
deadline has passed the thread repeats the stop every millisecond until the
run loop disarms it. A repeat that reaches an already finished run does
nothing; one that reaches the next run cannot happen, because arming and
disarming take the same lock the thread stops under.
"""
from __future__ import annotations

import threading
import time

REPEAT_S = 0.001          # re-issue a stop this often until disarmed
IDLE_EXIT_S = 1.0         # the thread ends after this long unarmed (restarted on demand)


class StopTimer:
    """Stop one Unicorn engine at a monotonic-clock deadline."""

    def __init__(self, uc, stop=None):
        self._uc = uc
        self._stop = stop or uc.emu_stop       # stopcheck.soft_stop for engines that stop between blocks
        self._cv = threading.Condition()
        self._deadline: float | None = None
        self._gen = 0
        self._fired_gen = -1
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stops = 0                       # emu_stop calls made (for tests and traces)

    def arm(self, seconds: float) -> None:
        """Stop the run that is about to start after ``seconds``."""
        with self._cv:
            self._gen += 1
            self._deadline = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="xenicorn-stop-timer", daemon=True)
                self._thread.start()
            self._cv.notify()

    def disarm(self) -> bool:
        """The run is over; return True if the deadline ended it."""
        with self._cv:
            self._deadline = None
            return self._fired_gen == self._gen

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._deadline = None
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        with self._cv:
            while not self._closed:
                if self._deadline is None:
                    if not self._cv.wait(IDLE_EXIT_S) and self._deadline is None:
                        break                # idle: let the engine be collected
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                self._fired_gen = self._gen
                self.stops += 1
                self._stop()
                self._deadline = time.monotonic() + REPEAT_S
            if not self._closed:
                self._thread = None          # idle exit; arm() starts a new thread
