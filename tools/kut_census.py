#!/usr/bin/env python3
"""Run kvm-unit-tests' x86 tests under xenicorn (and QEMU TCG) and compare.

kvm-unit-tests is the KVM project's suite of small test kernels. A built tree
holds ``x86/*.flat`` (Multiboot ELF kernels) and ``x86/unittests.cfg``, an
INI-like list of tests: a ``[name]`` line, then ``file``, ``smp``,
``test_args`` (the kernel command line, given with ``-append``),
``qemu_params`` (extra QEMU options; ``extra_params`` in older trees),
``arch``, ``groups``, ``accel``, ``check``, ``timeout``... This tool reads that
file (it uses no code of the suite), runs each test under xenicorn and, with
``--qemu``, under ``qemu-system-x86_64 -machine accel=tcg`` with the command
line the suite's own ``x86/run`` builds, and prints a markdown table.

A test ends by writing its status to the isa-debug-exit port 0xF4; the
machine then exits with ``(v << 1) | 1``. The suite reads that status as:
1 PASS, 77 SKIP (``report_summary`` returned 77 >> 1), 0 FAIL (no debug
exit), 124 TIMEOUT (``timeout``), 128+N killed by signal N, anything else
FAIL. Status 1 with errors on stderr is a VMM failure, not a pass.

    python tools/kut_census.py /work/kut-src [--qemu] [--jobs 2] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XENICORN_MAX_MIB = 3584               # xenicorn's -m limit (RAM below the 4 GiB hole)

# The devices the suite's x86/run gives QEMU (pc-testdev brings ports 0xE0,
# 0xE4 and the IRQ lines at 0x2000; isa-debug-exit the exit port).
QEMU_BASE = ["--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard",
             "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
             "-display", "none", "-serial", "stdio", "-device", "pci-testdev",
             "-machine", "accel=tcg"]


@dataclasses.dataclass
class Test:
    """One ``[section]`` of unittests.cfg."""

    name: str
    file: str = ""
    smp: int = 1
    test_args: str = ""
    qemu_params: str = ""
    arch: str = ""
    groups: list[str] = dataclasses.field(default_factory=list)
    accel: str = ""
    check: str = ""
    machine: str = ""
    timeout: float = 90.0
    disabled_if: str = ""


@dataclasses.dataclass
class Result:
    """What one run gave: the class, the raw status and the telling lines."""

    verdict: str            # PASS, FAIL, SKIP, TIMEOUT, CRASH
    status: int | None = None
    reason: str = ""        # why it was skipped, or the first failing line
    summary: str = ""       # the guest's SUMMARY line
    seconds: float = 0.0
    command: str = ""


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``2m``, ``1h`` as coreutils' timeout reads them."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"bad timeout {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_cfg(text: str) -> list[Test]:
    """Read unittests.cfg: ``key = value`` lines under ``[name]`` headers;
    ``qemu_params = \"\"\"...\"\"\"`` may span lines; ``#`` starts a comment line."""
    tests: list[Test] = []
    cur: Test | None = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(.*)\]", line)
        if m:
            cur = Test(m.group(1))
            tests.append(cur)
            continue
        m = re.fullmatch(r"(\w+)\s*=\s*(.*)", line)
        if not m or cur is None:
            continue
        key, value = m.group(1), m.group(2)
        if value.startswith('"""'):
            value = value[3:]
            while '"""' not in value:
                value += "\n" + next(lines, '"""')
            value = value[:value.index('"""')]
            value = value.replace("\\\n", "")
        if key == "file":
            cur.file = value
        elif key == "smp":
            cur.smp = int(value)
        elif key in ("test_args", "extra_args"):
            cur.test_args = value
        elif key in ("qemu_params", "extra_params"):
            cur.qemu_params = value
        elif key == "groups":
            cur.groups = value.split()
        elif key == "timeout":
            cur.timeout = parse_duration(value)
        elif key in ("arch", "accel", "check", "machine", "disabled_if"):
            setattr(cur, key, value)
    return tests


def expand(text: str) -> list[str]:
    """Split like the shell, running backquoted commands as the suite's eval
    does (kvmclock_test passes `date +%s`)."""
    def run(m: re.Match) -> str:
        return subprocess.run(m.group(1), shell=True, capture_output=True, text=True).stdout.strip()
    return shlex.split(re.sub(r"`([^`]*)`", run, text))


def mib(size: str) -> int:
    """QEMU's -m: a number of MiB, or with a k/M/G/T suffix."""
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)[bB]?", size)
    if not m:
        raise ValueError(size)
    scale = {"": 1, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}[m.group(2).lower()]
    return int(int(m.group(1)) * scale)


