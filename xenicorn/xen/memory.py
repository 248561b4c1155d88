"""``memory_op`` (hypercall 12): the guest's physical memory as Xen sees it.

Sub-ops from xen/include/public/memory.h. ``xen_ulong_t`` and ``xen_pfn_t``
are ``unsigned long`` on x86, so the structures differ by guest width:

=================================  =========================================
cmd                                structure (64-bit / 32-bit size)
=================================  =========================================
0 XENMEM_increase_reservation      xen_memory_reservation: extent_start
1 XENMEM_decrease_reservation      handle, nr_extents, extent_order,
6 XENMEM_populate_physmap          mem_flags, domid (32 / 20 bytes)
2 XENMEM_maximum_ram_page          no argument: highest RAM frame
3 XENMEM_current_reservation       domid_t*: pages the domain has
4 XENMEM_maximum_reservation       domid_t*: pages it may have
7 XENMEM_add_to_physmap            domid, size, space, idx, gpfn (24 / 16)
9 XENMEM_memory_map                { nr_entries; buffer } (16 / 8): E820
23 XENMEM_add_to_physmap_batch     domid, space, size, u, idxs, gpfns, errs
=================================  =========================================

The domain owns ``pages`` (Xen's tot_pages, XENMEM_current_reservation) out
of ``max_pages`` (XENMEM_maximum_reservation): the RAM it was built with plus
the 1 MiB libxl adds. decrease_reservation gives frames back; populate_physmap
allocates a page for any gfn within that budget, where there was RAM or not
(a hole gets a new page in the memory map, saved with it), as Xen does.

Map spaces for add_to_physmap: 0 shared_info (idx 0 only), 1 grant_table
(frame idx; with bit 31, XENMAPIDX_grant_table_status, a v2 status frame:
see :meth:`~xenicorn.xen.gnttab.GrantTable.place`), 2 gmfn, 3 gmfn_range,
4 gmfn_foreign, 5 dev_mmio. As in QEMU's Xen emulation: gmfn spaces give
-EOPNOTSUPP, foreign ones -EPERM, unknown ones -EINVAL, and another domain
-ESRCH. The high bits of ``cmd`` (from bit 6) carry Xen's continuation
index; a guest calls with them zero.
"""
from __future__ import annotations

import struct

from . import errno
from .guest import HypercallError
from ..devices.ioapic import IOAPIC_BASE
from ..devices.lapic import LAPIC_BASE
from ..machine.memory import EXTRA_FRAMES

XENMEM_increase_reservation, XENMEM_decrease_reservation = 0, 1
XENMEM_maximum_ram_page, XENMEM_current_reservation, XENMEM_maximum_reservation = 2, 3, 4
XENMEM_populate_physmap, XENMEM_add_to_physmap, XENMEM_memory_map = 6, 7, 9
XENMEM_add_to_physmap_batch = 23
MEMOP_EXTENT_SHIFT = 6
XENMAPSPACE_shared_info, XENMAPSPACE_grant_table, XENMAPSPACE_gmfn = 0, 1, 2
XENMAPSPACE_gmfn_range, XENMAPSPACE_gmfn_foreign, XENMAPSPACE_dev_mmio = 3, 4, 5
DOMID_SELF = 0x7FF0
MAX_ORDER = 9                       # a domU may ask for up to 2 MiB extents
P2M_GFN_BITS = 36                   # a 4-level p2m maps 48-bit guest-physical addresses
PAGE = 4096


def check_domid(call, domid: int) -> None:
    """DOMID_SELF or our own id; another domain -ESRCH (we are unprivileged)."""
    if domid not in (DOMID_SELF, call.xen.config.domid):
        raise HypercallError(errno.ESRCH, f"domain {domid}")


