"""Interrupts and exceptions from virtual-8086 mode (SDM vol. 3 §20.3).

The vm86_32 kernel enters vm86 by IRET and takes a LAPIC timer interrupt,
INT n with IOPL 0 and 3, #UD, #DE and two bad gates there; it checks each
frame itself and prints it. Python delivers every event from vm86: the CPU
engine's own delivery of external interrupts declines in vm86
(engine/delivery.py says why). The kernel runs as is and traced, and on
QEMU TCG as the reference x86.
The unit tests below call deliver() on a vm86 state for the paths the
engine never hands to Python (its translator raises #GP for INT n with
IOPL < 3 itself).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from test_firmware import RF, frames, run
from test_interrupts import IDT, gate32, protected, stack
from xenicorn import firmware
from xenicorn.engine.rawctx import HF_ADDSEG, HF_CPL_MASK, RawContext
from xenicorn.x86.interrupts import VM, EventType, deliver
from xenicorn.x86.segments import DESC_P, DESC_S, SegmentCache

IF = 1 << 9
IOPL3 = 3 << 12
CONFORMING_CODE_DPL0 = 0x00CF9E000000FFFF
VM86_SEGS = {"cs": 0x0800, "ss": 0x0900, "es": 0x0A00, "ds": 0x0800, "fs": 0x0B00, "gs": 0x0C00}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vm86_state(machine, iopl=0, ip=0x10):
    """The CPU in vm86 at 0800:ip with the vm86 segments above: CPL 3, VM=1."""
    vcpu = protected(machine)
    caches = {name: SegmentCache(sel, sel << 4, 0xFFFF, DESC_P | DESC_S | (3 << 13) | (0x3 << 8))
              for name, sel in VM86_SEGS.items()}
    with RawContext(vcpu.uc) as ctx:
        ctx.load_segments(**caches)
    vcpu.set_reg("rsp", 0x0800)
    vcpu.set_reg("rip", ip)
    vcpu.set_reg("rflags", VM | IF | 2 | (iopl << 12))
    return vcpu


def check_ring0_frame(machine, vcpu, eip, flags, err=None):
    """Nine dwords (and the error code) on the TSS stack; null data segments; VM clear."""
    words = 9 + (err is not None)
    sp = 0x9000 - 4 * words
    expect = ([err] if err is not None else []) + [eip, 0x0800, flags, 0x0800, 0x0900, 0x0A00, 0x0800,
                                                    0x0B00, 0x0C00]
    assert vcpu.reg("rsp") == sp and stack(machine, sp, words) == expect
    ctx = RawContext(vcpu.uc)
    assert all(ctx.segment(s) == SegmentCache(0, 0, 0, 0) for s in ("es", "ds", "fs", "gs"))
    assert ctx.segment("ss").selector == 0x10 and ctx.segment("cs").selector == 0x08
    assert ctx.hflags & HF_CPL_MASK == 0 and not ctx.hflags & HF_ADDSEG       # flat again: no segment bases
    assert not vcpu.reg("rflags") & (VM | IF)


def test_external_interrupt_from_vm86_pushes_the_vm86_segments(machine):
    vcpu = vm86_state(machine)
    rec = deliver(vcpu, 0x30, EventType.EXTERNAL)
    assert rec.stack_switched and [n for n, _ in rec.pushed][:4] == ["gs", "fs", "ds", "es"]
    check_ring0_frame(machine, vcpu, 0x10, VM | IF | 2)
    assert vcpu.pc == 0x400000 + 16 * 0x30


def test_int_n_with_iopl_below_3_is_gp0_at_the_int(machine):
    """The engine's translator raises this #GP itself; Python's delivery agrees if asked."""
    vcpu = vm86_state(machine, iopl=0, ip=0x12)
    machine.memory.write(0x8010, b"\xcd\x50")
    machine.memory.write(IDT + 8 * 0x50, gate32(0x500000, dpl=3))
    rec = deliver(vcpu, 0x50, EventType.SOFTWARE_INTERRUPT)
    assert rec.vector == 13 and rec.error_code == 0
    check_ring0_frame(machine, vcpu, 0x10, VM | IF | 2 | RF, err=0)


@pytest.mark.parametrize("code", [b"\xcc", b"\xcd\x50"])
def test_int3_is_not_iopl_sensitive_but_int_n_is_with_iopl_3_allowed(machine, code):
    vector = 3 if code == b"\xcc" else 0x50
    vcpu = vm86_state(machine, iopl=0 if vector == 3 else 3, ip=0x10 + len(code))
    machine.memory.write(0x8010, code)
    machine.memory.write(IDT + 8 * vector, gate32(0x500000, dpl=3))
    rec = deliver(vcpu, vector, EventType.SOFTWARE_INTERRUPT)
    assert rec.vector == vector and vcpu.pc == 0x500000
    check_ring0_frame(machine, vcpu, 0x10 + len(code), rec.old["rflags"])


@pytest.mark.parametrize("descriptor, selector", [(CONFORMING_CODE_DPL0, 0x28), (None, 0x1B)])
def test_handler_segment_must_be_nonconforming_dpl0(machine, descriptor, selector):
    """A conforming or DPL3 handler segment: #GP(selector | EXT) (SDM vol. 2A, INT n)."""
    vcpu = vm86_state(machine)
    if descriptor is not None:
        machine.memory.write_struct(0x1000 + 0x28, "<Q", descriptor)          # GDT entry 5
    machine.memory.write(IDT + 8 * 0x30, gate32(0x500000, selector=selector))
    rec = deliver(vcpu, 0x30, EventType.EXTERNAL)
    assert rec.vector == 13 and rec.error_code == (selector & 0xFFFC) | 1
    assert "virtual-8086" in rec.chain[0]
    check_ring0_frame(machine, vcpu, 0x10, VM | IF | 2 | RF, err=(selector & 0xFFFC) | 1)


