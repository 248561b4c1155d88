"""UMIP (CR4 bit 11): SGDT/SIDT/SLDT/STR/SMSW are #GP(0) at CPL > 0 while it is set.

The umip32/umip64 kernels check it from inside (every destination form at
CPL 0 and 3, UMIP off, on, off); the machine's side is checked here: the
exits that did it, the intercepts armed exactly while UMIP is on, a
snapshot taken with it on, what the decoder stores, and XTF's and
kvm-unit-tests' own umip tests.
"""
import os
import re
import subprocess
import sys

import pytest

from xenicorn import exits as E
from xenicorn.engine.msr import INTERCEPT_UMIP
from xenicorn.engine.vcpustate import VcpuRecord
from xenicorn.records import RecordError
from xenicorn.x86 import umip
from xenicorn.x86.cpuid import CpuidPolicy

from test_firmware import run
from test_snapshot import make

XTF_TESTS = os.environ.get("XTF_TESTS", "/work/xtf-src/tests")
KUT = os.environ.get("KUT_DIR", "/work/kut-src")
# the intercepted instructions the kernel runs with UMIP on: SGDT, SIDT, and SLDT/STR/SMSW to m16, r16,
# r32 (and r64), at CPL 0 and again at CPL 3; at CPL 0 also MOV from CR0 (and a non-canonical SGDT)
EXITS = {"umip32": 2 * (2 + 3 * 3) + 1, "umip64": 2 * (2 + 3 * 4) + 2}


@pytest.mark.parametrize("name, checks", [("umip32", 40), ("umip64", 43)])
def test_the_kernel_sees_umip_from_cpuid_to_gp_at_cpl3(name, checks):
    machine, _, status, text = run(name)
    assert "FAIL" not in text, text
    assert text.rstrip().endswith("Test result: SUCCESS") and status == 0, text
    assert len(re.findall(r"^ok ", text, re.M)) == checks
    assert "CPL 3, UMIP on: every SMSW form is #GP" in text and "CPL 0, UMIP on: SGDT stores what" in text
    # each instruction with UMIP on was one exit; none with UMIP off (the kernel runs all five then too)
    assert machine.exit_counts["SystemRead"] == EXITS[name]
    vcpu = machine.vcpu
    assert not vcpu.reg("cr4") & umip.CR4_UMIP                    # cleared again at the end...
    assert not vcpu.msr.extra & INTERCEPT_UMIP and "umip" not in vcpu.msr.interests   # ...and disarmed


def test_policy_reports_umip():
    assert CpuidPolicy().query(7, 0)[2] & umip.LEAF7_ECX_UMIP
    assert not CpuidPolicy().query(7, 1)[2] & umip.LEAF7_ECX_UMIP


def test_umip_on_survives_a_snapshot_and_a_record_that_disagrees_is_refused(tmp_path):
    path = str(tmp_path / "umip.snap")
    saver = make("umip64", "")

    def listener(vcpu, ex):
        if isinstance(ex, E.CrWrite) and ex.cr == 4 and ex.value & umip.CR4_UMIP:
            vcpu.request_stop("test: a pause with UMIP on")
    saver.dispatch.listeners.append(listener)
    marks = []
    save = saver.save_snapshot
    saver.save_snapshot = lambda p: (marks.append((len(saver.console.data), saver.vcpu.msr.extra)), save(p))[1]
    saver.save_at(1, path)
    assert saver.run() == 0
    assert len(marks) == 1 and marks[0][1] & INTERCEPT_UMIP, "the snapshot was not taken with UMIP on"
    whole = bytes(saver.console.data)

    fresh = make("umip64", "")
    fresh.load_snapshot(path)
    assert fresh.vcpu.msr.extra & INTERCEPT_UMIP and "umip" in fresh.vcpu.msr.interests
    assert fresh.run() == 0
    assert whole[:marks[0][0]] + bytes(fresh.console.data) == whole
    assert b"CPL 3, UMIP on: every SGDT form is #GP (1 of 1)" in bytes(fresh.console.data)
    assert fresh.exit_counts["SystemRead"] == EXITS["umip64"]

    rec = VcpuRecord(fresh.vcpu).save_record()
    rec["state"]["msr"]["extra"] |= INTERCEPT_UMIP                  # the intercepts without the interest
    with pytest.raises(RecordError, match="UMIP"):
        VcpuRecord(fresh.vcpu).check_record(rec)
    rec["state"]["msr"]["extra"] |= 1 << 5                          # an intercept xenicorn never sets
    with pytest.raises(RecordError):
        VcpuRecord(fresh.vcpu).check_record(rec)


