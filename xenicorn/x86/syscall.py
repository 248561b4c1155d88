"""SYSCALL and SYSENTER: the fast system-call entries, given their effect.

Unicorn translates both instructions into a call to the UC_HOOK_INSN hook
and nothing else; SYSRET and SYSEXIT it executes itself. So, as for
interrupt delivery, xenicorn performs the entry in Python (SDM vol. 2B,
"SYSCALL" and "SYSENTER"):

===========  ===============================================================
SYSCALL      RCX ← RIP of the next instruction; R11 ← RFLAGS;
(64-bit)     RFLAGS ← RFLAGS & ~IA32_FMASK (and RF cleared);
             CS ← IA32_STAR[47:32] (flat 64-bit code, DPL 0);
             SS ← IA32_STAR[47:32] + 8 (flat data, DPL 0); RIP ← IA32_LSTAR.
             #UD if EFER.SCE = 0. Outside 64-bit mode Intel CPUs raise #UD;
             AMD's legacy/compatibility forms use STAR[31:0] / CSTAR.
SYSENTER     CS ← IA32_SYSENTER_CS (#GP(0) if null), SS ← CS + 8,
             RSP ← IA32_SYSENTER_ESP, RIP ← IA32_SYSENTER_EIP, CPL 0;
             RFLAGS.VM, IF, RF cleared; a 64-bit entry in IA-32e mode.
===========  ===============================================================

One Unicorn detail shapes the code: when the hook returns, Unicorn adds
the instruction's length (2) to RIP, so the hook leaves RIP two bytes
*before* the target (measured for both instructions; see
docs/unicorn-notes.md). The vCPU is reached through its typed interface
(:mod:`.cpu`), never the engine's handle.
"""
from __future__ import annotations

from .cpu import Vcpu
from .interrupts import EventType, deliver
from .segments import flat_code32, flat_code64, flat_data

EFER, STAR, LSTAR, CSTAR, FMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176
EFER_SCE, EFER_LMA = 1 << 0, 1 << 10
IF, RF, VM = 1 << 9, 1 << 16, 1 << 17
INSN_LEN = 2


def _fault(vcpu: Vcpu, vector: int, error_code: int | None) -> None:
    """Raise an exception at the instruction, undoing Unicorn's +2."""
    rec = deliver(vcpu, vector, EventType.HARDWARE_EXCEPTION, error_code)
    vcpu.set_reg("rip", rec.new["rip"] - INSN_LEN)


def _enter(vcpu: Vcpu, cs, ss, rip: int, rsp: int | None, rflags: int) -> None:
    with vcpu.cpu_state() as state:
        state.load_segments(cs=cs, ss=ss)
    if rsp is not None:
        vcpu.set_reg("rsp", rsp)
    vcpu.set_reg("rflags", rflags)
    vcpu.set_reg("rip", rip - INSN_LEN)


def do_syscall(vcpu: Vcpu) -> None:
    """SYSCALL from the UC_HOOK_INSN hook (RIP is at the instruction)."""
    efer = vcpu.msr_read(EFER)
    if not efer & EFER_SCE:
        return _fault(vcpu, 6, None)
    rip = vcpu.reg("rip")
    rflags = vcpu.reg("rflags")
    star = vcpu.msr_read(STAR)
    sel = (star >> 32) & 0xFFFC
    bits = vcpu.code_bits()
    if efer & EFER_LMA:
        if bits != 64 and vcpu.machine.config.vendor != "amd":
            return _fault(vcpu, 6, None)
        vcpu.set_reg("rcx", rip + INSN_LEN)
        vcpu.set_reg("r11", rflags & ~RF)
        target = vcpu.msr_read(LSTAR if bits == 64 else CSTAR)
        new_flags = rflags & ~vcpu.msr_read(FMASK) & ~RF
        _enter(vcpu, flat_code64(sel), flat_data(sel + 8), target, None, new_flags | 2)
        return None
    if vcpu.machine.config.vendor != "amd":
        return _fault(vcpu, 6, None)
    # AMD legacy mode: ECX = return EIP, target in STAR[31:0]
    vcpu.set_reg("rcx", (rip + INSN_LEN) & 0xFFFFFFFF)
    _enter(vcpu, flat_code32(sel), flat_data(sel + 8), star & 0xFFFFFFFF, None,
           (rflags & ~(IF | VM | RF)) | 2)
    return None


def do_sysenter(vcpu: Vcpu) -> None:
    """SYSENTER from the UC_HOOK_INSN hook (RIP is at the instruction)."""
    cs = vcpu.msr_read(SYSENTER_CS) & 0xFFFC
    if not vcpu.reg("cr0") & 1 or cs == 0:
        return _fault(vcpu, 13, 0)
    rflags = vcpu.reg("rflags")
    new_flags = (rflags & ~(IF | VM | RF)) | 2
    esp, eip = vcpu.msr_read(SYSENTER_ESP), vcpu.msr_read(SYSENTER_EIP)
    if vcpu.msr_read(EFER) & EFER_LMA:
        _enter(vcpu, flat_code64(cs), flat_data(cs + 8), eip, esp, new_flags)
    else:
        _enter(vcpu, flat_code32(cs), flat_data(cs + 8), eip & 0xFFFFFFFF, esp & 0xFFFFFFFF, new_flags)
    return None
