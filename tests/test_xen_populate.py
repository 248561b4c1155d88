"""XENMEM_populate_physmap outside the boot RAM, in both guest widths: Xen's accounting and refusals."""
import pytest

from xenicorn.engine.msr import SHADOW_BASE
from xenicorn.machine.memory import EXTRA_FRAMES
from xenicorn.records import RecordError

from test_xen_hypercalls import BUF, BUF2, SELF, call, ul, xen  # noqa: F401 (xen: the 32- and 64-bit fixture)

HOLE = 0xFFFFF                      # the page below 4 GiB: no RAM in a 16 MiB machine
POPULATE, DECREASE, INCREASE, CURRENT, MAXIMUM = 6, 1, 0, 3, 4


def extents(m, cmd, gfns, order=0):
    """memory_op(cmd) over the extent list ``gfns``; returns the extents done."""
    w = m.bits // 8
    m.memory.write(BUF2, b"".join(g.to_bytes(w, "little") for g in gfns))
    m.memory.write_struct(BUF, f"<{ul(m)}{ul(m)}IIH", BUF2, len(gfns), order, 0, SELF)
    return call(m, 12, cmd, BUF)


def reservation(m):
    m.memory.write_struct(BUF3 := 0x6000, "<H", SELF)
    return call(m, 12, CURRENT, BUF3), call(m, 12, MAXIMUM, BUF3)


def engine_read(m, gpa, n=4):
    return bytes(m.vcpu.uc.mem_read(gpa, n))


def test_max_pages_is_the_ram_plus_libxl_slack(xen):
    ram = xen.memory.size // 4096
    assert reservation(xen) == (ram, ram + 256)
    assert extents(xen, INCREASE, [0] * 300) == 256                # accounting only, up to max_pages


def test_a_hole_becomes_ram_and_goes_back(xen):
    ram = xen.memory.size // 4096
    gpa = HOLE << 12
    assert not xen.memory.is_ram(gpa)
    assert extents(xen, POPULATE, [HOLE]) == 1
    assert xen.memory.is_ram(gpa) and reservation(xen)[0] == ram + 1
    assert engine_read(xen, gpa) == bytes(4)                        # the CPU engine sees the page
    xen.memory.write(gpa, b"\x11\x22\x33\x44")
    assert engine_read(xen, gpa) == b"\x11\x22\x33\x44"             # the same bytes as Python's
    assert gpa not in [e.addr for e in xen.memory.e820()]          # the boot-time map does not change
    assert extents(xen, POPULATE, [HOLE]) == 1                      # again: a fresh page replaces it
    assert engine_read(xen, gpa) == bytes(4) and reservation(xen)[0] == ram + 2
    assert extents(xen, DECREASE, [HOLE]) == 1
    assert not xen.memory.is_ram(gpa) and reservation(xen)[0] == ram + 1
    assert extents(xen, DECREASE, [HOLE]) == 0                      # nothing there any more


def test_populate_stops_at_max_pages(xen):
    ram = xen.memory.size // 4096
    gfns = [0x100000 + i for i in range(EXTRA_FRAMES + 1)]          # 4 GiB and up: all holes here
    assert extents(xen, POPULATE, gfns) == 256                      # tot_pages reached max_pages
    assert reservation(xen)[0] == ram + 256
    assert extents(xen, POPULATE, [0x10]) == 0                      # even over RAM: the allocation fails
    assert extents(xen, DECREASE, [0x100000]) == 1
    assert extents(xen, POPULATE, [0x100000 + 300]) == 1            # one page of room again


def test_refused_gfns_change_nothing(xen):
    ram = xen.memory.size // 4096
    refused = [0xFEE00,                                            # the LAPIC's page: xenicorn keeps it
               SHADOW_BASE >> 12]                                  # the CPU engine's own page
    for gfn in refused:
        assert extents(xen, POPULATE, [gfn]) == 0, hex(gfn)
    assert extents(xen, POPULATE, [0x200], order=9) == 0            # 512 pages > the 256 left
    assert reservation(xen)[0] == ram and xen.status is None and not xen.memory.extra


def test_a_gfn_past_the_p2m_width_is_refused_after_the_allocation(xen):
    if xen.bits == 32:
        pytest.skip("a 32-bit guest's xen_pfn_t cannot name a gfn past 2^36")
    ram = xen.memory.size // 4096
    assert extents(xen, POPULATE, [1 << 36, HOLE]) == 0            # ept_set_entry: -EINVAL, Xen stops
    assert reservation(xen)[0] == ram + 1                           # the page it allocated stays counted
    assert not xen.memory.extra and not xen.memory.is_ram(HOLE << 12)


def test_populating_over_a_grant_frame_crashes_the_domain(xen):
    xen.xen.gnttab.place(0, HOLE)
    assert extents(xen, POPULATE, [HOLE]) == 0
    assert xen.shutdown_reason == "crash" and "grant frame" in xen.shutdown_message


def test_added_pages_are_saved_and_restored(xen):
    gpa = HOLE << 12
    assert extents(xen, POPULATE, [HOLE]) == 1
    xen.memory.write(gpa, b"kept")
    saved = xen.memory.save_record()
    assert extents(xen, DECREASE, [HOLE]) == 1 and not xen.memory.is_ram(gpa)
    xen.memory.apply_record(xen.memory.check_record(saved))
    assert xen.memory.read(gpa, 4) == b"kept" and engine_read(xen, gpa) == b"kept"
    bad = dict(saved, state=dict(saved["state"], extra=[[0, 0x1000]]))   # over boot RAM
    with pytest.raises(RecordError):
        xen.memory.check_record(bad)
