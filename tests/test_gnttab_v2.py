"""Grant tables v2: the gnttab kernels end to end, the model's rules, and snapshots."""
import struct

import pytest

from xenicorn import firmware
from xenicorn.boot import boot
from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import MachineConfig
from xenicorn.records import RecordError
from xenicorn.xen import errno
from xenicorn.xen.gnttab import (GNTST_bad_copy_arg, GNTST_bad_page, GNTST_general_error, GNTST_okay,
                                 GNTST_permission_denied, GTF_permit_access, GTF_readonly, GTF_reading,
                                 GTF_sub_page, GTF_writing, GrantError, GrantTable)

import test_xen_hypercalls
from test_xen_hypercalls import SELF, call, ul

xen = test_xen_hypercalls.xen               # the fixture: a vCPU in 32- and 64-bit mode

BAR1 = 0xF0000000
GNTTAB, BUF = 20, 0x3000
STATUS = 1 << 31


class Dom0Sink(ConsoleSink):
    """The console, and dom0's backend acting on the guest's "gnttab: dom0 ..." lines."""

    def __init__(self):
        super().__init__(None)
        self.machine = None
        self.seen: dict = {}

    def write(self, data: bytes) -> None:
        super().write(data)
        if "stopped" in self.seen and "pause" not in self.seen:
            self.seen["pause"] = self.machine.vcpu.instructions   # counted when that run ended
        if data != b"\n":
            return
        line = self.text().rsplit("\n", 2)[-2]
        gt = self.machine.xen.gnttab
        if line == "gnttab: dom0 map":
            self.machine.vcpu.request_stop("dom0 mapped")              # a pause to save a snapshot at
            self.seen["stopped"] = True
            gt.map(8)                                                  # held until "unmap"
            self.seen["version"] = gt.version
            self.seen["status8"] = gt.status(8)
            self.seen["status_frame"] = self.machine.memory.read(BAR1 + 4096, 32)
            self.seen["full"] = gt.read(8, 0, 18)
            self.seen["sub"] = gt.read(9, 256, 17)
            gt.write(8, 100, b"dom0 was here")
            self.seen["refused"] = [self._code(f) for f in (
                lambda: gt.map(9, writable=False),                    # sub-page: never mapped
                lambda: gt.read(9, 0, 8),                             # before the window
                lambda: gt.read(9, 300, 30),                          # past the window's end
                lambda: gt.read(9, 4090, 10),                         # past the page
                lambda: gt.write(9, 256, b"x"),                       # read-only
                lambda: gt.map(10),                                   # transitive
                lambda: gt.read(10, 0, 8))]
        elif line == "gnttab: dom0 unmap":
            gt.unmap(gt.mappings[8][0])                                # (perhaps mapped before a snapshot)

    @staticmethod
    def _code(f):
        try:
            f()
        except GrantError as e:
            return e.code
        return GNTST_okay


def make(name, **kw):
    sink = Dom0Sink()
    machine, _ = boot(MachineConfig(debugcon="none", **kw), firmware.find(name), console=sink)
    sink.machine = machine
    return machine, sink


@pytest.mark.parametrize("bits", [32, 64])
def test_gnttab_kernel(bits):
    machine, sink = make(f"gnttab{bits}")
    status = machine.run()
    text = sink.text()
    assert status == 0 and text.rstrip().endswith("Test result: SUCCESS"), text
    assert "FAIL" not in text
    assert text.count("\nok ") >= 50
    for line in ("ok set_version(1) while entry 8 is mapped = -16 (expected -16)",
                 "ok copy sub-page grant past the page end: status -10",
                 "ok set_version(1) with reserved entry 3 at frame 2^32 = -34 (expected -34)"):
        assert line in text
    s = sink.seen
    assert s["version"] == 2 and s["status8"] == GTF_reading | GTF_writing
    # the status frame as the guest mapped it: u16 per entry, entry 8 busy, the rest idle
    words = struct.unpack("<16H", s["status_frame"])
    assert words[8] == GTF_reading | GTF_writing and not any(words[:8] + words[9:])
    assert s["full"] == b"full page for dom0" and s["sub"] == b"sub-page for dom0"
    assert s["refused"] == [GNTST_general_error, GNTST_general_error, GNTST_general_error, GNTST_bad_copy_arg,
                            GNTST_general_error, GNTST_general_error, GNTST_general_error]
    gt = machine.xen.gnttab
    assert gt.version == 1 and not gt.mappings and not gt.status_gfns            # back to v1, idle
    assert all(i < 128 for i in machine.memory.frames if i < 254)                # no status frame mapped
    assert gt.entry(2)[:2] == (GTF_permit_access | GTF_readonly, 0) and gt.entry(3)[0] == 0   # reserved, v1 again


