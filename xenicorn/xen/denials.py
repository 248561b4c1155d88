"""The hypercalls an unprivileged HVM guest may not use, answered as Xen answers them.

Xen gives an HVM guest a table of hypercalls (xen/include/hypercall-defs.c,
columns ``hvm32``/``hvm64``); a number without an entry there gets
``-ENOSYS`` from the generated dispatcher (xen/scripts/gen_hypercall.awk,
the ``default:`` case of ``call_handlers_hvm64``). Those are the PV-only
calls (page tables, trap tables, segment bases, callbacks, ``iret``,
``kexec_op``, ``mca``) and calls left out of a default build (``argo_op``:
``CONFIG_ARGO`` off; ``xsm_op``: ``CONFIG_XSM`` off on x86, and XSM's dummy
policy answers ``-ENOSYS`` to it anyway; ``tmem_op``: removed).

The management hypercalls are in the table, and refuse a domU inside:
most copy their argument first (``-EFAULT``), check its interface version
(``-EACCES``: the guest was built against another Xen), then ask XSM,
whose dummy policy (xen/include/xsm/dummy.h ``xsm_default_action``) lets
only the control domain through (``-EPERM``). The order matters to a
guest, and each handler below follows the Xen function it cites.

xenicorn's world has two domains: dom0 (a PV domain, as the usual ``xl``
host's) and the guest (``XenConfig.domid``). The interface versions follow
the Xen version the machine reports (``--xen-version``). docs/xen-abi.md
has the table; tests/test_xen_denials.py walks it.
"""
from __future__ import annotations

import struct

from . import errno
from .guest import HypercallError

# Interface versions by Xen release (xen/include/public/domctl.h, sysctl.h at
# each RELEASE tag): (XEN_DOMCTL_INTERFACE_VERSION, XEN_SYSCTL_INTERFACE_VERSION)
INTERFACE_VERSIONS = {(4, 16): (0x14, 0x14), (4, 17): (0x15, 0x15), (4, 18): (0x16, 0x15), (4, 19): (0x17, 0x15),
                      (4, 20): (0x17, 0x15), (4, 21): (0x17, 0x16), (4, 22): (0x18, 0x16)}
XENPF_INTERFACE_VERSION = 0x03000001          # xen/include/public/platform.h, unchanged since 3.0
VM_EVENT_INTERFACE_VERSION = 7                # xen/include/public/vm_event.h

# sizeof the argument structures: a header and a 128-byte union (its pad[128])
PLATFORM_OP_SIZE = SYSCTL_SIZE = 8 + 128      # cmd, interface_version
DOMCTL_SIZE = 16 + 128                        # cmd, interface_version, domain, _pad[3]
SHADOW_OP_SIZE = 40                           # struct xen_domctl_shadow_op

DOMID_IO, DOMID_INVALID = 0x7FF1, 0x7FF4      # xen/include/public/xen.h
DOM0 = 0

# domctl commands (xen/include/public/domctl.h) the front door treats apart
D_CREATEDOMAIN, D_GETDOMAININFO, D_SHADOW_OP, D_IRQ_PERMISSION, D_IOMEM_PERMISSION = 1, 5, 10, 19, 20
D_IOPORT_PERMISSION, D_ASSIGN_DEVICE, D_BIND_PT_IRQ, D_MEMORY_MAPPING, D_IOPORT_MAPPING = 21, 37, 38, 39, 40
D_TEST_ASSIGN_DEVICE, D_SET_TARGET, D_DEASSIGN_DEVICE, D_UNBIND_PT_IRQ, D_GET_DEVICE_GROUP = 45, 46, 47, 48, 50
D_VM_EVENT_OP, D_GETPAGEFRAMEINFO3, D_GSI_PERMISSION, D_GET_DOMAIN_STATE = 56, 61, 88, 90
XEN_VM_EVENT_GET_VERSION = 3
# sub-ops do_domctl hands to arch_do_domctl / iommu_do_domctl before its own XSM check
ARCH_FIRST = {D_GET_DEVICE_GROUP, D_IOPORT_PERMISSION, D_IOPORT_MAPPING, D_IRQ_PERMISSION, D_GSI_PERMISSION,
              D_BIND_PT_IRQ, D_UNBIND_PT_IRQ, D_GETPAGEFRAMEINFO3}
