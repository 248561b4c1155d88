#!/usr/bin/env python3
"""Hypercalls per second: a guest looping on xen_version(XENVER_version).

Each hypercall is a VMCALL exit: Unicorn's invalid-instruction hook, the
dispatcher reading the argument registers, the handler, the result written
to RAX and RIP moved past the VMCALL. The kernel (firmware hcbench32/64)
runs n calls; the script times n calls against n = 0 on the same image, so
boot cost cancels out, for 32- and 64-bit guests.

    python benchmarks/hypercalls.py [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xenicorn import firmware                                      # noqa: E402
from xenicorn.devices.console import ConsoleSink                  # noqa: E402
from xenicorn.machine.machine import MachineConfig  # noqa: E402
from xenicorn.boot import boot  # noqa: E402


def run(name: str, n: int) -> float:
    machine, _ = boot(MachineConfig(cmdline=f"n={n}", debugcon="none"), firmware.find(name),
                      console=ConsoleSink(None))
    t = time.perf_counter()
    status = machine.run()
    dt = time.perf_counter() - t
    assert status == 0 and f"{n} hypercalls" in machine.console.text()
    assert machine.xen.hypercall_counts.get("xen_version", 0) == n
    return dt


def measure(n: int, reps: int) -> dict:
    out = {}
    for bits in (32, 64):
        name = f"hcbench{bits}"
        base = statistics.median(run(name, 0) for _ in range(reps))
        full = statistics.median(run(name, n) for _ in range(reps))
        per = (full - base) / n
        out[f"{bits}-bit"] = {"calls": n, "seconds": full - base, "us_per_call": per * 1e6,
                              "calls_per_second": 1 / per}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = measure(2_000 if args.quick else 50_000, 1 if args.quick else 3)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'guest':8s} {'calls':>8s} {'us/call':>8s} {'calls/s':>10s}")
    for mode, r in res.items():
        print(f"{mode:8s} {r['calls']:8d} {r['us_per_call']:8.1f} {r['calls_per_second']:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
