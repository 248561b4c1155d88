"""What Xen refuses a domU, and the two consoles, as an XTF-style guest meets them.

docs/xen-abi.md's table of denials is walked through the hypercall
dispatcher, 32- and 64-bit: every row's first answer is what a well-formed
call gets (current interface version, the guest itself as target), and the
rows cover every number xenicorn answers for Xen this way. The xenabi
kernels make the calls from a guest and print each line through both
consoles, as XTF does: once on the guest's console, once in Xen's log.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_firmware import run
from test_xen_hypercalls import call, xen  # noqa: F401 (xen: the 32- and 64-bit fixture)
from xenicorn.xen import denials, errno

DOC = Path(__file__).resolve().parent.parent / "docs" / "xen-abi.md"
BUF, BUF2 = 0x3000, 0x4000
LAST_NUMBER = 63                 # numbers above: "64 and up"


def doc_rows():
    """(numbers, first answer) for each row of the denials table."""
    text = DOC.read_text().split("## Hypercalls a domU may not use", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.match(r"\d", cells[0]):
            continue
        numbers = []
        if cells[0] == "64 and up":
            numbers = [64, 100, 0xFFFF, 0x7FFFFFFF]
        else:
            for part in cells[0].split(","):
                lo, _, hi = part.strip().partition("-")
                numbers += range(int(lo), int(hi or lo) + 1)
        first = re.match(r"`(-E[A-Z0-9]+|0)`", cells[2])
        assert first, f"row {cells[0]}: no answer in {cells[2]!r}"
        code = 0 if first.group(1) == "0" else -getattr(errno, first.group(1)[1:])
        rows.append((numbers, code))
    return rows


def well_formed(m, number):
    """Arguments a guest that knows the ABI would pass, aimed at itself."""
    dom_v, sys_v = denials.versions(m.xen)
    mem = m.memory
    mem.write(BUF, bytes(160))
    if number == 7:
        mem.write_struct(BUF, "<II", 48, denials.XENPF_INTERFACE_VERSION)     # XENPF_settime64
    elif number == 35:
        mem.write_struct(BUF, "<II", 27, sys_v)                               # livepatch_op
    elif number in (36, 49):
        mem.write_struct(BUF, "<IIH", 5 if number == 36 else 10, dom_v, 1)    # getdomaininfo / shadow_op
    elif number == 41:
        mem.write_struct(BUF, "<QQ" if m.bits == 64 else "<II", BUF2, 64)
        return (1, 1, BUF)
    return (BUF, BUF, 0)


def test_the_table_covers_every_denial_xenicorn_makes():
    documented = {n for numbers, _ in doc_rows() for n in numbers}
    assert set(denials.TABLE) <= documented
    assert set(range(LAST_NUMBER + 1)) - documented == {12, 13, 15, 17, 18, 20, 21, 24, 26, 29, 32, 33, 34}


def test_each_row_is_what_the_dispatcher_answers(xen):
    for numbers, code in doc_rows():
        for n in numbers:
            if n >= 1 << xen.bits:
                continue
            assert call(xen, n, *well_formed(xen, n)) == code, f"hypercall {n}"


def test_the_order_of_checks(xen):
    mem, bad = xen.memory, 0xC0000000
    dom_v, sys_v = denials.versions(xen.xen)
    assert (dom_v, sys_v) == (0x15, 0x15)                                   # Xen 4.17
    for number, size in ((7, 136), (35, 136), (36, 144), (49, 144)):
        assert call(xen, number, bad) == -errno.EFAULT
        assert call(xen, number, xen.memory.size - size + 1) == -errno.EFAULT   # the op's last byte
    mem.write_struct(BUF, "<IIH", 5, dom_v + 1, 1)
    assert call(xen, 36, BUF) == -errno.EACCES and call(xen, 49, BUF) == -errno.EOPNOTSUPP
    mem.write_struct(BUF, "<II", 1, 0x03000000)
    assert call(xen, 7, BUF) == -errno.EACCES and call(xen, 35, BUF) == -errno.EACCES
    domctl = {                                # (cmd, version, domain, u64 args...) -> answer
        (5, dom_v, 77): -errno.EPERM,         # no such domain: EPERM, not ESRCH, for a domU
        (5, dom_v, 0): -errno.EPERM,
        (37, dom_v, 0x7FF4): -errno.ESRCH,    # assign_device to DOMID_INVALID
        (47, dom_v, 0x7FF1): -errno.EPERM,    # deassign_device from DOMID_IO
        (20, dom_v, 1, 5, 0): -errno.EINVAL,  # iomem_permission of 0 frames wraps
        (20, dom_v, 1, 0, 0): -errno.EPERM,
        (39, dom_v, 1, denials.U64, 0, 2): -errno.EINVAL,       # memory_mapping: the gfns wrap
        (46, dom_v, 1, 0): -errno.EOPNOTSUPP,  # set_target to dom0
        (46, dom_v, 1, 5): -errno.ESRCH,
        (56, dom_v, 0x7FF4, 1): -errno.ESRCH,  # vm_event_op (not GET_VERSION) without a domain
        (1, dom_v, 0): -errno.EPERM,          # createdomain
        (90, 0, 0x7FF4): -errno.EPERM,        # get_domain_state of DOMID_INVALID (dom_xen)
        (21, dom_v, 1, 0xFFFF | 2 << 32): -errno.EINVAL,       # ioport_permission past port 0xFFFF
        (21, dom_v, 1, 0x3F8 | 8 << 32): -errno.EPERM,
        (40, dom_v, 0, 0): -errno.EOPNOTSUPP,                  # ioport_mapping on dom0
        (40, dom_v, 1, 0x3F8 | 0x3F8 << 32, 0): -errno.EINVAL,   # ... of 0 ports
        (40, dom_v, 1, 0x3F8 | 0x3F8 << 32, 8): -errno.EPERM,
        (38, dom_v, 0): -errno.EINVAL, (48, dom_v, 1): -errno.EPERM,   # (un)bind_pt_irq
        (88, dom_v, 1, 4 | 2 << 32): -errno.EINVAL,             # gsi_permission flags
        (50, dom_v, 1): -errno.EOPNOTSUPP, (50, dom_v, 0): -errno.EPERM,   # get_device_group
        (61, dom_v, 1): -errno.EPERM,                           # getpageframeinfo3
    }
    for (cmd, version, dom, *u), want in domctl.items():
        mem.write(BUF, bytes(144))
        mem.write_struct(BUF, "<IIH", cmd, version, dom)
        mem.write_struct(BUF + 16, "<" + "Q" * len(u), *u)
        assert call(xen, 36, BUF) == want, (cmd, dom, u)
    # vm_event_op GET_VERSION: answered without XSM, the op copied back
    mem.write(BUF, bytes(144))
    mem.write_struct(BUF, "<IIHxxxxxxI", 56, dom_v, 1, 3)
    assert call(xen, 36, BUF) == 0 and mem.read_struct(BUF + 24, "<I") == (7,)
    # dm_op: buffer count, then the buffers, then the domain
    desc = 16 if xen.bits == 64 else 8
    assert call(xen, 41, 1, 0, BUF) == -errno.ENODATA and call(xen, 41, 1, 3, BUF) == -errno.E2BIG
    assert call(xen, 41, 1, 2, xen.memory.size - desc) == -errno.EFAULT
    assert call(xen, 41, 0x10001, 1, BUF) == -errno.EPERM                   # domid_t: 16 bits
    assert call(xen, 41, 0, 1, BUF) == -errno.EINVAL and call(xen, 41, 9, 1, BUF) == -errno.ESRCH
    # paging_domctl_cont writes u.shadow_op back even when XSM refuses
    mem.write_struct(BUF, "<IIH", 10, dom_v, 1)
    mem.write(BUF + 16, b"S" * 40)
    assert call(xen, 49, BUF) == -errno.EPERM and mem.read(BUF + 16, 40) == b"S" * 40
    mem.write_struct(BUF, "<IIH", 10, dom_v, 9)
    assert call(xen, 49, BUF) == -errno.ESRCH


def test_interface_versions_follow_the_reported_xen(machine):
    machine.xen.config.version = (4, 22)
    assert denials.versions(machine.xen) == (0x18, 0x16)
    machine.xen.config.version = (4, 99)
    assert denials.versions(machine.xen) == (0x18, 0x16)        # newest known
    machine.xen.config.version = (4, 2)
    assert denials.versions(machine.xen) == (0x14, 0x14)        # oldest known


def test_64bit_hypercall_numbers_are_all_of_rax(xen):
    if xen.bits == 32:
        assert call(xen, (1 << 32) | 17, 0, 0) == 0x40011          # EAX only
    else:
        assert call(xen, (1 << 32) | 17, 0, 0) == -errno.ENOSYS


CONSOLE_IO_ONLY = ["one line in three pieces", "bell escape[0m cr end"]


@pytest.mark.parametrize("name", ["xenabi32", "xenabi64"])
def test_an_xtf_style_guest_prints_each_line_once_per_console(name):
    machine, _, status, text = run(name)
    assert status == 0 and machine.shutdown_reason == "poweroff"
    lines = text.splitlines()
    assert "FAIL" not in text and lines[-1] == "Test result: SUCCESS", text
    assert lines[0].startswith(name) and len(lines) > 60 and len(set(lines)) == len(lines)
    log = machine.xen_log.text().splitlines()
    assert all(entry.startswith("(d1) ") for entry in log)
    assert [entry[5:] for entry in log if entry[5:] not in CONSOLE_IO_ONLY] == lines
    assert [entry[5:] for entry in log if entry[5:] in CONSOLE_IO_ONLY] == CONSOLE_IO_ONLY
    assert machine.xen.pvconsole.received == len(text)
    counts = machine.xen.hypercall_counts
    assert counts["domctl"] >= 10 and counts["dm_op"] == 6 and counts["console_io"] > len(lines)


def xenicorn(*args):
    res = subprocess.run([sys.executable, "-m", "xenicorn", *args], capture_output=True, text=True, timeout=120)
    return res.returncode, res.stdout, res.stderr


def test_xen_log_goes_to_stderr_a_file_or_nowhere(tmp_path):
    status, out, err = xenicorn("run", "xencore64")
    assert status == 0 and "Test result: SUCCESS" in out and "hello through console_io" not in out
    assert err == "(d1) hello through console_io\n"
    path = tmp_path / "xen.log"
    status, out2, err = xenicorn("run", "xencore64", "--xen-log", f"file:{path}")
    assert status == 0 and err == "" and path.read_text() == "(d1) hello through console_io\n"
    status, out3, err = xenicorn("run", "xencore64", "--xen-log", "none")
    assert status == 0 and err == "" and out3.count("\n") == out.count("\n")
    status, out, err = xenicorn("run", "xencore64", "--xen-log", "stdout")
    assert status == 0 and err == "" and "(d1) hello through console_io\n" in out


@pytest.mark.parametrize("spec", ["syslog", "file:", "file:/nonexistent/dir/xen.log"])
def test_a_bad_xen_log_is_one_line_and_status_2(spec):
    status, out, err = xenicorn("run", "hello64", "--xen-log", spec)
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--xen-log" in err
    assert "Traceback" not in err
