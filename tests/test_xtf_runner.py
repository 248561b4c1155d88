"""``xenicorn xtf``: the XTF runner, on the project's own kernels and on hand-made misbehaving ones.

The images are named as XTF names its kernels (``test-<env>-<name>``): the
bundled firmware (which ends with XTF's ``Test result:`` line), the
misbehaving firmware (a triple fault, an endless loop), and tiny kernels
built here with gcc that print a chosen XTF report -- FAILURE, SKIP, ERROR,
or nothing -- and power off.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from xenicorn import cli, firmware, xtf

ROOT = Path(__file__).resolve().parent.parent
FW_SRC = ROOT / "xenicorn" / "firmware" / "src"

# A 32-bit kernel that writes MESSAGE to port 0xE9 (Xen's and QEMU's debug
# console, which xenicorn prints) and powers off through the ACPI PM1a
# control register (SLP_TYP=S5 | SLP_EN), as lib/report.c does without Xen.
REPORTER_S = r"""
        .code32
        .section .text.start, "ax"
        .globl _start
_start: mov     $msg, %esi
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, $0xe9
        jmp     1b
2:      mov     $0x604, %dx
        mov     $0x2000, %ax
        out     %ax, %dx
3:      cli
        hlt
        jmp     3b
msg:    .asciz  "{message}"
"""

MADE = {
    "test-hvm32-fails": "--- Xen Test Framework ---\\nFail: the widget is bent\\nTest result: FAILURE\\n",
    "test-hvm32-skips": "Skip: no widget on this platform\\nTest result: SKIP\\n",
    "test-hvm32-errs": "Error: the test cannot judge\\nTest result: ERROR\\n",
    "test-hvm32-silent": "",
}


def build_reporter(out: Path, message: str) -> None:
    """Link a ``REPORTER_S`` kernel printing ``message`` with the firmware's PVH note and linker script."""
    src = out.with_suffix(".S")
    src.write_text(REPORTER_S.replace("{message}", message))
    objs = []
    for n, s in enumerate([FW_SRC / "lib" / "pvh_note.S", src]):
        obj = out.parent / f"{out.name}.{n}.o"
        subprocess.run(["gcc", "-m32", "-c", str(s), "-o", str(obj)], check=True)
        objs.append(str(obj))
    subprocess.run(["ld", "-m", "elf_i386", "-nostdlib", "-z", "noexecstack", "--no-warn-rwx-segments",
                    "-T", str(FW_SRC / "lib" / "link.ld"), *objs, "-o", str(out)], check=True)
    for o in objs:
        Path(o).unlink()
    src.unlink()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A directory tree of XTF-named images: two succeed, one of each other result, a triple fault, a hang."""
    if shutil.which("gcc") is None or shutil.which("ld") is None:
        pytest.skip("gcc and ld build the misbehaving test kernels")
    root = tmp_path_factory.mktemp("xtf")
    (root / "hello").mkdir()
    (root / "made" / "deeper").mkdir(parents=True)
    shutil.copy(firmware.find("hello64"), root / "hello" / "test-hvm64-hello")
    shutil.copy(firmware.find("hello32"), root / "hello" / "test-hvm32pae-hello")
    shutil.copy(firmware.find("triple32"), root / "made" / "test-hvm32-triple")
    shutil.copy(firmware.find("spin32"), root / "made" / "test-hvm32-spin")
    for name, message in MADE.items():
        build_reporter(root / "made" / "deeper" / name, message)
    # Not images: an xl config, an object file named like a test, a PV kernel.
    (root / "hello" / "test-hvm64-hello.cfg").write_text('name="test-hvm64-hello"\nvcpus=1\nmemory=128\n')
    (root / "made" / "test-hvm32-notelf").write_text("not an ELF\n")
    shutil.copy(firmware.find("hello64"), root / "made" / "test-pv64-hello")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenicorn", "xtf", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def full_run(images, tmp_path_factory):
    """Every image at once, two at a time, with a short timeout for the one that hangs."""
    junit = tmp_path_factory.mktemp("junit") / "xtf.xml"
    proc = run_cli("--jobs", "2", "--timeout", "4", "--junit", str(junit), str(images))
    return proc, junit


def result_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """``name -> (result, rest of line)`` for the per-image lines."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3 and parts[0].startswith("test-") and parts[1] in xtf.ALL_RESULTS:
            out[parts[0]] = (parts[1], line)
    return out


