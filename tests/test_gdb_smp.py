"""The gdb stub with several vCPUs: one gdb thread per vCPU.

The raw-protocol tests run two hand-made 32-bit loops on a ``-smp 2``
machine in a thread (no assembler needed): vCPU 0 runs the loop of
:mod:`test_gdbstub`, vCPU 1 its own loop on its own page tables, which map
the same linear page to other RAM. The real-gdb tests assemble a small
guest at test time (skipped without gcc, ld and gdb): the BSP starts the
APs with INIT and SIPI through a real-mode trampoline that enters 32-bit
protected mode, and each AP then loops in ``ap_main``.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import pytest
from test_gdbstub import (
    COUNTER,
    EAX,
    EIP,
    ENTRY,
    FLAG,
    GDB_FLAGS,
    LINEAR,
    LOOP_CMP,
    PAGE_A,
    Rsp,
    _free_port,
    _symbols,
    build_machine,
    stopped_session,
)


AP_ENTRY = 0x100100
AP_COUNTER = 0x101010
# inc dword [AP_COUNTER]; jmp AP_ENTRY
AP_LOOP = bytes.fromhex("ff0510101000" "ebf8")
AP_PD, AP_PT_HIGH = 0x13000, 0x14000
PAGE_C = 0x9000                              # vCPU 1's page at LINEAR


def build_smp_machine():
    """The one-vCPU test machine with a second vCPU already started on its own loop and page tables."""
    m = build_machine(smp=2)
    mem = m.memory
    mem.write(AP_ENTRY, AP_LOOP)
    mem.code_written(AP_ENTRY, len(AP_LOOP))
    mem.write_u32(AP_PD, 0x11000 | 3)                       # the same identity map of the first 4 MiB
    mem.write_u32(AP_PD + (LINEAR >> 22) * 4, AP_PT_HIGH | 3)
    mem.write_u32(AP_PT_HIGH, PAGE_C | 3)                   # LINEAR -> another page than vCPU 0's
    ap = m.vcpus[1]
    ap.reset_to_flat32(AP_ENTRY, esp=0x80000)
    ap.set_reg("cr3", AP_PD)
    ap.set_reg("cr0", ap.reg("cr0") | 0x80000000)
    ap.halted = ap.wait_for_sipi = False                    # as if a SIPI had started it
    ap.sleep_kind = ""
    return m


@pytest.fixture
def smp():
    """A stopped (-S) two-vCPU machine in a thread, gdb's side connected."""
    yield from stopped_session(build_smp_machine(), lambda m: [v.instructions for v in m.vcpus] == [0, 0])


def extra_info(c: Rsp, tid: int) -> str:
    return bytes.fromhex(c.cmd(f"qThreadExtraInfo,{tid:x}")).decode()


def test_every_vcpu_is_a_thread(smp):
    m, c, *_ = smp
    assert c.cmd("qfThreadInfo") == "m1,2" and c.cmd("qsThreadInfo") == "l"
    assert c.cmd("qC") == "QC1" and c.cmd("?") == "T05thread:01;"
    assert c.cmd("T1") == "OK" and c.cmd("T2") == "OK"
    assert c.cmd("T3") == "E22" and c.cmd("T0") == "E22" and c.cmd("T-1") == "E22"
    assert extra_info(c, 1) == "CPU#0 [running]" and extra_info(c, 2) == "CPU#1 [running]"
    assert c.cmd("qThreadExtraInfo,3") == "E22"
    assert c.cmd("Hg3") == "E22" and c.cmd("Hc3") == "E22" and c.cmd("Hgzz") == "E22"
    assert c.cmd("Hg0") == "OK" and c.cmd("Hc-1") == "OK"   # any / all: the selection stays
    assert c.cmd("vCont;c:3") == "E22"
    m.vcpus[1].halted = True
    assert extra_info(c, 2) == "CPU#1 [halted]"
    m.vcpus[1].wait_for_sipi = True
    assert extra_info(c, 2) == "CPU#1 [wait-for-SIPI]"
    m.vcpus[1].halted = m.vcpus[1].wait_for_sipi = False