def map_space(call, space: int, idx: int, gpfn: int) -> None:
    """Put one frame of ``space`` at guest frame ``gpfn``."""
    xen = call.xen
    if space == XENMAPSPACE_shared_info:
        if idx != 0:
            raise HypercallError(errno.EINVAL, f"shared_info idx {idx}")
        gpa = gpfn * PAGE
        if not xen.host.memory.is_ram(gpa, PAGE):
            raise HypercallError(errno.EINVAL, f"gpfn {gpfn:#x} is not RAM")
        xen.map_shared_info(gpa, call.bits)
        call.note(f"shared_info at {gpa:#x}")
        return
    if space == XENMAPSPACE_grant_table:
        bad_gpfn = gpfn * PAGE >= 1 << 52 or gpfn * PAGE in (IOAPIC_BASE, LAPIC_BASE)
        xen.gnttab.place(idx, gpfn, bad_gpfn)     # a shared frame, or a v2 status frame (bit 31)
        call.note(f"grant frame {idx:#x} at gpfn {gpfn:#x}")
        return
    if space in (XENMAPSPACE_gmfn, XENMAPSPACE_gmfn_range):
        raise HypercallError(errno.EOPNOTSUPP, "gmfn map spaces")
    if space in (XENMAPSPACE_gmfn_foreign, XENMAPSPACE_dev_mmio):
        raise HypercallError(errno.EPERM, "foreign/device map spaces")
    raise HypercallError(errno.EINVAL, f"map space {space}")


def _add_to_physmap(call, arg: int) -> int:
    u = call.ulong
    domid, size, space, idx, gpfn = call.guest.read_struct(arg, f"<HHI{u}{u}")
    check_domid(call, domid)
    map_space(call, space, idx, gpfn)
    return 0


def _add_to_physmap_batch(call, arg: int) -> int:
    u = call.ulong
    fmt = f"<HHHH{u}{u}{u}"
    domid, space, size, foreign, idxs, gpfns, errs = call.guest.read_struct(arg, fmt)
    check_domid(call, domid)
    if space in (XENMAPSPACE_gmfn_foreign, XENMAPSPACE_dev_mmio):
        raise HypercallError(errno.EPERM, "foreign map space")
    if space not in (XENMAPSPACE_shared_info, XENMAPSPACE_grant_table):
        raise HypercallError(errno.EINVAL if space > XENMAPSPACE_dev_mmio else errno.EOPNOTSUPP,
                             f"map space {space} in a batch")
    w = call.bits // 8
    for i in range(size):
        idx = int.from_bytes(call.guest.read(idxs + i * w, w), "little")
        gpfn = int.from_bytes(call.guest.read(gpfns + i * w, w), "little")
        try:
            map_space(call, space, idx, gpfn)
            rc = 0
        except HypercallError as e:
            if e.code == errno.EFAULT:
                raise
            rc = -e.code
        call.guest.write(errs + 4 * i, struct.pack("<i", rc))
    return 0


def _memory_map(call, arg: int) -> int:
    fmt = "<I4xQ" if call.bits == 64 else "<II"
    nr, buf = call.guest.read_struct(arg, fmt)
    e820 = call.xen.host.memory.e820()
    n = min(nr, len(e820))
    raw = b"".join(struct.pack("<QQI", e.addr, e.size, e.type) for e in e820[:n])
    call.guest.write(buf, raw)
    call.guest.write_struct(arg, "<I", n)
    call.note(f"{n} E820 entries")
    return 0


def _reservation(call, cmd: int, arg: int) -> int:
    """increase/decrease_reservation and populate_physmap: ballooning basics."""
    xen = call.xen
    u = call.ulong
    fmt = f"<{u}{u}IIH" + ("6x" if call.bits == 64 else "2x")
    start, nr, order, flags, domid = call.guest.read_struct(arg, fmt)
    check_domid(call, domid)
    if order > MAX_ORDER:
        call.note(f"extent_order {order} > {MAX_ORDER}")
        return 0
    w = call.bits // 8
    pages_per = 1 << order
    done = 0
    for i in range(nr):
        if cmd == XENMEM_increase_reservation:
            # A translated (HVM) guest gets frames it cannot address: Xen
            # only accounts for them; so does xenicorn.
            if xen.state.pages + pages_per > xen.max_pages():
                break
            xen.state.pages += pages_per
            done += 1
            continue
        gpfn = int.from_bytes(call.guest.read(start + i * w, w), "little")
        first = gpfn & ~(pages_per - 1)
        if cmd == XENMEM_populate_physmap:
            if not _populate(call, first, pages_per):
                break
        elif not _decrease(call, first, pages_per):
            break
        done += 1
    call.note(f"{done} of {nr} extents (order {order})")
    return done