def xenicorn_options(test: Test) -> tuple[list[str], list[str]]:
    """Translate the test's QEMU parameters: the xenicorn options that mean
    the same, and the QEMU options xenicorn cannot honour (the test still
    runs, on xenicorn's board and the nearest CPU model, :func:`cpu_option`)."""
    opts: list[str] = []
    needs: list[str] = []
    args = expand(test.qemu_params)
    i = 0
    while i < len(args):
        a = args[i]
        val = args[i + 1] if i + 1 < len(args) else ""
        if a == "-m":
            if mib(val) > XENICORN_MAX_MIB:
                needs.append(f"-m {val} (xenicorn gives at most {XENICORN_MAX_MIB} MiB: runs with that)")
            opts += ["-m", str(min(mib(val), XENICORN_MAX_MIB))]
            i += 2
            continue
        if a == "-cpu":
            cpu_opts, cpu_needs = cpu_option(val)
            opts += cpu_opts
            needs += cpu_needs
            i += 2
            continue
        if a in ("-machine", "-M", "-device", "-global", "-overcommit"):
            needs.append(f"{a} {val}")
            i += 2
            continue
        needs.append(a)
        i += 1
    return opts, needs


# QEMU names of features xenicorn's default model always reports: "+feat" of one
# of these is honoured already, "-feat" cannot be (--cpu takes away only what max adds).
ALWAYS_REPORTED = {"fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
                   "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "pni", "sse3", "cx16",
                   "popcnt", "hypervisor", "syscall", "nx", "xd", "lm", "lahf_lm", "lahf-lm", "arch-capabilities",
                   "umip"}


def cpu_option(val: str) -> tuple[list[str], list[str]]:
    """QEMU's ``-cpu MODEL,+feat,-feat,prop...`` as xenicorn options, and what of it cannot be honoured.

    ``max`` is xenicorn's ``--cpu max``; ``qemu64`` (QEMU's baseline) is
    xenicorn's ``default``. A ``+feat`` xenicorn offers joins ``--cpu``; one
    it does not offer is listed (one every model reports, such as UMIP, is
    honoured). A ``-feat`` of a feature xenicorn never offers is already
    true; of one ``max`` adds it joins ``--cpu``.
    ``vendor=`` is ``--vendor``; other properties (``host-phys-bits``...)
    are listed.
    """
    sys.path.insert(0, ROOT)
    from xenicorn.x86 import cpumodel
    sys.path.remove(ROOT)
    model, *parts = val.split(",")
    opts: list[str] = []
    needs: list[str] = []
    if model not in ("max", "qemu64"):                # another CPU: only the vendor is kept
        vendor = [p for p in parts if p.startswith("vendor=")]
        return (cpu_option("qemu64," + vendor[0])[0] if vendor else []), [f"-cpu {val}"]
    spec = ["max" if model == "max" else "default"]
    for part in parts:
        if part in ("vendor=GenuineIntel", "vendor=AuthenticAMD"):
            opts += ["--vendor", "intel" if part.endswith("Intel") else "amd"]
        elif part[:1] in "+-" and part:
            feat = cpumodel.ALIASES.get(part[1:], part[1:])
            if feat in cpumodel.FEATURES:
                spec.append(part[0] + feat)
            elif (part[0] == "+") != (feat in ALWAYS_REPORTED):
                needs.append(part)
        else:
            needs.append(part)
    if spec != ["default"]:
        opts += ["--cpu", ",".join(spec)]
    if needs:
        needs = [f"-cpu {model}: " + ",".join(needs)]
    return opts, needs


def skip_reason(test: Test, arch: str, kernel: str, run_all: bool, accel: str) -> str:
    """Why the suite's runner would not run this test here ('' = it runs)."""
    if "nodefault" in test.groups and not run_all:
        return "nodefault group (manual run only)"
    if test.arch and test.arch != arch:
        return f"{test.arch} only (built for {arch})"
    if test.accel and test.accel != accel:
        return f"{test.accel} only"
    for item in test.check.split():
        path, _, value = item.partition("=")
        try:
            with open(path) as f:
                ok = f.read().strip() == value
        except OSError:
            ok = False
        if not ok:
            return f"{path} not equal to {value}"
    if not os.path.exists(kernel):
        return f"{os.path.basename(kernel)} not built"
    return ""


def first_failure(text: str) -> str:
    """The first line that tells why a run failed: a ``FAIL:`` report, a
    failed assertion, an unexpected exception."""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("FAIL") or any(p in s for p in ("assert failed", "Unhandled exception", "Traceback")):
            return s
    return ""


