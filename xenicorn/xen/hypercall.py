"""Hypercall dispatch: from a VMCALL exit to a Python handler and back.

An HVM guest enters Xen with ``VMCALL`` (Intel) or ``VMMCALL`` (AMD), usually
through a 32-byte stub of the hypercall page. The hypercall number is in
EAX; the arguments are in registers, by the calling convention of the mode
the vCPU is in (xen/include/public/arch-x86/xen-x86_{32,64}.h):

=========  ==========================  ======================
mode       arguments 1..5              result
=========  ==========================  ======================
64-bit     RDI, RSI, RDX, R10, R8      RAX
32-bit     EBX, ECX, EDX, ESI, EDI     EAX
=========  ==========================  ======================

The mode is that of the code segment executing the VMCALL, so a 64-bit
kernel's compatibility-mode code would use the 32-bit convention; it also
picks the layout of every structure with ``unsigned long`` fields, which is
why Xen (and xenicorn) latch the guest's "width" from its hypercalls.
Hypercalls from CPL > 0 fail with ``-EPERM``; numbers Xen's HVM table
lacks, or that are beyond it, with ``-ENOSYS``; the ones a domU may not use
with what Xen answers (:mod:`xenicorn.xen.denials`). Handlers are plain functions ``handler(call, *args) -> int``
that raise :class:`~xenicorn.xen.guest.HypercallError` to fail.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from . import errno
from .guest import GuestAccess, HypercallError

if TYPE_CHECKING:
    from .platform import XenPlatform

# Hypercall numbers (xen/include/public/xen.h; 48 and 49 are x86's arch_0 and arch_1:
# arch-x86/xen-mca.h, xen/arch/x86/include/asm/hypercall.h).
HYPERCALL_NAMES = {
    0: "set_trap_table", 1: "mmu_update", 2: "set_gdt", 3: "stack_switch", 4: "set_callbacks",
    5: "fpu_taskswitch", 6: "sched_op_compat", 7: "platform_op", 8: "set_debugreg", 9: "get_debugreg",
    10: "update_descriptor", 12: "memory_op", 13: "multicall", 14: "update_va_mapping",
    15: "set_timer_op", 16: "event_channel_op_compat", 17: "xen_version", 18: "console_io",
    19: "physdev_op_compat", 20: "grant_table_op", 21: "vm_assist", 22: "update_va_mapping_otherdomain",
    23: "iret", 24: "vcpu_op", 25: "set_segment_base", 26: "mmuext_op", 27: "xsm_op", 28: "nmi_op",
    29: "sched_op", 30: "callback_op", 31: "xenoprof_op", 32: "event_channel_op", 33: "physdev_op",
    34: "hvm_op", 35: "sysctl", 36: "domctl", 37: "kexec_op", 38: "tmem_op", 39: "argo_op",
    40: "xenpmu_op", 41: "dm_op", 42: "hypfs_op", 48: "mca", 49: "paging_domctl_cont",
}
NUMBERS = {v: k for k, v in HYPERCALL_NAMES.items()}

ARGS64 = ("rdi", "rsi", "rdx", "r10", "r8")
ARGS32 = ("rbx", "rcx", "rdx", "rsi", "rdi")


@dataclass
class Call:
    """One hypercall in progress: who made it, how, and what it said."""

    xen: "XenPlatform"
    vcpu: object
    number: int
    args: tuple[int, ...]
    bits: int                          # 64 or 32: argument and structure layout
    guest: GuestAccess
    notes: list[str] = field(default_factory=list)   # extra detail for --trace hypercalls
    stop: bool = False                 # the handler ended the run (shutdown)

    @property
    def long_mode(self) -> bool:
        return self.bits == 64

    @property
    def ulong(self) -> str:
        """struct format of the guest's ``unsigned long``."""
        return "Q" if self.bits == 64 else "I"

    def note(self, text: str) -> None:
        self.notes.append(text)


Handler = Callable[..., int]


def sign(value: int, bits: int) -> int:
    """Interpret an argument register as a signed integer of the guest's width."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def dispatch(xen: "XenPlatform", vcpu, table: dict[int, Handler], snap=None) -> Call:
    """Run the hypercall the vCPU is making; write its result to RAX."""
    snap = snap or vcpu.snapshot()
    bits = 64 if snap.code_bits == 64 else 32
    mask = (1 << bits) - 1
    number = snap.reg("rax") & mask          # all of RAX in 64-bit mode (hvm_hypercall)
    args = tuple(snap.reg(r) & mask for r in (ARGS64 if bits == 64 else ARGS32))
    call = Call(xen, vcpu, number, args, bits, GuestAccess(vcpu))
    if snap.cpl != 0:
        result = -errno.EPERM
        call.note("CPL > 0")
    else:
        handler = table.get(number)
        if handler is None:
            result = -errno.ENOSYS
            xen.unimplemented(HYPERCALL_NAMES.get(number, f"hypercall {number}"))
        else:
            try:
                result = handler(call, *args)
            except HypercallError as e:
                result = -e.code
                call.note(str(e))
    vcpu.set_reg("rax", result & mask)
    call.result = result
    return call