# -- the model, driven through the hypercall -------------------------------------------------
def set_version(m, v):
    m.memory.write_struct(BUF, "<I", v)
    return call(m, GNTTAB, 8, BUF, 1), m.memory.read_struct(BUF, "<I")[0]


def add_frame(m, idx, gpfn):
    m.memory.write_struct(BUF + 0x100, f"<HHI{ul(m)}{ul(m)}", SELF, 0, 1, idx, gpfn)
    return call(m, 12, 7, BUF + 0x100)


def v2_entry(m, ref, flags, domid, frame, page_off=0, length=0):
    m.memory.write_struct(BAR1 + 16 * ref, "<HHHHQ", flags, domid, page_off, length, frame)


def test_v2_rules(xen):
    gt = xen.xen.gnttab
    assert add_frame(xen, 0, BAR1 >> 12) == 0
    assert set_version(xen, 2) == (0, 2) and gt.nr_status_frames == 1
    assert add_frame(xen, STATUS | 8, (BAR1 >> 12) + 1) == -errno.EINVAL     # would need 72 grant frames
    assert add_frame(xen, STATUS | 0, (BAR1 >> 12) + 1) == 0
    assert gt.status_gfns == {0: (BAR1 >> 12) + 1} and gt.nr_frames == 8     # the table grew to cover it
    v2_entry(xen, 8, GTF_permit_access, 0, 0x50)
    v2_entry(xen, 9, GTF_permit_access | GTF_sub_page, 0, 0x51, 100, 50)
    v2_entry(xen, 11, GTF_permit_access, 0, 0x53)
    xen.xen.state.ballooned.add(0x53)                                        # given back to Xen
    with pytest.raises(GrantError) as e:
        gt.map(11)
    assert e.value.code == GNTST_bad_page
    m = gt.map(8, writable=False)
    assert xen.memory.read_struct(BAR1 + 4096 + 16, "<H")[0] == GTF_reading
    assert xen.memory.read_struct(BAR1 + 16 * 8, "<H")[0] == GTF_permit_access      # flags untouched in v2
    xen.memory.write(0x51000 + 100, b"x" * 50)
    gt.copy(9, 100, 8, 0, 50)                                                # grant to grant, as dom0
    assert xen.memory.read(0x50000, 50) == b"x" * 50
    with pytest.raises(GrantError) as e:
        gt.copy(9, 100, 8, 0, 51)
    assert e.value.code == GNTST_general_error
    assert set_version(xen, 1) == (-errno.EBUSY, 2)
    gt.unmap(m)
    assert xen.memory.read_struct(BAR1 + 4096 + 16, "<H")[0] == 0
    assert set_version(xen, 1) == (0, 1) and gt.nr_status_frames == 0
    assert not xen.memory.is_ram(BAR1 + 4096) and gt.status_gfns == {}    # the status frame left the guest
    assert xen.memory.read(BAR1, 4096) == bytes(4096)                      # no crud from v2
    # get_status_frames from dom0 is refused by XSM, not "no such domain"
    xen.memory.write_struct(BUF, "<IHh", 0, 0, 99)
    assert call(xen, GNTTAB, 9, BUF, 1) == 0 and xen.memory.read_struct(BUF + 6, "<h")[0] == GNTST_permission_denied


