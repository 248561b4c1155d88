"""``hvm_op`` (hypercall 34): HVM parameters and HVM-only services.

Sub-ops from xen/include/public/hvm/hvm_op.h and parameters from
hvm/params.h:

====  ==============================  =======================================
cmd   name                            argument
====  ==============================  =======================================
0     HVMOP_set_param                 { domid_t domid; u32 index; u64 value }
1     HVMOP_get_param                 (same, 16 bytes at any width)
9     HVMOP_pagetable_dying           { domid_t; u16 pad[3]; u64 gpa }
10    HVMOP_get_time                  { u64 now }: Xen system time, ns
23    HVMOP_set_evtchn_upcall_vector  { u32 vcpu; u8 vector }
====  ==============================  =======================================

A guest may read and set only some parameters of its own domain (Xen's
``hvm_allow_set_param``/``hvm_allow_get_param``); the rest belong to the
toolstack and answer -EPERM. ``HVM_PARAM_CALLBACK_IRQ`` chooses how event
upcalls arrive: ``type << 56 | value`` with type 0 GSI, 1 PCI INTx
(``domain << 32 | bus << 16 | devfn << 8 | pin``; domain and bus must be 0
here), 2 vector (low 8 bits). An unknown type is accepted and means "none",
as in Xen. Setting it latches the guest's 32/64-bit width, as QEMU does.
"""
from __future__ import annotations

from . import errno
from .guest import HypercallError
from .memory import check_domid

HVMOP_set_param, HVMOP_get_param, HVMOP_pagetable_dying, HVMOP_get_time = 0, 1, 9, 10
HVMOP_set_evtchn_upcall_vector = 23

HVM_PARAM_CALLBACK_IRQ, HVM_PARAM_STORE_PFN, HVM_PARAM_STORE_EVTCHN = 0, 1, 2
HVM_PARAM_PAE_ENABLED, HVM_PARAM_TIMER_MODE, HVM_PARAM_HPET_ENABLED = 4, 10, 11
HVM_PARAM_VM86_TSS, HVM_PARAM_CONSOLE_PFN, HVM_PARAM_CONSOLE_EVTCHN = 15, 17, 18
HVM_PARAM_ACPI_IOPORTS_LOCATION, HVM_PARAM_VM_GENERATION_ID_ADDR = 19, 34
HVM_PARAM_X87_FIP_WIDTH, HVM_PARAM_VM86_TSS_SIZED = 36, 37
HVM_NR_PARAMS = 39
HVMPTM_one_missed_tick_pending = 3
CALLBACK_TYPE_GSI, CALLBACK_TYPE_PCI_INTX, CALLBACK_TYPE_VECTOR = 0, 1, 2

GUEST_SETTABLE = {HVM_PARAM_CALLBACK_IRQ, HVM_PARAM_VM86_TSS, HVM_PARAM_VM86_TSS_SIZED,
                  HVM_PARAM_ACPI_IOPORTS_LOCATION, HVM_PARAM_VM_GENERATION_ID_ADDR,
                  HVM_PARAM_STORE_EVTCHN, HVM_PARAM_CONSOLE_EVTCHN, HVM_PARAM_X87_FIP_WIDTH,
                  HVM_PARAM_TIMER_MODE, HVM_PARAM_PAE_ENABLED}
GUEST_READABLE = GUEST_SETTABLE | {HVM_PARAM_STORE_PFN, HVM_PARAM_CONSOLE_PFN}
PARAM_NAMES = {0: "CALLBACK_IRQ", 1: "STORE_PFN", 2: "STORE_EVTCHN", 4: "PAE_ENABLED", 10: "TIMER_MODE",
               11: "HPET_ENABLED",
               15: "VM86_TSS", 17: "CONSOLE_PFN", 18: "CONSOLE_EVTCHN", 19: "ACPI_IOPORTS_LOCATION",
               34: "VM_GENERATION_ID_ADDR", 36: "X87_FIP_WIDTH", 37: "VM86_TSS_SIZED"}


