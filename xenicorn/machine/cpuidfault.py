"""CPUID faulting: a kernel can make CPUID at CPL > 0 raise #GP(0).

Intel CPUs offer it through two MSRs, and Xen offers it to every HVM guest
whatever the host has, since it intercepts CPUID anyway ("it's always
possible to emulate CPUID faulting for HVM guests",
xen/arch/x86/cpu-policy.c ``calculate_hvm_max_policy``):

=============================  ============================================
MSR                            meaning
=============================  ============================================
0xCE  PLATFORM_INFO            read-only; bit 31: CPUID faulting is there
                               (a write is #GP: xen/arch/x86/msr.c
                               ``guest_wrmsr`` lists it as read-only)
0x140 MISC_FEATURES_ENABLES    bit 0: CPUID faulting on; every other bit is
                               reserved, #GP (``guest_wrmsr``)
=============================  ============================================

While bit 0 is set, a CPUID at CPL > 0 is #GP(0) and RIP stays at the
CPUID (xen/arch/x86/hvm/hvm.c ``hvm_vmexit_cpuid``); the kernel's own
CPUIDs run as usual. Linux uses it for ``arch_prctl(ARCH_SET_CPUID, 0)``.

xenicorn hooks every CPUID, but that hook runs inside a translated block,
where no exception can be raised; so while faulting is on, CPUID is
intercepted through the MSR window instead (engine/msr.py
``intercept_cpuid``), which ends the block at the CPUID first. The MSRs
are seen only while that window is open: for a kernel a PC firmware starts
from power-on, for any kernel from its CPUID leaf 7 (when it looks at its
features, ARCH_CAPABILITIES' interest in machine/dispatch.py), in both
cases until its first SYSCALL; and while faulting is on (so the write that
ends it is always seen). A kernel that turns
it on after its user mode began is not seen: Unicorn drops that write, and
its user code's CPUID keeps working.
"""
from __future__ import annotations

from .. import exits as E
from ..x86.interrupts import EventType

MSR_PLATFORM_INFO = 0xCE
MSR_MISC_FEATURES_ENABLES = 0x140
PLATFORM_INFO_CPUID_FAULTING = 1 << 31
CPUID_FAULTING = 1 << 0


def watch(vcpu) -> None:
    """Ask the vCPU's MSR window for exits on both MSRs (the window opens elsewhere)."""
    for msr in (MSR_PLATFORM_INFO, MSR_MISC_FEATURES_ENABLES):
        vcpu.msr.watch(msr)


def handlers(dispatcher) -> dict:
    """The MSR handlers, for :class:`~xenicorn.machine.dispatch.ExitDispatcher`'s table."""

    def platform_info(vcpu, ex: E.Msr):
        if ex.write:
            return dispatcher.deliver(vcpu, 13, EventType.HARDWARE_EXCEPTION, 0)
        ex.value = PLATFORM_INFO_CPUID_FAULTING
        return E.Action.CONTINUE

    def misc_features_enables(vcpu, ex: E.Msr):
        if not ex.write:
            ex.value = CPUID_FAULTING if vcpu.cpuid_faulting else 0
            return E.Action.CONTINUE
        if ex.value & ~CPUID_FAULTING:
            return dispatcher.deliver(vcpu, 13, EventType.HARDWARE_EXCEPTION, 0)
        vcpu.cpuid_faulting = bool(ex.value & CPUID_FAULTING)
        vcpu.msr.intercept_cpuid(vcpu.cpuid_faulting)
        return E.Action.CONTINUE

    return {MSR_PLATFORM_INFO: platform_info, MSR_MISC_FEATURES_ENABLES: misc_features_enables}


def faults(vcpu) -> bool:
    """Does a CPUID on this vCPU fault now (faulting on, CPL > 0)?"""
    return vcpu.cpuid_faulting and vcpu.cpl() > 0