def test_each_image_gets_its_result_and_a_crash_is_the_worst(full_run):
    proc, _ = full_run
    lines = result_lines(proc.stdout)
    assert {name: res for name, (res, _) in lines.items()} == {
        "test-hvm64-hello": "SUCCESS", "test-hvm32pae-hello": "SUCCESS",
        "test-hvm32-fails": "FAILURE", "test-hvm32-skips": "SKIP", "test-hvm32-errs": "ERROR",
        "test-hvm32-silent": "CRASH", "test-hvm32-triple": "CRASH", "test-hvm32-spin": "CRASH",
    }, proc.stdout + proc.stderr
    assert proc.returncode == 6                 # xtf-runner's CRASH
    assert "Fail: the widget is bent" in lines["test-hvm32-fails"][1]
    assert "Skip: no widget on this platform" in lines["test-hvm32-skips"][1]
    assert lines["test-hvm64-hello"][1].rstrip().endswith("s")     # name  result  seconds
    assert "(1 PV images left out" in proc.stdout


def test_a_crash_shows_how_it_ended_and_the_last_lines(full_run):
    out = full_run[0].stdout
    assert "triple fault" in out
    assert "no result within the 4 s timeout" in out
    assert "    | spinning forever" in out
    assert "no result line (exit status 0)" in out      # silent: powered off cleanly, never reported


def test_summary_counts_and_lists_results_per_environment(full_run):
    out = full_run[0].stdout
    assert "8 images: 2 SUCCESS, 1 SKIP, 1 ERROR, 1 FAILURE, 3 CRASH" in out
    by_test = out[out.index("By test:"):].splitlines()
    assert any(ln.split() == ["hello", "hvm32pae=SUCCESS", "hvm64=SUCCESS"] for ln in by_test)
    assert any(ln.split() == ["spin", "hvm32=CRASH"] for ln in by_test)


