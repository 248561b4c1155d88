"""CPU models (--cpu MODEL[,+feat,-feat]): parsing, the CPUID each model answers, the engine CPU
that follows it, and the cpufeat32/64 kernels, which check from inside that an offered feature
works and an unoffered one is #UD / #GP."""
import subprocess
import sys

import pytest

from xenicorn.engine import cpufeatures, rawctx
from xenicorn.x86 import cpumodel
from xenicorn.x86 import cpuid as C
from xenicorn.x86.cpuid import CpuidPolicy
from xenicorn.x86.crcheck import CR4_OSXSAVE, CR4_PKE, CR4_SMAP, CR4_SMEP, cr4_valid_bits, features_from_cpuid

from test_firmware import run

MINUS_ALL = "max,-smep,-smap,-pku,-rdtscp,-xsave,-clflushopt,-clwb,-fsgsbase"


# -- parsing -------------------------------------------------------------------------------------
def test_default_adds_nothing_and_max_everything():
    assert cpumodel.parse("default").is_default and cpumodel.parse("default").spec == "default"
    m = cpumodel.parse("max")
    assert m.spec == "max" and m.features == tuple(sorted(cpumodel.FEATURES))
    for name in ("smep", "smap", "pku", "rdtscp", "xsave", "xsaveopt", "clflushopt", "clwb", "fsgsbase"):
        assert m.has(name)


def test_plus_and_minus_use_qemus_names_and_dependencies():
    m = cpumodel.parse("max,-pku,-xsave")
    assert not m.has("pku") and not m.has("xsave")
    assert not m.has("xsaveopt") and not m.has("xgetbv1")      # they need XSAVE, as in QEMU
    assert m.spec == "max,-pku,-xgetbv1,-xsave,-xsaveopt"
    assert cpumodel.parse("default,+smap,+rdtscp").features == ("rdtscp", "smap")
    assert cpumodel.parse("default,+xsaveopt").features == ()  # without xsave it is dropped
    assert cpumodel.parse("default,smap=on,sse4_1=on").features == ("smap", "sse4.1")
    assert cpumodel.parse("max,-smap,+smap").has("smap")      # the last word wins


@pytest.mark.parametrize("spec,words", [
    ("qemu64", "unknown CPU model 'qemu64'"), ("max,+la57", "unknown or unsupported feature 'la57'"),
    ("max,-vmx", "unknown or unsupported feature 'vmx'"), ("max,smap", "expected +FEATURE or -FEATURE"),
    ("", "unknown CPU model ''")])