def test_hg_selects_the_registers_and_the_page_tables(smp):
    m, c, *_ = smp
    m.memory.write(PAGE_A, b"AAAA")
    m.memory.write(PAGE_C, b"CCCC")
    assert c.reg(EIP) == ENTRY and c.cmd(f"m{LINEAR:x},4") == b"AAAA".hex()
    assert c.cmd("Hg2") == "OK"
    assert c.reg(EIP) == AP_ENTRY and c.cmd(f"m{LINEAR:x},4") == b"CCCC".hex()
    assert c.cmd(f"P{EAX:x}=efbeadde") == "OK"
    assert m.vcpus[1].reg("rax") == 0xDEADBEEF and m.vcpus[0].reg("rax") != 0xDEADBEEF
    regs1 = c.cmd("g")
    assert c.cmd("Hg1") == "OK" and c.reg(EIP) == ENTRY and c.cmd("g") != regs1
    assert c.cmd(f"M{LINEAR:x},1:42") == "OK" and m.memory.read(PAGE_A, 1) == b"B"
    assert c.cmd("Hg2") == "OK" and c.cmd("G" + regs1) == "OK" and c.cmd("g") == regs1


def test_stops_name_the_vcpu_and_steps_move_only_theirs(smp):
    m, c, *_ = smp
    v0, v1 = m.vcpus
    # a breakpoint in vCPU 1's loop: it resumes on it (runs it once), comes round, stops
    assert c.cmd(f"Z0,{AP_ENTRY:x},1") == "OK"
    assert c.cmd("c") == "T05thread:02;"
    assert c.cmd("qC") == "QC2" and c.reg(EIP) == AP_ENTRY       # the stop selected vCPU 1
    assert m.memory.read_u32(AP_COUNTER) == 1 and v1.instructions == 2
    assert c.cmd(f"z0,{AP_ENTRY:x},1") == "OK"
    # a breakpoint in vCPU 0's loop reports thread 1
    assert c.cmd(f"Z0,{LOOP_CMP:x},1") == "OK"
    assert c.cmd("c") == "T05thread:01;" and c.cmd("qC") == "QC1" and c.reg(EIP) == LOOP_CMP
    assert c.cmd(f"z0,{LOOP_CMP:x},1") == "OK"
    # vCont;s:2;c: vCPU 1 executes one instruction, vCPU 0 stays where it is
    n0, n1, pc0 = v0.instructions, v1.instructions, v0.pc
    assert c.cmd("Hg1") == "OK"
    assert c.cmd("vCont;s:2;c") == "T05thread:02;"
    assert v1.instructions == n1 + 1 and v0.instructions == n0 and v0.pc == pc0
    assert c.reg(EIP) in (AP_ENTRY, AP_ENTRY + 6)             # the stop selected vCPU 1 again
    # the other way round
    pc1 = v1.pc
    assert c.cmd("vCont;s:1") == "T05thread:01;"
    assert v0.instructions == n0 + 1 and v1.instructions == n1 + 1 and v1.pc == pc1
    # the old "s" steps the Hc thread
    assert c.cmd("Hc2") == "OK" and c.cmd("s") == "T05thread:02;"
    assert v1.instructions == n1 + 2 and v0.instructions == n0 + 1


def test_continue_of_one_vcpu_holds_the_other_and_ctrl_c_names_the_runner(smp):
    m, c, *_ = smp
    v0, v1 = m.vcpus
    c.send("vCont;c:1")                                      # scheduler-locking on: only vCPU 0
    time.sleep(0.3)
    c.sock.sendall(b"\x03")
    assert c.recv() == "T02thread:01;"
    assert v0.instructions > 0 and v1.instructions == 0 and m.memory.read_u32(AP_COUNTER) == 0
    c.send("vCont;c:2")
    time.sleep(0.3)
    c.sock.sendall(b"\x03")
    assert c.recv() == "T02thread:02;"
    assert m.memory.read_u32(AP_COUNTER) > 0
    # a watchpoint only vCPU 1's loop hits, with both running
    assert c.cmd(f"Z2,{AP_COUNTER:x},4") == "OK"
    assert c.cmd("c") == f"T05thread:02;watch:{AP_COUNTER:x};"
    assert c.cmd(f"z2,{AP_COUNTER:x},4") == "OK"
    assert c.cmd(f"Z2,{COUNTER:x},4") == "OK"
    assert c.cmd("c") == f"T05thread:01;watch:{COUNTER:x};"
    assert c.cmd(f"z2,{COUNTER:x},4") == "OK"


