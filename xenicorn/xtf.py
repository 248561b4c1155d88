"""``xenicorn xtf``: run Xen Test Framework images, as Xen's ``xtf-runner`` does under ``xl``.

XTF (the Xen Test Framework, github andyhhp/xtf) builds each test as several
tiny kernels, one per guest *environment*: ``test-hvm64-selftest`` is the
``selftest`` test built for a 64-bit HVM guest (``hvm32``, ``hvm32pae``,
``hvm32pse`` and ``hvm64`` are HVM; ``pv64`` and ``pv32pae`` are PV guests,
which xenicorn does not run). Every image carries a PVH entry note, so
``xenicorn run IMAGE`` boots it directly; the test reports on its console and
ends with one line ``Test result: SUCCESS`` (or ``SKIP``, ``ERROR``,
``FAILURE``, possibly followed by ``with warnings``), then shuts the domain
down.

This runner boots each image in its own ``python -m xenicorn run`` process,
several at once (``--jobs``), each with a time limit: a guest that ends
without a result line -- a triple fault, a hang cut off by the timeout, a
crash of the emulator -- counts as ``CRASH``, as xtf-runner counts it. The
results and exit status follow xtf-runner's (``all_results`` and
``exit_code()`` in its ``xtf-runner`` script): the worst result of all
images wins, in the order SUCCESS < SKIP < ERROR < FAILURE < CRASH, with the
exit codes 0, 3, 4, 5, 6. Bad user input is one line and exit status 2.

xl reads each test's ``.cfg`` file (``vcpus``, ``memory``, test-specific
extras such as ``viridian``); when an image has its ``.cfg`` beside it (XTF's
build tree and ``make install`` both put it there), the runner passes its
``vcpus`` and ``memory`` on as ``-smp`` and ``-m``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# xtf-runner's results, best to worst; the worst result of a run picks the exit code.
ALL_RESULTS = ("SUCCESS", "SKIP", "ERROR", "FAILURE", "CRASH")
EXIT_CODES = {"SUCCESS": 0, "SKIP": 3, "ERROR": 4, "FAILURE": 5, "CRASH": 6}
STATUS_USAGE = 2
HVM_ENVS = ("hvm32", "hvm32pae", "hvm32pse", "hvm64")
PV_ENVS = ("pv32pae", "pv64")
# test-<env>-<name>; XTF names its test kernels so (build/gen.mk), and the xl
# configs add ``~variation`` and ``.cfg``, which are no images.
IMAGE_NAME = re.compile(rf"^test-({'|'.join(HVM_ENVS + PV_ENVS)})-([A-Za-z0-9_][A-Za-z0-9_.-]*)$")
RESULT_LINE = "Test result:"
# XTF's tests start their reasons so by convention (xtf_skip("Skip: ..."), xtf_failure("Fail: ..."), ...).
REASON = re.compile(r"^\s*(skip|fail|failure|error|warning)\b", re.IGNORECASE)
EXPECTED = re.compile(r"\b[Ee]xpected\b")
SKIPPING = re.compile(r"\bskip|not (available|supported|detected)|unavailable", re.IGNORECASE)
# Lines every XTF test prints, and the FEP notice many print before their real reason.
BANNER = ("--- Xen Test Framework", "Environment:", "FEP support not detected")
TAIL_LINES = 8          # of a CRASH's output, printed and kept as its reason
KILL_GRACE_S = 10.0     # a child still alive this long after its own --timeout is killed


class XtfUsageError(Exception):
    """Bad user input (no such path, no image matched): one line, exit status 2."""


@dataclass
class Image:
    """One XTF test kernel: ``test-<env>-<test>`` at ``path``."""

    path: Path
    env: str
    test: str
    vcpus: int | None = None        # from the xl config beside the image, if any
    memory: int | None = None       # MiB, likewise

    @property
    def name(self) -> str:
        return f"test-{self.env}-{self.test}"


@dataclass
class Outcome:
    """How one image's run ended: its result, why, and everything it printed."""

    image: Image
    result: str
    seconds: float
    reason: str = ""                # the line the test gave for its result, or what ended a CRASH
    status: int | None = None       # the child's exit status (None: killed)
    stdout: str = ""
    stderr: str = ""
    tail: list[str] = field(default_factory=list)


def interpret_result(line: str) -> str:
    """The result one console line reports, by xtf-runner's ``interpret_result()`` rule.

    The first of ``ALL_RESULTS`` named in a line holding ``Test result:`` wins;
    any other line means the guest never reported: CRASH.
    """
    if RESULT_LINE not in line:
        return "CRASH"
    tail = line.split(RESULT_LINE, 1)[1]
    for res in ALL_RESULTS:
        if res in tail:
            return res
    return "CRASH"