def check_vm86_kernel(machine, kernel, status, text):
    assert "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS"), text
    assert status == 0 and machine.shutdown_reason == "poweroff"
    got = frames(text)
    # the last three: SMSW and SGDT with UMIP off (then INT3), SMSW and SGDT with UMIP on (#GP(0))
    assert [f["vec"] for f in got] == [64, 3, 13, 80, 6, 0, 13, 13, 3, 13, 13]
    assert [f["err"] for f in got if f["vec"] == 13] == [0, 0x20, 0x292, 0, 0]
    vm86_segs = (0xA00, 0x800, 0xB00, 0xC00)
    assert all(f["flags"] & VM and f["cs"] == 0x800 and (f["es"], f["ds"], f["fs"], f["gs"]) == vm86_segs for f in got)
    # SDM §17.3.1.1: RF set for the faults, not for the trap and the interrupts
    assert [bool(f["flags"] & RF) for f in got] == [False, False, True, False, True, True, True, True,
                                                    False, True, True]
    vcpu = machine.vcpu
    assert vcpu.cpl() == 0 and not vcpu.reg("rflags") & VM
    return got


def test_vm86_kernel_python_delivers_even_where_the_engine_could():
    """Unwatched, the engine would deliver the timer; in vm86 it declines
    (QEMU sends DPL1/2 handler segments to ring 1/2), so Python delivers."""
    machine, kernel, status, text = run("vm86_32")
    check_vm86_kernel(machine, kernel, status, text)
    assert machine.vcpu.engine_deliveries == 0 and machine.lapic.timer_fires == 1


def test_vm86_kernel_with_python_delivering_everything(capsys):
    machine, kernel, status, text = run("vm86_32", trace={"int"})
    check_vm86_kernel(machine, kernel, status, text)
    err = capsys.readouterr().err
    assert machine.vcpu.engine_deliveries == 0
    assert re.search(r"\[int\] vector 0x40 \(external interrupt\) via protected gate int32: 0x800:0x[0-9a-f]+ cpl3 "
                     r"-> 0x8:0x[0-9a-f]+( <vm86_isr_\d+>)? cpl0", err)      # named by the kernel's symbols
    assert "vector 0x51 (handler segment 0x23 of an event from virtual-8086 mode is DPL 3, not 0) -> #GP" in err


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU not installed")
def test_vm86_frames_agree_with_qemu():
    """QEMU TCG as the reference: the same frames, but for RF (xenicorn sets it for
    faults, as hardware does) and where and with which flags the timer struck."""
    res = subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-m", "128", "-cpu", "qemu64,+umip",
                          "-kernel", firmware.find("vm86_32"),
                          "-debugcon", "stdio", "-device", "isa-debug-exit,iobase=0xf4",
                          "-display", "none", "-no-reboot"], capture_output=True, text=True, timeout=60)
    assert "Test result: SUCCESS" in res.stdout, res.stdout
    _, _, _, text = run("vm86_32")
    ours, qemus = frames(text), frames(res.stdout)
    for f in ours + qemus:
        f["flags"] &= ~RF
        if f["vec"] == 64:
            del f["flags"], f["ip"]
    assert ours == qemus


XTF = os.environ.get("XTF_DIR", "")


@pytest.mark.skipif(not os.path.isfile(os.path.join(XTF, "tests/xsa-192/test-hvm32-xsa-192")),
                    reason="set XTF_DIR to a built XTF tree")
def test_xtf_xsa_192_enters_vm86_by_task_switch_and_leaves_by_int():
    image = os.path.join(XTF, "tests/xsa-192/test-hvm32-xsa-192")
    res = subprocess.run([sys.executable, "-m", "xenicorn", "run", image], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert "Test result: SUCCESS" in res.stdout and res.returncode == 0, res.stdout + res.stderr
