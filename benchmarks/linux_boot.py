"""Debian's stock kernel to the userspace marker: xenicorn next to QEMU TCG.

Both run the same bzImage and busybox initramfs (``xenicorn.linux.guest``)
with the same command line; the wall time is measured from process start
to the marker line on the serial console, and to the process's end (the
guest powers off). QEMU runs a plain PC (``-accel tcg``, no Xen: it cannot
emulate Xen without KVM), so its boot takes the native paths (PIT/TSC,
no event channels); the comparison is of whole boots, not of like paths.
Guest MIPS is reported for xenicorn from a second, counting run
(``--max-insns``, which slows it down): the instructions to the marker
over the first run's time to it.

    python benchmarks/linux_boot.py [--runs N] [--json] [--quick] [--smp 1,2,4]

``--quick`` boots xenicorn once and skips QEMU (the smoke test uses it).
QEMU is skipped when ``qemu-system-x86_64`` is not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xenicorn.linux import guest  # noqa: E402

CMDLINE = guest.DEFAULT_CMDLINE


def _timed(cmd: list[str], marker: str, timeout: float) -> dict:
    """Run ``cmd``; seconds to the marker line and to the end, and its output."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=ROOT)
    to_marker, out = None, []
    try:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            out.append(line)
            if to_marker is None and marker in line:
                to_marker = time.monotonic() - start
            if time.monotonic() - start > timeout:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return {"to_marker_s": to_marker, "total_s": time.monotonic() - start, "status": proc.returncode,
            "output": "".join(out)}


def xenicorn_boot(image: str, initrd: str, timeout: float, smp: int = 1) -> dict:
    return _timed([sys.executable, "-m", "xenicorn", "run", image, "--boot", "linux", "-m", "512",
                   "--initrd", initrd, "--append", CMDLINE, "--timeout", str(int(timeout)), "-smp", str(smp)],
                  guest.MARKER, timeout + 10)


def xenicorn_instructions(image: str, initrd: str, timeout: float) -> int | None:
    """Instructions to the marker, from a counting run stopped there."""
    from xenicorn.machine.machine import MachineConfig
    from xenicorn.boot import boot
    from xenicorn.devices.console import ConsoleSink

    class Watch(ConsoleSink):
        def __init__(self):
            super().__init__(None)
            self.at = None
            self.machine = None

        def write(self, data: bytes) -> None:
            super().write(data)
            if self.at is None and guest.MARKER.encode() in self.data:
                self.at = self.machine.vcpu.instructions
                self.machine.shutdown("quit", 0, "marker reached")

    sink = Watch()
    config = MachineConfig(ram_mib=512, cmdline=CMDLINE, max_insns=10**12, timeout=timeout)
    machine, _ = boot(config, image, initrd=initrd, console=sink, protocol="linux")
    sink.machine = machine
    machine.run()
    machine.close()
    return sink.at


def qemu_boot(image: str, initrd: str, timeout: float, smp: int = 1) -> dict | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    return _timed([qemu, "-accel", "tcg", "-m", "512", "-smp", str(smp), "-kernel", image, "-initrd", initrd,
                   "-append", CMDLINE, "-nographic", "-no-reboot", "-monitor", "none"],
                  guest.MARKER, timeout)


def smp_table(image: str, initrd: str, counts: list[int], runs: int, timeout: float) -> int:
    """``--smp 1,2,4``: the boot with each vCPU count, xenicorn beside QEMU TCG, in one run of this script."""
    base = None
    print(f"{'vCPUs':>5}  {'xenicorn to marker':>19}  {'vs -smp 1':>9}  {'QEMU TCG to marker':>19}")
    for n in counts:
        xs = [r["to_marker_s"] for r in (xenicorn_boot(image, initrd, timeout, n) for _ in range(runs))]
        qs = [r["to_marker_s"] for r in (qemu_boot(image, initrd, timeout, n) for _ in range(runs)) if r]
        x = statistics.median(t for t in xs if t is not None) if any(t is not None for t in xs) else None
        q = statistics.median(t for t in qs if t is not None) if any(t is not None for t in qs) else None
        base = base or x
        rel = f"{x / base:.2f}x" if x and base else "-"
        print(f"{n:>5}  {f'{x:.1f} s' if x else 'not reached':>19}  {rel:>9}  "
              f"{f'{q:.1f} s' if q else '-':>19}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one xenicorn boot, no QEMU, no counting run")
    ap.add_argument("--smp", metavar="N,N,...", help="compare these vCPU counts instead (e.g. 1,2,4)")
    args = ap.parse_args(argv)
    image, initrd = guest.bzimage(), guest.initramfs()
    if args.smp:
        return smp_table(image, initrd, [int(n) for n in args.smp.split(",")], args.runs, args.timeout)
    runs = 1 if args.quick else args.runs
    xen_runs = [xenicorn_boot(image, initrd, args.timeout) for _ in range(runs)]
    qemu_runs = [] if args.quick else [r for r in (qemu_boot(image, initrd, args.timeout) for _ in range(runs))
                                        if r is not None]

    def summary(rs):
        ok = [r["to_marker_s"] for r in rs if r["to_marker_s"] is not None]
        return {"runs": len(rs), "reached": len(ok), "to_marker_s": statistics.median(ok) if ok else None,
                "total_s": statistics.median(r["total_s"] for r in rs) if rs else None}

    result = {"xenicorn": summary(xen_runs), "qemu_tcg": summary(qemu_runs) if qemu_runs else None}
    if not args.quick and result["xenicorn"]["to_marker_s"]:
        n = xenicorn_instructions(image, initrd, args.timeout * 3)
        if n:
            result["xenicorn"]["instructions_to_marker"] = n
            result["xenicorn"]["guest_mips"] = n / result["xenicorn"]["to_marker_s"] / 1e6
    if result["qemu_tcg"] and result["qemu_tcg"]["to_marker_s"] and result["xenicorn"]["to_marker_s"]:
        result["ratio_xenicorn_over_qemu"] = result["xenicorn"]["to_marker_s"] / result["qemu_tcg"]["to_marker_s"]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name, r in (("xenicorn", result["xenicorn"]), ("QEMU TCG", result["qemu_tcg"])):
            if r is None:
                print(f"{name:9s} not installed")
                continue
            mips = f", {r['guest_mips']:.0f} guest MIPS" if r.get("guest_mips") else ""
            marker = f"{r['to_marker_s']:.1f} s" if r["to_marker_s"] else "not reached"
            print(f"{name:9s} marker {marker} (median of {r['reached']}/{r['runs']}), "
                  f"whole run {r['total_s']:.1f} s{mips}")
        if "ratio_xenicorn_over_qemu" in result:
            print(f"xenicorn / QEMU TCG to the marker: {result['ratio_xenicorn_over_qemu']:.1f}x")
    return 0 if result["xenicorn"]["reached"] else 1


if __name__ == "__main__":
    sys.exit(main())
