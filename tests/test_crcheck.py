"""Control-register writes: the pure checks (x86/crcheck.py), the decoder (x86/crdecode.py),
and the crcheck32/64 kernels, whose refused writes must be #GP(0) at the MOV."""
import os
import re
import subprocess
import sys

import pytest

from xenicorn.x86 import crcheck as C
from xenicorn.x86.cpuid import CpuidPolicy
from xenicorn.x86.crdecode import decode

from test_firmware import run

POLICY = C.features_from_cpuid(lambda leaf, sub: CpuidPolicy().query(leaf, sub))
VALID = C.cr4_valid_bits(POLICY)
PG_PE = C.CR0_PG | C.CR0_PE | C.CR0_ET
LMA = C.EFER_LME | C.EFER_LMA


# -- CR4 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bit", [C.CR4_VMXE, C.CR4_SMXE, C.CR4_FSGSBASE, C.CR4_PCIDE, C.CR4_OSXSAVE,
                                 C.CR4_SMEP, C.CR4_SMAP, C.CR4_PKE, C.CR4_LA57, 1 << 15, 1 << 32])
def test_cr4_bits_the_policy_does_not_report_are_refused(bit):
    assert C.check_cr4(0, bit, valid=VALID, efer=0, cr3=0) is not None


@pytest.mark.parametrize("bit", [C.CR4_TSD, C.CR4_DE, C.CR4_PSE, C.CR4_PAE, C.CR4_MCE,
                                 C.CR4_PGE, C.CR4_PCE, C.CR4_OSFXSR, C.CR4_OSXMMEXCPT, C.CR4_UMIP])
def test_cr4_bits_the_policy_reports_are_taken(bit):
    assert C.check_cr4(0, bit, valid=VALID, efer=0, cr3=0) is None


def test_cr4_vme_and_pvi_follow_the_policys_vme_bit():
    reported = POLICY.has("leaf1_edx", 1)
    for bit in (C.CR4_VME, C.CR4_PVI):
        assert (C.check_cr4(0, bit, valid=VALID, efer=0, cr3=0) is None) == reported


def test_cr4_bits_follow_the_reported_features():
    f = C.Features(leaf1_ecx=(1 << 5) | (1 << 17) | (1 << 26), leaf7_ebx=(1 << 0) | (1 << 7) | (1 << 20),
                   leaf7_ecx=(1 << 2) | (1 << 3) | (1 << 16))
    valid = C.cr4_valid_bits(f)
    for bit in (C.CR4_VMXE, C.CR4_PCIDE, C.CR4_OSXSAVE, C.CR4_FSGSBASE, C.CR4_SMEP, C.CR4_SMAP, C.CR4_UMIP,
                C.CR4_PKE, C.CR4_LA57, C.CR4_PCE):
        assert valid & bit
    assert not valid & (C.CR4_VME | C.CR4_PAE | C.CR4_OSFXSR | C.CR4_SMXE)


def test_cr4_pae_cannot_be_cleared_in_long_mode():
    assert C.check_cr4(C.CR4_PAE, 0, valid=VALID, efer=LMA, cr3=0) is not None
    assert C.check_cr4(C.CR4_PAE, 0, valid=VALID, efer=C.EFER_LME, cr3=0) is None


def test_cr4_pcide_needs_long_mode_and_cr3_low_bits_clear():
    valid = VALID | C.CR4_PCIDE
    assert C.check_cr4(C.CR4_PAE, C.CR4_PAE | C.CR4_PCIDE, valid=valid, efer=0, cr3=0) is not None
    assert C.check_cr4(C.CR4_PAE, C.CR4_PAE | C.CR4_PCIDE, valid=valid, efer=LMA, cr3=0x1001) is not None
    assert C.check_cr4(C.CR4_PAE, C.CR4_PAE | C.CR4_PCIDE, valid=valid, efer=LMA, cr3=0x1000) is None


def test_cr4_la57_cannot_change_in_long_mode():
    valid = VALID | C.CR4_LA57
    assert C.check_cr4(C.CR4_PAE, C.CR4_PAE | C.CR4_LA57, valid=valid, efer=LMA, cr3=0) is not None
    assert C.check_cr4(0, C.CR4_LA57, valid=valid, efer=0, cr3=0) is None


