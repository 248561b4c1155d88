"""Bringing vCPUs up without INIT-SIPI: ``VCPUOP_initialise``, ``up``, ``down``, ``is_up``.

An HVM guest may start its other vCPUs as on hardware (INIT and start-up
IPIs through its local APIC) or ask Xen: ``VCPUOP_initialise(vcpu, ctx)``
gives a vCPU that has never run its first register state, ``VCPUOP_up``
lets it run, ``VCPUOP_down`` takes it out of the schedule, ``VCPUOP_is_up``
asks (xen/include/public/vcpu.h). For an HVM domain the state is a
``struct vcpu_hvm_context`` (xen/include/public/hvm/hvm_vcpu.h)::

    u32 mode (0: 32-bit fields, 1: 64-bit fields), u32 pad
    32-bit: eax ecx edx ebx esp ebp esi edi eip eflags cr0 cr3 cr4 pad1 (u32 each),
            efer (u64), cs/ds/ss/es/tr base (u32 each), limit (u32 each),
            access rights (u16 each), 3 u16 pad           = 120 bytes
    64-bit: rax rcx rdx rbx rsp rbp rsi rdi rip rflags cr0 cr3 cr4 efer (u64 each);
            segments are flat: CS 64-bit code, DS/ES/SS data, TR a 64-bit TSS

An access-rights word is the descriptor's bits 40-55 packed: type (3:0),
S (4), DPL (6:5), P (7), AVL (8), L (9), D/B (10), G (11), unusable (12).

As in Xen (``arch_initialise_vcpu``): a vCPU already initialised (the boot
vCPU, or one a SIPI or this call started) answers -EEXIST; ``up`` of one
never initialised -EINVAL; a bad mode, a CS that is not a present code
segment, or 64-bit state outside long mode -EINVAL. Every vCPU but 0
starts *down*: ``is_up`` is 0 until it is started.
"""
from __future__ import annotations

import struct

from . import errno
from .guest import HypercallError
from ..x86.segments import SegmentCache

VCPUOP_initialise, VCPUOP_up, VCPUOP_down, VCPUOP_is_up = 0, 1, 2, 3
VCPU_HVM_MODE_32B, VCPU_HVM_MODE_64B = 0, 1
CTX32 = struct.Struct("<II" + "I" * 14 + "Q" + "I" * 10 + "H" * 5 + "3H")
CTX64 = struct.Struct("<II" + "Q" * 14)
AR_UNUSABLE = 1 << 12
CR0_PE, CR0_PG, CR4_PAE, EFER_LME, EFER_LMA = 1, 1 << 31, 1 << 5, 1 << 8, 1 << 10
FLAT = 0xFFFFFFFF


def ar_to_flags(ar: int) -> int:
    """Access rights (hvm_vcpu.h) -> the segment cache's flags word (descriptor bits 32-63 layout)."""
    return ((ar & 0xFF) << 8) | ((ar & 0xF00) << 12)


def vcpu_up_op(xen, call, cmd: int, vcpuid: int, arg: int) -> int:
    """VCPUOP_initialise / up / down / is_up for vCPU ``vcpuid`` (checked to exist)."""
    host = xen.host
    vs = xen.vcpu_state(vcpuid)
    started = host.vcpu_running(vcpuid) or vcpuid == 0
    if cmd == VCPUOP_is_up:
        return int(host.vcpu_running(vcpuid))
    if cmd == VCPUOP_initialise:
        if vs.initialised or started:
            raise HypercallError(errno.EEXIST, f"vCPU {vcpuid} is already initialised")
        apply = _decode(call, arg)
        host.post_vcpu_state(vcpuid, apply)
        vs.initialised = True
        call.note(f"vCPU {vcpuid} initialised")
        return 0
    if cmd == VCPUOP_up:
        if not (vs.initialised or started):
            raise HypercallError(errno.EINVAL, f"vCPU {vcpuid} was never initialised")
        host.set_vcpu_running(vcpuid, True)
        return 0
    host.set_vcpu_running(vcpuid, False)             # VCPUOP_down
    if vcpuid == call.vcpu.index:
        call.stop = True
    return 0


def _decode(call, arg: int):
    """Read and check a vcpu_hvm_context; the function that loads it into a vCPU."""
    mode, _ = call.guest.read_struct(arg, "<II")
    if mode == VCPU_HVM_MODE_32B:
        f = CTX32.unpack(call.guest.read(arg, CTX32.size))[2:]
        gprs = dict(zip(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "rip", "rflags"), f[:10],
                        strict=True))
        cr0, cr3, cr4, efer = f[10], f[11], f[12], f[14]
        bases, limits, ars = f[15:20], f[20:25], f[25:30]
        segs = {name: SegmentCache(0, base, limit, ar_to_flags(ar))
                for name, base, limit, ar in zip(("cs", "ds", "ss", "es", "tr"), bases, limits, ars, strict=True)}
        cs_ar = ars[0]
        if not cs_ar & 0x80 or not cs_ar & 0x10 or not cs_ar & 0x8 or cs_ar & AR_UNUSABLE:
            raise HypercallError(errno.EINVAL, f"CS access rights {cs_ar:#x}: not a present code segment")
        if not cr0 & CR0_PE:
            raise HypercallError(errno.EINVAL, "32-bit state with CR0.PE clear")
    elif mode == VCPU_HVM_MODE_64B:
        f = CTX64.unpack(call.guest.read(arg, CTX64.size))[2:]
        gprs = dict(zip(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "rip", "rflags"), f[:10],
                        strict=True))
        cr0, cr3, cr4, efer = f[10:14]
        if not (cr0 & CR0_PG and cr0 & CR0_PE and cr4 & CR4_PAE and efer & EFER_LME):
            raise HypercallError(errno.EINVAL, "64-bit state outside long mode")
        efer |= EFER_LMA
        code, data = 0x9B | (1 << 9), 0x93                     # 64-bit code (L), read/write data
        segs = {"cs": SegmentCache(0, 0, FLAT, ar_to_flags(code | (1 << 11))),
                **{n: SegmentCache(0, 0, FLAT, ar_to_flags(data | (1 << 10) | (1 << 11))) for n in ("ds", "ss", "es")},
                "tr": SegmentCache(0, 0, 0x67, ar_to_flags(0x8B))}
    else:
        raise HypercallError(errno.EINVAL, f"vcpu_hvm_context mode {mode}")

    def apply(vcpu) -> None:
        vcpu.load_initial_state(gprs=gprs, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, segments=segs)
    return apply
