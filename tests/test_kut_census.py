"""tools/kut_census.py: the unittests.cfg reader, the option mapping and the verdicts.

No kvm-unit-tests tree is needed: the cfg text and the exit statuses are
written here as the suite's scripts (runtime.bash, arch-run.bash) define them.
"""
import importlib.util
import os
import sys

import pytest

_spec = importlib.util.spec_from_file_location(
    "kut_census", os.path.join(os.path.dirname(__file__), "..", "tools", "kut_census.py"))
kut = importlib.util.module_from_spec(_spec)
sys.modules["kut_census"] = kut                 # its dataclasses look their module up
_spec.loader.exec_module(kut)

CFG = '''##############
# comment
[smptest3]
file = smptest.flat
smp = 3

[svm]
file = svm.flat
smp = 2
test_args = "-pause_filter_test"
qemu_params = -cpu max,+svm -m 4g
arch = x86_64
groups = svm
timeout = 2m

[multi]
file = a.flat
qemu_params = """-cpu qemu64,vendor=AuthenticAMD \\
-machine pit=off"""
groups = nodefault

#[init]
#file = init.flat

[kvm]
file = pmu.flat
accel = kvm
'''


def test_cfg_sections_keys_and_multiline_params():
    tests = {t.name: t for t in kut.parse_cfg(CFG)}
    assert list(tests) == ["smptest3", "svm", "multi", "kvm"]          # a commented-out section is no test
    assert tests["smptest3"].smp == 3 and tests["smptest3"].timeout == 90.0
    svm = tests["svm"]
    assert svm.test_args == '"-pause_filter_test"' and svm.arch == "x86_64" and svm.timeout == 120.0
    assert kut.expand(svm.test_args) == ["-pause_filter_test"]
    assert " ".join(kut.expand(tests["multi"].qemu_params)) == "-cpu qemu64,vendor=AuthenticAMD -machine pit=off"


def test_qemu_options_map_to_xenicorn_or_are_listed_as_needs():
    tests = {t.name: t for t in kut.parse_cfg(CFG)}
    opts, needs = kut.xenicorn_options(tests["svm"])
    assert opts == ["--cpu", "max", "-m", "3584"]
    assert needs[0] == "-cpu max: +svm" and needs[1].startswith("-m 4g")
    opts, needs = kut.xenicorn_options(tests["multi"])
    assert opts == ["--vendor", "amd"] and needs == ["-machine pit=off"]


@pytest.mark.parametrize("val,opts,needs", [
    ("max", ["--cpu", "max"], []),
    ("max,host-phys-bits", ["--cpu", "max"], ["-cpu max: host-phys-bits"]),
    ("max,+vmx,-pku", ["--cpu", "max,-pku"], ["-cpu max: +vmx"]),
    ("max,+svm,-rdtscp,-xsave,-invpcid,-skinit", ["--cpu", "max,-rdtscp,-xsave"], ["-cpu max: +svm"]),
    ("qemu64,+umip", [], []),                            # every model reports UMIP
    ("qemu64,+pcid,+invpcid", [], ["-cpu qemu64: +pcid,+invpcid"]),
    ("qemu64,-pcid,-invpcid", [], []),                  # xenicorn offers neither: already true
    ("qemu64,+smap", ["--cpu", "default,+smap"], []),
    ("max,-nx", ["--cpu", "max"], ["-cpu max: -nx"]),    # every model has NX
    ("host,hv_passthrough", [], ["-cpu host,hv_passthrough"]),
    ("Skylake-Server,vendor=AuthenticAMD", ["--vendor", "amd"], ["-cpu Skylake-Server,vendor=AuthenticAMD"]),
])
def test_cpu_models_map_to_xenicorns_cpu_option(val, opts, needs):
    assert kut.cpu_option(val) == (opts, needs)


def test_skip_reasons_follow_the_runner(tmp_path):
    tests = {t.name: t for t in kut.parse_cfg(CFG)}
    flat = tmp_path / "smptest.flat"
    flat.write_bytes(b"")
    assert kut.skip_reason(tests["smptest3"], "x86_64", str(flat), False, "tcg") == ""
    assert "i386" not in kut.skip_reason(tests["svm"], "x86_64", str(flat), False, "tcg")
    assert kut.skip_reason(tests["svm"], "i386", str(flat), False, "tcg").startswith("x86_64 only")
    assert kut.skip_reason(tests["multi"], "x86_64", str(flat), False, "tcg").startswith("nodefault")
    assert kut.skip_reason(tests["multi"], "x86_64", str(flat), True, "tcg") == ""
    assert kut.skip_reason(tests["kvm"], "x86_64", str(flat), False, "tcg") == "kvm only"
    assert "not built" in kut.skip_reason(tests["smptest3"], "x86_64", str(tmp_path / "no.flat"), False, "tcg")


@pytest.mark.parametrize("status, out, err, vmm, verdict", [
    (1, "SUMMARY: 3 tests\n", "xenicorn: debug-exit: isa-debug-exit wrote 0x0\n", "xenicorn", "PASS"),
    (1, "", "qemu-system-x86_64: warning: TCG doesn't support requested feature\n", "qemu", "PASS"),
    (1, "", "qemu-system-x86_64: CPU model 'host' requires KVM or HVF\n", "qemu", "CRASH"),
    (1, "hello\n", "xenicorn: halted: vCPU asleep (HLT)\n", "xenicorn", "TIMEOUT"),
    (1, "hello\n", "xenicorn: triple-fault: triple fault: #GP\n", "xenicorn", "FAIL"),
    (1, "", "Traceback (most recent call last):\n  ...\nKeyError: 3\n", "xenicorn", "CRASH"),
    (3, "PASS: a\nFAIL: b\nSUMMARY: 2 tests, 1 unexpected failures\n", "", "qemu", "FAIL"),
    (77, "SKIP: no feature\nSUMMARY: 1 tests, 1 skipped\n", "", "qemu", "SKIP"),
    (124, "PASS: a\n", "", "qemu", "TIMEOUT"),
    (127, "x86/apic.c:942: assert failed: x\n", "", "qemu", "FAIL"),
    (0, "PASS: a\n", "", "qemu", "FAIL"),                 # no debug exit (QEMU's --no-reboot)
    (-6, "", "", "qemu", "CRASH"),                        # killed by SIGABRT
])
def test_exit_statuses_map_to_the_suites_verdicts(status, out, err, vmm, verdict):
    assert kut.classify(status, out, err, vmm).verdict == verdict


def test_first_failing_line_and_summary_are_kept():
    r = kut.classify(3, "PASS: a\nFAIL: NP exception\nFAIL: NMI\nSUMMARY: 3 tests, 2 unexpected failures\n", "",
                     "xenicorn")
    assert r.reason == "FAIL: NP exception" and r.summary == "SUMMARY: 3 tests, 2 unexpected failures"
    assert kut.cell(r) == "FAIL (3 tests, 2 unexpected failures)"