def _decrease(call, first: int, pages_per: int) -> bool:
    """One extent of decrease_reservation: the frames go back to Xen (False: Xen stops there).

    Frames of the boot RAM stay in the engine's map, zeroed and marked
    ballooned; a page populate_physmap added elsewhere leaves the map
    (guest_remove_page: the gfn is a hole again).
    """
    xen = call.xen
    mem = xen.host.memory
    frames = range(first, first + pages_per)
    if not mem.is_ram(first * PAGE, pages_per * PAGE) or any(f in xen.state.ballooned for f in frames):
        return False
    if any(f * PAGE in mem.frames.values() for f in frames):
        return False                                          # a grant frame is not the guest's page
    for f in frames:
        if mem.is_added(f * PAGE):
            mem.remove_page(f * PAGE)
        else:
            xen.state.ballooned.add(f)
            mem.fill(f * PAGE, PAGE)
    xen.state.pages -= pages_per
    return True


def _populate(call, first: int, pages_per: int) -> bool:
    """One extent of populate_physmap (xen/common/memory.c populate_physmap); False: Xen stops there.

    Xen allocates a fresh page for each frame and enters it in the p2m
    (guest_physmap_add_page -> p2m_add_page), wherever the gfn is:

    * the allocation fails when the domain would own more than max_pages
      (assign_pages: tot_pages + pages > max_pages);
    * the p2m refuses a gfn beyond its guest-physical width (ept_set_entry:
      -EINVAL above 48 bits, gfn >> 36), after the page was allocated: the
      domain keeps that page, unmapped but counted;
    * a frame that is already RAM is replaced by the fresh, zeroed page; the
      old page stays the domain's (unmapped, still counted), so tot_pages
      grows either way;
    * a grant-table frame there is a "special" p2m entry: p2m_add_page
      crashes the domain (domain_crash) and fails with -EPERM.

    Where the guest had no RAM the page is added to the memory map
    (:meth:`GuestMemory.add_page`), from a pool as large as max_pages'
    slack: a guest that balloons out boot RAM and then populates more than
    that many holes finds the pool empty, as if the allocation failed
    (Xen would reuse the freed memory). xenicorn keeps its device pages (the
    LAPIC, IOAPIC, HPET, a PCI BAR) and the engine's own: a gfn there is
    refused, as if the allocation failed (Xen would map RAM over the
    emulated device).
    """
    xen = call.xen
    mem = xen.host.memory
    if xen.state.pages + pages_per > xen.max_pages():
        return False
    if (first + pages_per - 1) >> P2M_GFN_BITS:
        # Xen allocated (and accounted) the extent before the p2m refused it, and
        # populate_physmap's "goto out" does not free it: the domain keeps it, unmapped
        xen.state.pages += pages_per
        return False
    frames = range(first, first + pages_per)
    for f in frames:
        if f * PAGE in mem.frames.values():
            xen.host.shutdown("crash", 1, f"populate_physmap over the grant frame at gfn {f:#x}: "
                              "Xen crashes the domain (p2m_add_page)")
            return False
        if not mem.is_ram(f * PAGE) and xen.host.device_page(f * PAGE):
            return False
    new = [f for f in frames if not mem.is_ram(f * PAGE)]
    if len(new) > EXTRA_FRAMES - len(mem.extra):
        return False                                          # the pool is max_pages' slack
    for f in frames:
        if f in new:
            mem.add_page(f * PAGE)
        else:
            xen.state.ballooned.discard(f)
            mem.fill(f * PAGE, PAGE)                          # a fresh page replaces the old
            mem.code_written(f * PAGE, PAGE)
    xen.state.pages += pages_per
    return True


def memory_op(call, cmd: int, arg: int, *_) -> int:
    """Dispatch a XENMEM_* (see the module table)."""
    if cmd >> MEMOP_EXTENT_SHIFT:
        raise HypercallError(errno.ENOSYS, "continuation bits set")
    xen = call.xen
    if cmd in (XENMEM_increase_reservation, XENMEM_decrease_reservation, XENMEM_populate_physmap):
        return _reservation(call, cmd, arg)
    if cmd == XENMEM_maximum_ram_page:
        return xen.max_ram_page()
    if cmd in (XENMEM_current_reservation, XENMEM_maximum_reservation):
        (domid,) = call.guest.read_struct(arg, "<H")
        check_domid(call, domid)
        return xen.state.pages if cmd == XENMEM_current_reservation else xen.max_pages()
    if cmd == XENMEM_add_to_physmap:
        return _add_to_physmap(call, arg)
    if cmd == XENMEM_add_to_physmap_batch:
        return _add_to_physmap_batch(call, arg)
    if cmd == XENMEM_memory_map:
        return _memory_map(call, arg)
    xen.unimplemented(f"memory_op cmd {cmd}")
    raise HypercallError(errno.ENOSYS)