U64 = (1 << 64) - 1
MAX_IOPORTS = 0x10000                         # xen/arch/x86/domctl.c
GSI_ACTION_MASK = 1                           # XEN_DOMCTL_GSI_ACTION_MASK

# Numbers an HVM guest's table does not have (hypercall-defs.c: "-" in the
# hvm32/hvm64 columns, or an entry under a Kconfig option off by default).
ABSENT = {
    0: "set_trap_table: PV only", 1: "mmu_update: PV only", 2: "set_gdt: PV only", 3: "stack_switch: PV only",
    4: "set_callbacks: PV only", 5: "fpu_taskswitch: PV only", 6: "sched_op_compat: PV only",
    8: "set_debugreg: PV only", 9: "get_debugreg: PV only", 10: "update_descriptor: PV only",
    14: "update_va_mapping: PV only", 16: "event_channel_op_compat: PV only",
    19: "physdev_op_compat: PV only", 22: "update_va_mapping_otherdomain: PV only", 23: "iret: PV only",
    25: "set_segment_base: PV only", 27: "xsm_op: CONFIG_XSM off on x86 (dummy policy: -ENOSYS too)",
    28: "nmi_op: PV only", 30: "callback_op: PV only", 31: "xenoprof_op: not for HVM, dropped in 4.22",
    37: "kexec_op: PV only", 38: "tmem_op: removed, no entry", 39: "argo_op: CONFIG_ARGO off by default",
    48: "mca: PV only",
}


def versions(xen) -> tuple[int, int]:
    """(domctl, sysctl) interface versions of the Xen the machine reports (nearest known release)."""
    want = tuple(xen.config.version)
    known = sorted(INTERFACE_VERSIONS)
    pick = max((v for v in known if v <= want), default=known[0])
    return INTERFACE_VERSIONS[pick]


def absent(call, *_) -> int:
    """Not in the HVM hypercall table: the dispatcher's -ENOSYS (nothing xenicorn lacks)."""
    call.note(ABSENT.get(call.number, "not in Xen's HVM table"))
    raise HypercallError(errno.ENOSYS)


def _deny(why: str):
    raise HypercallError(errno.EPERM, f"XSM: {why} (dummy policy: control domain only)")


def platform_op(call, arg: int, *_) -> int:
    """xen/arch/x86/platform_hypercall.c do_platform_op: copy, version, ``xsm_platform_op`` (XSM_PRIV)."""
    cmd, version = struct.unpack_from("<II", call.guest.read(arg, PLATFORM_OP_SIZE))
    call.note(f"cmd {cmd}")
    if version != XENPF_INTERFACE_VERSION:
        raise HypercallError(errno.EACCES, f"interface version {version:#x}")
    _deny("platform_op")


def sysctl(call, arg: int, *_) -> int:
    """xen/common/sysctl.c do_sysctl: copy, version, ``xsm_sysctl`` (XSM_PRIV) for every cmd.

    The check comes before the ``switch``, so livepatch ops
    (``XEN_SYSCTL_livepatch_op``) are refused the same way.
    """
    cmd, version = struct.unpack_from("<II", call.guest.read(arg, SYSCTL_SIZE))
    call.note(f"cmd {cmd}")
    if version != versions(call.xen)[1]:
        raise HypercallError(errno.EACCES, f"interface version {version:#x}")
    _deny("sysctl")


def _exists(call, domid: int) -> bool:
    return domid in (DOM0, call.xen.config.domid)


