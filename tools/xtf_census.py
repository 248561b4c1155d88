"""Run every XTF HVM image under xenicorn and write the census, ``docs/conformance.md``.

    python tools/xtf_census.py --xtf /work/xtf-src --jobs 2

runs ``xenicorn xtf`` over ``<xtf>/tests`` (XTF built there with ``make``)
and writes the Markdown census: the XTF and xenicorn commits, the commands,
the counts by result, and for each image that did not succeed, the reason the
test printed and why (the ``WHY`` table below: what Xen itself gives, or
which gap in xenicorn). ``--from-junit FILE`` rebuilds the census from the
JUnit file of an earlier ``xenicorn xtf --junit FILE`` run instead.

Update ``WHY`` when a gap closes or a new result appears: a test that fails
with no entry is listed as "unexplained".
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xenicorn import xtf  # noqa: E402

XEN = "Xen gives this too"
OWNED = "xenicorn gap, being closed elsewhere"
ACCURACY = "xenicorn gap: x86 accuracy"
GAP = "xenicorn gap"
FEP_SKIP = (XEN, "needs the forced emulation prefix, which only a Xen built with CONFIG_HVM_FEP and booted "
                 "with `hvm_fep` offers; release builds SKIP it the same way")

# test -> (kind, why); the reasons are for a result other than SUCCESS.
WHY: dict[str, tuple[str, str]] = {
    "argo": (XEN, "Argo is off unless Xen is built with CONFIG_ARGO and booted with `argo=1`; "
                  "xenicorn has no Argo (`argo_op` is -ENOSYS), as a default Xen"),
    "nested-svm": (XEN, "needs `nestedhvm = 1` (its extra.cfg) and SVM offered to the guest; xenicorn "
                        "offers no nested virtualisation, as Xen without nestedhvm"),
    "nested-vmx": (XEN, "needs `nestedhvm = 1` (its extra.cfg) and VT-x offered to the guest; xenicorn "
                        "offers no nested virtualisation, as Xen without nestedhvm"),
    "fep": (XEN, "succeeds only when the forced emulation prefix works (`xtf_has_fep`): a Xen without "
                 "`hvm_fep` FAILs it too; with `--hvm-fep` xenicorn offers it (x86/fep.py) and it succeeds"),
    "xsa-123": FEP_SKIP, "xsa-170": FEP_SKIP, "xsa-191": FEP_SKIP,
    "xsa-186": (XEN, "needs the forced emulation prefix (SKIP as on a release Xen); with `--hvm-fep` both "
                     "succeed: hvm32 populates gfn 0xfffff, where it has no RAM, within max_pages (RAM + "
                     "libxl's 1 MiB slack), as Xen's populate_physmap does (xen/memory.py)"),
    "xsa-196": FEP_SKIP, "xsa-200": FEP_SKIP, "xsa-203": FEP_SKIP, "xsa-204": FEP_SKIP,
    "xsa-451": FEP_SKIP, "xsa-470": FEP_SKIP,
    "selftest": (OWNED, "grant tables v2: GNTTABOP_set_version(2) is refused (-EINVAL); "
                        "Xen grants v2 to HVM guests by default (gnttab=max-ver:2)"),
    "xsa-188": (OWNED, "FIFO event channels: EVTCHNOP_init_control is -ENOSYS, where Xen validates "
                       "the control block (the test wants -EINVAL for its bad offset)"),
    "cpuid-faulting": (XEN, "every check passes (PLATFORM_INFO bit 31, MISC_FEATURES_ENABLES bit 0, user "
                            "CPUID #GP while on, as Xen offers every HVM guest); the test SKIPs for its "
                            "FEP notice alone, as on a Xen without `hvm_fep`"),
    "livepatch-priv-check": (GAP, "Xen's do_sysctl (xen/common/sysctl.c) answers an unprivileged guest -EPERM "
                                  "(-EACCES for a wrong interface version) through XSM's dummy policy, so "
                                  "the test SUCCEEDs on Xen; xenicorn has no sysctl (-ENOSYS), which the "
                                  "test reads as 'no live patching'"),
    "xsa-261": (GAP, "no HPET: Xen emulates one for HVM guests (xen/arch/x86/hvm/hpet.c; libxl's hpet "
                     "defaults to on), xenicorn has none, so the test SKIPs"),
    "xsa-472-3": (GAP, "needs 3 vCPUs: its extra.cfg says `vcpus = 3` (info.json asks for none) and it "
                       "starts NR_APS = 2 APs; with -smp 1 or -smp 2 VCPUOP_initialise of the missing vCPU "
                       "is -ENOENT, as on Xen ('unable to init CPU1: -2' / 'CPU2'), an ERROR. The runner "
                       "passes -smp 3 from the .cfg beside the image, and it SUCCEEDs"),
    "swint-emulation": (XEN, "every native check passes (a fault delivering INT n/INT3/INTO/ICEBP is "
                             "reported at the instruction, prefixes included, and ICEBP, #UD in the CPU "
                             "engine, is a #DB trap); the emulated half needs the forced emulation "
                             "prefix, so it SKIPs, as on a Xen without `hvm_fep`; SUCCESS with it"),
    "umip": (XEN, "every native check passes (UMIP reported; SGDT/SIDT/SLDT/STR/SMSW are #GP(0) at CPL 3 "
                  "with CR4.UMIP, through the engine's SVM intercepts: machine/umip.py); the emulated half "
                  "needs the forced emulation prefix, so it SKIPs, as on a Xen without `hvm_fep`; SUCCESS "
                  "with it"),
    "fpu-exception-emulation": (XEN, "the native half passes (MMX/SSE check CR0.EM and CR4.OSFXSR before "
                                     "CR0.TS, corrected at the #NM: x86/fpufault.py); the emulated half needs "
                                     "the forced emulation prefix, so it SKIPs, as on a Xen without `hvm_fep`"),
    "xsa-462": (XEN, "the ESR check passes (0x60: 'send illegal vector' from the IPI, 'receive illegal "
                     "vector' from LVT error's own vector 15, as Xen's vlapic_error); the test SKIPs for "
                     "its FEP notice alone, as on a Xen without `hvm_fep`"),
}

# SUCCESS results that prove less than they seem.
VACUOUS: dict[str, str] = {
    "xsa-472-1": "writes the Viridian MSR HV_X64_MSR_REFERENCE_TSC; xenicorn has no Viridian and drops "
                 "unknown MSR writes, where Xen without `viridian` in the config #GPs",
    "xsa-472-2": "writes the Viridian synthetic timer MSRs; dropped as above (no Viridian in xenicorn)",
    "xsa-472-3": "runs 3 vCPUs and balloons the page out and in (XENMEM_decrease_reservation / "
                 "populate_physmap), but the Viridian reference TSC page it maps is a dropped MSR write",
    "invlpg": "XTF runs it twice under xl, with `hap=0` and `hap=1` (variations ~shadow, ~hap); xenicorn "
              "has one paging engine and runs the image once",
    "xsa-168": "XTF runs it only with `hap=0` (variation ~shadow): it probes Xen's shadow paging code, "
               "which xenicorn does not have; it shows only that the guest's INVLPG sequence runs",
    "memop-seg": "succeeds natively and with `--hvm-fep`, but the CPU engine checks no data-segment "
                 "limits: xenicorn makes the check at the engine's #PF/#GP and delivers the #GP(0)/#SS(0) "
                 "the CPU raises first (x86/segcheck.py; `--trace int` says so), which covers the test's "
                 "accesses (they all reach unmapped or supervisor pages). An access past a limit that "
                 "reaches mapped memory raises nothing (QEMU 7.2 TCG does the same); checking every access "
                 "in a Unicorn memory hook would make loads ~240x and stores ~19x slower "
                 "(benchmarks/seglimit.py, docs/unicorn-notes.md), so it is not done",
    "xsa-173": "XTF runs it only with `hap=0` (variation ~shadow), to probe Xen's shadow code; here it "
               "checks the CPU engine's page walk instead (a PSE l2e past MAXPHYADDR must #PF[Rsvd])",
}


def git_commit(path: Path) -> str:
    """``path``'s HEAD commit, and whether its work tree has changes."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        # The census file itself does not count: it is what a re-run rewrites.
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!docs/conformance.md"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


