"""Hardware task switches through IDT task gates (SDM vol. 3 §6.11.1, §7.3).

The taskgate32 kernel takes an NMI, INT n, #UD, #GP, #DF and a LAPIC timer
interrupt through task gates and checks, inside each task and after IRET
back, what the switch did (it prints one ``task NAME: ...`` line per
switch). It runs three ways that must agree: unwatched (the timer interrupt
is delivered by the CPU engine, QEMU's own ``switch_tss``), traced (Python
delivers everything, :mod:`xenicorn.x86.taskswitch`), and on QEMU TCG.
taskgate64 checks that a type-5 IDT entry is #GP in IA-32e mode. The unit
tests below reach what a kernel cannot check on both CPUs alike: the EXT
bit in the TSS checks' error codes (QEMU leaves it out), a TI=1 selector
(QEMU says #TS where the SDM says #GP), faults after the commit point, and
the 16-bit TSS.
"""
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from unicorn import x86_const as X

from test_firmware import run
from test_interrupts import GDT, IDT, TSS, gate32, protected, stack
from xenicorn import firmware
from xenicorn.engine.rawctx import RawContext
from xenicorn.x86.interrupts import EventType, TripleFault, deliver

RF, NT, IF = 1 << 16, 1 << 14, 1 << 9
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TSS = 0x4000
OLD_SEL, NEW_SEL = 0x28, 0x30


def tss_desc(base, limit=0x67, kind=0x9, present=True):
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF,
                       (0x80 if present else 0) | kind, (limit >> 16) & 0xF, base >> 24)


def tss32(eip=0x500000, esp=0x7000, cs=0x08, ss=0x10, ds=0x10, eflags=0x2, ldt=0, regs=(1, 2, 3, 4, 0, 6, 7, 8)):
    gprs = list(regs)
    gprs[4] = esp
    return (struct.pack("<HHIIIIIIIII", 0, 0, 0, 0, 0, 0, 0, 0, 0x0, eip, eflags)
            + struct.pack("<8I", *gprs) + struct.pack("<12H", ds, 0, cs, 0, ss, 0, ds, 0, 0, 0, 0, 0)
            + struct.pack("<HHHH", ldt, 0, 0, 0x68))


def setup(machine, new_desc=None, new_tss=None, vector=0x30):
    """Protected mode, TR = 0x28 (busy, at TSS), a task gate at ``vector`` to 0x30 (at NEW_TSS)."""
    vcpu = protected(machine)
    mem = machine.memory
    mem.write(GDT + OLD_SEL, tss_desc(TSS, kind=0xB))
    mem.write(GDT + NEW_SEL, new_desc if new_desc is not None else tss_desc(NEW_TSS))
    vcpu.uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, 16 * 8 - 1, 0))
    mem.write(NEW_TSS, new_tss if new_tss is not None else tss32())
    mem.write(IDT + 8 * vector, gate32(0, selector=NEW_SEL, kind=0x5))
    for name, value in (("rax", 0xA), ("rbx", 0xB), ("rsi", 0x51), ("rdi", 0xD1), ("rbp", 0xB9)):
        vcpu.set_reg(name, value)
    return vcpu


def tr(vcpu):
    with RawContext(vcpu.uc) as ctx:
        return ctx.segment("tr")


def test_nmi_through_a_task_gate_saves_links_and_loads_the_new_task(machine):
    vcpu = setup(machine, vector=2)
    with RawContext(vcpu.uc) as ctx:
        old_selectors = tuple(ctx.segment(n).selector for n in ("es", "cs", "ss", "ds", "fs", "gs"))
    rec = deliver(vcpu, 2, EventType.NMI)
    mem = machine.memory
    assert rec.task == {"old_tr": OLD_SEL, "new_tr": NEW_SEL, "tss_bits": 32} and rec.gate["kind"] == "task"
    assert "task switch TR 0x28 -> 0x30" in rec.summary()
    # the old task, in the old TSS: EIP where it stopped, EFLAGS, registers, selectors
    eip, eflags, eax, ecx, edx, ebx, esp, ebp, esi, edi = struct.unpack("<10I", mem.read(TSS + 0x20, 40))
    assert (eip, eflags, eax, ebx, esp, ebp, esi, edi) == (0x100000, 0x202, 0xA, 0xB, 0x8000, 0xB9, 0x51, 0xD1)
    assert struct.unpack("<12H", mem.read(TSS + 0x48, 24))[::2] == old_selectors
    # the link, both busy, NT, CR0.TS, and the new state
    assert struct.unpack("<H", mem.read(NEW_TSS, 2))[0] == OLD_SEL
    assert mem.read(GDT + NEW_SEL + 5, 1)[0] & 0xF == 0xB and mem.read(GDT + OLD_SEL + 5, 1)[0] & 0xF == 0xB
    assert tr(vcpu).selector == NEW_SEL and tr(vcpu).base == NEW_TSS
    assert vcpu.reg("rflags") & NT and not vcpu.reg("rflags") & IF and vcpu.reg("cr0") & 8
    assert (vcpu.pc, vcpu.reg("rsp"), vcpu.reg("rax"), vcpu.reg("rdi")) == (0x500000, 0x7000, 1, 8)
    assert stack(machine, 0x7000 - 8, 2) == [0, 0]                     # no frame pushed


