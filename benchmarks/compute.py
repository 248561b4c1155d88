#!/usr/bin/env python3
"""Guest compute speed under xenicorn versus bare Unicorn, in one run.

The guest (benchmarks/guests/compute.S, prebuilt as compute.bin) runs a loop
of 8 instructions per iteration in three variants: registers only, one load,
one store (Unicorn 2.1.4 sends every store down a slow path, so the mix
matters). Each variant runs under xenicorn (a full Machine: all its hooks,
devices and the run loop) and in a bare Unicorn instance started at the same
code, interleaved, several times; the table reports median MIPS and the
ratio xenicorn / bare. With no device busy, xenicorn should not cost more
than 10% (ratio >= 0.9).

    python benchmarks/compute.py            # full run
    python benchmarks/compute.py --quick    # smoke run, seconds
    python benchmarks/compute.py --json     # machine-readable
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from unicorn import Uc, UC_ARCH_X86, UC_MODE_32
from unicorn import x86_const as X

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from xenicorn.devices.console import ConsoleSink                     # noqa: E402
from xenicorn.machine.machine import Machine, MachineConfig  # noqa: E402

BASE = 0x100000
VARIANTS = {"registers": (0x000, 0x080), "load": (0x100, 0x180), "store": (0x200, 0x280)}
INSNS_PER_ITER = 8
TARGET = 0.9


def guest() -> bytes:
    with open(os.path.join(HERE, "guests", "compute.bin"), "rb") as f:
        return f.read()


def run_xenicorn(code: bytes, variant: str, iters: int) -> float:
    start, _ = VARIANTS[variant]
    m = Machine(MachineConfig(ram_mib=16), console=ConsoleSink(None))
    m.memory.write(BASE, code)
    m.memory.code_written(BASE, len(code))
    m.vcpu.reset_to_flat32(BASE + start, esp=0x90000)
    m.vcpu.set_reg("rcx", iters)
    t = time.perf_counter()
    status = m.run()
    dt = time.perf_counter() - t
    assert status == 0 and m.shutdown_reason == "poweroff", m.shutdown_message
    m.close()
    return dt


def run_bare(code: bytes, variant: str, iters: int, setup=None) -> float:
    """Seconds for ``iters`` iterations of ``variant`` in a bare Unicorn; ``setup(uc)`` first (a hook...)."""
    start, done = VARIANTS[variant]
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 16 << 20)
    uc.mem_write(BASE, code)
    uc.reg_write(X.UC_X86_REG_ECX, iters)
    uc.reg_write(X.UC_X86_REG_ESP, 0x90000)
    if setup is not None:
        setup(uc)
    t = time.perf_counter()
    uc.emu_start(BASE + start, BASE + done)
    dt = time.perf_counter() - t
    assert uc.reg_read(X.UC_X86_REG_ECX) == 0
    return dt


def measure(iters: int, reps: int) -> dict:
    code = guest()
    results = {}
    for variant in VARIANTS:
        ours, bare = [], []
        for _ in range(reps):                 # interleaved, so drift hits both
            ours.append(run_xenicorn(code, variant, iters))
            bare.append(run_bare(code, variant, iters))
        insns = iters * INSNS_PER_ITER
        mo, mb = statistics.median(ours), statistics.median(bare)
        results[variant] = {"instructions": insns, "xenicorn_s": mo, "bare_s": mb,
                            "xenicorn_mips": insns / mo / 1e6, "bare_mips": insns / mb / 1e6,
                            "ratio": mb / mo}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--iterations", type=int, default=0)
    p.add_argument("--reps", type=int, default=0)
    args = p.parse_args(argv)
    iters = args.iterations or (20_000 if args.quick else 25_000_000)
    reps = args.reps or (1 if args.quick else 5)
    res = measure(iters, reps)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'variant':10s} {'instructions':>13s} {'xenicorn MIPS':>14s} {'bare MIPS':>10s} {'ratio':>6s}")
    for variant, r in res.items():
        print(f"{variant:10s} {r['instructions']:13d} {r['xenicorn_mips']:14.1f} {r['bare_mips']:10.1f} "
              f"{r['ratio']:6.2f}")
    if not args.quick:
        worst = min(r["ratio"] for r in res.values())
        print(f"{'PASS' if worst >= TARGET else 'FAIL'}: worst ratio {worst:.2f} (target >= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