def _set_param(call, index: int, value: int) -> None:
    xen = call.xen
    if index not in GUEST_SETTABLE:
        raise HypercallError(errno.EPERM, f"param {index} is the toolstack's")
    if index == HVM_PARAM_TIMER_MODE and value > HVMPTM_one_missed_tick_pending:
        raise HypercallError(errno.EINVAL, f"timer mode {value}")
    if index == HVM_PARAM_PAE_ENABLED and value > 1:
        raise HypercallError(errno.EINVAL, f"PAE_ENABLED {value}")
    if index == HVM_PARAM_X87_FIP_WIDTH and value not in (0, 4, 8):
        raise HypercallError(errno.EINVAL, f"FIP width {value}")
    if index == HVM_PARAM_CALLBACK_IRQ:
        kind = value >> 56
        if kind == CALLBACK_TYPE_PCI_INTX and (value >> 16) & 0xFFFFFFFF:
            raise HypercallError(errno.EINVAL, "PCI INTx callback outside domain 0 bus 0")
        xen.state.width = call.bits
        old = xen.state.params.get(index, 0)
        xen.state.params[index] = value
        xen.callback_changed(old, value)
        return
    xen.state.params[index] = value


def hvm_op(call, cmd: int, arg: int, *_) -> int:
    """Dispatch an HVMOP_* (see the module table)."""
    xen = call.xen
    if cmd in (HVMOP_set_param, HVMOP_get_param):
        domid, index, value = call.guest.read_struct(arg, "<H2xIQ")
        check_domid(call, domid)
        if index >= HVM_NR_PARAMS:
            raise HypercallError(errno.EINVAL, f"param index {index}")
        name = PARAM_NAMES.get(index, str(index))
        if cmd == HVMOP_set_param:
            call.note(f"set {name} = {value:#x}")
            _set_param(call, index, value)
            return 0
        if index not in GUEST_READABLE:
            raise HypercallError(errno.EPERM, f"param {index} is the toolstack's")
        value = xen.state.params.get(index, 0)
        call.note(f"get {name} = {value:#x}")
        call.guest.write_struct(arg + 8, "<Q", value)
        return 0
    if cmd == HVMOP_get_time:
        now = xen.now_ns()
        call.guest.write_struct(arg, "<Q", now)
        return 0
    if cmd == HVMOP_pagetable_dying:
        domid, gpa = call.guest.read_struct(arg, "<H6xQ")
        check_domid(call, domid)
        call.note(f"page table at {gpa:#x} dying")
        return 0
    if cmd == HVMOP_set_evtchn_upcall_vector:
        vcpu_id, vector = call.guest.read_struct(arg, "<IB")
        if vector < 0x10:
            raise HypercallError(errno.EINVAL, f"upcall vector {vector:#x} < 0x10")
        if vcpu_id >= len(xen.host.vcpus):
            raise HypercallError(errno.ENOENT, f"vCPU {vcpu_id}")
        xen.state.upcall_vectors[vcpu_id] = vector
        call.note(f"vCPU {vcpu_id} upcall vector {vector:#x}")
        # Xen's hvmop_set_evtchn_upcall_vector asserts the vector at once
        # (hvm_assert_evtchn_irq, xen/arch/x86/hvm/hvm.c) so an upcall already
        # pending is not lost; it does so unconditionally, which gives a guest
        # a spurious upcall when none is (discussed on xen-devel, with keying
        # it to evtchn_upcall_pending proposed): xenicorn asserts only then.
        info = xen.vcpu_info(vcpu_id)
        if info is not None and info.upcall_pending:
            xen.callback.upcall(vcpu_id)
        return 0
    xen.unimplemented(f"hvm_op cmd {cmd}")
    raise HypercallError(errno.ENOSYS)