def classify(status: int, stdout: str, stderr: str, vmm: str) -> Result:
    """Map an exit status to the suite's verdicts (scripts/runtime.bash).

    xenicorn's status 1 is also its "the guest crashed" status, so there a 1
    is a pass only when stderr says the guest wrote 0 to the exit port; a
    vCPU halted with nothing left to wake it is what QEMU shows as a hang
    (TIMEOUT), a triple fault what QEMU's ``--no-reboot`` shows as an exit
    without debug exit (FAIL).
    """
    summary = next((ln.strip() for ln in reversed(stdout.splitlines()) if ln.startswith("SUMMARY:")), "")
    if status < 0:
        status = 128 - status
    errors = [ln.strip() for ln in stderr.splitlines() if ln.strip() and "warning" not in ln.lower()]
    if "Traceback (most recent call last)" in stderr:
        return Result("CRASH", status, f"{vmm} traceback: {errors[-1]}", summary)
    end = ""
    if vmm == "xenicorn":
        end = next((m.group(1) for m in map(re.compile(r"xenicorn: ([a-z-]+): ").match, errors) if m), "")
        errors = [ln for ln in errors if not ln.startswith("xenicorn: debug-exit")]
    why = first_failure(stdout)
    if status == 1 and vmm == "xenicorn" and end != "debug-exit":
        if end == "halted":
            return Result("TIMEOUT", status, why or "halted for good (QEMU hangs): " + last_line(stdout), summary)
        if end == "triple-fault":
            return Result("FAIL", status, why or "triple fault, last: " + last_line(stdout), summary)
        return Result("CRASH", status, errors[0] if errors else "status 1", summary)
    if status == 1:
        if vmm == "qemu" and errors:
            return Result("CRASH", status, errors[0], summary)
        return Result("PASS", status, "", summary)
    if status == 77:
        return Result("SKIP", status, why or last_line(stdout), summary)
    if status == 124:
        return Result("TIMEOUT", status, why or "last: " + last_line(stdout), summary)
    if status == 127:
        return Result("FAIL", status, why or "abort(): " + last_line(stdout), summary)
    if status >= 128:
        return Result("CRASH", status, f"signal {status - 128}", summary)
    why = why or (errors[0] if errors else "")
    if status == 0:
        why = why or "no debug exit: " + last_line(stdout)
    return Result("FAIL", status, why, summary)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def run_one(cmd: list[str], wall: float, vmm: str, log: str = "") -> Result:
    """Run a VMM, kill it after ``wall`` seconds (TIMEOUT), classify; keep
    its output in ``log`` if given."""
    start = time.monotonic()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=wall, cwd=ROOT)
        out, err, status = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, err, status = e.stdout or b"", e.stderr or b"", 124
    res = classify(status, out.decode(errors="replace"), err.decode(errors="replace"), vmm)
    if log:
        with open(log, "wb") as f:
            f.write(f"$ {shlex.join(cmd)}\n# status {status}\n".encode() + out + b"\n--- stderr ---\n" + err)
    res.seconds = time.monotonic() - start
    res.command = shlex.join(cmd)
    return res


def xenicorn_command(test: Test, kernel: str, opts: list[str], timeout: float, extra: list[str]) -> list[str]:
    # the suite's runner gives QEMU -device pc-testdev (see QEMU_BASE); so does this
    cmd = [sys.executable, "-m", "xenicorn", "run", kernel, "-smp", str(test.smp), "-device", "pc-testdev"]
    if test.test_args:
        cmd += ["--append", " ".join(expand(test.test_args))]
    return cmd + opts + ["--timeout", str(timeout)] + extra


def qemu_command(test: Test, kernel: str, qemu: str) -> list[str]:
    cmd = [qemu] + QEMU_BASE + ["-kernel", kernel, "-smp", str(test.smp)]
    if test.test_args:
        cmd += ["-append", " ".join(expand(test.test_args))]
    return cmd + expand(test.qemu_params)


def read_arch(src: str) -> str:
    try:
        with open(os.path.join(src, "config.mak")) as f:
            m = re.search(r"^ARCH=(\S+)", f.read(), re.M)
            return m.group(1) if m else "x86_64"
    except OSError:
        return "x86_64"