# -- CR0 ---------------------------------------------------------------------------------------
def test_cr0_rules():
    ok = dict(cr4=0, efer=0, code64=False)
    assert C.check_cr0(0x11, 1 << 32 | 0x11, **ok) is not None                      # upper half
    assert C.check_cr0(0x11, C.CR0_PG | C.CR0_ET, **ok) is not None                   # PG without PE
    assert C.check_cr0(0x11, 0x11 | C.CR0_NW, **ok) is not None                       # NW without CD
    assert C.check_cr0(0x11, 0x11 | C.CR0_NW | C.CR0_CD, **ok) is None
    assert C.check_cr0(0x11, PG_PE, **ok) is None
    assert C.check_cr0(0x11, PG_PE, cr4=0, efer=C.EFER_LME, code64=False) is not None  # LME without PAE
    assert C.check_cr0(0x11, PG_PE, cr4=C.CR4_PAE, efer=C.EFER_LME, code64=False) is None
    assert C.check_cr0(PG_PE, 0x11, cr4=C.CR4_PAE, efer=LMA, code64=True) is not None  # leave from 64-bit code
    assert C.check_cr0(PG_PE, 0x11, cr4=C.CR4_PAE, efer=LMA, code64=False) is None     # from compatibility mode
    assert C.check_cr0(PG_PE, 0x11, cr4=C.CR4_PAE | C.CR4_PCIDE, efer=LMA, code64=False) is not None
    assert C.check_cr0(PG_PE, PG_PE | C.CR0_TS | C.CR0_WP | C.CR0_AM | C.CR0_NE | C.CR0_MP, **ok) is None


# -- EFER and XCR0 -----------------------------------------------------------------------------
def test_efer_rules():
    assert C.check_efer(0, C.EFER_SCE | C.EFER_LME | C.EFER_NXE, cr0=0, features=POLICY) is None
    assert C.check_efer(0, 1 << 1, cr0=0, features=POLICY) is not None                 # reserved
    assert C.check_efer(0, C.EFER_SVME, cr0=0, features=POLICY) is not None            # no SVM reported
    assert C.check_efer(0, C.EFER_FFXSR, cr0=0, features=POLICY) is not None
    assert C.check_efer(0, C.EFER_LME, cr0=PG_PE, features=POLICY) is not None        # LME under paging
    assert C.check_efer(LMA, LMA | C.EFER_NXE, cr0=PG_PE, features=POLICY) is None     # keeps LMA as it is
    assert C.check_efer(C.EFER_LME, LMA, cr0=0, features=POLICY) is not None           # LMA is not writable
    assert C.check_efer(0, C.EFER_NXE, cr0=0, features=C.Features()) is not None       # no NX reported


def test_xcr0_rules():
    sup = C.XCR0_X87 | C.XCR0_SSE | C.XCR0_AVX
    assert C.check_xcr0(C.XCR0_X87 | C.XCR0_SSE | C.XCR0_AVX, index=0, supported=sup) is None
    assert C.check_xcr0(C.XCR0_X87, index=1, supported=sup) is not None
    assert C.check_xcr0(C.XCR0_SSE, index=0, supported=sup) is not None                # x87 clear
    assert C.check_xcr0(C.XCR0_X87 | C.XCR0_AVX, index=0, supported=sup) is not None   # AVX without SSE
    assert C.check_xcr0(C.XCR0_X87 | 1 << 5, index=0, supported=sup) is not None       # unsupported


def test_the_policy_reports_no_xsave_so_no_xcr0():
    assert POLICY.xcr0_supported == 0 and not VALID & C.CR4_OSXSAVE


# -- decoding ----------------------------------------------------------------------------------
GPRS = [0x1000 * (i + 1) for i in range(16)]


def test_decode_mov_cr_forms():
    d = decode(bytes.fromhex("0f22e0"), 64, GPRS)               # mov cr4, rax
    assert (d.cr, d.length, d.kind, d.value(0)) == (4, 3, "mov", GPRS[0])
    d = decode(bytes.fromhex("410f22c3"), 64, GPRS)             # mov cr0, r11
    assert (d.cr, d.length, d.value(0)) == (0, 4, GPRS[11])
    d = decode(bytes.fromhex("0f22c1"), 32, [1 << 40 | 5] * 16)  # 32-bit: the low half only
    assert d.value(0) == 5
    assert decode(bytes.fromhex("0f20c0"), 32, GPRS) is None    # a read is not a write


