"""The interrupt window: an exit exactly where x86 would take a pending interrupt.

While an interrupt waits and the guest has interrupts off, the vCPU asks for
an exit when IF becomes 1 (after STI's one-instruction shadow, after POPF
or IRET). xenicorn gets it from QEMU's own window check as an SVM VINTR exit
(engine/irqwindow.py): no block hook, no translation flush.
"""

import pytest

from xenicorn.engine import irqwindow

from xenicorn.engine.rawctx import RawContext
from xenicorn.x86.segments import SegmentCache, DESC_P

from test_interrupts import protected, TSS

VECTOR = 0x40
HANDLER = 0x400000 + 16 * VECTOR


class OneInterrupt:
    """An interrupt controller with one interrupt pending."""

    def __init__(self, vector):
        self.vector = vector

    def pending(self):
        return self.vector is not None

    def acknowledge(self):
        vector, self.vector = self.vector, None
        return vector


def run_with_interrupt_waiting(machine, code: bytes) -> int:
    """Run ``code`` (IF=0) with an interrupt pending; the EIP it interrupted."""
    vcpu = protected(machine)
    vcpu.set_reg("rflags", 0x2)                                     # interrupts off
    machine.memory.write(0x100000, code)
    machine.memory.write(HANDLER, bytes.fromhex("5b" "f4"))         # pop ebx (the return EIP) ; hlt
    machine.interrupt_source = OneInterrupt(VECTOR)
    machine.config.max_insns = 1_000_000
    machine.run()
    assert machine.interrupt_source.vector is None, "the interrupt was never taken"
    return vcpu.reg("rbx") & 0xFFFFFFFF


def test_the_exit_and_its_self_test_work_on_the_pinned_unicorn():
    assert irqwindow.available()


def test_sti_opens_the_window_after_the_instruction_in_its_shadow(machine):
    # mov ecx, 100000 ; l: dec ecx ; jnz l ; sti ; nop ; inc eax ; hlt
    code = bytes.fromhex("b9a0860100" "ffc9" "75fc" "fb" "90" "40" "f4")
    interrupted = run_with_interrupt_waiting(machine, code)
    assert interrupted == 0x100000 + 11                              # the inc, after sti; nop
    assert machine.vcpu.reg("rcx") == 0 and machine.vcpu.reg("rax") == 0
    assert machine.vcpu.window_exits == 1
    assert machine.vcpu._window_hook is None                         # no block hook was needed


def test_popf_opens_the_window_right_after_it(machine):
    # pushfd ; or dword [esp], 0x200 ; popfd ; inc eax ; hlt
    code = bytes.fromhex("9c" "810c2400020000" "9d" "40" "f4")
    assert run_with_interrupt_waiting(machine, code) == 0x100000 + 9
    assert machine.vcpu.window_exits == 1


def test_iret_to_code_with_if_set_opens_the_window(machine):
    # push 0x202 ; push 0x08 ; push 0x100020 ; iretd  ...  0x100020: inc eax ; hlt
    code = bytes.fromhex("6802020000" "6a08" "6820001000" "cf").ljust(0x20, b"\x90") + bytes.fromhex("40f4")
    assert run_with_interrupt_waiting(machine, code) == 0x100020
    assert machine.vcpu.window_exits == 1


def test_sti_hlt_sleeps_then_takes_the_interrupt_after_the_hlt(machine):
    code = bytes.fromhex("fb" "f4" "40" "f4")                         # sti ; hlt ; inc eax ; hlt
    assert run_with_interrupt_waiting(machine, code) == 0x100000 + 2


def test_a_disarmed_window_leaves_no_request_behind(machine):
    vcpu = machine.vcpu
    protected(machine)
    vcpu.arm_interrupt_window()
    assert vcpu._irq_request.virq and vcpu.msr.interrupt_window
    vcpu.disarm_interrupt_window()
    assert not vcpu._irq_request.virq and not vcpu.msr.interrupt_window
    # and the SVM intercept state is gone with it: MSRs behave as with the window closed
    assert not vcpu.msr.is_open


def test_the_block_hook_fallback_opens_the_same_window(machine):
    """Builds where the exit does not work keep the block hook: same semantics, slower."""
    machine.vcpu._irq_request = None
    code = bytes.fromhex("b9a0860100" "ffc9" "75fc" "fb" "90" "40" "f4")
    assert run_with_interrupt_waiting(machine, code) == 0x100000 + 11
    assert machine.vcpu.window_exits == 0