def git_commit(src: str) -> str:
    p = subprocess.run(["git", "-C", src, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def cell(r: Result | None) -> str:
    if r is None:
        return "—"
    text = r.verdict
    if r.summary and r.verdict in ("PASS", "FAIL", "SKIP"):
        text += " " + r.summary.replace("SUMMARY: ", "(") + ")"
    return text.replace("|", "\\|")


def markdown(rows: list[dict], with_qemu: bool) -> str:
    head = ("| test | xenicorn | QEMU 7.2 TCG | xenicorn's first failing line / skip reason "
            "| QEMU options not honoured |")
    out = [head, "|" + "---|" * 5]
    if not with_qemu:
        out = [head.replace(" QEMU 7.2 TCG |", ""), "|" + "---|" * 4]
    for row in rows:
        x, q = row["xenicorn"], row["qemu"]
        why = (x.reason if x and x.verdict != "PASS" else "").replace("|", "\\|")
        needs = "; ".join(row["needs"]).replace("|", "\\|")
        cols = [row["name"], cell(x)] + ([cell(q)] if with_qemu else []) + [f"`{why}`" if why else "", needs]
        out.append("| " + " | ".join(cols) + " |")
    return "\n".join(out)


def counts(rows: list[dict], key: str) -> str:
    tally: dict[str, int] = {}
    for row in rows:
        r = row[key]
        if r is not None:
            tally[r.verdict] = tally.get(r.verdict, 0) + 1
    return ", ".join(f"{k} {tally[k]}" for k in ("PASS", "FAIL", "SKIP", "TIMEOUT", "CRASH") if k in tally)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="a built kvm-unit-tests tree (holds x86/unittests.cfg and x86/*.flat)")
    p.add_argument("--qemu", action="store_true", help="also run each test under QEMU TCG")
    p.add_argument("--qemu-binary", default="qemu-system-x86_64")
    p.add_argument("--jobs", "-j", type=int, default=2)
    p.add_argument("--max-timeout", type=float, default=0.0, metavar="S",
                   help="cap every test's timeout (from the cfg, default 90 s) at S seconds")
    p.add_argument("--only", default="", help="comma-separated test names")
    p.add_argument("--all", action="store_true", help="run nodefault tests too")
    p.add_argument("--xenicorn-args", default="", help="extra options for xenicorn run (e.g. '--no-xen')")
    p.add_argument("--markdown", metavar="FILE", help="write the table here")
    p.add_argument("--json", metavar="FILE", help="write every result (commands, statuses) here")
    p.add_argument("--logs", metavar="DIR", help="keep each run's output in DIR/NAME.VMM.log")
    args = p.parse_args(argv)
    cfg = os.path.join(args.src, "x86", "unittests.cfg")
    try:
        with open(cfg) as f:
            tests = parse_cfg(f.read())
    except OSError as e:
        print(f"kut_census: {cfg}: {e.strerror}", file=sys.stderr)
        return 2
    if args.only:
        wanted = set(args.only.split(","))
        tests = [t for t in tests if t.name in wanted]
    arch = read_arch(args.src)
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    extra = shlex.split(args.xenicorn_args)
    rows: list[dict] = []
    jobs = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for t in tests:
            kernel = os.path.join(args.src, "x86", t.file)
            timeout = min(t.timeout, args.max_timeout) if args.max_timeout else t.timeout
            opts, needs = xenicorn_options(t)
            row = {"name": t.name, "file": t.file, "smp": t.smp, "test_args": t.test_args,
                   "qemu_params": t.qemu_params, "needs": needs, "xenicorn": None, "qemu": None}
            rows.append(row)
            why = skip_reason(t, arch, kernel, args.all, "tcg")
            if why:
                row["xenicorn"] = Result("SKIP", None, why)
                if args.qemu:
                    row["qemu"] = Result("SKIP", None, why)
                continue
            # xenicorn's own --timeout ends the guest cleanly (status 124); the
            # wall-clock limit a little later catches a hung emulator.
            xcmd = xenicorn_command(t, kernel, opts, timeout, extra)
            logs = {vmm: os.path.join(args.logs, f"{t.name}.{vmm}.log") if args.logs else ""
                    for vmm in ("xenicorn", "qemu")}
            jobs.append((row, "xenicorn", pool.submit(run_one, xcmd, timeout + 15, "xenicorn", logs["xenicorn"])))
            if args.qemu:
                qcmd = qemu_command(t, kernel, args.qemu_binary)
                jobs.append((row, "qemu", pool.submit(run_one, qcmd, timeout, "qemu", logs["qemu"])))
        for row, key, fut in jobs:
            row[key] = fut.result()
            r = row[key]
            print(f"{key:8} {row['name']:40} {r.verdict:7} {r.seconds:6.1f}s {r.reason[:90]}", file=sys.stderr)
    table = markdown(rows, args.qemu)
    text = (f"kvm-unit-tests {git_commit(args.src)} ({arch})\n\n"
            f"xenicorn: {counts(rows, 'xenicorn')}\n" + (f"QEMU TCG: {counts(rows, 'qemu')}\n" if args.qemu else "")
            + "\n" + table + "\n")
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: (dataclasses.asdict(v) if isinstance(v, Result) else v) for k, v in row.items()}
                       for row in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