def test_junit_file_parses_with_one_testcase_per_image(full_run):
    root = ET.parse(full_run[1]).getroot()
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == \
        ("8", "1", "4", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert len(cases) == 8
    assert cases["test-hvm32-fails"].find("failure").get("message") == "Fail: the widget is bent"
    assert cases["test-hvm32-skips"].find("skipped") is not None
    assert cases["test-hvm32-errs"].find("error").get("type") == "ERROR"
    assert cases["test-hvm32-triple"].find("error").get("type") == "CRASH"
    assert cases["test-hvm64-hello"].find("failure") is None
    assert "Test result: SUCCESS" in cases["test-hvm64-hello"].find("system-out").text
    assert cases["test-hvm32pae-hello"].get("classname") == "xtf.hello"


def test_filter_and_one_job_pick_the_exit_code_of_the_worst_result(images):
    proc = run_cli("-j", "1", "--filter", "hello", "--filter", "test-hvm32-fails", "--filter", "*-skips",
                   "--quiet", str(images / "hello"), str(images / "made"))
    lines = result_lines(proc.stdout)
    assert set(lines) == {"test-hvm32-fails", "test-hvm32-skips"}     # --quiet: SUCCESS lines left out
    assert "4 images: 2 SUCCESS, 1 SKIP, 1 FAILURE" in proc.stdout
    assert proc.returncode == 5, proc.stdout + proc.stderr          # FAILURE beats SKIP


def test_an_image_file_named_directly_runs_and_success_is_status_0(images):
    proc = run_cli(str(images / "hello" / "test-hvm64-hello"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(result_lines(proc.stdout)) == {"test-hvm64-hello"}


@pytest.mark.parametrize("argv, message", [
    (["/no/such/dir"], "no such file or directory: /no/such/dir"),
    (["--jobs", "0", "."], "must be at least 1"),
    (["--jobs", "many", "."], "not a number"),
    (["--timeout", "-1", "."], "positive number of seconds"),
    (["--filter", "nothing-like-this", "."], "no XTF images matched"),
    (["--junit", "/no/such/dir/x.xml", "."], "no such directory"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys, tmp_path):
    argv = [str(tmp_path) if a == "." else a for a in argv]
    shutil.copy(firmware.find("hello64"), tmp_path / "test-hvm64-hello")
    with pytest.raises(SystemExit) as exc:
        sys.exit(cli.main(["xtf", *argv]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_result_lines_read_as_xtf_runner_reads_them():
    assert xtf.interpret_result("Test result: SUCCESS") == "SUCCESS"
    assert xtf.interpret_result("Test result: SUCCESS with warnings") == "SUCCESS"
    assert xtf.interpret_result("Test result: FAILURE") == "FAILURE"
    assert xtf.interpret_result("Test result: RUNNING") == "CRASH"
    assert xtf.interpret_result("SUCCESS") == "CRASH"
    assert xtf.worst(["SKIP", "SUCCESS"]) == "SKIP"
    assert xtf.worst(["FAILURE", "ERROR", "SKIP"]) == "FAILURE"
    assert xtf.worst(["FAILURE", "CRASH"]) == "CRASH"
    assert [xtf.EXIT_CODES[r] for r in xtf.ALL_RESULTS] == [0, 3, 4, 5, 6]


def test_classify_reads_duplicated_console_on_either_stream():
    image = xtf.Image(Path("test-hvm64-x"), "hvm64", "x")
    twice = "Environment: HVM 64bit\nEnvironment: HVM 64bit\nSkip: no FEP\nSkip: no FEP\n" \
            "Test result: SKIP\nTest result: SKIP\n"
    for out, err in ((twice, ""), ("", twice), (twice, twice)):
        o = xtf.classify(image, out, err, 0, 1.0, 30)
        assert (o.result, o.reason) == ("SKIP", "Skip: no FEP")
    o = xtf.classify(image, "Test result: FAILURE\n", "", 0, 1.0, 30)
    assert (o.result, o.reason) == ("FAILURE", "")
    o = xtf.classify(image, "partial\n", "xenicorn: crash: guest asked\nxenicorn:   detail\n", 1, 1.0, 30)
    assert o.result == "CRASH" and o.reason == "crash: guest asked (exit status 1)"
    assert xtf.classify(image, "", "", None, 1.0, 30).reason.startswith("killed")


def test_the_xl_config_beside_an_image_gives_vcpus_and_memory(tmp_path):
    image = tmp_path / "test-hvm32-xsa-472-3"
    shutil.copy(firmware.find("hello32"), image)
    (tmp_path / "test-hvm32-xsa-472-3.cfg").write_text(
        'name="test-hvm32-xsa-472-3"\nvcpus=1 \nmemory=128\n# Test Extra Configuration:\n'
        'viridian = [ "base", "reference_tsc" ]\nvcpus = 3\n')
    (found,), pv = xtf.find_images([str(tmp_path)])
    assert (found.test, found.env, found.vcpus, found.memory, pv) == ("xsa-472-3", "hvm32", 3, 128, 0)
    cmd = xtf.command(found, 30, ["--vendor", "amd"])
    assert cmd[-6:] == ["-smp", "3", "-m", "128", "--vendor", "amd"]


def test_junit_holds_console_bytes_xml_cannot(tmp_path):
    image = xtf.Image(Path("test-hvm64-x"), "hvm64", "x")
    o = xtf.classify(image, "bell\x07 nul\x00\nTest result: ERROR\n", "", 0, 1.0, 30)
    xtf.write_junit(str(tmp_path / "j.xml"), [o])
    case = ET.parse(tmp_path / "j.xml").getroot().find("testsuite/testcase")
    assert "bell\\x07 nul\\x00" in case.find("system-out").text
    assert case.find("error").get("type") == "ERROR"


def test_reasons_follow_xtf_conventions():
    image = xtf.Image(Path("test-hvm64-x"), "hvm64", "x")
    fep = "XSA-123 PoC\nFEP unavailable, but needed by test. (Is Xen support\n" \
          "compiled in, and booted with 'hvm_fep'?)\nTest result: SKIP\n"
    assert xtf.classify(image, fep, "", 0, 1.0, 30).reason == \
        "FEP unavailable, but needed by test. (Is Xen support compiled in, and booted with 'hvm_fep'?)"
    fpu = "Testing SSE\n  Expected #UD, got #NM (cr0: TS)\nFEP support not detected - some tests will be " \
          "skipped\nTest result: FAILURE\n"
    assert xtf.classify(image, fpu, "", 0, 1.0, 30).reason == "Expected #UD, got #NM (cr0: TS)"
    skip = "Software interrupt emulation\nFEP support not detected - some tests will be skipped\n" \
           "Test cpl0\n  Testing int3\n  Testing into\nTest result: SKIP\n"
    assert xtf.classify(image, skip, "", 0, 1.0, 30).reason == \
        "FEP support not detected - some tests will be skipped"
    panic = "Test\nPANIC: PANIC: Unhandled exception at 0023:10401e\nVec 6 #UD\n"
    o = xtf.classify(image, panic, "xenicorn: crash: SCHEDOP_shutdown(crash)\n", 1, 1.0, 30)
    assert o.reason == "guest PANIC: Unhandled exception at 0023:10401e / Vec 6 #UD; " \
                       "crash: SCHEDOP_shutdown(crash) (exit status 1)"


def load_census():
    import importlib.util
    spec = importlib.util.spec_from_file_location("xtf_census", ROOT / "tools" / "xtf_census.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_census_rebuilt_from_a_junit_file_explains_each_result(tmp_path):
    census = load_census()

    def outcome(name, out, status=0):
        m = xtf.IMAGE_NAME.match(name)
        return xtf.classify(xtf.Image(Path(name), m.group(1), m.group(2)), out, "", status, 1.5, 30)

    outcomes = [
        outcome("test-hvm64-selftest", "Fail: xtf_init_grant_table(2) returned -5\nTest result: FAILURE\n"),
        outcome("test-hvm32-xsa-123", "FEP unavailable, but needed by test. (Is Xen support\n"
                                      "compiled in, and booted with 'hvm_fep'?)\nTest result: SKIP\n"),
        outcome("test-hvm32-brand-new", "", status=124),
        outcome("test-hvm32-xsa-472-1", "Test result: SUCCESS\n"),
        outcome("test-hvm64-example", "Test result: SUCCESS\n"),
    ]
    xtf.write_junit(str(tmp_path / "run.xml"), outcomes)
    back = census.from_junit(str(tmp_path / "run.xml"))
    assert [(o.image.name, o.image.test, o.image.env, o.result, o.reason) for o in back] == \
        [(o.image.name, o.image.test, o.image.env, o.result, o.reason) for o in outcomes]

    (tmp_path / "xtf" / "tests").mkdir(parents=True)
    out = tmp_path / "census.md"
    assert census.main(["--xtf", str(tmp_path / "xtf"), "--from-junit", str(tmp_path / "run.xml"),
                        "--out", str(out)]) == 0
    md = out.read_text()
    assert "| SUCCESS | 2 |" in md and "| SKIP | 1 |" in md and "| CRASH | 1 |" in md and "| total | 5 |" in md
    rows = {ln.split("|")[1].strip() + "/" + ln.split("|")[2].strip(): ln for ln in md.splitlines()
            if ln.startswith("| ") and ln.count("|") == 7}
    assert "grant tables v2" in rows["selftest/hvm64"]
    assert "Fail: xtf_init_grant_table(2) returned -5" in rows["selftest/hvm64"]
    assert "hvm_fep" in rows["xsa-123/hvm32"] and census.XEN in rows["xsa-123/hvm32"]
    assert "unexplained" in rows["brand-new/hvm32"] and "no result within the 30 s timeout" in md
    assert "example/hvm64" not in rows
    assert "**xsa-472-1**" in md and "**invlpg**" not in md         # notes only on what succeeded here
    assert census.main(["--xtf", str(tmp_path / "nothing")]) == 2