def worst(results) -> str:
    """The worst of ``results`` (SUCCESS for none), which picks the run's exit code."""
    return max(results, key=ALL_RESULTS.index, default="SUCCESS")


def read_xl_config(path: Path) -> dict[str, str]:
    """The ``key = value`` settings of an xl config file (later ones win, as xl reads them)."""
    settings: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return settings
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        key, sep, value = line.partition("=")
        if sep and key.strip():
            settings[key.strip()] = value.strip().strip('"')
    return settings


def _image(path: Path) -> Image | None:
    m = IMAGE_NAME.match(path.name)
    if not m:
        return None
    image = Image(path=path, env=m.group(1), test=m.group(2))
    cfg = read_xl_config(path.with_name(path.name + ".cfg"))
    for key in ("vcpus", "memory"):
        if cfg.get(key, "").isdigit():
            setattr(image, key, int(cfg[key]))
    return image


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_images(paths: list[str], filters: list[str] | None = None) -> tuple[list[Image], int]:
    """The images named by ``paths`` (files, or directories searched recursively), sorted by name.

    A directory gives every ELF file named ``test-<hvm env>-<name>``; PV
    images are counted (the second value) but left out, as xenicorn boots HVM
    guests only. A file named on the command line runs whatever its name.
    ``filters`` are shell patterns matched against the image name
    (``test-hvm64-selftest``) or the test name (``selftest``).
    """
    images: dict[Path, Image] = {}
    pv_skipped = 0
    for arg in paths:
        p = Path(arg)
        if p.is_file():
            image = _image(p) or Image(path=p, env="?", test=p.name)
            images.setdefault(p.resolve(), image)
        elif p.is_dir():
            for f in sorted(p.rglob("test-*")):
                image = _image(f) if f.is_file() else None
                if image is None or not _is_elf(f):
                    continue
                if image.env in PV_ENVS:
                    pv_skipped += 1
                    continue
                images.setdefault(f.resolve(), image)
        else:
            raise XtfUsageError(f"no such file or directory: {arg}")
    found = sorted(images.values(), key=lambda i: (i.test, i.env, str(i.path)))
    if filters:
        found = [i for i in found
                 if any(fnmatch.fnmatchcase(i.name, g) or fnmatch.fnmatchcase(i.test, g) for g in filters)]
    return found, pv_skipped


def _reason(lines: list[str], result: str) -> str:
    """The line a test gave for its result, best effort.

    The last ``Skip:``/``Fail:``/``Error:`` line before the result; else the
    last line saying what was expected; else the last line printed (XTF's
    banner aside), joined to the line before when that one leaves a
    parenthesis open (XTF's "FEP unavailable, but needed by test. (Is Xen
    support" / "compiled in, and booted with 'hvm_fep'?)").
    """
    before: list[str] = []
    for ln in (ln.rstrip() for ln in lines):
        # XTF prints each line on two consoles; keep one of each repeat.
        if ln.strip() and RESULT_LINE not in ln and (not before or before[-1] != ln):
            before.append(ln)
    flagged = [n for n, ln in enumerate(before) if REASON.match(ln)]
    if flagged:
        n = flagged[-1]
        # An indented line right after it gives the detail ("  expected #SS[0000], got #GP[0000]").
        nxt = before[n + 1] if n + 1 < len(before) else ""
        detail = nxt if nxt[:1].isspace() and EXPECTED.search(nxt) else ""
        return f"{before[n].strip()}: {detail.strip()}" if detail else before[n].strip()
    before = [ln.strip() for ln in before]
    if result == "SUCCESS":
        return ""
    if result == "SKIP":
        # xtf_skip() prints its message as it is: the last line that says so
        # ("FEP support not detected - some tests will be skipped")
        said = [n for n, ln in enumerate(before) if SKIPPING.search(ln)]
        if said:
            n = said[-1]
            if before[n].count("(") > before[n].count(")") and n + 1 < len(before):
                return f"{before[n]} {before[n + 1]}"      # continued on the next line
            return before[n]
    expected = [ln for ln in before if EXPECTED.search(ln)]
    if expected:
        return expected[-1]
    rest = [ln for ln in before if not ln.startswith(BANNER)]
    if len(rest) >= 2 and rest[-2].count("(") > rest[-2].count(")"):
        return f"{rest[-2]} {rest[-1]}"
    return rest[-1] if rest else ""


