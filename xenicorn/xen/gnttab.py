"""Grant tables, version 1: how a guest lets another domain touch its pages.

A guest shares a page by writing a *grant entry* into its grant table: "domain
D may access my frame F" (read-only or not), and then telling D the entry's
index, the grant *reference*. The table itself is a set of frames Xen owns
and the guest maps into its physical address space with
``XENMEM_add_to_physmap(XENMAPSPACE_grant_table, idx, gpfn)``; an HVM Linux
puts them in the xen-platform device's memory BAR. Each 4 KiB frame holds
512 v1 entries (xen/include/public/grant_table.h)::

    struct grant_entry_v1 { u16 flags; domid_t domid; u32 frame; };

``flags`` bits 1:0 are the type (1 = GTF_permit_access); bit 2 GTF_readonly;
bits 3 and 4 (GTF_reading, GTF_writing) are set *by Xen* while the grantee
has the page mapped, so the guest knows when it may revoke the grant.

xenicorn plays the grantee, domain 0 (:meth:`GrantTable.map`,
:meth:`read`, :meth:`write`), with the checks Xen applies in
``map_grant_ref``: a reference inside the table, an entry of type
permit_access for *this* domain, no write through a read-only grant, and a
frame that is guest RAM. Failures are the GNTST_* codes.

The guest's side is ``grant_table_op`` (hypercall 20). As in QEMU's Xen
emulation, only version 1 exists and the guest may only query and set up its
own table:

====  ==============  ===================================================
cmd   name            argument (count must be 1)
====  ==============  ===================================================
2     setup_table     { u16 dom; u32 nr_frames; OUT i16 status; handle frame_list }
6     query_size      { u16 dom; OUT u32 nr_frames, max_nr_frames; i16 status }
8     set_version     { u32 version } -- 1 only
10    get_version     { u16 dom; u16 pad; OUT u32 version }
====  ==============  ===================================================

Every other op (map/unmap/copy/transfer ... the backend's side) answers
-ENOSYS: a domU does not map other domains' grants here.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..records import RecordError, boolean, integer, listing, make_record, open_record, uint
from . import errno
from .guest import HypercallError

GNTTABOP_setup_table, GNTTABOP_query_size, GNTTABOP_set_version, GNTTABOP_get_version = 2, 6, 8, 10
GNTST_okay, GNTST_general_error, GNTST_bad_domain, GNTST_bad_gntref = 0, -1, -2, -4
GNTST_permission_denied, GNTST_bad_page = -8, -9
GTF_type_mask, GTF_permit_access = 3, 1
GTF_readonly, GTF_reading, GTF_writing = 1 << 2, 1 << 3, 1 << 4
ENTRIES_PER_FRAME = 4096 // 8
INVALID_GFN = (1 << 64) - 1
DOMID_SELF = 0x7FF0
BACKEND_DOMID = 0


class GrantError(Exception):
    """A grant the backend may not use; ``code`` is the GNTST_* value."""

    def __init__(self, code: int, why: str):
        super().__init__(f"GNTST {code}: {why}")
        self.code = code


@dataclass
class GrantMapping:
    """A granted frame the backend holds mapped (release with ``unmap``)."""

    ref: int
    gpa: int
    writable: bool


class GrantTable:
    """The domain's v1 grant table, and the backend's view of it."""

    def __init__(self, xen):
        self.xen = xen
        self.nr_frames = 0                       # frames set up (grown, never shrunk)
        self.mappings: dict[int, list[GrantMapping]] = {}   # ref -> live backend mappings

    @property
    def max_frames(self) -> int:
        return self.xen.config.gnttab_max_frames

    def frame_mapped(self, idx: int) -> None:
        """add_to_physmap put frame ``idx`` in the guest: the table grows to include it."""
        self.nr_frames = max(self.nr_frames, idx + 1)

    # -- the guest's hypercall ------------------------------------------------------
    def hypercall(self, call, cmd: int, uop: int, count: int, *_) -> int:
        if cmd not in (GNTTABOP_setup_table, GNTTABOP_query_size, GNTTABOP_set_version, GNTTABOP_get_version):
            self.xen.unimplemented(f"grant_table_op cmd {cmd}")
            raise HypercallError(errno.ENOSYS)
        if count != 1:
            raise HypercallError(errno.EINVAL, f"count {count}")
        g = call.guest
        mine = (DOMID_SELF, self.xen.config.domid)
        if cmd == GNTTABOP_set_version:
            (version,) = g.read_struct(uop, "<I")
            if version != 1:
                g.write_struct(uop, "<I", 1)
                raise HypercallError(errno.EINVAL, f"grant table version {version} (v1 only)")
            return 0
        if cmd == GNTTABOP_get_version:
            (dom,) = g.read_struct(uop, "<H")
            if dom not in mine:
                raise HypercallError(errno.ESRCH, f"domain {dom:#x}")
            g.write_struct(uop + 4, "<I", 1)
            return 0
        if cmd == GNTTABOP_query_size:
            (dom,) = g.read_struct(uop, "<H")
            status = GNTST_okay if dom in mine else GNTST_bad_domain
            g.write_struct(uop + 4, "<IIh", self.nr_frames, self.max_frames, status)
            return 0
        # setup_table
        handle_off = 16 if call.bits == 64 else 12
        dom, nr = g.read_struct(uop, "<H2xI")
        (frames,) = g.read_struct(uop + handle_off, "<Q" if call.bits == 64 else "<I")
        if dom not in mine:
            g.write_struct(uop + 8, "<h", GNTST_bad_domain)
            return 0
        if nr > self.max_frames:
            g.write_struct(uop + 8, "<h", GNTST_general_error)
            call.note(f"{nr} frames > max {self.max_frames}")
            return 0
        self.nr_frames = max(self.nr_frames, nr)
        fmt = "<Q" if call.bits == 64 else "<I"
        mask = (1 << call.bits) - 1
        for i in range(nr):
            gpfn = self.xen.state.grant_frames.get(i)
            g.write_struct(frames + i * (8 if call.bits == 64 else 4), fmt,
                           INVALID_GFN & mask if gpfn is None else gpfn)
        g.write_struct(uop + 8, "<h", GNTST_okay)
        return 0

    # -- the backend (dom0) side ------------------------------------------------------
    def _entry_gpa(self, ref: int) -> int:
        frame = ref // ENTRIES_PER_FRAME
        gpfn = self.xen.state.grant_frames.get(frame) if ref >= 0 and frame < self.nr_frames else None
        if gpfn is None:
            raise GrantError(GNTST_bad_gntref, f"reference {ref} is outside the table")
        return gpfn * 4096 + (ref % ENTRIES_PER_FRAME) * 8

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of grant ``ref`` as the guest wrote it."""
        mem = self.xen.host.memory
        gpa = self._entry_gpa(ref)
        if not mem.is_ram(gpa, 8):
            raise GrantError(GNTST_bad_gntref, f"grant frame of reference {ref} is not mapped in RAM")
        return mem.read_struct(gpa, "<HHI")

    def _check(self, ref: int, writable: bool, domid: int) -> int:
        flags, grantee, frame = self.entry(ref)
        if flags & GTF_type_mask != GTF_permit_access:
            raise GrantError(GNTST_bad_gntref, f"reference {ref} grants nothing (flags {flags:#x})")
        if grantee != domid:
            raise GrantError(GNTST_permission_denied, f"reference {ref} is for domain {grantee}, not {domid}")
        if writable and flags & GTF_readonly:
            raise GrantError(GNTST_permission_denied, f"reference {ref} is read-only")
        gpa = frame * 4096
        if not self.xen.host.memory.is_ram(gpa, 4096):
            raise GrantError(GNTST_bad_page, f"granted frame {frame:#x} is not RAM")
        return gpa

    def _set_busy(self, ref: int) -> None:
        """GTF_reading/GTF_writing while mapped, as Xen maintains them."""
        gpa = self._entry_gpa(ref)
        mem = self.xen.host.memory
        live = self.mappings.get(ref, [])
        flags = mem.read_struct(gpa, "<H")[0] & ~(GTF_reading | GTF_writing)
        if live:
            flags |= GTF_reading | (GTF_writing if any(m.writable for m in live) else 0)
        mem.write_struct(gpa, "<H", flags)

    def map(self, ref: int, writable: bool = True, domid: int = BACKEND_DOMID) -> GrantMapping:
        """Map a granted frame for the backend (Xen's GNTTABOP_map_grant_ref checks)."""
        gpa = self._check(ref, writable, domid)
        m = GrantMapping(ref, gpa, writable)
        self.mappings.setdefault(ref, []).append(m)
        self._set_busy(ref)
        return m

    def unmap(self, mapping: GrantMapping) -> None:
        live = self.mappings.get(mapping.ref, [])
        if mapping in live:
            live.remove(mapping)
            if not live:
                del self.mappings[mapping.ref]
            self._set_busy(mapping.ref)

    def read(self, ref: int, offset: int, size: int, domid: int = BACKEND_DOMID) -> bytes:
        """GNTTABOP_copy from the guest: bytes of a granted frame."""
        if offset < 0 or size < 0 or offset + size > 4096:
            raise GrantError(GNTST_general_error, "copy beyond the frame")
        return self.xen.host.memory.read(self._check(ref, False, domid) + offset, size)

    def write(self, ref: int, offset: int, data: bytes, domid: int = BACKEND_DOMID) -> None:
        """GNTTABOP_copy to the guest (needs a writable grant)."""
        if offset < 0 or offset + len(data) > 4096:
            raise GrantError(GNTST_general_error, "copy beyond the frame")
        self.xen.host.memory.write(self._check(ref, True, domid) + offset, data)

    # -- snapshots (snapshot/) -------------------------------------------------------
    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("xen-gnttab", 1)

    def save_record(self) -> dict:
        """The table's size and dom0's live mappings (the entries and their GTF_reading/writing
        bits are in the grant frames, saved with RAM)."""
        return make_record(*self.RECORD, {
            "nr_frames": self.nr_frames,
            "mappings": [[m.ref, m.gpa, m.writable] for ms in self.mappings.values() for m in ms]})

    def check_record(self, record: dict):
        """At most ``gnttab_max_frames`` frames; mappings of entries inside them, at page addresses."""
        st = open_record(record, *self.RECORD)
        nr = uint(st, "nr_frames", 32)
        if nr > self.max_frames:
            raise RecordError(f"{nr} grant frames, this domain may have {self.max_frames}")
        mappings = []
        for item in listing(st, "mappings", 1 << 16):
            if not isinstance(item, list) or len(item) != 3:
                raise RecordError("grant mapping is not [ref, gpa, writable]")
            ref = integer(item[0], "grant reference", 0, nr * ENTRIES_PER_FRAME - 1)
            gpa = integer(item[1], f"grant {ref} frame address", 0, (1 << 52) - 4096)
            if gpa % 4096:
                raise RecordError(f"grant {ref} mapped at {gpa:#x}, not a frame")
            mappings.append(GrantMapping(ref, gpa, boolean(item[2], f"grant {ref} writable")))
        return nr, mappings

    def apply_record(self, prepared) -> None:
        nr, mappings = prepared
        self.nr_frames, self.mappings = nr, {}
        for m in mappings:
            self.mappings.setdefault(m.ref, []).append(GrantMapping(m.ref, m.gpa, m.writable))
