"""The host's time-stamp counter, read from Python and calibrated once.

Under Unicorn a guest's RDTSC returns the *host's* TSC (unless the machine
traps it for deterministic time, :mod:`msr`). Whoever describes that TSC
to the guest (Xen's PV clock, CPUID leaf 0x15) must read the same counter
and know its rate. Python has no RDTSC, so :class:`HostTsc` executes one in
a private two-byte Unicorn guest (about 5 µs a read) and measures the rate
against the host's monotonic clock once per process.

The pure arithmetic of the PV clock lives in :mod:`xenicorn.xen.pvclock`;
the machine hands this source (or its deterministic stand-in) to the Xen
layer as ``machine.tsc``, an object with ``read()`` and ``hz()``.
"""
from __future__ import annotations

import functools
import time

from unicorn import Uc, UC_ARCH_X86, UC_MODE_32
from unicorn import x86_const as X

_TSC_HZ: float | None = None


class HostTsc:
    """The guest-visible TSC when it is the host's: read and calibrated from Python."""

    def __init__(self):
        self.uc = Uc(UC_ARCH_X86, UC_MODE_32)
        self.uc.mem_map(0, 0x1000)
        self.uc.mem_write(0, b"\x0f\x31")     # rdtsc

    @classmethod
    @functools.cache
    def shared(cls) -> "HostTsc":
        """One per process (each holds a small Unicorn engine)."""
        return cls()

    def read(self) -> int:
        """The host TSC now (EDX:EAX of one RDTSC)."""
        self.uc.emu_start(0, 2)
        return ((self.uc.reg_read(X.UC_X86_REG_EDX) & 0xFFFFFFFF) << 32) | (
            self.uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF)

    def hz(self) -> float:
        """TSC ticks per second, measured once per process over ~50 ms.

        Each end of the interval pairs a TSC read with the host clock read
        just before and after it, keeping the tightest of a few tries: a
        pair taken across a Python hiccup would put the rate off by the
        hiccup over the interval (a single 20 ms sample was 0.14% off here).
        """
        global _TSC_HZ
        if _TSC_HZ is None:
            t0, n0 = self._paired_read()
            time.sleep(0.05)
            t1, n1 = self._paired_read()
            _TSC_HZ = (t1 - t0) * 1e9 / max(1, n1 - n0)
        return _TSC_HZ

    def _paired_read(self, tries: int = 16) -> tuple[int, int]:
        """(TSC, monotonic ns) taken as close together as we can manage."""
        best = None
        for _ in range(tries):
            before = time.monotonic_ns()
            tsc = self.read()
            after = time.monotonic_ns()
            if best is None or after - before < best[0]:
                best = (after - before, tsc, (before + after) // 2)
        return best[1], best[2]
