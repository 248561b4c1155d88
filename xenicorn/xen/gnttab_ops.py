"""``grant_table_op`` (hypercall 20): what a domU may ask of its own grant table.

The ops and their structures are listed in :mod:`.gnttab`; each answer
follows xen/common/grant_table.c (do_grant_table_op and the gnttab_* function
named in each handler). Three kinds of failure: a negative errno for the
whole call (bad count, bad pointer, bad version), a per-op GNTST_* ``status``
field with return value 0 (setup_table, query_size, get_status_frames and
each copy op), or, for set_version, the errno with the version actually in
force written back.

Which domain ``dom`` names: DOMID_SELF or our own id is this domain; 0 is
dom0, which exists but which an unprivileged domU may not inspect (XSM says
no: GNTST_permission_denied / -EPERM); anything else does not exist
(GNTST_bad_domain / -ESRCH).
"""
from __future__ import annotations

from . import errno
from .gnttab import (DOMID_SELF, GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_bad_domain, GNTST_bad_virt_addr,
                     GNTST_general_error, GNTST_okay, GNTST_permission_denied, GNTTABOP_copy,
                     GNTTABOP_get_status_frames, GNTTABOP_get_version, GNTTABOP_query_size, GNTTABOP_set_version,
                     GNTTABOP_setup_table, INVALID_GFN)
from .guest import HypercallError


def _target(gt, dom: int) -> int:
    """GNTST_okay for this domain, else the status Xen's domain lookup + XSM check gives."""
    if dom in (DOMID_SELF, gt.xen.config.domid):
        return GNTST_okay
    return GNTST_permission_denied if dom == 0 else GNTST_bad_domain


def grant_table_op(gt, call, cmd: int, uop: int, count: int) -> int:
    """Dispatch one GNTTABOP_* (do_grant_table_op)."""
    handler = _OPS.get(cmd)
    if handler is None:
        gt.xen.unimplemented(f"grant_table_op cmd {cmd}")
        raise HypercallError(errno.ENOSYS)
    if count >> 31:
        raise HypercallError(errno.EINVAL, f"count {count}")          # (int)count < 0
    return handler(gt, call, uop, count)


def _one(count: int) -> None:
    if count != 1:
        raise HypercallError(errno.EINVAL, f"count {count}")


def _setup_table(gt, call, uop: int, count: int) -> int:
    """gnttab_setup_table: grow to nr_frames and list where each shared frame is mapped."""
    _one(count)
    g = call.guest
    handle_off = 16 if call.bits == 64 else 12
    dom, nr = g.read_struct(uop, "<H2xI")
    (frames,) = g.read_struct(uop + handle_off, "<Q" if call.bits == 64 else "<I")
    status = _target(gt, dom)
    if status == GNTST_okay and nr > gt.max_frames:
        status = GNTST_general_error
        call.note(f"{nr} frames > max {gt.max_frames}")
    if status == GNTST_okay:
        gt.nr_frames = max(gt.nr_frames, nr)       # a v2 table's status frames follow
        fmt, w = ("<Q", 8) if call.bits == 64 else ("<I", 4)
        mask = (1 << call.bits) - 1
        for i in range(nr):
            gpfn = gt.xen.state.grant_frames.get(i)
            g.write_struct(frames + i * w, fmt, INVALID_GFN & mask if gpfn is None else gpfn)
    g.write_struct(uop + 8, "<h", status)
    return 0


def _query_size(gt, call, uop: int, count: int) -> int:
    """gnttab_query_size: frames in use and the most this domain may have."""
    _one(count)
    (dom,) = call.guest.read_struct(uop, "<H")
    call.guest.write_struct(uop + 4, "<IIh", gt.nr_frames, gt.max_frames, _target(gt, dom))
    return 0


def _set_version(gt, call, uop: int, count: int) -> int:
    """gnttab_set_version: 1 or 2 (else -EINVAL); switching needs every grant beyond the 8
    reserved ones idle (-EBUSY); the version in force is written back either way."""
    g = call.guest
    (version,) = g.read_struct(uop, "<I")
    rc = errno.EINVAL if version not in (1, 2) else 0
    if not rc and version != gt.version:
        rc = gt.switch_version(version)
    g.write_struct(uop, "<I", gt.version)
    if rc:
        raise HypercallError(rc, f"grant table version {version} (now {gt.version})")
    call.note(f"grant table v{gt.version}")
    return 0


def _get_status_frames(gt, call, uop: int, count: int) -> int:
    """gnttab_get_status_frames: the gfns of the first nr_frames status frames (u64 each);
    more than the table has GNTST_general_error (so any in v1), a bad list GNTST_bad_virt_addr."""
    _one(count)
    g = call.guest
    nr, dom = g.read_struct(uop, "<IH")
    (frames,) = g.read_struct(uop + 8, "<Q" if call.bits == 64 else "<I")
    status = _target(gt, dom)
    if status == GNTST_okay and nr > gt.nr_status_frames:
        status = GNTST_general_error
        call.note(f"{nr} status frames asked, {gt.nr_status_frames} exist")
    if status == GNTST_okay:
        for i in range(nr):
            gpfn = gt.status_gfns.get(i, INVALID_GFN)
            try:
                g.write_struct(frames + 8 * i, "<Q", gpfn)
            except HypercallError:
                status = GNTST_bad_virt_addr
                break
    g.write_struct(uop + 6, "<h", status)
    return 0


def _get_version(gt, call, uop: int, count: int) -> int:
    """gnttab_get_version: no such domain -ESRCH, dom0 -EPERM (XSM)."""
    (dom,) = call.guest.read_struct(uop, "<H")
    status = _target(gt, dom)
    if status != GNTST_okay:
        raise HypercallError(errno.EPERM if status == GNTST_permission_denied else errno.ESRCH, f"domain {dom:#x}")
    call.guest.write_struct(uop + 4, "<I", gt.version)
    return 0


def _copy(gt, call, uop: int, count: int) -> int:
    """gnttab_copy: ``count`` ops, each with its own status; a domU copies between its own
    frames (gmfn, DOMID_SELF only) and grants it gave itself (gref, grantee = its own id)."""
    g = call.guest
    if call.bits == 64:
        fmt, size, status_off = "<QHH4xQHH4xHH", 40, 36
    else:
        fmt, size, status_off = "<IHHIHHHH", 24, 20
    me = gt.xen.config.domid
    for i in range(count):
        op = uop + i * size
        s_u, s_dom, s_off, d_u, d_dom, d_off, length, flags = g.read_struct(op, fmt)
        src_ref, dst_ref = flags & GNTCOPY_source_gref, flags & GNTCOPY_dest_gref
        status = gt.copy_one((bool(src_ref), s_u & 0xFFFFFFFF if src_ref else s_u, s_dom, s_off),
                             (bool(dst_ref), d_u & 0xFFFFFFFF if dst_ref else d_u, d_dom, d_off), length, me)
        g.write_struct(op + status_off, "<h", status)
    call.note(f"{count} copies")
    return 0


_OPS = {GNTTABOP_setup_table: _setup_table, GNTTABOP_copy: _copy, GNTTABOP_query_size: _query_size,
        GNTTABOP_set_version: _set_version, GNTTABOP_get_status_frames: _get_status_frames,
        GNTTABOP_get_version: _get_version}
