"""Segment faults before page faults (x86/segcheck.py): the memseg kernels, the trace, the cost rule."""
import re
import shutil
import subprocess

import pytest

from xenicorn import firmware
from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import MachineConfig

from xenicorn.x86 import segcheck
from xenicorn.x86.segments import DESC_P, SegmentCache

from test_firmware import boot, run


@pytest.mark.parametrize("name,checks", [("memseg32", 13), ("memseg64", 10)])
def test_memseg_kernels_see_the_sdm_faults(name, checks, capsys):
    machine, _, status, text = run(name, trace={"int"})
    assert "FAIL" not in text, text
    assert text.count("\nok ") == checks
    assert text.rstrip().endswith("Test result: SUCCESS") and status == 0
    err = capsys.readouterr().err
    fixes = [line for line in err.splitlines() if "segment check:" in line]
    if name == "memseg32":
        # the engine page-faulted; the CPU faults on the segment first, and the trace says why
        assert any("the engine raised #PF(0x5), the CPU raises #GP(0): ds: offset 0xc0000000 (+1) is past "
                   "limit 0x7fffffff" in line for line in fixes), fixes
        assert any("the engine raised #PF(0x7), the CPU raises #SS(0): ss: offset 0xc0000000 (+4) is past limit"
                   in line for line in fixes), fixes                   # PUSH's implicit store
        assert any("#GP(0): gs holds a null selector" in line for line in fixes), fixes
        assert any("inside expand-down limit 0x7fffffff" in line for line in fixes), fixes
        assert len(fixes) == 8                                  # all but the two real #PFs and the gap
        assert "past the limit onto a mapped user page: no fault" in text     # the documented gap
    else:
        assert any("the engine raised #GP(0x0), the CPU raises #SS(0): ss: linear 0x8000000040000000 is not "
                   "canonical" in line for line in fixes), fixes
        assert len(fixes) == 4                                  # (%rbp), (%rsp), %ds:(%rbp), push
    assert machine.vcpu.reg("cr2") == (0x90000000 if name == "memseg32" else 0x10000000000)   # the last real #PF


def flat_segments():
    return [SegmentCache(0x18, 0, 0xFFFFFFFF, DESC_P | (0x3 << 8)) for _ in range(6)]


class FakeVcpu:
    """Just enough of a vCPU for segcheck.correct() to decide whether to decode."""

    def __init__(self, segs, bits, pe=True):
        self.segs = segs
        self.live = self
        self.cpl = 3
        self.has_descriptors = pe
        self.code_bits = bits

    def segment(self, i):
        return self.segs[i]

    def gprs(self):
        return (0,) * 16

    def read_linear(self, *args, **kw):
        raise AssertionError("decoded an instruction that cannot need it")


def test_flat_page_faults_are_not_decoded():
    """The cost rule: a flat 32-bit guest's #PF, a 64-bit #PF or #GP(sel) pays no decode."""
    assert segcheck.correct(FakeVcpu(flat_segments(), 32), 14, 0x4, 0x1000) is None
    based = flat_segments()
    based[4] = SegmentCache(0x30, 0x12345000, 0xFFFFFFFF, DESC_P | (0x3 << 8))   # a per-CPU FS base
    assert segcheck.correct(FakeVcpu(based, 32), 14, 0x4, 0x1000) is None
    assert segcheck.correct(FakeVcpu(flat_segments(), 64), 14, 0x4, 0x1000) is None
    assert segcheck.correct(FakeVcpu(flat_segments(), 64), 13, 0x1230, 0x1000) is None
    assert segcheck.correct(FakeVcpu(flat_segments(), 32, pe=False), 13, 0, 0x1000) is None
    limited = flat_segments()
    limited[5] = SegmentCache(0x4B, 0, 0x7FFFFFFF, DESC_P | (0x3 << 8))
    with pytest.raises(AssertionError):                           # a limited GS: this one decodes
        segcheck.correct(FakeVcpu(limited, 32), 14, 0x4, 0x1000)


def check_name(line):
    """A check line without its verdict and the values it printed."""
    return re.sub(r"(: vec=.*| \(0x[0-9a-f]+\)|: 0x[0-9a-f]+)$", "", line.split(" ", 1)[1])


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU not installed")
@pytest.mark.parametrize("name", ["memseg32", "memseg64"])
def test_qemu_tcg_skips_the_same_checks_the_engine_does(name):
    """Real QEMU TCG runs the same image: the page faults and #GPs it raises agree with ours, and the
    checks it fails are exactly the segment checks xenicorn makes at the exception (QEMU adds a
    segment's base and never tests its limit, and reports non-canonical stack accesses as #GP)."""
    res = subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-m", "128", "-kernel", firmware.find(name),
                          "-debugcon", "stdio", "-device", "isa-debug-exit,iobase=0xf4",
                          "-display", "none", "-no-reboot"], capture_output=True, text=True, timeout=60)
    qemu = {check_name(line): line.split(" ", 1)[0]
            for line in res.stdout.splitlines() if line.startswith(("ok ", "FAIL "))}
    _, _, _, text = run(name)
    ours = [check_name(line) for line in text.splitlines() if line.startswith("ok ")]
    assert sorted(qemu) == sorted(ours)
    failed = {what for what, verdict in qemu.items() if verdict == "FAIL"}
    if name == "memseg32":
        segment_faults = {what for what in qemu if "#GP(0)" in what or "#SS(0)" in what}
        assert len(segment_faults) == 8
        assert failed == segment_faults | {"CR2 untouched by the segment fault"}     # QEMU wrote CR2 there
    else:
        assert failed == {"non-canonical (%rbp): #SS(0)", "non-canonical (%rsp): #SS(0)",
                          "non-canonical %ds:(%rbp), the override ignored: #SS(0)",
                          "push with a non-canonical RSP: #SS(0)"}


@pytest.mark.parametrize("name,checks", [("memseg32", 13), ("memseg64", 10)])
def test_page_faults_while_the_msr_window_is_open(name, checks):
    """With HF_GUEST set (the intercept window, engine/msr.py) the #PF intercept turns a page fault
    into SVM exit 0x14E: it must arrive as the same #PF, with the same error code and CR2."""
    m, _ = boot(MachineConfig(debugcon="none", xen_log="none"), firmware.find(name), console=ConsoleSink(None))
    m.vcpu.msr.open("test")
    status = m.run()
    text = m.console.text()
    assert status == 0 and "FAIL" not in text and text.count("\nok ") == checks, text
    assert m.vcpu.msr.is_open
    assert m.vcpu.reg("cr2") == (0x90000000 if name == "memseg32" else 0x10000000000)