def test_stepping_a_vcpu_that_waits_for_sipi_waits_with_it_until_ctrl_c(smp):
    """Nothing can start it while the others are held: the step waits, as the vCPU does, for gdb's Ctrl-C."""
    m, c, *_ = smp
    v0, v1 = m.vcpus
    v1.halted = v1.wait_for_sipi = True
    v1.sleep_kind = "wait-for-SIPI"
    c.send("vCont;s:2;c")
    time.sleep(0.3)
    assert v0.instructions == 0 and v1.instructions == 0 and m.status is None
    c.sock.sendall(b"\x03")
    assert c.recv() == "T02thread:02;"
    assert c.cmd("vCont;s:1") == "T05thread:01;" and v0.instructions == 1


def test_detach_lets_every_vcpu_run(smp):
    m, c, thread, result = smp
    c.send("vCont;c:2")
    time.sleep(0.1)
    c.sock.sendall(b"\x03")
    assert c.recv() == "T02thread:02;"
    assert c.cmd(f"M{FLAG:x},4:21000000") == "OK"
    assert c.cmd("D") == "OK"                                # vCPU 0, held until now, ends the machine
    thread.join(10)
    assert result["status"] == (0x21 << 1) | 1


# ----------------------------------------------------------------------
# the real gdb, on a guest that starts its APs itself
# ----------------------------------------------------------------------
SMP_GUEST = r"""
    .code32
    .globl _start
_start:                                 # the BSP: flat 32-bit protected mode, paging off
    mov $tramp, %esi
    mov $0x8000, %edi
    mov $(tramp_end - tramp), %ecx
    rep movsb
    movl $0x1FF, 0xFEE000F0             # software-enable the local APIC (SVR)
    movl $0x000C4500, 0xFEE00300        # INIT to all but self
    movl $0x000C4608, 0xFEE00300        # SIPI to all but self: start at 0x8000
bsp_wait:
    lock incl bsp_spins
    cmpl $0, ap_started
    je bsp_wait
    mov $20000, %ecx
bsp_work:
    lock incl shared
    loop bsp_work
    mov $'K', %al
    out %al, $0xe9
    mov $0, %al
    out %al, $0xf4                      # isa-debug-exit: status 1
    hlt

    .globl ap_main
ap_main:                                # every AP, once in protected mode
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    lock incl ap_started
ap_spin:
    lock incl shared
    pause
    jmp ap_spin

    .code16
tramp:                                  # at 0x8000: an AP starts here in real mode
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl 0x8000 + (gdt_ptr - tramp)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_main
    .p2align 3
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF            # 0x08: flat 32-bit code
    .quad 0x00CF92000000FFFF            # 0x10: flat data
gdt_ptr:
    .word gdt_ptr - gdt - 1
    .long 0x8000 + (gdt - tramp)
tramp_end:

    .code32
    .p2align 2
ap_started: .long 0
bsp_spins: .long 0
shared: .long 0
"""

needs_tools = pytest.mark.skipif(not all(shutil.which(t) for t in ("gcc", "ld", "gdb", "nm")),
                                 reason="needs gcc, ld, gdb and nm")


@pytest.fixture(scope="module")
def smp_guest(tmp_path_factory):
    """(ELF for gdb's symbols, flat binary for xenicorn) of :data:`SMP_GUEST`, linked at 0x100000."""
    d = tmp_path_factory.mktemp("smpguest")
    src, obj, elf, flat = d / "g.S", d / "g.o", d / "g.elf", d / "g.bin"
    src.write_text(SMP_GUEST)
    subprocess.run(["gcc", "-m32", "-c", str(src), "-o", str(obj)], check=True)
    link = ["ld", "-m", "elf_i386", "-Ttext=0x100000", "-e", "_start", str(obj)]
    subprocess.run([*link, "-o", str(elf)], check=True)
    subprocess.run([*link, "--oformat", "binary", "-o", str(flat)], check=True)
    return elf, flat


