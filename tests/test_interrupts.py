"""Event delivery corner cases, by setting CPU state and calling deliver().

The firmware kernels (test_firmware.py) cover the common frames end to end;
these reach paths a kernel rarely takes: real mode, the EXT bit, the gate
DPL check for INT n, task gates to nothing, SYSENTER.
"""
import struct

import pytest
from unicorn import x86_const as X

from xenicorn.x86.interrupts import EventType, TripleFault, deliver
from xenicorn.engine.rawctx import RawContext
from xenicorn.x86.segments import SegmentCache, DESC_P, DESC_S, flat_code32, flat_data

GDT, IDT, TSS = 0x1000, 0x2000, 0x3000
CODE32_DPL0 = 0x00CF9A000000FFFF
DATA_DPL0 = 0x00CF92000000FFFF
CODE32_DPL3 = 0x00CFFA000000FFFF
DATA_DPL3 = 0x00CFF2000000FFFF


def gate32(offset, selector=0x08, dpl=0, kind=0xE, present=True):
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0,
                       (0x80 if present else 0) | (dpl << 5) | kind, offset >> 16)


def protected(machine, cpl=0):
    """32-bit flat protected mode with GDT, IDT and a TSS whose ring-0 stack is 0x9000."""
    mem, vcpu = machine.memory, machine.vcpu
    vcpu.reset_to_flat32(0x100000, esp=0x8000)
    mem.write(GDT, struct.pack("<6Q", 0, CODE32_DPL0, DATA_DPL0, CODE32_DPL3, DATA_DPL3, 0))
    mem.write_struct(TSS + 4, "<II", 0x9000, 0x10)                 # ESP0, SS0
    uc = vcpu.uc
    uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, 6 * 8 - 1, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 256 * 8 - 1, 0))
    with RawContext(uc) as ctx:
        ctx.set_segment("tr", SegmentCache(0x28, TSS, 0x67, DESC_P | (0xB << 8)))
        if cpl == 3:
            ctx.load_segments(cs=flat_code32(0x1B, 3), ss=flat_data(0x23, 3))
    for v in range(256):
        mem.write(IDT + 8 * v, gate32(0x400000 + 16 * v))
    vcpu.set_reg("rflags", 0x202)
    return vcpu


def stack(machine, sp, n):
    return list(struct.unpack(f"<{n}I", machine.memory.read(sp, 4 * n)))


def test_real_mode_uses_the_ivt_and_pushes_flags_cs_ip(machine):
    vcpu = machine.vcpu
    vcpu.reset_to_flat32(0)
    uc = vcpu.uc
    uc.reg_write(X.UC_X86_REG_CR0, 0x10)                            # PE off
    code16 = SegmentCache(0x1000, 0x10000, 0xFFFF, DESC_P | DESC_S | (0xB << 8))
    data16 = SegmentCache(0, 0, 0xFFFF, DESC_P | DESC_S | (0x3 << 8))
    with RawContext(uc) as ctx:
        ctx.load_segments(cs=code16, ss=data16)
    uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0x3FF, 0))
    machine.memory.write_struct(0x21 * 4, "<HH", 0x0100, 0x2000)      # IVT[0x21] = 2000:0100
    vcpu.set_reg("rip", 0x0123)
    vcpu.set_reg("rsp", 0x7000)
    vcpu.set_reg("rflags", 0x202)
    rec = deliver(vcpu, 0x21, EventType.SOFTWARE_INTERRUPT)
    assert rec.mode == "real"
    assert struct.unpack("<HHH", machine.memory.read(0x6FFA, 6)) == (0x0123, 0x1000, 0x202)
    ctx = RawContext(uc)
    assert ctx.segment("cs").selector == 0x2000 and ctx.segment("cs").base == 0x20000
    assert vcpu.pc == 0x100 and vcpu.reg("rsp") == 0x6FFA
    assert not vcpu.reg("rflags") & (1 << 9)


def test_external_interrupt_through_an_interrupt_gate(machine):
    vcpu = protected(machine)
    vcpu.set_reg("rip", 0x100123)
    old_cs = RawContext(vcpu.uc).segment("cs").selector
    rec = deliver(vcpu, 0x30, EventType.EXTERNAL)
    assert vcpu.pc == 0x400000 + 16 * 0x30 and rec.error_code is None
    assert stack(machine, 0x8000 - 12, 3) == [0x100123, old_cs, 0x202]    # RF not set: not a fault
    assert RawContext(vcpu.uc).segment("cs").selector == 0x08
    assert not vcpu.reg("rflags") & (1 << 9)