def test_reserved_busy_entries_keep_their_state_across_versions(xen):
    gt = xen.xen.gnttab
    assert add_frame(xen, 0, BAR1 >> 12) == 0
    xen.memory.write_struct(BAR1 + 8 * 3, "<HHI", GTF_permit_access, 0, 0x52)
    m = gt.map(3)                                                     # reserved entries may stay mapped
    assert set_version(xen, 2) == (0, 2)
    assert gt.entry(3) == (GTF_permit_access, 0, 0x52) and gt.status(3) == GTF_reading | GTF_writing
    assert set_version(xen, 1) == (0, 1)
    assert gt.entry(3) == (GTF_permit_access | GTF_reading | GTF_writing, 0, 0x52)
    gt.unmap(m)
    assert gt.entry(3) == (GTF_permit_access, 0, 0x52)


def test_snapshot_record_keeps_version_and_status_frames(xen):
    gt = xen.xen.gnttab
    assert add_frame(xen, 0, BAR1 >> 12) == 0 and set_version(xen, 2) == (0, 2)
    assert add_frame(xen, STATUS, (BAR1 >> 12) + 2) == 0
    v2_entry(xen, 8, GTF_permit_access, 0, 0x50)
    gt.map(8)
    record = gt.save_record()
    other = GrantTable(xen.xen)
    other.apply_record(other.check_record(record))
    assert (other.version, other.nr_frames, other.status_gfns) == (2, 8, {0: (BAR1 >> 12) + 2})
    assert [(m.ref, m.writable, m.domid) for m in other.mappings[8]] == [(8, True, 0)]
    # a record from before v2 loads as a v1 table
    old = {"type": "xen-gnttab", "version": 1, "state": {"nr_frames": 2, "mappings": [[5, 0x50000, False]]}}
    other.apply_record(other.check_record(old))
    assert other.version == 1 and other.status_gfns == {} and other.mappings[5][0].gpa == 0x50000
    for state, why in [({**record["state"], "version": 3}, "version"),
                       ({**record["state"], "status_frames": [[1, 5]]}, "status frame"),
                       ({**record["state"], "version": 1}, "status frame")]:
        with pytest.raises(RecordError, match=why):
            other.check_record({**record, "state": state})


def test_snapshot_while_a_v2_grant_is_mapped(tmp_path):
    """Saved between "dom0 map" and "dom0 unmap": the v2 table, its status frame and dom0's
    mapping come back, and the loaded machine finishes the run exactly as the unbroken one."""
    kw = {"clock": "deterministic", "ram_mib": 32}
    ref, ref_sink = make("gnttab64", **kw)
    assert ref.run() == 0
    saver, saver_sink = make("gnttab64", **kw)
    path = str(tmp_path / "v2.snap")
    saver.save_at(ref_sink.seen["pause"], path)
    marks = []
    save = saver.save_snapshot
    saver.save_snapshot = lambda p: (marks.append(len(saver_sink.data)), save(p))[1]
    assert saver.run() == 0 and bytes(saver_sink.data) == bytes(ref_sink.data) and marks
    fresh, fresh_sink = make("gnttab64", **kw)
    fresh.load_snapshot(path)
    gt = fresh.xen.gnttab
    assert gt.version == 2 and gt.status_gfns == {0: (BAR1 >> 12) + 1} and gt.nr_frames == 8
    assert [m.writable for m in gt.mappings[8]] == [True] and gt.status(8) == GTF_reading | GTF_writing
    assert fresh.memory.frames[128] == BAR1 + 4096                          # status frame 0, in the guest
    assert fresh.run() == 0
    out = bytes(ref_sink.data)
    assert out[:marks[0]] + bytes(fresh_sink.data) == out and out.rstrip().endswith(b"Test result: SUCCESS")
    assert gt.version == 1 and not gt.mappings