def _run_gdb(elf, flat, cpus: int, commands: list[str]) -> tuple[str, str, int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "xenicorn", "run", str(flat), "--load-addr", "0x100000",
                             "--no-xen", "-smp", str(cpus), "-gdb", f"tcp::{port}", "-S", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        args = ["gdb", *GDB_FLAGS, "-ex", "set pagination off", "-ex", "set tcp connect-timeout 30",
                "-ex", f"file {elf}", "-ex", f"target remote 127.0.0.1:{port}"]
        for cmd in commands:
            args += ["-ex", cmd]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return done.stdout + done.stderr, stdout + stderr, proc.returncode


def _values(out: str) -> list[int]:
    return [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)", out, re.MULTILINE)]


@needs_tools
@pytest.mark.parametrize("cpus", [2, 4])
def test_gdb_info_threads_and_a_breakpoint_on_an_ap(smp_guest, cpus):
    elf, flat = smp_guest
    sym = _symbols(elf)
    out, console, status = _run_gdb(elf, flat, cpus, [
        "info threads", "break ap_main", "continue", "info registers eip",
        "thread 1", "p/x $pc", "thread 2", "p/x $pc", "stepi", "p/x $pc", "thread 1", "p/x $pc",
        "info threads", "delete", "detach"])
    # before the first instruction: the BSP runs, every AP waits for its start-up IPI
    listed = re.findall(r"^[* ] (\d+)\s+Thread (\d+) \(CPU#(\d+) \[([a-zA-Z-]+)\]\)", out, re.MULTILINE)
    first = listed[:cpus]
    assert [(int(i), int(t), int(n)) for i, t, n, _ in first] == [(k + 1, k + 1, k) for k in range(cpus)], out
    assert [s for *_, s in first] == ["running"] + ["wait-for-SIPI"] * (cpus - 1)
    # the AP that reaches ap_main first (vCPU 1: the round robin runs it after the BSP) is thread 2
    ap_main = sym["ap_main"]
    assert f"Thread 2 hit Breakpoint 1, 0x{ap_main:08x} in ap_main ()" in out, out
    assert re.search(rf"^eip\s+0x{ap_main:x}\s+0x{ap_main:x} <ap_main>", out, re.MULTILINE), out
    bsp_pc, ap_pc, stepped, bsp_after = _values(out)
    assert sym["_start"] <= bsp_pc < sym["ap_main"] and bsp_pc != ap_main     # thread 1 is the BSP
    assert ap_pc == ap_main and ap_main < stepped < sym["ap_spin"]            # stepi moved vCPU 1 only
    assert bsp_after == bsp_pc
    # afterwards every AP has started
    listed = listed[cpus:]
    assert len(listed) == cpus and all(s != "wait-for-SIPI" for *_, s in listed), out
    assert "[Inferior 1 (Remote target) detached]" in out
    assert status == 1 and "K" in console, console


@needs_tools
def test_gdb_scheduler_locking_on_runs_only_the_selected_vcpu(smp_guest):
    """``set scheduler-locking on`` makes gdb send ``vCont;c:2``: the BSP stays put until it is off."""
    elf, flat = smp_guest
    sym = _symbols(elf)
    out, console, status = _run_gdb(elf, flat, 2, [
        "break ap_main", "continue", "delete", "set scheduler-locking on", "break bsp_work", "break ap_spin",
        "continue", "continue", "thread 1", "p/x $pc", "set scheduler-locking off", "continue",
        "delete", "detach"])
    assert out.count("Thread 2 hit Breakpoint 3, ") == 2, out
    assert out.count("hit Breakpoint 2, ") == 1                  # bsp_work, only once the lock is off
    assert f"Thread 1 hit Breakpoint 2, 0x{sym['bsp_work']:08x} in bsp_work ()" in out
    (bsp_pc,) = _values(out)
    assert sym["bsp_wait"] <= bsp_pc < sym["bsp_work"]            # held in its wait loop meanwhile
    assert status == 1 and "K" in console, console