def test_trap_gate_keeps_if(machine):
    vcpu = protected(machine)
    machine.memory.write(IDT + 8 * 0x31, gate32(0x500000, kind=0xF))
    deliver(vcpu, 0x31, EventType.EXTERNAL)
    assert vcpu.reg("rflags") & (1 << 9)


def test_not_present_gate_for_an_external_interrupt_sets_ext(machine):
    vcpu = protected(machine)
    machine.memory.write(IDT + 8 * 0x30, gate32(0x500000, present=False))
    rec = deliver(vcpu, 0x30, EventType.EXTERNAL)
    assert rec.vector == 11 and rec.error_code == (0x30 << 3) | 2 | 1     # IDT | EXT
    assert rec.chain and "0x30" in rec.chain[0]
    assert stack(machine, 0x8000 - 16, 1) == [(0x30 << 3) | 3]


def test_int_n_from_cpl3_through_a_dpl0_gate_is_gp(machine):
    vcpu = protected(machine, cpl=3)
    vcpu.set_reg("rsp", 0x7000)
    vcpu.set_reg("rip", 0x100042)
    rec = deliver(vcpu, 0x40, EventType.SOFTWARE_INTERRUPT)
    assert rec.vector == 13 and rec.error_code == (0x40 << 3) | 2          # no EXT for INT n
    assert rec.stack_switched and vcpu.cpl() == 0
    # ring-0 stack from the TSS: error code, EIP, CS, EFLAGS, ESP, SS; the
    # fault is the INT instruction's, so EIP is the INT's (0x100040), not past it
    assert stack(machine, 0x9000 - 24, 6) == [0x202, 0x100040, 0x1B, 0x202 | (1 << 16), 0x7000, 0x23]


@pytest.mark.parametrize("code, vector, at", [(b"\xcd\x21", 0x21, 0x100040), (b"\xcc", 3, 0x100041),
                                               (b"\xcd\x03", 3, 0x100040), (b"\x67\xcc", 3, 0x100040),
                                               (b"\x3e\x67\xcd\x21", 0x21, 0x10003E)],
                         ids=["int-n", "int3", "int-3", "addr16-int3", "ds-addr16-int-n"])
def test_fault_delivering_a_software_interrupt_points_at_the_instruction(machine, code, vector, at):
    """SDM vol. 3 §6.5: a fault's saved EIP is the faulting instruction's, and
    a fault while delivering INT n / INT3 is the INT's own (QEMU TCG agrees;
    kvm-unit-tests' eventinj fixes the IDT in its #NP handler and returns to
    run the INT again). RIP is past the INT when delivery starts."""
    vcpu = protected(machine)
    machine.memory.write(0x100042 - len(code), code)
    machine.memory.write(IDT + 8 * vector, gate32(0x500000, present=False))
    vcpu.set_reg("rip", 0x100042)
    rec = deliver(vcpu, vector, EventType.SOFTWARE_INTERRUPT)
    assert rec.vector == 11 and rec.error_code == (vector << 3) | 2      # IDT bit, no EXT
    assert stack(machine, vcpu.reg("rsp"), 2) == [(vector << 3) | 2, at]


def test_int_n_from_cpl3_through_a_dpl3_gate_switches_stacks(machine):
    vcpu = protected(machine, cpl=3)
    machine.memory.write(IDT + 8 * 0x80, gate32(0x600000, dpl=3))
    vcpu.set_reg("rsp", 0x7000)
    vcpu.set_reg("rip", 0x100044)
    rec = deliver(vcpu, 0x80, EventType.SOFTWARE_INTERRUPT)
    assert rec.vector == 0x80 and vcpu.pc == 0x600000 and vcpu.reg("rsp") == 0x9000 - 20
    assert stack(machine, 0x9000 - 20, 5) == [0x100044, 0x1B, 0x202, 0x7000, 0x23]
    assert RawContext(vcpu.uc).segment("ss").selector == 0x10


