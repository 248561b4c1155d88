"""Control-register writes the CPU engine let through unchecked: judged here.

The engine intercepts MOV to CR0/CR4, LMSW and CLTS before they run
(:mod:`xenicorn.engine.msr`, :mod:`xenicorn.x86.crdecode`) and WRMSR to
EFER through the MSR permission map. Each write is checked against the
architecture and the CPUID policy the guest sees (:mod:`xenicorn.x86.crcheck`):
a good one is performed here, exactly as the instruction would (the engine's
own CR update, then RIP past the instruction); a bad one is #GP(0) with RIP
at the instruction, delivered like every other exception Python delivers
(:meth:`ExitDispatcher.deliver`).
"""
from __future__ import annotations

from .. import exits as E
from ..x86 import crcheck
from ..x86.interrupts import EventType
from . import umip

CHECKED_CRS = (1 << 0) | (1 << 4)


def arm(vcpu) -> None:
    """Intercept this vCPU's CR0/CR4 writes from now on, and EFER writes while the MSR window is open.

    The CR check runs in QEMU's CR-write helper; what it costs elsewhere
    (HF_GUEST: PUSHF/POPF, IRET, IN/OUT get a helper call) is measured in
    docs/unicorn-notes.md. EFER is caught through the MSR
    permission map, which QEMU consults only while the MSR window is open
    (engine/msr.py): the window is not kept open for it (PVH guests run
    with it closed once Xen's hypercall page is set up), so a WRMSR to EFER
    in steady state gets QEMU's own handling: unsupported bits dropped, no
    #GP (docs/unicorn-notes.md).
    """
    vcpu.msr.watch_cr_writes(CHECKED_CRS)
    vcpu.msr.watch(crcheck.MSR_EFER, read=False, write=True)


class CrWriteChecker:
    """The machine's half: the policy's features and the two exit handlers."""

    def __init__(self, machine):
        self.machine = machine

    @property
    def features(self) -> crcheck.Features:
        # asked anew each time (a few CPUID lookups; CR writes are rare): no state to snapshot
        return crcheck.features_from_cpuid(lambda leaf, sub: self.machine.cpuid.query(leaf, sub))

    def _fault(self, vcpu, why: str) -> E.Action:
        tracer = self.machine.tracer
        if tracer.on("io"):
            tracer.emit("io", f"#GP(0): {why}")
        return self.machine.dispatch.deliver(vcpu, 13, EventType.HARDWARE_EXCEPTION, 0)

    def cr_write(self, vcpu, ex: E.CrWrite) -> E.Action:
        old = vcpu.reg(f"cr{ex.cr}")
        efer = vcpu.efer()
        if ex.cr == 0:
            why = crcheck.check_cr0(old, ex.value, cr4=vcpu.reg("cr4"), efer=efer,
                                    code64=vcpu.code_bits() == 64)
            value = ex.value | crcheck.CR0_ET        # hardwired to 1 (QEMU sets it too)
        else:
            why = crcheck.check_cr4(old, ex.value, valid=crcheck.cr4_valid_bits(self.features), efer=efer,
                                    cr3=vcpu.reg("cr3"))
            value = ex.value
        if why is not None:
            return self._fault(vcpu, why)
        vcpu.set_reg(f"cr{ex.cr}", value)
        if ex.cr == 4:
            umip.sync(vcpu, value)                # CR4.UMIP arms the SGDT & co. intercepts (umip.py)
        vcpu.pc = ex.pc + ex.length
        return E.Action.CONTINUE

    def efer_write(self, vcpu, ex: E.Msr) -> E.Action:
        if not ex.write:                          # reads are not intercepted; answer truly anyway
            ex.value = vcpu.efer()
            return E.Action.CONTINUE
        why = crcheck.check_efer(vcpu.efer(), ex.value, cr0=vcpu.reg("cr0"), features=self.features)
        if why is not None:
            return self._fault(vcpu, why)
        vcpu.msr_write(crcheck.MSR_EFER, ex.value)
        return E.Action.CONTINUE