def domctl(call, arg: int, *_) -> int:
    """xen/common/domctl.c do_domctl, up to its ``xsm_domctl`` (a domU gets no further).

    Copy; version (0 for the stable ``get_domain_state``); the domain
    lookup of the first ``switch`` (a missing domain is ``-EPERM`` for
    anyone but the control domain); the sub-ops handled before the XSM
    check, each with its argument checks; then ``xsm_domctl``: ``-EPERM``.
    """
    raw = bytearray(call.guest.read(arg, DOMCTL_SIZE))
    cmd, version, dom = struct.unpack_from("<IIH", raw)
    call.note(f"cmd {cmd} domain {dom}")
    if version != (0 if cmd == D_GET_DOMAIN_STATE else versions(call.xen)[0]):
        raise HypercallError(errno.EACCES, f"interface version {version:#x}")
    # the first switch: which domain the op is about
    target = "lookup"
    if cmd == D_CREATEDOMAIN:
        target = None
    elif cmd in (D_ASSIGN_DEVICE, D_DEASSIGN_DEVICE) and dom == DOMID_IO:
        target = "dom_io"
    elif cmd in (D_ASSIGN_DEVICE, D_DEASSIGN_DEVICE) and dom == DOMID_INVALID:
        raise HypercallError(errno.ESRCH, "DOMID_INVALID")
    elif cmd in (D_TEST_ASSIGN_DEVICE, D_VM_EVENT_OP) and dom == DOMID_INVALID:
        target = None
    elif cmd == D_GET_DOMAIN_STATE and dom == DOMID_INVALID:
        target = "dom_xen"
    elif not _exists(call, dom):
        _deny(f"no domain {dom}")              # is_control_domain(current) ? -ESRCH : -EPERM
    # the sub-ops handled without the domctl lock
    u = struct.unpack_from("<QQQ", raw, 16)
    if cmd in (D_GETDOMAININFO, D_GET_DOMAIN_STATE):
        _deny("xsm_getdomaininfo/xsm_get_domain_state (XSM_XS_PRIV)")
    if cmd == D_IOMEM_PERMISSION:
        mfn, nr = u[0], u[1]
        if (mfn + nr - 1) & U64 < mfn:
            raise HypercallError(errno.EINVAL, "mfn range wraps")
        _deny("xsm_iomem_permission")
    if cmd == D_MEMORY_MAPPING:
        gfn, mfn, nr = u
        # (Xen also refuses mfns beyond the host's paddr_bits here: not modelled)
        if (mfn + nr - 1) & U64 < mfn or (gfn + nr - 1) & U64 < gfn:
            raise HypercallError(errno.EINVAL, "range wraps")
        _deny("xsm_iomem_mapping (XSM_DM_PRIV)")
    if cmd == D_SET_TARGET:
        other = u[0] & 0xFFFF
        if not _exists(call, other):
            raise HypercallError(errno.ESRCH, f"no domain {other}")
        if other == dom:
            raise HypercallError(errno.EINVAL, "a domain cannot target itself")
        if other == DOM0:
            raise HypercallError(errno.EOPNOTSUPP, "dom0 is not an HVM domain")
        _deny("xsm_set_target")
    if cmd == D_VM_EVENT_OP:
        if u[0] & 0xFFFFFFFF == XEN_VM_EVENT_GET_VERSION:
            # no XSM check for this one: vm_event_domctl answers anyone (xen/common/vm_event.c)
            struct.pack_into("<I", raw, 24, VM_EVENT_INTERFACE_VERSION)
            call.guest.write(arg, bytes(raw))      # copyback of the whole op
            return 0
        if target is None:
            raise HypercallError(errno.ESRCH, "vm_event_op without a domain")
    if cmd in ARCH_FIRST:
        _arch_domctl(call, cmd, dom, raw)
    _deny("xsm_domctl")


