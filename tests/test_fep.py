"""Xen's forced emulation prefix (``--hvm-fep``), through the fep32/fep64 guest kernels.

The kernels probe FEP as XTF does, run instructions through it and check
the frames of the faults it raises; these tests check what they printed
and the machine state afterwards, with FEP on and off (off is Xen's
default: the prefix is a plain #UD).
"""
from __future__ import annotations

import pytest

from xenicorn import firmware
from xenicorn.boot import boot
from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import MachineConfig
from xenicorn.x86.fep import PREFIX

from test_firmware import frames


def run(name, **cfg):
    path = firmware.find(name)
    assert path, f"firmware {name} is missing; run tools/build_firmware.py"
    config = MachineConfig(debugcon="none", xen_log="none", **cfg)
    machine, kernel = boot(config, path, console=ConsoleSink(None))
    machine.fep_marks = []
    machine.dispatch.listeners.append(lambda vcpu, ex: machine.fep_marks.append(ex.fep) if hasattr(ex, "fep")
                                      else None)
    status = machine.run()
    return machine, kernel, status, machine.console.text()


@pytest.mark.parametrize("name", ["fep32", "fep64"])
def test_without_hvm_fep_the_prefix_is_a_plain_ud_at_the_ud2(name):
    machine, kernel, status, text = run(name)
    assert status == 0 and "FAIL" not in text, text
    assert "FEP unavailable" in text and text.rstrip().endswith("Test result: SUCCESS")
    (f,) = frames(text)
    assert f["vec"] == 6 and f["ip"] == kernel.symbols["probe_insn"]
    assert machine.vcpu.read_linear(f["ip"], 5) == PREFIX
    assert machine.dispatch.counts["InvalidInstruction"] == 1 and machine.fep_marks == []


@pytest.mark.parametrize("name", ["fep32", "fep64"])
def test_hvm_fep_emulates_the_next_instruction_with_the_emulators_checks(name):
    machine, kernel, status, text = run(name, hvm_fep=True)
    assert status == 0 and "FAIL" not in text, text
    assert "FEP available" in text and text.rstrip().endswith("Test result: SUCCESS")
    sym = kernel.symbols
    got = frames(text)
    # the fault through FEP is at the instruction after the prefix (Xen's rule)
    by_ip = {f["ip"]: f for f in got}
    assert by_ip[sym["gp_insn"]]["vec"] == 13 and by_ip[sym["gp_insn"]]["err"] == 0x1230
    assert by_ip[sym["ud_insn"]]["vec"] == 6
    assert sym["probe_insn"] not in by_ip                  # the probe did not fault
    assert "ok FEP register op: add $0x11 -> 0x33" in text
    assert "ok FEP at CPL3: add -> 10" in text
    # SIMD exceptions: the engine has none, the emulator's check raises #XM with MXCSR.IE
    assert "native divss 0/0 unmasked: no fault, mxcsr=0x0" in text
    assert "ok FEP divss 0/0 unmasked: #XM with IE (vec=19 mxcsr=0x1)" in text
    if name == "fep32":
        # the point of FEP: checks the engine skips natively
        assert "native read past the limit: no fault" in text
        assert "native read through a null selector: no fault" in text
        assert [f["vec"] for f in got] == [13, 6, 19, 13, 13, 13]
        assert "ok FEP read past the limit: #GP(0)" in text
    else:
        assert [(f["vec"], f["err"]) for f in got] == [(13, 0x1230), (6, 0), (19, 0), (12, 0), (13, 0)]
    # every forced emulation is a #UD exit, marked FEP for --trace exits
    marks = machine.fep_marks
    assert machine.dispatch.counts["InvalidInstruction"] == len(marks) == (12 if name == "fep32" else 11)
    assert marks[0].endswith(": emulated") and "mov" in marks[0]              # the probe
    assert any(m.endswith("#GP(0) from the emulator") for m in marks)
    assert "add" in marks[-1] and marks[-1].endswith(": emulated")            # CPL3's
    assert machine.vcpu.cpl() == 0


class FakeRegs:
    """RegisterAccess's read/write over a dict (the SIMD checks need nothing else)."""

    def __init__(self, **values):
        self.values = {"cr0": 0x80000011, "cr4": 0x620, "mxcsr": 0, **values}

    def read(self, name):
        return self.values[name]

    def write(self, name, value):
        self.values[name] = value


def single(x: float) -> int:
    import struct
    return struct.unpack("<I", struct.pack("<f", x))[0]


def decode(code: bytes):
    from xenicorn.x86.fep import DECODERS
    return next(DECODERS[64].disasm(code, 0x1000))


DIVSS = bytes.fromhex("f30f5ec1")         # divss xmm0, xmm1
ADDSS = bytes.fromhex("f30f58c1")         # addss xmm0, xmm1
UCOMISS = bytes.fromhex("0f2ec1")         # ucomiss xmm0, xmm1


