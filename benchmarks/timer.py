#!/usr/bin/env python3
"""Guest compute speed with a 1 kHz LAPIC timer, against the same guest without one.

The firmware kernels tickbench32/64 run the same work loop twice in one
boot: once with no timer ("quiet"), once with the LAPIC timer periodic at
1 kHz of virtual time on host time ("ticking"), and time both with RDTSC.
Each tick ends a run of Unicorn, fires the timer in Python, delivers the
interrupt through the IDT, and the handler's EOI is an MMIO exit. Guest
instructions per iteration come from an exact count (deterministic time),
so the script reports guest MIPS for both phases, their ratio, and what one
tick costs.

    python benchmarks/timer.py [--quick] [--json]
"""
from __future__ import annotations

import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common                                                      # noqa: E402
from xenicorn import firmware                                      # noqa: E402
from xenicorn.devices.console import ConsoleSink                  # noqa: E402
from xenicorn.machine.machine import MachineConfig  # noqa: E402
from xenicorn.boot import boot  # noqa: E402
from xenicorn.engine.tsc import HostTsc                           # noqa: E402


def run(name: str, n: int, hz: int, clock: str = "host"):
    machine, _ = boot(MachineConfig(cmdline=f"n={n} hz={hz}", debugcon="none", clock=clock),
                      firmware.find(name), console=ConsoleSink(None))
    status = machine.run()
    text = machine.console.text()
    assert status == 0 and "Test result: SUCCESS" in text, text
    quiet = int(re.search(r"quiet: (\d+) cycles", text).group(1))
    ticking, ticks = map(int, re.search(r"ticking: (\d+) cycles, (\d+) ticks", text).groups())
    return machine, quiet, ticking, ticks


def insns_per_iteration(name: str) -> float:
    """Exact guest instructions per loop iteration (both phases run the loop)."""
    a, *_ = run(name, 20_000, 1000, "deterministic")
    b, *_ = run(name, 120_000, 1000, "deterministic")
    return (b.vcpu.instructions - a.vcpu.instructions) / (2 * 100_000)


def measure(n: int, reps: int) -> dict:
    tsc_hz = HostTsc().hz()
    out = {}
    for bits in (32, 64):
        name = f"tickbench{bits}"
        ipi = insns_per_iteration(name)
        samples = [run(name, n, 1000)[1:] for _ in range(reps)]
        quiet = statistics.median(s[0] for s in samples) / tsc_hz
        ticking = statistics.median(s[1] for s in samples) / tsc_hz
        ticks = statistics.median(s[2] for s in samples)
        insns = ipi * n
        out[f"{bits}-bit"] = {
            "iterations": n, "instructions": int(insns), "ticks": ticks,
            "quiet_mips": insns / quiet / 1e6, "ticking_mips": insns / ticking / 1e6,
            "ratio": quiet / ticking,
            "us_per_tick": (ticking - quiet) / ticks * 1e6 if ticks else 0.0,
        }
    return out


def _row(k: str, r: dict) -> str:
    return (f"{k:7s} {r['quiet_mips']:10.0f} {r['ticking_mips']:10.0f} {r['ratio']:6.3f} "
            f"{r['ticks']:6.0f} {r['us_per_tick']:8.1f}")


def main(argv=None) -> int:
    return common.main(__doc__, measure, (200_000, 1), (20_000_000, 3),
                       f"{'guest':7s} {'quiet MIPS':>10s} {'1 kHz MIPS':>10s} {'ratio':>6s} {'ticks':>6s} "
                       f"{'us/tick':>8s}", _row, argv)


if __name__ == "__main__":
    sys.exit(main())