def test_an_error_code_is_all_the_new_stack_gets(machine):
    vcpu = setup(machine, vector=13)
    rec = deliver(vcpu, 13, EventType.HARDWARE_EXCEPTION, 0x1234)
    assert rec.pushed == [("error_code", 0x1234)]
    assert vcpu.reg("rsp") == 0x7000 - 4 and stack(machine, 0x7000 - 4, 1) == [0x1234]
    # a fault saves RF=1 in the old task's EFLAGS image (SDM vol. 3 §17.3.1.1)
    assert struct.unpack("<I", machine.memory.read(TSS + 0x24, 4))[0] == 0x202 | RF


BAD_TARGETS = [
    ("busy", tss_desc(NEW_TSS, kind=0xB), NEW_SEL, 13, NEW_SEL | 1),
    ("not present", tss_desc(NEW_TSS, present=False), NEW_SEL, 11, NEW_SEL | 1),
    ("limit 0x66", tss_desc(NEW_TSS, limit=0x66), NEW_SEL, 10, NEW_SEL | 1),
    ("a code segment", None, 0x08, 13, 0x08 | 1),
    ("TI=1", tss_desc(NEW_TSS), NEW_SEL | 4, 13, NEW_SEL | 4 | 1),
    ("beyond the GDT", tss_desc(NEW_TSS), 0x100, 13, 0x101),
]


@pytest.mark.parametrize("why, desc, selector, vector, err", BAD_TARGETS, ids=[b[0] for b in BAD_TARGETS])
def test_a_bad_tss_faults_in_the_old_task_with_ext(machine, why, desc, selector, vector, err):
    """Table 7-1 and INT n's TASK-GATE pseudo-code; EXT=1 for an external interrupt (§6.13)."""
    vcpu = setup(machine, new_desc=desc)
    machine.memory.write(IDT + 8 * 0x30, gate32(0, selector=selector, kind=0x5))
    before = machine.memory.read(TSS, 0x68)
    rec = deliver(vcpu, 0x30, EventType.EXTERNAL)
    assert (rec.vector, rec.error_code) == (vector, err) and not rec.task
    assert tr(vcpu).selector == OLD_SEL and machine.memory.read(TSS, 0x68) == before
    assert vcpu.pc == 0x400000 + 16 * vector and stack(machine, vcpu.reg("rsp"), 2) == [err, 0x100000]


def test_a_tss_outside_ram_is_a_clean_triple_fault(machine):
    """A hostile guest's TSS base in unassigned space: the machine stops and says why, no traceback."""
    vcpu = setup(machine, new_desc=tss_desc(0xE0000000), vector=2)
    with pytest.raises(TripleFault, match="not RAM"):
        deliver(vcpu, 2, EventType.NMI)
    assert tr(vcpu).selector == OLD_SEL


def test_a_task_gate_in_long_mode_is_gp_with_the_idt_bit(machine):
    """IA-32e mode has no task gates: type 5 is #GP(vector*8+2+EXT) (§6.14.1); taskgate64 checks INT n."""
    from xenicorn.x86 import interrupts
    vcpu = setup(machine, vector=2)
    cpu = interrupts._Cpu(vcpu)
    cpu.efer |= interrupts.EFER_LMA                      # only the gate checks are asked, in 64-bit form
    gate = {"type": 5, "dpl": 0, "present": True}
    with pytest.raises(interrupts._Fault) as f:
        interrupts._check_gate(cpu, gate, 2, EventType.NMI, 1)
    assert (f.value.vector, f.value.error_code) == (13, 2 * 8 + 2 + 1)