@pytest.mark.parametrize("code,a,b,mxcsr,fault,flags", [
    (DIVSS, 0.0, 0.0, 0, (19, None), 0x01),              # 0/0: invalid (XSA-451)
    (DIVSS, 1.0, 0.0, 0, (19, None), 0x04),              # x/0: zero divide
    (DIVSS, 1.0, 0.0, 0x1F80, None, 0x1F84),             # masked: flag only, the engine divides
    (DIVSS, 1.0, 3.0, 0, (19, None), 0x20),              # 1/3: precision
    (DIVSS, 1.0, 4.0, 0, None, 0),                       # exact: nothing
    (UCOMISS, 1e-45, 1e-45, 0, (19, None), 0x02),        # a denormal operand (XSA-470)
    (UCOMISS, 1e-45, 1e-45, 0x40, None, 0x40),           # ... ignored with DAZ
    (ADDSS, 3e38, 3e38, 0, (19, None), 0x28),            # overflow (and precision)
])
def test_sse_exceptions_through_the_emulator(code, a, b, mxcsr, fault, flags):
    from xenicorn.x86 import simdfp
    regs = FakeRegs(xmm0=single(a), xmm1=single(b), mxcsr=mxcsr)
    assert simdfp.check(decode(code), regs, lambda size: None) == fault
    assert regs.values["mxcsr"] == flags


def test_sse_exception_is_ud_without_osxmmexcpt_and_absent_with_ts():
    from xenicorn.x86 import simdfp
    regs = FakeRegs(xmm0=single(0.0), xmm1=single(0.0), cr4=0x220)
    assert simdfp.check(decode(DIVSS), regs, lambda size: None) == (6, None)
    regs = FakeRegs(xmm0=single(0.0), xmm1=single(0.0), cr0=0x80000019)    # CR0.TS: #NM comes first
    assert simdfp.check(decode(DIVSS), regs, lambda size: None) is None and regs.values["mxcsr"] == 0


def test_the_checks_survive_any_instruction_bytes():
    """A hostile guest may put anything after the prefix: decoding and the checks never raise."""
    import random
    from xenicorn.x86 import fep, simdfp
    from xenicorn.x86.segments import SegmentCache, flat_data
    rng = random.Random(7)
    segs = [flat_data(0x18)] * 6
    segs[4] = SegmentCache(0, 0, 0, 0)               # a null FS
    for _ in range(3000):
        code = bytes(rng.getrandbits(8) for _ in range(15))
        for bits in (16, 32, 64):
            insn = next(fep.DECODERS[bits].disasm(code, 0x1000), None)
            if insn is None:
                continue
            for seg, offset, size, write, stack in fep.operand_accesses(insn, lambda r: rng.getrandbits(64), 0x1010):
                fep.check_long(seg, offset, size, stack, segs)
                fep.check_protected(seg, offset, size, write, segs)
            regs = FakeRegs(**{f"xmm{i}": rng.getrandbits(128) for i in range(16)}, mxcsr=rng.getrandbits(16))
            simdfp.check(insn, regs, lambda size: rng.getrandbits(8 * size))


def test_sse_checks_on_special_values_never_raise_and_only_set_flags():
    import random
    from xenicorn.x86 import simdfp
    rng = random.Random(3)
    specials = [0, 1, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x00000001, 0x80000001, 0x7F7FFFFF,
                0x3F800000, 0xBF800000, 0x00800000]
    ops = [bytes.fromhex(h) for h in ("f30f58c1", "f30f5cc1", "f30f59c1", "f30f5ec1", "f30f51c1", "f30f5dc1",
                                       "f30f5fc1", "0f2ec1", "0f2fc1", "0f58c1", "0f5ec1", "660f5ec1", "f20f5ec1")]
    for code in ops:
        insn = decode(code)
        for _ in range(300):
            lanes = [rng.choice(specials) if rng.random() < 0.7 else rng.getrandbits(32) for _ in range(8)]
            a = sum(v << (32 * i) for i, v in enumerate(lanes[:4]))
            b = sum(v << (32 * i) for i, v in enumerate(lanes[4:]))
            mxcsr = rng.choice([0, 0x1F80, 0x40, 0x1F00, 0x1F40])
            regs = FakeRegs(xmm0=a, xmm1=b, mxcsr=mxcsr)
            fault = simdfp.check(insn, regs, lambda size: None)
            detected, masks = regs.values["mxcsr"] & 0x3F, (mxcsr >> 7) & 0x3F
            assert regs.values["mxcsr"] & ~0x3F == mxcsr                   # only status bits change
            assert (fault == (19, None)) == bool(detected & ~masks), (insn.mnemonic, hex(a), hex(b), hex(mxcsr))


def test_cli_hvm_fep_and_the_fep_trace_line():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "xenicorn", "run", "fep64", "--hvm-fep", "--trace", "int,exits"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "FEP available" in res.stdout and "Test result: SUCCESS" in res.stdout
    trace = res.stdout + res.stderr
    assert "[int] FEP: " in trace and ": mov al, 1: emulated" in trace           # XTF's probe, traced
    assert "InvalidInstruction" in trace and "fep=FEP: " in trace                # the exit, marked
    res = subprocess.run([sys.executable, "-m", "xenicorn", "run", "fep64", "--trace", "int"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "FEP unavailable" in res.stdout and "[int] FEP" not in res.stdout + res.stderr