def test_live_context_is_the_engines_cpu_state_not_a_copy():
    """LiveContext reads and writes CPUX86State in place (found through qemu_get_cpu)."""
    from unicorn import Uc, UC_ARCH_X86, UC_MODE_64
    from unicorn import x86_const as X
    from xenicorn.engine.rawctx import LiveContext, RawContext, OFF_REGS, OFF_OLD_EXCEPTION
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    live = LiveContext(uc)
    uc.reg_write(X.UC_X86_REG_RBX, 0x1234)
    assert live.read(OFF_REGS + 3 * 8, "<Q") == 0x1234                  # regs[R_EBX]
    live.write(OFF_REGS + 3 * 8, "<Q", 0x5678)
    assert uc.reg_read(X.UC_X86_REG_RBX) == 0x5678                      # no commit needed
    live.write(OFF_OLD_EXCEPTION, "<i", 8)
    assert RawContext(uc).read(OFF_OLD_EXCEPTION, "<i") == 8            # a saved copy sees it too
    live.consume_exception()
    assert RawContext(uc).read(OFF_OLD_EXCEPTION, "<i") == -1


@pytest.mark.parametrize("cpl", [0, 3])
def test_the_engine_delivers_external_interrupts_as_python_does(cpl):
    """With nobody watching deliveries, the CPU engine delivers the vector itself (VMCB int_vector).

    The frame it pushes, the registers and the handler it enters must be
    those of xenicorn's own delivery (x86/interrupts.py), which the
    firmware tests hold to the SDM: same guest, delivered both ways.
    """
    from xenicorn.devices.console import ConsoleSink
    from xenicorn.machine.machine import Machine, MachineConfig
    from test_interrupts import stack
    results = []
    for watched in (False, True):
        m = Machine(MachineConfig(ram_mib=16, debugcon="none"), console=ConsoleSink(None))
        vcpu = protected(m, cpl=cpl)
        with RawContext(vcpu.uc) as ctx:                                    # TR as LTR leaves it: available type
            ctx.set_segment("tr", SegmentCache(0x28, TSS, 0x67, DESC_P | (0x9 << 8)))
        m.memory.write(0x100000, bytes.fromhex("90" "90" "f4"))             # nop ; nop ; hlt
        m.memory.write(HANDLER, bytes.fromhex("f4"))                        # hlt
        if watched:
            m.tracer.listeners.append(lambda *a: None)                       # someone watches: Python delivers
        m.interrupt_source = OneInterrupt(VECTOR)
        m.config.max_insns = 100_000
        m.run()
        sp = vcpu.reg("rsp") & 0xFFFFFFFF
        regs = {r: vcpu.reg(r) for r in ("rip", "rsp", "rflags", "cs", "ss")}
        results.append((regs, stack(m, sp, 5 if cpl else 3), vcpu.engine_deliveries))
        m.close()
    (engine_regs, engine_frame, n_engine), (python_regs, python_frame, n_python) = results
    assert n_engine == 1 and n_python == 0
    assert engine_regs == python_regs and engine_frame == python_frame
    assert engine_regs["rip"] == HANDLER + 1 and engine_frame[0] == 0x100000   # taken before the first nop
    if cpl:
        assert engine_regs["rsp"] & 0xFFFFFFFF == 0x9000 - 20                 # ring-0 stack from the TSS


def test_a_tss_the_engine_would_abort_on_is_left_to_python(machine):
    """QEMU aborts the process on a busy-type TR cache during a stack switch; Python delivers then."""
    vcpu = protected(machine, cpl=3)                 # the PVH-style busy 32-bit TSS in the TR cache
    machine.memory.write(0x100000, bytes.fromhex("90" "f4"))
    machine.memory.write(HANDLER, bytes.fromhex("f4"))
    machine.interrupt_source = OneInterrupt(VECTOR)
    machine.run()
    assert machine.interrupt_source.vector is None and vcpu.engine_deliveries == 0
    assert vcpu.reg("rip") == HANDLER + 1 and vcpu.reg("rsp") & 0xFFFFFFFF == 0x9000 - 20


def test_the_unmapped_memory_hook_leaves_ram_alone():
    """Unicorn keeps stores to any page a memory hook covers on its slow path: the hook covers gaps only."""
    from xenicorn.engine.vcpu import VCpu
    top = (1 << 64) - 1
    assert VCpu._gaps_in([(0, 0x1000000, 0)]) == [(0x1000000, top)]
    assert VCpu._gaps_in([(0x100000000, 0x1000, 0x2000), (0, 0xC0000000, 0)]) == [
        (0xC0000000, 0xFFFFFFFF), (0x100001000, top)]
    assert VCpu._gaps_in([(0x1000, 0x1000, 0)]) == [(0, 0xFFF), (0x2000, top)]
