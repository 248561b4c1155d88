"""Grant tables v1 (v2: test_gnttab_v2.py): the guest's grant_table_op and the backend's checked access."""
import pytest

from xenicorn.xen import errno
from xenicorn.xen.gnttab import (GrantError, GNTST_bad_gntref, GNTST_bad_page, GNTST_bad_copy_arg,
                                  GNTST_bad_domain, GNTST_general_error, GTF_permit_access, GTF_readonly,
                                  GTF_reading, GTF_writing)

from test_xen_hypercalls import SELF, call, ul, xen  # noqa: F401 - the fixture

BUF = 0x3000
GNTTAB = 20
BAR1 = 0xF0000000                       # the xen-platform device's memory BAR


def map_grant_frame(m, idx, gpfn):
    m.memory.write_struct(BUF, f"<HHI{ul(m)}{ul(m)}", SELF, 0, 1, idx, gpfn)
    return call(m, 12, 7, BUF)


def grant(m, ref, domid, frame, flags=GTF_permit_access):
    gpfn = m.xen.state.grant_frames[ref // 512]
    m.memory.write_struct(gpfn * 4096 + (ref % 512) * 8, "<HHI", flags, domid, frame)


def test_versions_and_sizes(xen):
    for bad in (0, 3):
        xen.memory.write_struct(BUF, "<I", bad)
        assert call(xen, GNTTAB, 8, BUF, 1) == -errno.EINVAL        # only versions 1 and 2
        assert xen.memory.read_struct(BUF, "<I")[0] == 1            # the version in force, written back
    xen.memory.write_struct(BUF, "<I", 1)
    assert call(xen, GNTTAB, 8, BUF, 1) == 0
    xen.memory.write_struct(BUF, "<HHI", SELF, 0, 0)
    assert call(xen, GNTTAB, 10, BUF, 1) == 0 and xen.memory.read_struct(BUF + 4, "<I")[0] == 1
    xen.memory.write_struct(BUF, "<HHI", 9, 0, 0)
    assert call(xen, GNTTAB, 10, BUF, 1) == -errno.ESRCH
    xen.memory.write_struct(BUF, "<HHI", 0, 0, 0)
    assert call(xen, GNTTAB, 10, BUF, 1) == -errno.EPERM           # dom0 exists; XSM says no
    xen.memory.write_struct(BUF, "<H2xIIh", SELF, 0, 0, 5)
    assert call(xen, GNTTAB, 6, BUF, 1) == 0
    assert xen.memory.read_struct(BUF + 4, "<IIh") == (0, 64, 0)
    assert map_grant_frame(xen, 3, 0x40) == 0
    assert call(xen, GNTTAB, 6, BUF, 1) == 0 and xen.memory.read_struct(BUF + 4, "<I")[0] == 4
    xen.memory.write_struct(BUF, "<H2xIIh", 7, 0, 0, 5)
    assert call(xen, GNTTAB, 6, BUF, 1) == 0 and xen.memory.read_struct(BUF + 12, "<h")[0] == GNTST_bad_domain
    assert call(xen, GNTTAB, 6, BUF, 2) == -errno.EINVAL               # count must be 1
    assert call(xen, GNTTAB, 0, BUF, 1) == -errno.ENOSYS              # map_grant_ref is the backend's


def test_setup_table_lists_where_frames_are_mapped(xen):
    assert map_grant_frame(xen, 1, 0x41) == 0
    off = 16 if xen.bits == 64 else 12
    xen.memory.write_struct(BUF, "<H2xIh", SELF, 3, 0)
    xen.memory.write_struct(BUF + off, "<Q" if xen.bits == 64 else "<I", 0x4000)
    assert call(xen, GNTTAB, 2, BUF, 1) == 0
    assert xen.memory.read_struct(BUF + 8, "<h")[0] == 0
    inv = (1 << xen.bits) - 1
    fmt = "<3Q" if xen.bits == 64 else "<3I"
    assert xen.memory.read_struct(0x4000, fmt) == (inv, 0x41, inv)
    xen.memory.write_struct(BUF, "<H2xIh", SELF, 65, 0)
    assert call(xen, GNTTAB, 2, BUF, 1) == 0 and xen.memory.read_struct(BUF + 8, "<h")[0] == GNTST_general_error


def test_grant_frame_in_the_platform_bar_is_memory_for_guest_and_emulator(xen):
    gpfn = BAR1 >> 12
    assert map_grant_frame(xen, 0, gpfn) == 0
    assert xen.memory.is_ram(BAR1, 4096)
    grant(xen, 5, 0, 0x50)
    assert xen.vcpu.uc.mem_read(BAR1 + 5 * 8, 8) == bytes.fromhex("0100000050000000")   # the CPU sees it
    xen.memory.write(0x50000, b"hello grant")
    assert xen.xen.gnttab.read(5, 0, 11) == b"hello grant"
    # the frame moves with its contents; the BAR page it left is device space again
    assert map_grant_frame(xen, 0, gpfn + 1) == 0
    assert xen.xen.gnttab.entry(5) == (GTF_permit_access, 0, 0x50)
    assert not xen.memory.is_ram(BAR1, 4096)


def test_backend_checks_what_xen_checks(xen):
    assert map_grant_frame(xen, 0, 0x40) == 0
    grant(xen, 1, 0, 0x50)                                   # writable, for dom0
    grant(xen, 2, 0, 0x51, GTF_permit_access | GTF_readonly)
    grant(xen, 3, 7, 0x52)                                   # for another domain
    grant(xen, 4, 0, 0xC0000)                                # not RAM
    gt = xen.xen.gnttab
    for ref, writable, code in [(0, False, GNTST_general_error),      # flags 0: nothing granted
                                (600, False, GNTST_bad_gntref),       # beyond the table
                                (2, True, GNTST_general_error),       # read-only (_set_status_v1)
                                (3, False, GNTST_general_error),      # for another domain
                                (4, False, GNTST_bad_page)]:
        with pytest.raises(GrantError) as e:
            gt.map(ref, writable=writable)
        assert e.value.code == code, ref
    m = gt.map(1)
    assert gt.entry(1)[0] == GTF_permit_access | GTF_reading | GTF_writing      # busy while mapped
    ro = gt.map(2, writable=False)
    assert gt.entry(2)[0] == GTF_permit_access | GTF_readonly | GTF_reading
    gt.write(1, 100, b"from dom0")
    assert xen.memory.read(0x50000 + 100, 9) == b"from dom0"
    with pytest.raises(GrantError):
        gt.write(2, 0, b"x")
    with pytest.raises(GrantError) as e:
        gt.read(1, 4090, 10)
    assert e.value.code == GNTST_bad_copy_arg
    gt.unmap(m)
    gt.unmap(ro)
    assert gt.entry(1)[0] == GTF_permit_access and gt.entry(2)[0] == GTF_permit_access | GTF_readonly


def test_grant_frame_limits(xen):
    assert map_grant_frame(xen, 64, 0x40) == -errno.EINVAL
    assert map_grant_frame(xen, 0x80000000, 0x40) == -errno.EINVAL
    assert map_grant_frame(xen, 0, 0xFEE00) == -errno.EINVAL          # not over the LAPIC