# -- the decoder: what each form stores (SDM vol. 2) -------------------------------------------
GDTR, IDTR, LDTR, TR, CR0 = (0x12345678_9ABCDEF0, 0x4F), (0x0011_2233_4455_6677, 0xFFF), 0x28, 0x38, 0x80050033
REGS = {"rax": 0x1111_2222_3333_4444, "rbx": 0x2000, "rsi": 0x10, "rbp": 0x100}


def store(code: str, bits: int, old: int = 0xFFFF_FFFF_FFFF_FFFF):
    st = umip.decode(bytes.fromhex(code), bits, 0x1000, lambda r: REGS.get(r, 0))
    value = umip.stored(st, bits=bits, old=old, gdtr=GDTR, idtr=IDTR, ldtr=LDTR, tr=TR, cr0=CR0)
    return st, value


def test_sgdt_sidt_store_limit_then_a_4_or_8_byte_base():
    st, v = store("0f0103", 32)                                      # sgdt [ebx]
    assert (st.name, st.width, st.mem, st.length) == ("sgdt", 6, ("ds", 0x2000), 3)
    assert v == (0x9ABCDEF0 << 16) | 0x4F
    st, v = store("660f0103", 32)                                    # 16-bit operand size: a 24-bit base
    assert st.width == 6 and v == (0xBCDEF0 << 16) | 0x4F
    st, v = store("0f010b", 64)                                      # sidt [rbx]
    assert st.width == 10 and v == (IDTR[0] << 16) | 0xFFF
    st, _ = store("0f010a", 16)                                      # sgdt [bp+si]: SS, 16-bit address
    assert st.mem == ("ss", 0x110) and st.width == 6


@pytest.mark.parametrize("code, bits, expect", [
    ("0f00c0", 32, LDTR),                                   # sldt eax: zero-extended
    ("660f00c0", 32, 0xFFFF_FFFF_FFFF_0000 | LDTR),                  # sldt ax: the low word only
    ("0f00c8", 64, TR),                                              # str eax: zero-extended to 64
    ("480f00c8", 64, TR),                                            # str rax
    ("0f01e0", 64, CR0),                                             # smsw eax: CR0[31:0] zero-extended
    ("480f01e0", 64, CR0),                                           # smsw rax
    ("660f01e0", 64, 0xFFFF_FFFF_FFFF_0033),                         # smsw ax
    ("0f01e0", 32, 0xFFFF_FFFF_FFFF_0033),                           # smsw eax outside 64-bit mode: the low word
    ("0f20c0", 64, CR0),                                             # mov rax, cr0
    ("0f20c0", 32, CR0),                                             # mov eax, cr0
])
def test_register_destinations(code, bits, expect):
    st, v = store(code, bits)
    assert st.reg == "rax" and v == expect


def test_memory_word_destinations_and_other_instructions():
    for code, name, value in (("0f0003", "sldt", LDTR), ("0f000b", "str", TR), ("0f0123", "smsw", 0x33)):
        st, v = store(code, 32)
        assert (st.name, st.width, st.mem, v) == (name, 2, ("ds", 0x2000), value)
    assert umip.decode(bytes.fromhex("0f22c0"), 64, 0, lambda r: 0) is None          # mov cr0, rax
    assert umip.decode(bytes.fromhex("90"), 64, 0, lambda r: 0) is None


# -- the test suites' own UMIP tests -----------------------------------------------------------
def _xtf(env, *args):
    image = os.path.join(XTF_TESTS, "umip", f"test-{env}-umip")
    if not os.path.exists(image):
        pytest.skip(f"XTF not built at {XTF_TESTS}")
    return subprocess.run([sys.executable, "-m", "xenicorn", "run", *args, image], capture_output=True,
                          text=True, timeout=120).stdout


@pytest.mark.parametrize("env", ["hvm32", "hvm64"])
def test_xtf_umip_succeeds_with_fep_and_natively_skips_only_the_fep_half(env):
    out = _xtf(env, "--hvm-fep")
    assert "Test result: SUCCESS" in out and "Fail" not in out, out
    out = _xtf(env)
    assert "Test result: SKIP" in out and "FEP support not detected" in out, out
    assert "UMIP is not supported" not in out and "Fail" not in out, out


def test_kvm_unit_tests_umip_runs_all_21_checks():
    flat = os.path.join(KUT, "x86", "umip.flat")
    if not os.path.exists(flat):
        pytest.skip(f"kvm-unit-tests not built at {KUT}")
    res = subprocess.run([sys.executable, "-m", "xenicorn", "run", flat, "-device", "pc-testdev", "--timeout", "90"],
                         capture_output=True, text=True, timeout=150)
    out = res.stdout + res.stderr
    assert "SUMMARY: 21 tests" in out and "FAIL" not in out and "UMIP not available" not in out, out
    assert len(re.findall(r"^PASS: ", out, re.M)) == 21
    assert "exception from sgdt" in out.split("UMIP=1, CPL=3")[1]
