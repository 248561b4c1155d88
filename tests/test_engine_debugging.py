"""engine/debugging: breakpoints, watchpoints, instruction hooks, the count after a stop, registers by name.

Each test runs a few instructions of flat 32-bit code on a real vCPU that
counts instructions (as a machine with a gdb stub does), calling
``vcpu.run`` directly: no run loop, no gdb.
"""
from __future__ import annotations

import pytest

from xenicorn import exits as E
from xenicorn.devices.console import ConsoleSink
from xenicorn.engine import debugging as D
from xenicorn.machine.machine import Machine, MachineConfig

CODE = 0x100000
DATA = 0x101000
# inc dword [DATA]; mov eax, [DATA + 4]; mov [DATA + 6], ax; inc ebx; jmp CODE
LOOP = bytes.fromhex("ff0500101000" "a104101000" "66a306101000" "43" "ebea")
INC, LOAD, STORE16, INC_EBX = CODE, CODE + 6, CODE + 11, CODE + 17


@pytest.fixture
def vcpu():
    m = Machine(MachineConfig(ram_mib=16, debugcon="none", count_instructions=True), console=ConsoleSink(None))
    m.memory.write(CODE, LOOP)
    m.memory.code_written(CODE, len(LOOP))
    v = m.vcpu
    v.reset_to_flat32(CODE, esp=0x90000)
    yield v
    m.close()


def test_a_breakpoint_stops_before_its_instruction_even_in_code_translated_before_it(vcpu):
    assert isinstance(vcpu.run(count=10), E.Limit)                 # the loop is translated now
    hits = []

    def stop(address):
        hits.append(address)
        vcpu.stop_with(E.Debug(address, "breakpoint"))
    bp = D.add_breakpoint(vcpu, INC_EBX, stop)
    vcpu.pc = CODE
    before = vcpu.reg("rbx")
    ex = vcpu.run(count=100)
    assert isinstance(ex, E.Debug) and ex.pc == INC_EBX and hits == [INC_EBX]
    assert vcpu.pc == INC_EBX and vcpu.reg("rbx") == before        # the inc ebx has not run
    D.remove(bp)
    assert isinstance(vcpu.run(count=10), E.Limit) and hits == [INC_EBX]   # gone, also from translations


def test_the_count_is_exact_after_a_breakpoint_stop(vcpu):
    D.add_breakpoint(vcpu, INC_EBX, lambda a: vcpu.stop_with(E.Debug(a, "breakpoint")))
    ex = vcpu.run(count=0)
    assert isinstance(ex, E.Debug)
    D.uncount_stopped_instruction(vcpu, 0)
    assert vcpu.instructions == 3                                  # inc, mov, mov: not the inc ebx
    vcpu.pc = LOAD
    ex = vcpu.run(count=50)                                        # a bounded run the breakpoint ends
    D.uncount_stopped_instruction(vcpu, 50)
    assert isinstance(ex, E.Debug) and vcpu.instructions == 3 + 2


def test_a_breakpoint_callback_that_raises_ends_the_run_as_an_internal_error(vcpu):
    def broken(address):
        raise RuntimeError("a bug in the debugger")
    D.add_breakpoint(vcpu, LOAD, broken)
    ex = vcpu.run(count=100)
    assert isinstance(ex, E.Shutdown) and ex.reason == "internal-error" and "a bug in the debugger" in ex.message


def test_watchpoints_see_only_overlapping_accesses_of_their_kind(vcpu):
    writes, reads, both = [], [], []
    D.add_watchpoint(vcpu, DATA + 7, 1, D.WATCH_WRITE, lambda a, n: writes.append((a, n)))
    D.add_watchpoint(vcpu, DATA + 4, 1, D.WATCH_READ, lambda a, n: reads.append((a, n)))
    D.add_watchpoint(vcpu, DATA + 3, 1, D.WATCH_ACCESS, lambda a, n: both.append((a, n)))
    vcpu.run(count=5)                                              # one turn of the loop
    assert writes == [(DATA + 6, 2)]                               # a 2-byte store that reaches into it
    assert reads == [(DATA + 4, 4)]                                # the load, not the inc's read of DATA
    assert both == [(DATA, 4), (DATA, 4)]                          # the inc reads and writes DATA..DATA+3


def test_removed_watchpoints_and_instruction_hooks_stay_silent(vcpu):
    seen, pcs = [], []
    w = D.add_watchpoint(vcpu, DATA, 4, D.WATCH_WRITE, lambda a, n: seen.append(a))
    i = D.add_instruction_hook(vcpu, pcs.append)
    vcpu.run(count=5)
    assert seen == [DATA] and pcs == [INC, LOAD, STORE16, INC_EBX, INC_EBX + 1]
    D.remove(w, i)
    vcpu.run(count=5)
    assert seen == [DATA] and len(pcs) == 5


def test_an_instruction_hook_ends_the_run_just_after_a_watched_access(vcpu):
    hit = []
    D.add_watchpoint(vcpu, DATA + 4, 4, D.WATCH_READ, lambda a, n: hit.append(a))
    D.add_instruction_hook(vcpu, lambda pc: hit and vcpu.stop_with(E.Debug(pc, "watchpoint")))
    ex = vcpu.run(count=100)
    assert isinstance(ex, E.Debug) and ex.pc == STORE16 and vcpu.pc == STORE16   # the load has run
    assert vcpu.reg("rax") & 0xFFFFFFFF == 0


def test_watchpoint_arguments_are_checked(vcpu):
    with pytest.raises(ValueError):
        D.add_watchpoint(vcpu, DATA, 4, "execute", lambda a, n: None)
    with pytest.raises(ValueError):
        D.add_watchpoint(vcpu, DATA, 0, D.WATCH_READ, lambda a, n: None)


def test_registers_by_gdb_name(vcpu):
    regs = D.RegisterAccess(vcpu)
    regs.write("rax", 0x1122334455667788)
    assert regs.read("rax") == vcpu.reg("rax") == 0x1122334455667788
    regs.write("xmm15", (1 << 127) | 5)
    assert regs.read("xmm15") == (1 << 127) | 5
    assert regs.read("efer") == vcpu.efer() and regs.read("cr0") == vcpu.reg("cr0")
    assert regs.read("cs") == vcpu.reg("cs")
    regs.write("fctrl", 0x37F)
    assert regs.read("fctrl") == 0x37F
    for name in ("cs", "cr3", "efer"):
        with pytest.raises(D.ReadOnlyRegister):
            regs.write(name, 0)
    with pytest.raises(KeyError):
        regs.read("no-such-register")


def test_st_i_follows_the_x87_stack_top(vcpu):
    """fld1 pushes: TOP moves and the new value is ST(0), the old ST(0) is ST(1)."""
    regs = D.RegisterAccess(vcpu)
    one = 0x3FFF_8000000000000000                                 # 1.0 as an 80-bit value
    two = 0x4000_8000000000000000
    code = bytes.fromhex("dbe3" "d9e8" "d9e8" "d8c0")              # fninit; fld1; fld1; fadd st0, st0
    vcpu.machine.memory.write(0x100100, code)
    vcpu.machine.memory.code_written(0x100100, len(code))
    vcpu.pc = 0x100100
    vcpu.run(count=4)
    assert (regs.read("fstat") >> 11) & 7 == 6                     # two pushes from TOP=0
    assert regs.read("st0") == two and regs.read("st1") == one
    regs.write("st1", two)
    assert regs.read("st1") == two and regs.read("st2") != two
