#!/usr/bin/env python3
"""What checking segment limits on every data access would cost (the check xenicorn does not make).

The CPU engine (QEMU's TCG in Unicorn) adds a segment's base to each data
address but never compares the offset with the segment's limit: QEMU's
``gen_lea_v_seg`` emits the addition only. xenicorn makes the check at the
exceptions the engine raises (x86/segcheck.py), which catches every access
past a limit that also faults in the page tables, at no steady-state cost.
An access past the limit that reaches mapped memory raises nothing, so it
would need a check on every access. Unicorn offers one place for that:
``UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE``, a callback into Python per access
(and with any such hook installed, every access leaves TCG's inline TLB
fast path for the helper that calls hooks).

The guest is benchmarks/compute.py's (8-instruction loops: registers only,
one load, one store per iteration), run in bare Unicorn three ways,
interleaved: no hook; a hook that does nothing; a hook that compares the
access's end with a 4 GiB - 1 limit (what a limit check must at least do;
it never fires here). The table gives each variant's time as a ratio to
the run without a hook.

    python benchmarks/seglimit.py            # 2,000,000 iterations x 3 repetitions
    python benchmarks/seglimit.py --quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

from unicorn import UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from compute import VARIANTS, INSNS_PER_ITER, guest, run_bare   # noqa: E402

LIMIT = 0xFFFFFFFF


def run(code: bytes, variant: str, iters: int, hook: str) -> float:
    faults = []

    def setup(uc):
        if hook == "empty":
            uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, lambda *a: None)
        elif hook == "limit":
            def check(uc, access, address, size, value, data):
                if address + size - 1 > LIMIT:          # the offset test a limit check needs (base 0)
                    faults.append(address)
            uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, check)
    dt = run_bare(code, variant, iters, setup)
    assert not faults
    return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    iters, reps = (20_000, 1) if args.quick else (2_000_000, 3)
    code = guest()
    print(f"{'variant':10s} {'MIPS no hook':>12s} {'empty hook':>11s} {'limit check':>12s}   (time / no hook)")
    for variant in VARIANTS:
        times = {h: [] for h in ("none", "empty", "limit")}
        for _ in range(reps):
            for h in times:
                times[h].append(run(code, variant, iters, h))
        base = statistics.median(times["none"])
        mips = iters * INSNS_PER_ITER / base / 1e6
        print(f"{variant:10s} {mips:12.1f} {statistics.median(times['empty']) / base:10.1f}x "
              f"{statistics.median(times['limit']) / base:11.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