def _arch_domctl(call, cmd: int, dom: int, raw: bytes) -> None:
    """The sub-ops do_domctl hands on before its XSM check, each with the checks it makes first.

    xen/arch/x86/domctl.c ``arch_do_domctl`` and xen/drivers/passthrough/
    iommu.c ``iommu_do_domctl``. Left out, as they depend on the host:
    ``irq_permission``'s ``-EINVAL`` for a PIRQ beyond the caller's
    ``nr_pirqs``, and ``gsi_permission``'s answers for a GSI with no IRQ.
    """
    w = struct.unpack_from("<IIII", raw, 16)
    if cmd == D_IOPORT_PERMISSION:
        first, count = w[0], w[1]
        end = (first + count) & 0xFFFFFFFF
        if end <= first or end > MAX_IOPORTS:
            raise HypercallError(errno.EINVAL, "port range")
    elif cmd == D_IOPORT_MAPPING:
        if dom == DOM0:
            raise HypercallError(errno.EOPNOTSUPP, "dom0 is not an HVM domain")
        gport, mport, count = w[0], w[1], w[2]
        if (gport | mport | ((count - 1) & 0xFFFFFFFF)) >= MAX_IOPORTS or gport + count > MAX_IOPORTS \
                or mport + count > MAX_IOPORTS:
            raise HypercallError(errno.EINVAL, "port range")
    elif cmd in (D_BIND_PT_IRQ, D_UNBIND_PT_IRQ) and dom == DOM0:
        raise HypercallError(errno.EINVAL, "dom0 is not an HVM domain")
    elif cmd == D_GSI_PERMISSION and w[1] & ~GSI_ACTION_MASK:
        raise HypercallError(errno.EINVAL, "flags")
    elif cmd == D_GET_DEVICE_GROUP and dom != DOM0:
        # iommu_do_domctl: no IOMMU for a domain without passthrough devices
        raise HypercallError(errno.EOPNOTSUPP, "no IOMMU for the domain")
    _deny("arch/iommu domctl hook")


def paging_domctl_cont(call, arg: int, *_) -> int:
    """xen/arch/x86/mm/paging.c do_paging_domctl_cont (hypercall 49, x86's arch_1).

    Copy; anything but a current-version ``shadow_op`` is ``-EOPNOTSUPP``;
    a missing domain ``-ESRCH``; ``xsm_domctl`` refuses, and the op's
    ``u.shadow_op`` is still copied back (a fault there is ``-EFAULT``).
    """
    raw = call.guest.read(arg, DOMCTL_SIZE)
    cmd, version, dom = struct.unpack_from("<IIH", raw)
    if version != versions(call.xen)[0] or cmd != D_SHADOW_OP:
        raise HypercallError(errno.EOPNOTSUPP, f"cmd {cmd} version {version:#x}")
    if not _exists(call, dom):
        raise HypercallError(errno.ESRCH, f"no domain {dom}")
    call.guest.write(arg + 16, raw[16:16 + SHADOW_OP_SIZE])
    _deny("xsm_domctl")


def dm_op(call, domid: int, nr_bufs: int, bufs: int, *_) -> int:
    """xen/common/dm.c do_dm_op (compat_dm_op in xen/arch/x86/hvm/dm.c) and dm_op's first checks.

    No buffers ``-ENODATA``, more than 2 ``-E2BIG``, unreadable buffer
    descriptors ``-EFAULT``; then ``rcu_lock_remote_domain_by_id``: a
    missing domain ``-ESRCH``, the caller itself ``-EPERM`` (a guest is
    never its own device model); dom0 is not HVM: ``-EINVAL``.
    """
    domid &= 0xFFFF                             # domid_t
    nr_bufs &= 0xFFFFFFFF
    if nr_bufs == 0:
        raise HypercallError(errno.ENODATA)
    if nr_bufs > 2:
        raise HypercallError(errno.E2BIG)
    call.guest.read(bufs, nr_bufs * (16 if call.long_mode else 8))   # {handle, xen_ulong_t size}
    call.note(f"domain {domid}")
    if not _exists(call, domid):
        raise HypercallError(errno.ESRCH, f"no domain {domid}")
    if domid == call.xen.config.domid:
        raise HypercallError(errno.EPERM, "the caller's own domain")
    raise HypercallError(errno.EINVAL, "dom0 is not an HVM domain")


def xenpmu_op(call, *_) -> int:
    """xen/arch/x86/cpu/vpmu.c do_xenpmu_op: an HVM domain has a vLAPIC, so ``-EOPNOTSUPP`` first."""
    raise HypercallError(errno.EOPNOTSUPP, "not for a domain with a vLAPIC")


def hypfs_op(call, *_) -> int:
    """xen/common/hypfs.c do_hypfs_op: ``xsm_hypfs_op`` (XSM_PRIV) before anything."""
    _deny("hypfs_op")


TABLE = {**{n: absent for n in ABSENT},
         7: platform_op, 35: sysctl, 36: domctl, 40: xenpmu_op, 41: dm_op, 42: hypfs_op, 49: paging_domctl_cont}