def from_junit(path: str) -> list[xtf.Outcome]:
    """The outcomes a ``xenicorn xtf --junit`` file recorded."""
    outcomes = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        m = xtf.IMAGE_NAME.match(name)
        image = xtf.Image(Path(name), m.group(1) if m else "?", m.group(2) if m else name)
        result, reason = "SUCCESS", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                result = {"failure": "FAILURE", "skipped": "SKIP"}.get(tag) or el.get("type", "ERROR")
                reason = el.get("message", "")
        if result == reason:
            reason = ""
        outcomes.append(xtf.Outcome(image, result, float(case.get("time", 0)), reason))
    return outcomes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(outcomes: list[xtf.Outcome], xtf_dir: Path, command: str, pv_left_out: int,
             fep: list[xtf.Outcome] | None = None) -> str:
    """The census as Markdown; ``fep``: the same images run with ``--hvm-fep``, a second column."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts = {r: sum(o.result == r for o in outcomes) for r in xtf.ALL_RESULTS}
    fep_counts = {r: sum(o.result == r for o in fep) for r in xtf.ALL_RESULTS} if fep else None
    fep_by_name = {o.image.name: o for o in fep or []}
    out = [
        "# XTF conformance census",
        "",
        "How xenicorn does on the [Xen Test Framework](https://github.com/andyhhp/xtf)'s HVM test "
        "kernels, each booted with `xenicorn run` by the `xenicorn xtf` runner (results and exit codes "
        "as Xen's `xtf-runner`). Generated by `tools/xtf_census.py`; do not edit by hand, edit its "
        "`WHY` table and re-run it.",
        "",
        f"- XTF commit: `{git_commit(xtf_dir)}`",
        f"- xenicorn commit: `{git_commit(ROOT)}`",
        f"- Run: {now}",
        f"- Built: `git clone https://github.com/andyhhp/xtf {xtf_dir} && make -C {xtf_dir} -j2` "
        "(gcc; XTF's own Makefile, which also writes each image's xl `.cfg` and `info.json`)",
        f"- Run with: `{command}`",
        "- The runner passes `vcpus` and `memory` from each image's `.cfg` on as `-smp` and `-m`; "
        "the other xl settings of the test's extra.cfg (`viridian`, `nestedhvm`, "
        "`max_event_channels`, `hap`) have no xenicorn equivalent and are not applied.",
        f"- Not run: {pv_left_out} PV images (`test-pv64-*`, `test-pv32pae-*`): xenicorn runs HVM guests.",
        "",
        "## Counts",
        "",
    ]
    if fep_counts is None:
        out += ["| result | images |", "|---|---|"]
        out += [f"| {r} | {n} |" for r, n in counts.items()]
        out += [f"| total | {len(outcomes)} |"]
    else:
        out += ["Two runs: as a release build of Xen (no forced emulation prefix), and with `--hvm-fep`, "
                "as Xen's own CI runs XTF (a debug build booted with `hvm_fep`).", "",
                "| result | images | with `--hvm-fep` |", "|---|---|---|"]
        out += [f"| {r} | {n} | {fep_counts[r]} |" for r, n in counts.items()]
        out += [f"| total | {len(outcomes)} | {len(fep)} |"]
    fep_col = " with `--hvm-fep` |" if fep else ""
    out += ["", "## Images that did not succeed", "",
            "One row per test, result and printed reason; `env` lists the images (test-ENV-TEST) it covers.",
            "", "| test | env | result | what the test printed | kind | why |" + fep_col,
            "|---|---|---|---|---|---|" + ("---|" if fep else "")]
    rows: dict[tuple[str, str, str], list[xtf.Outcome]] = {}
    for o in sorted(outcomes, key=lambda o: (xtf.ALL_RESULTS.index(o.result), o.image.test, o.image.env)):
        if o.result != "SUCCESS":
            rows.setdefault((o.image.test, o.result, o.reason), []).append(o)
    for (test, result, reason), group in rows.items():
        kind, why = WHY.get(test, ("unexplained", "no entry in tools/xtf_census.py's WHY table"))
        envs = ", ".join(o.image.env for o in group)
        line = f"| {test} | {envs} | {result} | {_cell(reason)} | {kind} | {_cell(why)} |"
        if fep:
            with_fep = sorted({fep_by_name[o.image.name].result for o in group if o.image.name in fep_by_name})
            line += f" {'/'.join(with_fep)} |"
        out.append(line)
    ran = {o.image.test for o in outcomes if o.result == "SUCCESS"}
    vacuous = [(t, note) for t, note in VACUOUS.items() if t in ran]
    if vacuous:
        out += ["", "## Successes that prove less than they seem", ""]
        out += [f"- **{t}**: {note}" for t, note in vacuous]
    out += ["", "## All results by test", "", "| test | " + " | ".join(xtf.HVM_ENVS) + " |",
            "|---|" + "---|" * len(xtf.HVM_ENVS)]
    by_test: dict[str, dict[str, str]] = {}
    for o in outcomes:
        by_test.setdefault(o.image.test, {})[o.image.env] = o.result
    fep_env: dict[tuple[str, str], str] = {(o.image.test, o.image.env): o.result for o in fep or []}
    for test, envs in sorted(by_test.items()):
        cells = []
        for e in xtf.HVM_ENVS:
            cell = envs.get(e, "")
            with_fep = fep_env.get((test, e))
            if cell and with_fep and with_fep != cell:
                cell += f" ({with_fep} with FEP)"
            cells.append(cell)
        out.append(f"| {test} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


KEEP_FROM = "\n## kvm-unit-tests"        # a census of its own (tools/kut_census.py), kept when this one is rewritten


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--xtf", default="/work/xtf-src", help="the built XTF tree (default /work/xtf-src)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="images run at once (default 2)")
    # 120 s: the msr test reads ~33,000 MSRs and prints a line for each (~20 s of CPU, more on a busy host).
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per image (default 120)")
    p.add_argument("--out", default=str(ROOT / "docs" / "conformance.md"), help="the census file ('-': stdout)")
    p.add_argument("--junit", metavar="FILE", help="also keep the run's JUnit XML")
    p.add_argument("--from-junit", metavar="FILE", help="no run: rebuild the census from this JUnit file")
    p.add_argument("--fep", action="store_true", help="also run every image with --hvm-fep (a second column)")
    args = p.parse_args(argv)
    xtf_dir = Path(args.xtf)
    tests = xtf_dir / "tests"
    if not tests.is_dir():
        print(f"xtf_census: error: no XTF tests directory {tests} (build XTF there first)", file=sys.stderr)
        return 2
    images, pv = xtf.find_images([str(tests)])
    command = f"python -m xenicorn xtf --jobs {args.jobs} --timeout {args.timeout:g} {tests}"
    if args.from_junit:
        outcomes = from_junit(args.from_junit)
    else:
        if not images:
            print(f"xtf_census: error: no XTF images under {tests}", file=sys.stderr)
            return 2
        runner = xtf.Runner(args.timeout, args.jobs)
        outcomes = runner.run(images, lambda o: print(xtf.image_line(o), o.reason, flush=True))
        if args.junit:
            xtf.write_junit(args.junit, outcomes)
    fep = None
    if args.fep and not args.from_junit:
        runner = xtf.Runner(args.timeout, args.jobs, ["--hvm-fep"])
        fep = runner.run(images, lambda o: print(xtf.image_line(o), o.reason, "(FEP)", flush=True))
        command += f"` and `python -m xenicorn xtf --run-arg=--hvm-fep --jobs {args.jobs} {tests}"
    text = markdown(outcomes, xtf_dir, command, pv, fep)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        out = Path(args.out)
        old = out.read_text() if out.exists() else ""
        if KEEP_FROM in old:
            text += old[old.index(KEEP_FROM):]
        out.write_text(text)
        print(f"wrote {args.out}")
    print("\n".join(xtf.summary(outcomes, quiet=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
