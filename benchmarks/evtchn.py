#!/usr/bin/env python3
"""Event-channel upcalls: events per second, the cost of an asserted line, deassert latency.

Boots the evtchn kernels in their measuring mode ("n=N" on the command
line): the guest sends N events to itself on an IPI port, each time waiting
until its upcall handler has run, then computes the same loop twice, once
with the callback line held asserted (its controller input masked, so only
the deassert machinery can cost anything) and once with it low. Three
callback designs in one run:

* ``vector``   HVM_PARAM_CALLBACK_IRQ type 2: no line at all;
* ``gsi-poll`` GSI 20, deasserted by a block hook polling upcall_pending
  (Xen's and QEMU's design);
* ``gsi-eoi``  GSI 20, deasserted when the guest EOIs (the resample).

Deassert latency is counted in guest instructions, on deterministic time:
from the guest's store that clears ``evtchn_upcall_pending`` to the moment
the line drops.

    python benchmarks/evtchn.py [--quick] [--json]
"""
from __future__ import annotations

import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from unicorn import UC_HOOK_CODE                                    # noqa: E402

import common                                                      # noqa: E402
from xenicorn import firmware                                      # noqa: E402
from xenicorn.devices.console import ConsoleSink                  # noqa: E402
from xenicorn.machine.machine import MachineConfig  # noqa: E402
from xenicorn.boot import boot  # noqa: E402
from xenicorn.engine.tsc import HostTsc                           # noqa: E402

DESIGNS = {"vector": ("vector", "poll"), "gsi-poll": ("gsi", "poll"), "gsi-eoi": ("gsi", "eoi")}


def run(name: str, via: str, mode: str, n: int) -> dict:
    machine, _ = boot(MachineConfig(cmdline=f"via={via} n={n}", debugcon="none", callback_deassert=mode),
                      firmware.find(name), console=ConsoleSink(None))
    status = machine.run()
    text = machine.console.text()
    assert status == 0 and "Test result: SUCCESS" in text, text
    ev = int(re.search(r"bench events \d+ cycles (\d+)", text).group(1))
    m = re.search(r"bench compute \d+ asserted (\S+) deasserted (\S+)", text)
    high, low = (None, None) if m.group(1) == "n/a" else (int(m.group(1)), int(m.group(2)))
    return {"events_cycles": ev, "asserted_cycles": high, "deasserted_cycles": low}


def latency(name: str, via: str, mode: str) -> float:
    """Median guest instructions from the clearing store to the line dropping."""
    machine, kernel = boot(MachineConfig(cmdline=f"via={via} n=50", debugcon="none", callback_deassert=mode,
                                         clock="deterministic"),
                           firmware.find(name), console=ConsoleSink(None))
    vcpu = machine.vcpu
    store = kernel.symbols["upcall_clear_store"]
    marks: list[int] = []
    gaps: list[int] = []
    vcpu.uc.hook_add(UC_HOOK_CODE, lambda uc, a, s, _: marks.append(vcpu.instructions_now()), None, store, store)

    def listen(category, text):
        if " deasserted (" in text and marks and "via changed" not in text:
            gaps.append(vcpu.instructions_now() - marks[-1])
    machine.tracer.listeners.append(listen)
    assert machine.run() == 0
    return statistics.median(gaps) if gaps else float("nan")


def measure(n: int, reps: int) -> dict:
    tsc = HostTsc().hz()
    out = {}
    for bits in (32, 64):
        name = f"evtchn{bits}"
        for label, (via, mode) in DESIGNS.items():
            runs = [run(name, via, mode, n) for _ in range(reps)]
            ev = statistics.median(r["events_cycles"] for r in runs) / tsc
            row = {"events": n, "events_per_second": n / ev, "us_per_event": ev / n * 1e6}
            if runs[0]["asserted_cycles"] is not None:
                high = statistics.median(r["asserted_cycles"] for r in runs)
                low = statistics.median(r["deasserted_cycles"] for r in runs)
                row["compute_asserted_vs_deasserted"] = low / high
                row["deassert_latency_insns"] = latency(name, via, mode)
            out[f"{bits}-bit {label}"] = row
    return out


def _row(k: str, r: dict) -> str:
    speed = f"{r['compute_asserted_vs_deasserted']:.4f}" if "compute_asserted_vs_deasserted" in r else "no line"
    lat = f"{r['deassert_latency_insns']:.0f}" if "deassert_latency_insns" in r else "-"
    return f"{k:18s} {r['events_per_second']:9.0f} {r['us_per_event']:9.1f} {speed:>17s} {lat:>8s}"


def main(argv=None) -> int:
    return common.main(__doc__, measure, (100, 1), (5000, 3),
                       f"{'guest / design':18s} {'events/s':>9s} {'us/event':>9s} {'speed, line high':>17s} "
                       f"{'latency':>8s}", _row, argv)


if __name__ == "__main__":
    sys.exit(main())