def test_bad_models_and_features_are_one_clear_error(spec, words):
    with pytest.raises(cpumodel.CpuModelError) as e:
        cpumodel.parse(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_refuses_a_bad_cpu_with_one_line_and_status_2():
    p = subprocess.run([sys.executable, "-m", "xenicorn", "run", "hello64", "--cpu", "max,+vmx"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "'vmx'" in p.stderr


# -- CPUID ---------------------------------------------------------------------------------------
def test_default_model_answers_exactly_as_before():
    q = CpuidPolicy().query
    assert q(1, 0)[2:] == (C.LEAF1_ECX, C.LEAF1_EDX)
    assert q(7, 0) == (0, 0, C.LEAF7_ECX, C.LEAF7_EDX_ARCH_CAPABILITIES)
    assert q(0xD, 0) == q(0xD, 1) == (0, 0, 0, 0)
    assert q(0x80000001, 0) == (0, 0, C.EXT1_ECX, C.EXT1_EDX)
    assert q(1, 0, cr4=CR4_OSXSAVE)[2] == C.LEAF1_ECX and q(7, 0, cr4=CR4_PKE)[2] == C.LEAF7_ECX
    assert CpuidPolicy().feature_words() is None              # the engine is left as it was


def test_max_model_leaves():
    p = CpuidPolicy(model=cpumodel.parse("max"))
    _, _, ecx, edx = p.query(1, 0)
    assert edx == C.LEAF1_EDX and ecx & C.LEAF1_ECX == C.LEAF1_ECX and ecx >> 26 & 1 and not ecx >> 27 & 1
    _, ebx, ecx, edx = p.query(7, 0)
    assert ebx == sum(1 << b for b in (0, 3, 7, 8, 9, 19, 20, 22, 23, 24)) and ecx == C.LEAF7_ECX | 1 << 3
    assert edx == C.LEAF7_EDX_ARCH_CAPABILITIES
    assert p.query(0x80000001, 0)[3] == C.EXT1_EDX | 1 << 26 | 1 << 27
    assert p.query(0x80000001, 0)[2] == C.EXT1_ECX | 1 << 5
    # XSAVE: x87, SSE and PKRU; sizes for the vCPU's XCR0 and for all; XSAVEOPT and XGETBV1
    assert p.query(0xD, 0, xcr0=1) == (0x203, 576, 0xA88, 0)
    assert p.query(0xD, 0, xcr0=0x203) == (0x203, 0xA88, 0xA88, 0)
    assert p.query(0xD, 1) == (0b101, 0, 0, 0)
    assert p.query(0xD, 9) == (8, 0xA80, 0, 0) and p.query(0xD, 2) == (0, 0, 0, 0)


def test_osxsave_and_ospke_follow_cr4():
    p = CpuidPolicy(model=cpumodel.parse("max"))
    assert p.query(1, 0, cr4=CR4_OSXSAVE)[2] >> 27 & 1
    assert p.query(7, 0, cr4=CR4_PKE)[2] == C.LEAF7_ECX | (1 << 3) | (1 << 4)
    q = CpuidPolicy(model=cpumodel.parse("max,-xsave,-pku"))
    assert not q.query(1, 0, cr4=CR4_OSXSAVE)[2] >> 26 & 3 and q.query(7, 0, cr4=CR4_PKE)[2] == C.LEAF7_ECX
    assert q.query(0xD, 0) == (0, 0, 0, 0)


def test_cr4_checks_follow_the_model():
    def valid(spec):
        return cr4_valid_bits(features_from_cpuid(CpuidPolicy(model=cpumodel.parse(spec)).query))
    assert valid("max") & (CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_OSXSAVE) == CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_OSXSAVE
    assert not valid("max,-smap,-pku") & (CR4_SMAP | CR4_PKE)
    assert not valid("default") & (CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_OSXSAVE)


# -- the engine CPU ------------------------------------------------------------------------------
def test_every_offered_feature_is_one_tcg_executes():
    for name, (word, bit) in cpumodel.FEATURES.items():
        assert cpufeatures.TCG_MASKS[word] >> bit & 1, name


@pytest.mark.parametrize("spec", ["max", MINUS_ALL, "default,+smap"])
def test_engine_feature_words_are_the_models(spec):
    words = CpuidPolicy(model=cpumodel.parse(spec)).feature_words()
    uc = cpufeatures.new_engine(words)
    got = cpufeatures.engine_words(uc)
    for name in cpufeatures.WORD_INDEX:
        assert got[name] == words[name] & cpufeatures.TCG_MASKS[name], name
    assert got["xcr0"] == words["xcr0"]
    assert rawctx.RawContext(uc).read(rawctx.OFF_XCR0, "<Q") == 1     # XCR0's reset value


def test_default_engine_is_unicorns_own():
    from unicorn import Uc, UC_ARCH_X86, UC_MODE_64
    assert cpufeatures.engine_words(cpufeatures.new_engine(None)) == \
        cpufeatures.engine_words(Uc(UC_ARCH_X86, UC_MODE_64))


def test_feature_word_selftest_passes_on_this_build():
    rawctx.feature_selftest.cache_clear()
    rawctx.feature_selftest()


# -- from inside: cpufeat32 / cpufeat64 ----------------------------------------------------------
FEATS = ("smep", "smap", "pku", "rdtscp", "xsave", "xsaveopt", "clflushopt", "clwb", "fsgsbase")


@pytest.mark.parametrize("name", ["cpufeat32", "cpufeat64"])
def test_offered_features_work_in_the_guest(name):
    machine, _, status, text = run(name, cpu="max")
    assert status == 0, text
    for feat in FEATS:
        assert f"{feat}: offered" in text
    for line in ("SMEP: supervisor fetch from a user page is #PF: vector 14 error 0x11",
                 "SMAP: supervisor read of a user page with AC=0 is #PF: vector 14 error 0x1",
                 "SMAP: supervisor write of a user page with AC=0 is #PF: vector 14 error 0x3",
                 "SMAP: the read after STAC: no fault", "CPUID OSPKE set with CR4.PKE",
                 "RDTSCP: ECX = TSC_AUX 0x1234 (got 0x1234)", "XCR0 is 1 after reset",
                 "XSETBV with a component CPUID does not list is #GP(0): vector 13 error 0x0",
                 "leaf 0xD: EBX = ECX = 0xa88 with PKRU", "CLWB: no fault", "CLFLUSHOPT: no fault"):
        assert "ok " + line in text, line
    if name == "cpufeat64":
        assert "ok PKU: read of a page whose key is access-disabled is #PF with PK: vector 14 error 0x21" in text
        assert "ok WRFSBASE/RDFSBASE round-trip (0x123456789a)" in text
    assert "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS")
    vcpu = machine.vcpu
    assert vcpu.msr_read(0xC0000103) == 0x1234 and vcpu.xcr0() == 1      # TSC_AUX kept, XCR0 put back
    assert not vcpu.reg("cr4") & (CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_OSXSAVE)


@pytest.mark.parametrize("name", ["cpufeat32", "cpufeat64"])
def test_features_taken_away_fault_in_the_guest(name):
    _, _, status, text = run(name, cpu=MINUS_ALL)
    assert status == 0, text
    for feat in FEATS:
        assert f"{feat}: not offered" in text
    for line in ("CR4.SMEP set refused: #GP(0)", "CR4.SMAP set refused: #GP(0)", "CR4.PKE set refused: #GP(0)",
                 "CR4.OSXSAVE set refused: #GP(0)", "CR4.FSGSBASE set refused: #GP(0)",
                 "STAC without SMAP is #UD: vector 6", "RDTSCP not offered is #UD: vector 6",
                 "XGETBV with CR4.OSXSAVE clear is #UD: vector 6", "CLFLUSHOPT not offered is #UD: vector 6",
                 "CLWB not offered is #UD: vector 6"):
        assert "ok " + line in text, line
    assert "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS")


def test_default_model_keeps_its_one_known_gap():
    """Under ``default`` the engine is Unicorn's own, which executes RDTSCP that CPUID does not
    report (kept so that nothing changes for existing guests); everything else refuses."""
    _, _, _, text = run("cpufeat64")
    for feat in FEATS:
        assert f"{feat}: not offered" in text
    fails = [ln for ln in text.splitlines() if ln.startswith("FAIL")]
    assert fails == ["FAIL RDTSCP not offered is #UD: vector 6 error 0x0 (got 0 faults, vector 0 error 0x0)"]


def test_a_snapshot_loads_only_into_a_machine_of_the_same_cpu_model():
    from xenicorn.machine.machine import Machine, MachineConfig
    from xenicorn.snapshot import SnapshotError, capture, check_compatible
    snap = capture(Machine(MachineConfig(cpu="max,-pku", ram_mib=16)))
    check_compatible(Machine(MachineConfig(cpu="max,-pku", ram_mib=16)), snap)
    for other in ("max", "default"):
        with pytest.raises(SnapshotError, match="CPU features"):
            check_compatible(Machine(MachineConfig(cpu=other, ram_mib=16)), snap)
    with pytest.raises(SnapshotError, match="the default CPU model"):
        check_compatible(Machine(MachineConfig(cpu="max", ram_mib=16)), capture(Machine(MachineConfig(ram_mib=16))))


# -- each offered instruction runs with its feature and is #UD without it ----------------------
# (64-bit code; the engine's reset CR4 has OSXSAVE and FSGSBASE on; RAX points at scratch memory)
INSNS = {
    "pclmulqdq": "660f3a44c100", "ssse3": "660f3800c1", "sse4.1": "660f3840c1", "sse4.2": "660f3837c1",
    "movbe": "0f38f000", "aes": "660f38dcc1", "rdrand": "0fc7f0", "xsave": "0f01d0",
    "xsaveopt": "0fae30", "fsgsbase": "f3480faec0", "bmi1": "c4e270f2c2", "bmi2": "c4e271f7c2",
    "adx": "660f38f6c1", "smap": "0f01cb", "clflushopt": "660fae38", "clwb": "660fae30",
    "pcommit": "660faef8", "rdtscp": "0f01f9",
}


def _run_insn(spec: str, code: str, rcx: int = 0):
    from unicorn import UC_HOOK_INSN_INVALID, UC_HOOK_INTR
    from unicorn import x86_const as X
    uc = cpufeatures.new_engine(CpuidPolicy(model=cpumodel.parse(spec)).feature_words())
    uc.mem_map(0x10000, 0x10000)
    uc.mem_write(0x10000, bytes.fromhex(code))
    uc.reg_write(X.UC_X86_REG_RAX, 0x18000)
    uc.reg_write(X.UC_X86_REG_RDX, 0)
    uc.reg_write(X.UC_X86_REG_RCX, rcx)
    seen = []

    def stop(uc, *args):
        seen.append(args[0] if isinstance(args[0], int) else 6)
        uc.emu_stop()
        return True
    uc.hook_add(UC_HOOK_INSN_INVALID, lambda uc, _: stop(uc, 6))
    uc.hook_add(UC_HOOK_INTR, lambda uc, intno, _: stop(uc, intno))
    uc.emu_start(0x10000, 0x10000 + len(code) // 2)
    return seen, uc


@pytest.mark.parametrize("feat", sorted(INSNS))
def test_each_offered_instruction_runs_and_is_ud_without_its_feature(feat):
    assert _run_insn("max", INSNS[feat])[0] == [], f"{feat} faults under max"
    assert _run_insn(f"max,-{feat}", INSNS[feat])[0] == [6], f"{feat} runs without its feature"


def test_lzcnt_is_lzcnt_with_abm_and_bsr_without():
    from unicorn import x86_const as X
    code = "f30fbdc1"                                       # lzcnt eax, ecx (BSR without ABM)
    assert _run_insn("max", code, rcx=1)[1].reg_read(X.UC_X86_REG_RAX) == 31
    assert _run_insn("max,-abm", code, rcx=1)[1].reg_read(X.UC_X86_REG_RAX) == 0


def test_xgetbv1_and_pku_instructions_follow_the_model():
    assert _run_insn("max", "0f01d0", rcx=1)[0] == []                   # XGETBV(1): XCR0 & XINUSE
    assert _run_insn("max,-xgetbv1", "0f01d0", rcx=1)[0] == [13]
    # MOV CR4 setting PKE, then RDPKRU: without PKU the engine drops CR4.PKE and RDPKRU is #UD.
    # (The guest's own MOV: Unicorn's reg_write stores CR4 as given after its checks.)
    code = "0f20e0" "0d00004000" "0f22e0" "31c9" "0f01ee"
    assert _run_insn("max", code)[0] == []
    assert _run_insn("max,-pku", code)[0] == [6]


def test_xen_leaves_are_the_same_under_every_model():
    from xenicorn.machine.machine import Machine, MachineConfig
    answers = []
    for spec in ("default", "max"):
        m = Machine(MachineConfig(cpu=spec, ram_mib=16))
        answers.append([m.cpuid.query(0x40000000 + n, 0) for n in (0, 1, 3, 4)])
    assert answers[0] == answers[1] and answers[0][0][0] == 0x40000005


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_debian_linux_under_max_uses_the_offered_features(tmp_path):
    """Linux takes what ``max`` offers: XSAVE with x87, SSE and PKRU, and turns on SMEP, SMAP,
    PKE, FSGSBASE and OSXSAVE in CR4 (checked in the machine after it powered off)."""
    from test_linuxboot import USERSPACE, boot_debian
    machine, text = boot_debian(tmp_path, cpu="max")
    assert USERSPACE in text and machine.shutdown_reason == "poweroff", text[-2000:]
    assert "x86/fpu: Enabled xstate features 0x203, context size is 2696 bytes" in text
    assert machine.vcpu.xcr0() == 0x203
    want = CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_OSXSAVE | (1 << 16)
    assert machine.vcpu.reg("cr4") & want == want, hex(machine.vcpu.reg("cr4"))
