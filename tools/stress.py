#!/usr/bin/env python3
"""Boot a firmware kernel many times and report the runs that did not succeed.

For hunting rare, timing-dependent failures (host time makes every run a
little different). Each failing run's last console lines and exit reason
are printed.

    python tools/stress.py xencore64 --runs 300 [--append CMDLINE] [--clock host|deterministic]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xenicorn import firmware                                      # noqa: E402
from xenicorn.devices.console import ConsoleSink                  # noqa: E402
from xenicorn.machine.machine import MachineConfig  # noqa: E402
from xenicorn.boot import boot  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--append", default="")
    p.add_argument("--clock", choices=("host", "deterministic"), default="host")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    path = firmware.find(args.kernel) or args.kernel
    if not os.path.exists(path):
        print(f"stress: {args.kernel}: no such kernel", file=sys.stderr)
        return 2
    failures = 0
    for i in range(args.runs):
        config = MachineConfig(cmdline=args.append, debugcon="none", clock=args.clock, timeout=args.timeout)
        machine, _ = boot(config, path, console=ConsoleSink(None))
        status = machine.run()
        text = machine.console.text()
        if status != 0 or "Test result: SUCCESS" not in text:
            failures += 1
            print(f"=== run {i}: status {status}, {machine.shutdown_reason}: {machine.shutdown_message}")
            print("\n".join(text.splitlines()[-6:]))
        machine.close()
    print(f"{failures} of {args.runs} runs failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