def test_a_bad_segment_in_the_new_tss_faults_in_the_new_task(machine):
    """After the commit point the fault belongs to the new task (§7.3 step 13): TR, link and
    the old TSS are already written, and the #TS frame holds the new task's CS:EIP."""
    vcpu = setup(machine, new_tss=tss32(ds=0x100), vector=2)
    rec = deliver(vcpu, 2, EventType.NMI)
    # ES = DS = 0x100 in this TSS; ES is checked first (CS, SS, ES, DS, FS, GS)
    assert (rec.vector, rec.error_code) == (10, 0x101) and "new task's ES 0x100" in rec.chain[0]
    assert tr(vcpu).selector == NEW_SEL and struct.unpack("<H", machine.memory.read(NEW_TSS, 2))[0] == OLD_SEL
    err, eip, cs, eflags = stack(machine, 0x7000 - 16, 4)
    assert (vcpu.reg("rsp"), err, eip, cs) == (0x7000 - 16, 0x101, 0x500000, 0x08) and eflags & NT


def test_a_software_interrupt_fault_after_the_commit_keeps_the_new_eip(machine):
    """INT n's own faults point at the INT; one after the switch must not rewind the new task's EIP."""
    vcpu = setup(machine, new_tss=tss32(ss=0x08), vector=0x40)
    machine.memory.write(IDT + 8 * 0x40, gate32(0, selector=NEW_SEL, kind=0x5, dpl=0))
    machine.memory.write(0x100000 - 2, b"\xcd\x40")
    rec = deliver(vcpu, 0x40, EventType.SOFTWARE_INTERRUPT)
    assert (rec.vector, rec.error_code) == (10, 0x08) and tr(vcpu).selector == NEW_SEL
    assert struct.unpack("<I", machine.memory.read(TSS + 0x20, 4))[0] == 0x100000       # after the INT


def test_a_16_bit_tss(machine):
    """The 16-bit TSS (figure 7-11): IP, FLAGS, AX..DI, ES CS SS DS in words; limit >= 0x2B."""
    raw = bytearray(0x2C)
    struct.pack_into("<HH", raw, 0x0E, 0x1234, 0x0002)
    struct.pack_into("<8H", raw, 0x12, 1, 2, 3, 4, 0x6000, 6, 7, 8)
    struct.pack_into("<5H", raw, 0x22, 0x10, 0x08, 0x10, 0x10, 0)
    vcpu = setup(machine, new_desc=tss_desc(NEW_TSS, limit=0x2B, kind=0x1), new_tss=bytes(raw), vector=13)
    rec = deliver(vcpu, 13, EventType.HARDWARE_EXCEPTION, 0x55)
    assert rec.task["tss_bits"] == 16 and tr(vcpu).flags >> 8 & 0xF == 0x3
    assert (vcpu.pc, vcpu.reg("rax"), vcpu.reg("rsp")) == (0x1234, 1, 0x6000 - 2)
    assert machine.memory.read(0x6000 - 2, 2) == b"\x55\x00" and vcpu.reg("rflags") & NT


def test_the_new_ldt_is_loaded_before_the_segments_that_use_it(machine):
    """LDTR comes from the new TSS, so a TI=1 selector there names the *new* task's LDT."""
    vcpu = setup(machine, new_tss=tss32(ds=0x0C, ldt=0x38), vector=2)
    mem = machine.memory
    mem.write(GDT + 0x38, struct.pack("<HHBBBB", 0x0F, 0x5000, 0, 0x82, 0, 0))        # LDT at 0x5000, 2 entries
    mem.write(0x5008, struct.pack("<HHBBBB", 0xFFFF, 0x2000, 0x01, 0x92, 0xCF, 0))   # data, base 0x12000
    deliver(vcpu, 2, EventType.NMI)
    with RawContext(vcpu.uc) as ctx:
        ldt, ds, es = ctx.segment("ldt"), ctx.segment("ds"), ctx.segment("es")
    assert (ldt.selector, ldt.base, ldt.limit) == (0x38, 0x5000, 0x0F)
    assert (ds.selector, ds.base) == (es.selector, es.base) == (0x0C, 0x12000)


def test_a_virtual_8086_task(machine):
    """A TSS whose EFLAGS has VM=1 starts a vm86 task: segments are paragraphs, CPL 3 (§20.2.1)."""
    vcpu = setup(machine, new_tss=tss32(eip=0x100, cs=0x800, ss=0x900, ds=0xA00, eflags=0x2 | (1 << 17)), vector=2)
    rec = deliver(vcpu, 2, EventType.NMI)
    with RawContext(vcpu.uc) as ctx:
        cs, ss, ds = ctx.segment("cs"), ctx.segment("ss"), ctx.segment("ds")
    assert (cs.base, ss.base, ds.base, cs.limit) == (0x8000, 0x9000, 0xA000, 0xFFFF)
    assert vcpu.cpl() == 3 and vcpu.reg("rflags") & (1 << 17) and vcpu.pc == 0x100 and rec.new["cpl"] == 3