def test_task_gates_to_a_null_descriptor_end_in_a_triple_fault(machine):
    """#GP's task gate names GDT entry 5, which is null: #GP(0x28|EXT), then #DF through the
    same kind of gate faults again (task switches: tests/test_taskswitch.py)."""
    vcpu = protected(machine)
    machine.memory.write(IDT + 8 * 0x08, gate32(0, selector=0x28, kind=0x5))
    machine.memory.write(IDT + 8 * 0x0D, gate32(0, selector=0x28, kind=0x5))
    with pytest.raises(TripleFault, match="task gate selector 0x28 is not a TSS"):
        deliver(vcpu, 0x0D, EventType.HARDWARE_EXCEPTION, 0)


def test_stack_fault_chain_ends_in_triple_fault(machine):
    vcpu = protected(machine)
    mem = machine.memory
    for i in range(1024):
        mem.write_u32(0x10000 + 4 * i, (i << 22) | 0x83)
    mem.write_u32(0x10000 + 4 * 1, 0)                               # 0x400000-0x7FFFFF not present
    vcpu.uc.reg_write(X.UC_X86_REG_CR4, 0x10)
    vcpu.uc.reg_write(X.UC_X86_REG_CR3, 0x10000)
    vcpu.uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
    vcpu.set_reg("rsp", 0x400800)
    with pytest.raises(TripleFault) as exc:
        deliver(vcpu, 0x30, EventType.EXTERNAL)
    msg = str(exc.value)
    assert "#PF" in msg and "#DF" in msg
    assert vcpu.reg("cr2") == 0x4007F4                              # where the first push faulted


def test_sysenter_and_sysexit_round_trip(machine):
    vcpu = protected(machine, cpl=3)
    uc = vcpu.uc
    # GDT for SYSEXIT: CS+16 = 0x18 user code, CS+24 = 0x20 user data (already in place)
    uc.msr_write(0x174, 0x08)
    uc.msr_write(0x175, 0x9000)
    uc.msr_write(0x176, 0x200000)
    # user: sysenter ; (returns here) mov al,'U' ; out 0xe9 ; poweroff
    user = bytes.fromhex("0f34" "b055e6e9" "66b80020" "66ba0406" "66ef" "f4")
    # kernel: mov al,'K' ; out 0xe9 ; mov edx, user+2 ; mov ecx, 0x7000 ; sysexit
    kernel = bytes.fromhex("b04be6e9" "ba02001000" "b900700000" "0f35")
    machine.memory.write(0x100000, user)
    machine.memory.write(0x200000, kernel)
    machine.memory.code_written(0x100000, 0x101000)
    vcpu.set_reg("rip", 0x100000)
    vcpu.set_reg("rsp", 0x7000)
    vcpu.set_reg("rflags", 0x3202)                                  # IOPL=3: CPL3 may use ports
    assert machine.run() == 0
    assert machine.console.data == b"KU"
    assert machine.exit_counts["Syscall"] == 1 and vcpu.cpl() == 3


@pytest.mark.parametrize("code", [b"\xf1", b"\x67\xf1"], ids=["icebp", "addr16-icebp"])
def test_icebp_is_a_db_trap_and_a_fault_delivering_it_points_at_it_with_ext(machine, code):
    """ICEBP (INT1): Unicorn has no decoding for 0xF1 and reports #UD; the CPU
    raises #DB as a trap (EIP past it) with no gate DPL check, and a fault while
    delivering it is the instruction's, with EXT set (XTF swint-emulation)."""
    from xenicorn.exits import InvalidInstruction
    vcpu = protected(machine)
    machine.memory.write(0x100040, code)
    machine.memory.write(IDT + 8 * 1, gate32(0x500000))
    vcpu.set_reg("rip", 0x100040)
    machine.dispatch.handle(vcpu, InvalidInstruction(0x100040))
    rec = vcpu.last_delivery
    assert rec.vector == 1 and rec.etype is EventType.PRIVILEGED_SOFTWARE_EXCEPTION
    assert stack(machine, vcpu.reg("rsp"), 1) == [0x100040 + len(code)]       # a trap: EIP past it
    vcpu = protected(machine)
    machine.memory.write(IDT + 8 * 1, gate32(0x500000, present=False))
    vcpu.set_reg("rip", 0x100040)
    machine.dispatch.handle(vcpu, InvalidInstruction(0x100040))
    rec = vcpu.last_delivery
    assert rec.vector == 11 and rec.error_code == (1 << 3) | 2 | 1             # IDT[1], EXT
    assert stack(machine, vcpu.reg("rsp"), 2) == [(1 << 3) | 3, 0x100040]       # a fault: EIP at it
