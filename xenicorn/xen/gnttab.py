"""Grant tables, versions 1 and 2: how a guest lets another domain touch its pages.

A guest shares a page by writing a *grant entry* into its grant table: "domain
D may access my frame F" (read-only or not), and then telling D the entry's
index, the grant *reference*. The table itself is a set of frames Xen owns
and the guest maps into its physical address space with
``XENMEM_add_to_physmap(XENMAPSPACE_grant_table, idx, gpfn)``; an HVM Linux
puts them in the xen-platform device's memory BAR. The layout depends on the
table's *version* (xen/include/public/grant_table.h)::

    v1, 512 per frame:  struct grant_entry_v1 { u16 flags; domid_t domid; u32 frame; };
    v2, 256 per frame:  union grant_entry_v2 {                 (16 bytes)
        header    { u16 flags; domid_t domid; }
        full_page { header; u32 pad0; u64 frame; }
        sub_page  { header; u16 page_off, length; u64 frame; } (GTF_sub_page set)
        transitive{ header; domid_t trans_domid; u16 pad0; u32 gref; } }

``flags`` bits 1:0 are the type (1 = GTF_permit_access, 3 = GTF_transitive);
bit 2 GTF_readonly; bit 8 GTF_sub_page (v2). GTF_reading/GTF_writing (bits 3
and 4) are set *by Xen* while the grantee uses the page, so the guest knows
when it may revoke the grant. In v1 they live in ``flags`` itself; in v2 they
live in separate *status frames*, one ``u16 grant_status_t`` per entry (2048
per frame), which the guest maps with ``idx | XENMAPIDX_grant_table_status``
(bit 31) and finds with GNTTABOP_get_status_frames.

xenicorn plays the grantee, domain 0 (:meth:`GrantTable.map`, :meth:`read`,
:meth:`write`, :meth:`copy`), with the checks Xen applies in
``map_grant_ref`` and ``acquire_grant_for_copy`` (xen/common/grant_table.c):
a reference inside the table, an entry of type permit_access for *this*
domain, no write through a read-only grant, a frame that is guest RAM; a map
refuses sub-page and transitive grants, a copy stays inside a sub-page's
``[page_off, page_off+length)``. Failures are Xen's GNTST_* codes.

The guest's side is ``grant_table_op`` (hypercall 20), in :mod:`.gnttab_ops`:

====  ==================  ==============================================
cmd   name                argument
====  ==================  ==============================================
2     setup_table         { u16 dom; u32 nr_frames; OUT i16 status; handle frame_list }
5     copy                count x { src, dest: {gref|gmfn, u16 domid, offset}; u16 len, flags; OUT i16 status }
6     query_size          { u16 dom; OUT u32 nr_frames, max_nr_frames; i16 status }
8     set_version         { INOUT u32 version } -- 1 or 2
9     get_status_frames   { u32 nr_frames; u16 dom; OUT i16 status; handle(u64) frame_list }
10    get_version         { u16 dom; u16 pad; OUT u32 version }
====  ==================  ==============================================

The other ops (map/unmap/transfer/swap ...) answer -ENOSYS: a domU does not
map other domains' grants here.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..records import RecordError, boolean, integer, listing, make_record, open_record, uint
from . import errno
from .guest import HypercallError

GNTTABOP_setup_table, GNTTABOP_copy, GNTTABOP_query_size = 2, 5, 6
GNTTABOP_set_version, GNTTABOP_get_status_frames, GNTTABOP_get_version = 8, 9, 10
GNTST_okay, GNTST_general_error, GNTST_bad_domain, GNTST_bad_gntref = 0, -1, -2, -3
GNTST_bad_virt_addr, GNTST_permission_denied, GNTST_bad_page, GNTST_bad_copy_arg = -5, -8, -9, -10
GTF_invalid, GTF_permit_access, GTF_transitive, GTF_type_mask = 0, 1, 3, 3
GTF_readonly, GTF_reading, GTF_writing, GTF_sub_page = 1 << 2, 1 << 3, 1 << 4, 1 << 8
GNTCOPY_source_gref, GNTCOPY_dest_gref = 1, 2
GNTTAB_NR_RESERVED_ENTRIES = 8           # kept across set_version (toolstack grants)
XENMAPIDX_grant_table_status = 1 << 31
PAGE = 4096
ENTRIES_PER_FRAME = PAGE // 8            # v1
V2_ENTRIES_PER_FRAME = PAGE // 16
STATUS_PER_FRAME = PAGE // 2
STATUS_FRAME_BASE = 128                  # hypervisor frame of status frame 0 (grant frames are 0..127)
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
    domid: int = BACKEND_DOMID


def status_frames_for(nr_frames: int) -> int:
    """Status frames covering ``nr_frames`` v2 grant frames (grant_to_status_frames)."""
    return (nr_frames * V2_ENTRIES_PER_FRAME + STATUS_PER_FRAME - 1) // STATUS_PER_FRAME


class GrantTable:
    """The domain's grant table (either version), and the backend's view of it."""

    def __init__(self, xen):
        self.xen = xen
        self.version = 1                          # a new domain starts at v1 (grant_table_init)
        self.nr_frames = 0                        # frames set up (grown, never shrunk)
        self.status_gfns: dict[int, int] = {}     # v2 status frame -> gpfn where the guest mapped it
        self.mappings: dict[int, list[GrantMapping]] = {}   # ref -> live backend mappings (Xen's pins)

    @property
    def max_frames(self) -> int:
        return self.xen.config.gnttab_max_frames

    @property
    def nr_entries(self) -> int:
        return self.nr_frames * (ENTRIES_PER_FRAME if self.version == 1 else V2_ENTRIES_PER_FRAME)

    @property
    def nr_status_frames(self) -> int:
        return status_frames_for(self.nr_frames) if self.version == 2 else 0

    def place(self, idx: int, gpfn: int, bad_gpfn: bool = False) -> None:
        """XENMAPSPACE_grant_table: put shared frame ``idx`` (or, bit 31 set in v2, a status
        frame) at ``gpfn``, growing the table as Xen's gnttab_map_frame_begin does."""
        status = self.version == 2 and idx & XENMAPIDX_grant_table_status
        if status:
            # gnttab_get_status_frame_mfn: the table grows until status frame idx exists
            idx &= ~XENMAPIDX_grant_table_status
            need = (idx + 1) * STATUS_PER_FRAME // V2_ENTRIES_PER_FRAME
            if need > self.max_frames:
                raise HypercallError(errno.EINVAL, f"status frame {idx} needs {need} grant frames")
            frame = STATUS_FRAME_BASE + idx
        else:
            # in v1 the status bit just makes idx too large (gnttab_get_shared_frame_mfn)
            need = idx + 1
            if idx >= self.max_frames:
                raise HypercallError(errno.EINVAL, f"grant frame {idx} >= {self.max_frames}")
            frame = idx
        if bad_gpfn:
            raise HypercallError(errno.EINVAL, f"gpfn {gpfn:#x}")
        self.xen.host.memory.map_frame(frame, gpfn * PAGE)
        st = self.xen.state
        # a frame mapped over another one's gpfn displaces it (map_frame), so forget that one
        for table, mine in ((st.grant_frames, None if status else idx), (self.status_gfns, idx if status else None)):
            for i in [i for i, g in table.items() if g == gpfn and i != mine]:
                del table[i]
        (self.status_gfns if status else st.grant_frames)[idx] = gpfn
        self.nr_frames = max(self.nr_frames, need)

    def hypercall(self, call, cmd: int, uop: int, count: int, *_) -> int:
        from .gnttab_ops import grant_table_op       # (that module builds on this one)
        return grant_table_op(self, call, cmd, uop, count)

    # -- the entries, in either layout ---------------------------------------------------
    def _view(self, frame: int) -> memoryview:
        return self.xen.host.memory.frame_view(frame)

    def _check_ref(self, ref: int) -> None:
        if not 0 <= ref < self.nr_entries:
            raise GrantError(GNTST_bad_gntref, f"reference {ref} is outside the table ({self.nr_entries})")

    def raw_entry(self, ref: int) -> tuple[int, int, int, int]:
        """(flags, domid, u32 at +4, frame) of ``ref``. v1 has no such word (0) and a u32 frame;
        in v2 the word is pad0 (full page), page_off | length << 16 (sub-page) or trans_domid
        (transitive, whose gref is then the low half of the u64 "frame")."""
        self._check_ref(ref)
        if self.version == 1:
            flags, domid, frame = struct.unpack_from("<HHI", self._view(ref // ENTRIES_PER_FRAME),
                                                     (ref % ENTRIES_PER_FRAME) * 8)
            return flags, domid, 0, frame
        return struct.unpack_from("<HHIQ", self._view(ref // V2_ENTRIES_PER_FRAME), (ref % V2_ENTRIES_PER_FRAME) * 16)

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of grant ``ref`` as the guest wrote it; in v1 ``flags`` carries
        GTF_reading/writing, in v2 they are in :meth:`status`."""
        flags, domid, _, frame = self.raw_entry(ref)
        return flags, domid, frame

    def _status_at(self, ref: int) -> tuple[memoryview, int]:
        """Where ``ref``'s GTF_reading/GTF_writing live: its flags (v1) or its status word (v2)."""
        if self.version == 1:
            return self._view(ref // ENTRIES_PER_FRAME), (ref % ENTRIES_PER_FRAME) * 8
        return self._view(STATUS_FRAME_BASE + ref // STATUS_PER_FRAME), (ref % STATUS_PER_FRAME) * 2

    def status(self, ref: int) -> int:
        """GTF_reading | GTF_writing as Xen shows them to the guest for ``ref``."""
        self._check_ref(ref)
        view, off = self._status_at(ref)
        return struct.unpack_from("<H", view, off)[0] & (GTF_reading | GTF_writing)

    def _set_busy(self, ref: int) -> None:
        """GTF_reading/GTF_writing while pinned, as Xen maintains them."""
        view, off = self._status_at(ref)
        live = self.mappings.get(ref, [])
        flags = struct.unpack_from("<H", view, off)[0] & ~(GTF_reading | GTF_writing)
        if live:
            flags |= GTF_reading | (GTF_writing if any(m.writable for m in live) else 0)
        struct.pack_into("<H", view, off, flags)

    # -- the checks of map_grant_ref / acquire_grant_for_copy ---------------------------------
    def acquire(self, ref: int, writable: bool, domid: int, mapflag: bool) -> tuple[int, int, int]:
        """(frame address, start, length) that ``domid`` may use through ``ref``, or GrantError.

        Xen's codes (grant_table.c): a reference beyond the table GNTST_bad_gntref;
        an entry pinned by another domain, of the wrong type or grantee, or
        read-only for a write GNTST_general_error (_set_status_v1/_v2; a map
        also refuses GTF_sub_page); a frame that is not RAM GNTST_bad_page
        (get_paged_frame).
        """
        self._check_ref(ref)
        live = self.mappings.get(ref, [])
        if live and live[0].domid != domid:
            raise GrantError(GNTST_general_error, f"reference {ref} is in use by domain {live[0].domid}")
        flags, grantee, word, frame = self.raw_entry(ref)
        if not live:
            kind = flags & (GTF_type_mask | (GTF_sub_page if mapflag else 0))
            if self.version == 2 and kind == GTF_transitive:
                # acquire_grant_for_copy follows it to trans_domid: a map never does, and
                # the only other domain here is dom0, which grants nothing (a self-reference
                # is refused outright): general_error either way
                raise GrantError(GNTST_general_error, f"reference {ref} is transitive")
            if kind != GTF_permit_access or grantee != domid:
                raise GrantError(GNTST_general_error,
                                 f"reference {ref} does not grant domain {domid} (flags {flags:#x}, domid {grantee})")
        if writable and flags & GTF_readonly:
            raise GrantError(GNTST_general_error, f"reference {ref} is read-only")
        if live:
            return live[0].gpa, 0, PAGE
        start, length = 0, PAGE
        if self.version == 2 and flags & GTF_sub_page:
            start, length = word & 0xFFFF, word >> 16
        if not self.is_guest_frame(frame):
            raise GrantError(GNTST_bad_page, f"granted frame {frame:#x} is not RAM")
        return frame * PAGE, start, length

    def is_guest_frame(self, gfn: int) -> bool:
        """get_paged_frame's test: a populated RAM frame of the guest (not ballooned out)."""
        return (gfn < 1 << 40 and self.xen.host.memory.is_ram(gfn * PAGE, PAGE)
                and gfn not in self.xen.state.ballooned)

    # -- the backend (dom0) side ------------------------------------------------------
    def map(self, ref: int, writable: bool = True, domid: int = BACKEND_DOMID) -> GrantMapping:
        """Map a granted frame for the backend (Xen's GNTTABOP_map_grant_ref checks)."""
        gpa, _, _ = self.acquire(ref, writable, domid, mapflag=True)
        m = GrantMapping(ref, gpa, writable, domid)
        self.mappings.setdefault(ref, []).append(m)
        self._set_busy(ref)
        return m

    def unmap(self, mapping: GrantMapping) -> None:
        live = self.mappings.get(mapping.ref, [])
        if mapping in live:
            live.remove(mapping)
            if not live:
                del self.mappings[mapping.ref]
            if mapping.ref < self.nr_entries:
                self._set_busy(mapping.ref)

    def read(self, ref: int, offset: int, size: int, domid: int = BACKEND_DOMID) -> bytes:
        """GNTTABOP_copy from the guest: bytes of a granted frame (or sub-page)."""
        gpa, start, length = self.acquire(ref, False, domid, mapflag=False)
        _bounds(offset, size, start, length, f"reference {ref}")
        return self.xen.host.memory.read(gpa + offset, size)

    def write(self, ref: int, offset: int, data: bytes, domid: int = BACKEND_DOMID) -> None:
        """GNTTABOP_copy to the guest (needs a writable grant)."""
        gpa, start, length = self.acquire(ref, True, domid, mapflag=False)
        _bounds(offset, len(data), start, length, f"reference {ref}")
        self.xen.host.memory.write(gpa + offset, data)

    def copy(self, src_ref: int, src_offset: int, dest_ref: int, dest_offset: int, length: int,
             domid: int = BACKEND_DOMID) -> None:
        """GNTTABOP_copy between two of the guest's grants, with every check Xen makes."""
        code = self.copy_one((True, src_ref, self.xen.config.domid, src_offset),
                             (True, dest_ref, self.xen.config.domid, dest_offset), length, domid)
        if code != GNTST_okay:
            raise GrantError(code, f"copy {src_ref}+{src_offset} -> {dest_ref}+{dest_offset} ({length} bytes)")

    def copy_one(self, src, dest, length: int, ldom: int) -> int:
        """One gnttab_copy op; ``src``/``dest`` are (is_gref, gref or gmfn, domid, offset) of this
        domain (DOMID_SELF or its id). The GNTST_* status, as gnttab_copy_one gives it."""
        if length == 0:
            return GNTST_okay                       # gnttab_copy_one: nothing to do, nothing checked
        me = self.xen.config.domid
        for is_ref, _, domid, _ in (src, dest):     # gnttab_copy_lock_domain
            if domid != DOMID_SELF and not is_ref:
                return GNTST_permission_denied      # only DOMID_SELF may name a frame
            if domid not in (DOMID_SELF, me, BACKEND_DOMID):
                return GNTST_bad_domain
        claimed = []
        for (is_ref, ref, domid, _), writable in ((src, False), (dest, True)):   # gnttab_copy_claim_buf
            try:
                if domid == BACKEND_DOMID:
                    return GNTST_bad_gntref         # dom0 exists but grants nothing: its table is empty
                if is_ref:
                    claimed.append(self.acquire(ref, writable, ldom, mapflag=False))
                elif not self.is_guest_frame(ref):
                    return GNTST_bad_page           # get_paged_frame
                else:
                    claimed.append((ref * PAGE, 0, PAGE))
            except GrantError as e:
                return e.code
        (sgpa, sstart, slen), (dgpa, dstart, dlen) = claimed
        try:
            _bounds(src[3], length, sstart, slen, "source")
            _bounds(dest[3], length, dstart, dlen, "dest")
        except GrantError as e:
            return e.code
        mem = self.xen.host.memory
        mem.write(dgpa + dest[3], mem.read(sgpa + src[3], length))
        return GNTST_okay

    # -- set_version's work (gnttab_set_version) ----------------------------------------
    def switch_version(self, version: int) -> int:
        """Change the layout to ``version`` (1 or 2, not the current one): 0 or an errno."""
        if any(ref >= GNTTAB_NR_RESERVED_ENTRIES for ref in self.mappings):
            return errno.EBUSY                      # only the reserved entries may stay in use
        reserved = []
        for ref in range(min(GNTTAB_NR_RESERVED_ENTRIES, self.nr_entries)):
            flags, domid, _, frame = self.raw_entry(ref)
            if self.version == 2:
                kind = flags & GTF_type_mask
                if kind == GTF_transitive or (kind == GTF_permit_access and frame >> 32):
                    return errno.ERANGE             # not representable in v1
                if kind != GTF_permit_access:
                    flags = domid = frame = 0
                else:
                    flags |= self.status(ref)
            reserved.append((flags, domid, frame))
        mem = self.xen.host.memory
        if self.version == 2:                       # gnttab_unpopulate_status_frames
            for idx in self.status_gfns:
                mem.unmap_frame(STATUS_FRAME_BASE + idx)
            self.status_gfns = {}
        for i in range(status_frames_for(self.nr_frames)):   # fresh status pages (populate), or freed ones
            self._view(STATUS_FRAME_BASE + i)[:] = bytes(PAGE)
        for i in range(self.nr_frames):             # no crud left from the old layout
            self._view(i)[:] = bytes(PAGE)
        self.version = version
        for ref, (flags, domid, frame) in enumerate(reserved):
            if version == 1:
                struct.pack_into("<HHI", self._view(0), ref * 8, flags, domid, frame)
            else:
                busy = flags & (GTF_reading | GTF_writing)
                struct.pack_into("<HHIQ", self._view(0), ref * 16, flags & ~busy, domid, 0, frame)
                struct.pack_into("<H", self._view(STATUS_FRAME_BASE), ref * 2, busy)
        return 0

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("xen-gnttab", 2)

    def save_record(self) -> dict:
        """Version, size, where the status frames are, and the backend's live mappings (the
        entries and status words are in the hypervisor frames, saved with RAM)."""
        return make_record(*self.RECORD, {
            "version": self.version, "nr_frames": self.nr_frames,
            "status_frames": sorted([i, g] for i, g in self.status_gfns.items()),
            "mappings": [[m.ref, m.gpa, m.writable, m.domid] for ms in self.mappings.values() for m in ms]})

    def check_record(self, record: dict):
        """Version 1 or 2, at most ``gnttab_max_frames`` frames, status frames (v2 only) inside
        the table, mappings of entries inside it at page addresses. A version-1 record (before
        grant table v2) still loads: a v1 table without status frames."""
        old = isinstance(record, dict) and record.get("version") == 1
        st = open_record(record, self.RECORD[0], 1 if old else self.RECORD[1])
        version = 1 if old else integer(st.get("version"), "grant table version", 1, 2)
        nr = uint(st, "nr_frames", 32)
        if nr > self.max_frames:
            raise RecordError(f"{nr} grant frames, this domain may have {self.max_frames}")
        status = {}
        for item in ([] if old else listing(st, "status_frames", 64)):
            if not isinstance(item, list) or len(item) != 2:
                raise RecordError("status frame is not [index, gpfn]")
            idx = integer(item[0], "status frame", 0, status_frames_for(nr) - 1 if version == 2 else -1)
            status[idx] = integer(item[1], f"status frame {idx} gpfn", 0, (1 << 40) - 1)
        per = ENTRIES_PER_FRAME if version == 1 else V2_ENTRIES_PER_FRAME
        mappings = []
        for item in listing(st, "mappings", 1 << 16):
            if not isinstance(item, list) or len(item) != (3 if old else 4):
                raise RecordError("grant mapping is not [ref, gpa, writable" + ("]" if old else ", domid]"))
            ref = integer(item[0], "grant reference", 0, nr * per - 1)
            gpa = integer(item[1], f"grant {ref} frame address", 0, (1 << 52) - 4096)
            if gpa % 4096:
                raise RecordError(f"grant {ref} mapped at {gpa:#x}, not a frame")
            domid = BACKEND_DOMID if old else integer(item[3], f"grant {ref} domain", 0, DOMID_SELF - 1)
            mappings.append(GrantMapping(ref, gpa, boolean(item[2], f"grant {ref} writable"), domid))
        return version, nr, status, mappings

    def apply_record(self, prepared) -> None:
        self.version, self.nr_frames, status, mappings = prepared
        self.status_gfns, self.mappings = dict(status), {}
        for m in mappings:
            self.mappings.setdefault(m.ref, []).append(GrantMapping(m.ref, m.gpa, m.writable, m.domid))


def _bounds(offset: int, size: int, start: int, length: int, what: str) -> None:
    """gnttab_copy_buf: beyond the page GNTST_bad_copy_arg; outside the grant's window general_error."""
    if offset < 0 or size < 0 or offset + size > PAGE:
        raise GrantError(GNTST_bad_copy_arg, f"{what}: {offset}+{size} crosses the page")
    if offset < start or offset + size > start + length:
        raise GrantError(GNTST_general_error, f"{what}: {offset}+{size} outside the granted {start}+{length}")