def test_decode_clts_and_lmsw():
    assert decode(bytes.fromhex("0f06"), 32, GPRS).value(0x8000001B) == 0x80000013
    d = decode(bytes.fromhex("0f01f0"), 32, [0xFFF0] + GPRS[1:])   # lmsw ax: PE stays set
    assert (d.length, d.value(0x80000011)) == (3, 0x80000011)
    d = decode(bytes.fromhex("0f013424"), 32, GPRS)               # lmsw [esp]
    assert (d.length, d.mem) == (4, ("ss", GPRS[4]))
    d = decode(bytes.fromhex("0f013510000000"), 64, GPRS, rip=0x1000)   # lmsw [rip+0x10]
    assert (d.length, d.mem) == (7, ("ds", 0x1000 + 7 + 0x10))
    d = decode(bytes.fromhex("640f017308"), 32, GPRS)             # lmsw fs:[ebx+8]
    assert (d.length, d.mem) == (5, ("fs", GPRS[3] + 8))
    assert decode(bytes.fromhex("0f01363412"), 16, GPRS).mem == ("ds", 0x1234)     # 16-bit: lmsw [0x1234]
    d = decode(bytes.fromhex("0f017205"), 16, GPRS)                                  # lmsw [bp+si+5]
    assert (d.length, d.mem) == (4, ("ss", (GPRS[5] + GPRS[6] + 5) & 0xFFFF))


# -- the guest kernels -------------------------------------------------------------------------
@pytest.mark.parametrize("name, refused", [("crcheck32", 12), ("crcheck64", 15)])
def test_bad_control_register_writes_are_gp_at_the_mov_and_good_ones_take_effect(name, refused):
    machine, _, status, text = run(name)
    assert status == 0, text
    assert "Test result: SUCCESS" in text and "FAIL" not in text
    gps = re.findall(r"^gp vec=13 err=0x0 ip=(0x[0-9a-f]+)$", text, re.M)
    assert len(gps) == refused
    # every write after the kernel's CPUID leaf-7 query, refused or taken (5 MOVs, CLTS, 2 LMSW, the
    # final restore), went through the check; crcheck64's start code sets CR4.PAE and CR0.PG on its
    # way to long mode before that query, with the window closed: those two are the engine's
    assert machine.exit_counts["CrWrite"] == refused + 9
    cr4 = machine.vcpu.reg("cr4")
    assert not cr4 & (C.CR4_VMXE | C.CR4_UMIP)


# -- #NM or #UD (x86/fpufault.py) --------------------------------------------------------------
def test_mmx_and_sse_check_em_and_osfxsr_before_ts():
    from xenicorn.x86.fpufault import nm_or_ud
    ts, em, osfxsr = 1 << 3, 1 << 2, 1 << 9
    movq_mm = bytes.fromhex("0f6fc0")            # movq mm0, mm0
    movups = bytes.fromhex("0f10c0")             # movups xmm0, xmm0
    movdqa = bytes.fromhex("660f6fc0")           # movdqa xmm0, xmm0 (SSE2: 66 + an MMX opcode)
    fld = bytes.fromhex("d9e8")                  # fld1
    assert nm_or_ud(movq_mm, 64, ts, 0) == 7            # MMX ignores OSFXSR
    assert nm_or_ud(movq_mm, 64, ts | em, osfxsr) == 6
    assert nm_or_ud(movups, 64, ts, osfxsr) == 7
    assert nm_or_ud(movups, 64, ts, 0) == 6
    assert nm_or_ud(movdqa, 32, ts, 0) == 6
    assert nm_or_ud(movups, 32, ts | em, osfxsr) == 6
    assert nm_or_ud(fld, 32, ts | em, osfxsr) == 7       # x87: #NM for EM or TS
    assert nm_or_ud(bytes.fromhex("9b"), 32, ts | 2, 0) == 7   # fwait


XTF_TESTS = os.environ.get("XTF_TESTS", "/work/xtf-src/tests")     # a built XTF tree (docs/conformance.md)


@pytest.mark.parametrize("test, env, result", [
    ("umip", "hvm32", "SKIP"), ("umip", "hvm64", "SKIP"),          # only for want of FEP (test_umip.py)
    ("xsa-278", "hvm64", "SUCCESS"),                                 # CR4.VMXE #GPs, VMX insns #UD
    ("fpu-exception-emulation", "hvm64", "SKIP"),                   # native half passes, FEP half skipped
])
def test_xtf_images_that_check_cr_writes_and_fpu_faults(test, env, result):
    image = os.path.join(XTF_TESTS, test, f"test-{env}-{test}")
    if not os.path.exists(image):
        pytest.skip(f"XTF not built at {XTF_TESTS}")
    out = subprocess.run([sys.executable, "-m", "xenicorn", "run", image], capture_output=True, text=True,
                         timeout=120).stdout
    assert f"Test result: {result}" in out, out
    assert "Fail" not in out and "Expected" not in out and "succeeded" not in out, out