def classify(image: Image, stdout: str, stderr: str, status: int | None, seconds: float,
             timeout: float) -> Outcome:
    """Turn one child's output and exit status into an :class:`Outcome`.

    The result line is searched on stdout, then stderr (XTF's console may be
    printed on either, and twice: it writes both to the PV console and to
    Xen's console_io); the last one found counts, as xtf-runner reads the
    console's last line. Without one the run is a CRASH, and its reason says
    how the child ended.
    """
    for text in (stdout, stderr):
        lines = text.splitlines()
        results = [i for i, ln in enumerate(lines) if RESULT_LINE in ln]
        if results:
            last = results[-1]
            result = interpret_result(lines[last])
            return Outcome(image, result, seconds, _reason(lines[:last], result), status, stdout, stderr,
                           lines[max(0, last - TAIL_LINES + 1):last + 1])
    lines = [ln for ln in (stdout.splitlines() + stderr.splitlines()) if ln.strip()]
    guest = [ln for ln in lines if not ln.startswith("xenicorn:")]
    machine = [ln for ln in lines if ln.startswith("xenicorn:")]   # how xenicorn says the run ended
    if status is None:
        why = f"killed: still running {KILL_GRACE_S:.0f} s after its {timeout:g} s timeout"
    elif status == 124:
        why = f"no result within the {timeout:g} s timeout"
    elif status < 0:
        why = f"killed by signal {-status}"
    elif machine:
        why = f"{machine[0].removeprefix('xenicorn:').strip()} (exit status {status})"
    else:
        why = f"no result line (exit status {status})"
    panics = [n for n, ln in enumerate(guest) if "PANIC:" in ln]
    if panics and status is not None:
        # XTF's panic(): "PANIC: <what>", then often the exception ("Vec 13 #GP[0000]").
        what = re.sub(r"^(PANIC:\s*)+", "", guest[panics[0]].strip())
        after = guest[panics[0] + 1].strip() if panics[0] + 1 < len(guest) else ""
        why = f"guest PANIC: {what}" + (f" / {after}" if after.startswith("Vec") else "") + f"; {why}"
    return Outcome(image, "CRASH", seconds, why, status, stdout, stderr,
                   guest[-(TAIL_LINES - 2):] + machine[:2])


def command(image: Image, timeout: float, run_args: list[str]) -> list[str]:
    """The ``xenicorn run`` command line that boots ``image``."""
    cmd = [sys.executable, "-m", "xenicorn", "run", str(image.path), "--timeout", f"{timeout:g}"]
    if image.vcpus and image.vcpus > 1:
        cmd += ["-smp", str(image.vcpus)]
    if image.memory:
        cmd += ["-m", str(image.memory)]
    return cmd + list(run_args)


class Runner:
    """Runs images in parallel child processes and kills what is left on interrupt."""

    def __init__(self, timeout: float, jobs: int, run_args: list[str] | None = None):
        self.timeout = timeout
        self.jobs = jobs
        self.run_args = list(run_args or [])
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def run_one(self, image: Image) -> Outcome:
        """Boot ``image`` in a child process and classify how it ended."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The child must import this xenicorn, wherever the runner was started from.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        start = time.monotonic()
        with self._lock:
            if self._stopping:
                return Outcome(image, "CRASH", 0.0, "not run: interrupted")
            child = subprocess.Popen(command(image, self.timeout, self.run_args), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
            self._children.add(child)
        try:
            try:
                out, err = child.communicate(timeout=self.timeout + KILL_GRACE_S)
                status: int | None = child.returncode
            except subprocess.TimeoutExpired:
                child.kill()
                out, err = child.communicate()
                status = None
        finally:
            with self._lock:
                self._children.discard(child)
        return classify(image, out.decode(errors="replace"), err.decode(errors="replace"), status,
                        time.monotonic() - start, self.timeout)

    def run(self, images: list[Image], report=None) -> list[Outcome]:
        """Run all ``images``, calling ``report(outcome)`` as each ends; outcomes in ``images`` order."""
        outcomes: dict[int, Outcome] = {}
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs)
        try:
            futures = {pool.submit(self.run_one, image): n for n, image in enumerate(images)}
            for fut in concurrent.futures.as_completed(futures):
                outcome = fut.result()
                outcomes[futures[fut]] = outcome
                if report:
                    report(outcome)
        except BaseException:
            self.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [outcomes[n] for n in range(len(images))]

    def stop(self) -> None:
        """Kill every running child (their process groups) and start no more."""
        with self._lock:
            self._stopping = True
            for child in list(self._children):
                try:
                    os.killpg(child.pid, 9)
                except OSError:
                    pass


# --- reports --------------------------------------------------------------------------------------

def image_line(outcome: Outcome) -> str:
    """``name  result  seconds``, as each image ends."""
    return f"{outcome.image.name:<40s} {outcome.result:<8s} {outcome.seconds:6.1f}s"


def summary(outcomes: list[Outcome], quiet: bool = False) -> list[str]:
    """Counts by result, then each test's results per environment (with ``quiet``, not all-SUCCESS tests)."""
    counts = {res: sum(o.result == res for o in outcomes) for res in ALL_RESULTS}
    lines = [f"{len(outcomes)} images: " + ", ".join(f"{n} {res}" for res, n in counts.items() if n)]
    by_test: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_test.setdefault(o.image.test, []).append(o)
    width = max((len(t) for t in by_test), default=0)
    shown = [t for t, os_ in sorted(by_test.items()) if not quiet or any(o.result != "SUCCESS" for o in os_)]
    if shown:
        lines.append("By test:")
    for test in shown:
        results = " ".join(f"{o.image.env}={o.result}" for o in by_test[test])
        lines.append(f"  {test:<{width}s}  {results}")
    return lines