def task_lines(text):
    return [line for line in text.splitlines() if line.startswith(("task ", "irq task"))]


def check_taskgate32(machine, status, text):
    assert "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS"), text
    assert status == 0 and machine.shutdown_reason == "poweroff"
    lines = task_lines(text)
    assert [line.split(":")[0] for line in lines] == ["task nmi", "task int80", "task ud", "task gp", "task df",
                                                      "irq task", "task nmi", "task int80"]
    assert all("link=0x38 nt=1 ts=1" in line and "types=0xb/0xb" in line for line in lines)
    assert "esp=top-4 err=0x1f8" in lines[3] and "esp=top-4 err=0x0" in lines[4]
    vcpu = machine.vcpu
    with vcpu.cpu_state() as s:
        tr_now, gdt = s.segment("tr"), s.segment("gdt")
    assert tr_now.selector == 0x38 and vcpu.cpl() == 0 and not vcpu.reg("rflags") & NT
    # IRET back from the last task: the task's descriptor available again, CR3 from the main TSS
    mem = machine.memory
    assert [mem.read(gdt.base + 0x50 + 8 * t + 5, 1)[0] & 0xF for t in range(6)] == [9] * 6
    assert mem.read(gdt.base + 0x38 + 5, 1)[0] & 0xF == 0xB
    assert vcpu.reg("cr3") == struct.unpack("<I", mem.read(tr_now.base + 0x1C, 4))[0] != 0
    assert vcpu.reg("cr0") & 8                                  # TS: the switch back set it
    return lines


def test_taskgate32_engine_and_python_switches_agree(capsys):
    """Unwatched, the timer interrupt goes through QEMU's switch_tss; traced, through Python's."""
    machine, _, status, text = run("taskgate32")
    engine = check_taskgate32(machine, status, text)
    assert machine.vcpu.engine_deliveries >= 1 and machine.lapic.timer_fires == 1
    machine, _, status, text = run("taskgate32", trace={"int"})
    python = check_taskgate32(machine, status, text)
    assert machine.vcpu.engine_deliveries == 0
    err = capsys.readouterr().err
    assert re.search(r"\[int\] vector 0x40 \(external interrupt\) via protected gate task: .* task switch "
                     r"TR 0x38 -> 0x78", err)
    assert "#GP (IDT gate 0xd not present) -> #DF (exception) err=0x0 via protected gate task" in err
    assert "vector 0x90 (task gate names TSS 0x38, which is busy) -> #GP (exception) err=0x38" in err
    assert engine == python


def test_taskgate64_type5_is_gp():
    machine, _, status, text = run("taskgate64")
    assert "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS"), text
    assert "#GP(0x482, vector*8+2 as the SDM says) at the INT" in text and status == 0


def qemu(name):
    res = subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-m", "128", "-kernel", firmware.find(name),
                          "-debugcon", "stdio", "-device", "isa-debug-exit,iobase=0xf4",
                          "-display", "none", "-no-reboot"], capture_output=True, text=True, timeout=60)
    assert "Test result: SUCCESS" in res.stdout, res.stdout
    return res.stdout


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU not installed")
def test_taskgate_kernels_agree_with_qemu():
    """QEMU TCG as the reference: the same lines, but RF in a fault's saved EFLAGS (xenicorn sets
    it, as hardware does) and the long-mode IDT index (QEMU reports vector*16+2)."""
    _, _, _, text = run("taskgate32")
    ours = [re.sub(r"old_flags=0x([0-9a-f]+)", lambda m: f"old_flags={int(m.group(1), 16) & ~RF:#x}", line)
            for line in task_lines(text)]
    assert ours == task_lines(qemu("taskgate32"))
    assert "#GP(0x902, vector*16+2 as QEMU TCG says)" in qemu("taskgate64")


XTF_IMAGE = os.path.join(os.environ.get("XTF_DIR", ""), "tests/nmi-taskswitch-priv/test-hvm32pae-nmi-taskswitch-priv")


@pytest.mark.skipif(not os.path.isfile(XTF_IMAGE), reason="set XTF_DIR to a built XTF tree")
def test_xtf_nmi_taskswitch_priv():
    """32-bit Windows' NMI task gate, entered from CPL0 and CPL3, with PAE paging."""
    image = XTF_IMAGE
    res = subprocess.run([sys.executable, "-m", "xenicorn", "run", image], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert "Test result: SUCCESS" in res.stdout and res.returncode == 0, res.stdout + res.stderr
    assert "NMI at 002b:" in res.stdout                  # the second NMI came from user mode
