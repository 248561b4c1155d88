"""NMI blocking: after an NMI, further NMIs wait for the next IRET (SDM vol. 3 §6.7.1).

The firmware kernels nmi32/nmi64 show it end to end with self-NMIs through
the local APIC; the machine tests below pin down where the held NMI is taken
(the IRET's target) and that a snapshot carries the blocked state.
"""
import pytest

from xenicorn.engine.vcpustate import VcpuRecord

from test_firmware import run
from test_interrupts import protected

NMI_HANDLER = 0x400000 + 16 * 2          # protected()'s IDT: vector v at 0x400000 + 16 v


class NmiSource:
    """An interrupt controller with an NMI waiting and nothing else."""

    def __init__(self):
        self.nmi_pending = True

    def pending(self):
        return False


def held_nmi_machine(machine):
    """Protected mode; ``push flags, cs, eip; iretd`` to 0x100010 (``inc eax; hlt``); an NMI waiting.

    The NMI handler is ``pop ebx; hlt``: EBX is the EIP the NMI interrupted.
    """
    vcpu = protected(machine)
    vcpu.set_reg("rflags", 0x2)
    code = bytes.fromhex("6a02" "6a08" "6810001000" "cf").ljust(0x10, b"\x90") + bytes.fromhex("40f4")
    machine.memory.write(0x100000, code)
    machine.memory.write(NMI_HANDLER, bytes.fromhex("5b" "f4"))
    machine.interrupt_source = NmiSource()
    machine.config.max_insns = 100_000
    return vcpu


def test_an_nmi_while_not_blocked_is_taken_at_once(machine):
    vcpu = held_nmi_machine(machine)
    machine.run()
    assert vcpu.reg("rbx") & 0xFFFFFFFF == 0x100000
    assert vcpu.nmi_blocked()                           # the handler's HLT: no IRET since


def test_a_blocked_nmi_is_taken_right_after_the_next_iret(machine):
    vcpu = held_nmi_machine(machine)
    vcpu.set_nmi_blocked(True)
    machine.run()
    assert not machine.interrupt_source.nmi_pending
    assert vcpu.reg("rbx") & 0xFFFFFFFF == 0x100010     # the IRET's target, before its inc ran
    assert vcpu.reg("rax") & 0xFFFFFFFF == 0
    assert vcpu.nmi_blocked() and not vcpu.msr.nmi_window and not vcpu._irq_request.nmi


def test_a_snapshot_carries_the_blocked_state(machine):
    vcpu = held_nmi_machine(machine)
    vcpu.set_nmi_blocked(True)
    vcpu.arm_nmi_window()
    record = VcpuRecord(vcpu)
    saved = record.save_record()
    vcpu.set_nmi_blocked(False)
    vcpu.disarm_nmi_window()
    record.apply_record(record.check_record(saved))
    assert vcpu.nmi_blocked() and not vcpu.msr.nmi_window   # the run loop arms the window again
    machine.run()
    assert vcpu.reg("rbx") & 0xFFFFFFFF == 0x100010


@pytest.mark.parametrize("name", ["nmi32", "nmi64"])
def test_nmi_blocking_as_a_guest_sees_it(name):
    machine, _, status, text = run(name)
    assert status == 0 and text.rstrip().endswith("Test result: SUCCESS"), text
    assert "FAIL" not in text
    for line in ("ok ... and is taken after the handler's IRET (2 NMIs)",
                 "ok a faulting IRET ends the blocking too: the held NMI is taken before the #GP handler "
                 "runs (2 NMIs when it ran)",
                 "ok no NMI is lost or repeated (2 NMIs)",
                 "ok three self-NMIs while blocked are one held NMI (2 NMIs, 0 inside)"):
        assert line in text
    vcpu = machine.vcpu
    assert not vcpu.nmi_blocked() and not vcpu.msr.nmi_window and not machine.lapic.nmi_pending