_XML_BAD = re.compile(r"[^\x09\x0A\x0D\x20-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")


def _xml_text(text: str) -> str:
    """``text`` with the characters XML 1.0 cannot hold (guest console bytes) written as backslash-x-NN."""
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def write_junit(path: str, outcomes: list[Outcome]) -> None:
    """JUnit XML as CI systems read it: one ``testcase`` per image.

    FAILURE is a ``failure``; ERROR and CRASH are ``error`` elements (the
    test, or the machine, could not judge); SKIP is ``skipped``. The guest's
    console is the ``system-out``, the runner's own messages ``system-err``.
    """
    import xml.etree.ElementTree as ET
    counts = {res: sum(o.result == res for o in outcomes) for res in ALL_RESULTS}
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", name="xtf", tests=str(len(outcomes)),
                          failures=str(counts["FAILURE"]), errors=str(counts["ERROR"] + counts["CRASH"]),
                          skipped=str(counts["SKIP"]), time=f"{sum(o.seconds for o in outcomes):.3f}")
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", classname=f"xtf.{o.image.test}", name=o.image.name,
                             time=f"{o.seconds:.3f}")
        message = _xml_text(o.reason or o.result)
        if o.result == "FAILURE":
            ET.SubElement(case, "failure", type="FAILURE", message=message)
        elif o.result in ("ERROR", "CRASH"):
            ET.SubElement(case, "error", type=o.result, message=message).text = _xml_text("\n".join(o.tail))
        elif o.result == "SKIP":
            ET.SubElement(case, "skipped", message=message)
        ET.SubElement(case, "system-out").text = _xml_text(o.stdout)
        if o.stderr:
            ET.SubElement(case, "system-err").text = _xml_text(o.stderr)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


# --- command line ---------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _positive_float(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not s > 0 or s != s or s == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return s


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``xtf`` subcommand's options."""
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="XTF images (test-<env>-<name>) or directories searched for them (XTF's tests/ "
                        "or its make install directory)")
    p.add_argument("-j", "--jobs", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                   help="images run at once (default: the CPU count)")
    # 120 s: XTF's msr test reads ~33,000 MSRs and prints a line for each, ~20 s of CPU alone, 45 s on a
    # busy host; a hang then costs two minutes.
    p.add_argument("--timeout", type=_positive_float, default=120.0, metavar="S",
                   help="seconds one image may run; without a result by then it is a CRASH (default 120)")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML: one testcase per image")
    p.add_argument("--filter", action="append", metavar="GLOB",
                   help="run only images whose name (test-hvm64-selftest) or test (selftest) matches; "
                        "repeatable")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the images and tests that did not succeed, and the counts")
    p.add_argument("--run-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG on to each 'xenicorn run' (e.g. --run-arg=--vendor=amd); repeatable")


def main(args: argparse.Namespace) -> int:
    """Run the images ``args`` names; the exit status is xtf-runner's for the worst result."""
    try:
        images, pv = find_images(args.paths, args.filter)
        if not images:
            raise XtfUsageError("no XTF images matched" + (f" ({pv} PV images left out)" if pv else ""))
        if args.junit:
            junit_dir = Path(args.junit).resolve().parent
            if not junit_dir.is_dir():
                raise XtfUsageError(f"cannot write {args.junit}: no such directory {junit_dir}")
    except XtfUsageError as e:
        print(f"xenicorn xtf: error: {e}", file=sys.stderr)
        return STATUS_USAGE
    if pv and not args.quiet:
        print(f"({pv} PV images left out: xenicorn boots HVM guests)")

    def report(o: Outcome) -> None:
        if args.quiet and o.result == "SUCCESS":
            return
        print(image_line(o) + (f"  {o.reason}" if o.reason and o.result != "CRASH" else ""), flush=True)
        if o.result == "CRASH":
            print(f"    {o.reason}")
            for line in o.tail:
                print(f"    | {line}")
            sys.stdout.flush()

    runner = Runner(args.timeout, args.jobs, args.run_arg)
    try:
        outcomes = runner.run(images, report)
    except KeyboardInterrupt:
        print("xenicorn xtf: interrupted", file=sys.stderr)
        return 130
    print()
    print("\n".join(summary(outcomes, args.quiet)))
    if args.junit:
        write_junit(args.junit, outcomes)
    return EXIT_CODES[worst(o.result for o in outcomes)]
