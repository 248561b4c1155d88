"""Event channels driven by hypercalls from Python: every op, Xen's errors, the backend API.

No guest code runs: the tests write the op's struct into guest memory and
feed a hypercall exit, in both guest widths (the ``xen`` fixture).
"""
import pytest

from xenicorn.xen import errno
from xenicorn.xen.evtchn import VIRQ_TIMER, VIRQ_CONSOLE

from test_xen_hypercalls import SELF, call, ul, xen  # noqa: F401 - the fixture

BUF, SHARED = 0x3000, 0x20000
EVTCHN, PHYSDEV, HVM = 32, 33, 34


def op(m, cmd, fmt, *fields):
    m.memory.write_struct(BUF, fmt, *fields)
    return call(m, EVTCHN, cmd, BUF)


def out_u32(m, offset):
    return m.memory.read_struct(BUF + offset, "<I")[0]


def map_shared(m):
    m.memory.write_struct(BUF, f"<HHI{ul(m)}{ul(m)}", SELF, 0, 0, 0, SHARED >> 12)
    assert call(m, 12, 7, BUF) == 0
    return m.xen.shared_info()


def ipi(m):
    assert op(m, 7, "<II", 0, 0) == 0
    return out_u32(m, 4)


def set_via(m, value):
    m.memory.write_struct(BUF, "<H2xIQ", SELF, 0, value)
    assert call(m, HVM, 0, BUF) == 0


def test_ports_are_allocated_lowest_first_and_closed_ports_reused(xen):
    map_shared(xen)
    ports = [ipi(xen) for _ in range(3)]
    assert ports == [3, 4, 5]                               # 1 and 2: xenstore and the PV console
    assert op(xen, 3, "<I", 4) == 0
    assert ipi(xen) == 4


def test_send_sets_pending_selector_and_upcall_once(xen):
    si = map_shared(xen)
    set_via(xen, 2 << 56 | 0xF3)
    p = ipi(xen)
    info = xen.xen.vcpu_info(0)
    assert op(xen, 4, "<I", p) == 0
    assert si.pending(p) and info.pending_sel == 1 and info.upcall_pending == 1
    assert xen.xen.callback.direct_pending(0) == 0xF3
    xen.xen.callback.direct_taken(0)
    assert op(xen, 4, "<I", p) == 0                         # already pending: coalesces
    assert xen.xen.callback.direct_pending(0) is None and xen.xen.evtchn.upcalls == 1


def test_masked_port_waits_for_unmask(xen):
    si = map_shared(xen)
    p = ipi(xen)
    si.set_masked(p)
    for _ in range(3):
        assert op(xen, 4, "<I", p) == 0
    info = xen.xen.vcpu_info(0)
    assert si.pending(p) and not info.upcall_pending
    assert op(xen, 9, "<I", p) == 0
    assert not si.masked(p) and info.upcall_pending == 1 and xen.xen.evtchn.upcalls == 1
    assert op(xen, 9, "<I", p) == 0 and xen.xen.evtchn.upcalls == 1   # unmasking again: nothing new


def test_loopback_interdomain_pair_and_close_returns_the_peer_to_unbound(xen):
    si = map_shared(xen)
    assert op(xen, 6, "<HHI", SELF, SELF, 0) == 0
    a = out_u32(xen, 4)
    assert op(xen, 0, "<H2xII", SELF, a, 0) == 0
    b = out_u32(xen, 8)
    assert op(xen, 4, "<I", b) == 0 and si.pending(a) and not si.pending(b)
    assert op(xen, 5, "<H2xIII8x", SELF, b, 0, 0) == 0
    status, vcpu, dom, port = xen.memory.read_struct(BUF + 8, "<IIH2xI")
    assert (status, vcpu, dom, port) == (2, 0, 1, a)
    assert op(xen, 3, "<I", a) == 0
    assert op(xen, 5, "<H2xIII8x", SELF, b, 0, 0) == 0 and out_u32(xen, 8) == 1   # unbound
    assert op(xen, 0, "<H2xII", SELF, b + 1, 0) == -errno.EINVAL                  # not unbound
    assert op(xen, 0, "<H2xII", 9, a, 0) == -errno.ESRCH


def test_hostile_arguments_get_xens_errors(xen):
    map_shared(xen)
    p = ipi(xen)
    nr = 4096 if xen.bits == 64 else 1024
    for cmd, fmt, fields, code in [
            (3, "<I", (0,), errno.EINVAL),                    # port 0
            (3, "<I", (nr,), errno.EINVAL),                   # out of range
            (3, "<I", (p + 5,), errno.EINVAL),                # never opened
            (4, "<I", (0xFFFFFFFF,), errno.EINVAL),
            (9, "<I", (nr + 1,), errno.EINVAL),
            (1, "<III", (24, 0, 0), errno.EINVAL),           # VIRQ beyond NR_VIRQS
            (1, "<III", (VIRQ_CONSOLE, 1, 0), errno.EINVAL),  # global VIRQ on vCPU 1
            (1, "<III", (VIRQ_TIMER, 5, 0), errno.ENOENT),    # no vCPU 5
            (7, "<II", (1, 0), errno.ENOENT),
            (8, "<II", (p, 2), errno.ENOENT),                 # bind_vcpu to a missing vCPU
            (8, "<II", (p, 0), errno.EINVAL),                 # an IPI port cannot move
            (5, "<H2xIII8x", (3, p, 0, 0), errno.ESRCH),      # status of another domain
            (5, "<H2xIII8x", (SELF, 0, 0, 0), errno.EINVAL),
            (6, "<HHI", (SELF, 77, 0), errno.ESRCH),          # unbound for a domain that is not there
            (6, "<HHI", (42, SELF, 0), errno.ESRCH),
            (10, "<H", (8,), errno.ESRCH),
            (2, "<III", (300, 0, 0), errno.EINVAL),           # PIRQ beyond NR_PIRQS
            (2, "<III", (20, 0, 0), errno.ENOENT),            # PIRQ not mapped
            (11, "<QIIQ", (SHARED >> 12, 0, 5, 0), errno.ENOENT),   # FIFO init_control for no vCPU 5
            (12, "<Q", (SHARED >> 12,), errno.EOPNOTSUPP),   # expand_array before init_control
            (13, "<II", (p, 0), errno.ENOSYS),                # no priorities in the 2-level ABI
            (77, "<I", (0,), errno.ENOSYS)]:
        assert op(xen, cmd, fmt, *fields) == -code, (cmd, fields)
    assert call(xen, EVTCHN, 4, 0xC0000000) == -errno.EFAULT
    assert op(xen, 1, "<III", VIRQ_TIMER, 0, 0) == 0
    assert op(xen, 1, "<III", VIRQ_TIMER, 0, 0) == -errno.EEXIST
    assert op(xen, 3, "<I", p) == 0 and op(xen, 3, "<I", p) == -errno.EINVAL       # double close
    assert [e["type"] for e in xen.xen.evtchn.event_list()] == ["interdomain", "interdomain", "virq"]


def test_send_on_unbound_is_dropped_and_on_a_virq_port_refused(xen):
    si = map_shared(xen)
    assert op(xen, 6, "<HHI", SELF, 0, 0) == 0
    u = out_u32(xen, 4)
    assert op(xen, 4, "<I", u) == 0 and not si.pending(u)
    assert op(xen, 1, "<III", VIRQ_TIMER, 0, 0) == 0
    assert op(xen, 4, "<I", out_u32(xen, 8)) == -errno.EINVAL


def test_the_ports_run_out_with_enospc(xen):
    map_shared(xen)
    nr = 4096 if xen.bits == 64 else 1024
    for _ in range(nr - 3):
        ipi(xen)
    assert op(xen, 7, "<II", 0, 0) == -errno.ENOSPC
    assert op(xen, 10, "<H", SELF) == 0 and not xen.xen.evtchn.ports        # reset closes them all


def test_virq_timer_is_raised_by_the_xen_timer(xen):
    si = map_shared(xen)
    assert op(xen, 1, "<III", VIRQ_TIMER, 0, 0) == 0
    port = out_u32(xen, 8)
    xen.xen.timer_fired(0)
    assert si.pending(port) and xen.xen.vcpu_info(0).upcall_pending


def test_backend_port_both_directions(xen):
    si = map_shared(xen)
    heard = []
    be = xen.xen.evtchn.backend_open(lambda: heard.append(1))
    # the guest binds to the backend's port ...
    assert op(xen, 0, "<H2xII", 0, be.port, 0) == 0
    gp = out_u32(xen, 8)
    assert be.connected and be.guest_port == gp
    assert op(xen, 4, "<I", gp) == 0 and heard == [1] and be.received == 1
    be.notify()
    assert si.pending(gp)
    assert op(xen, 0, "<H2xII", 0, be.port, 0) == -errno.EINVAL            # already connected
    assert op(xen, 3, "<I", gp) == 0 and not be.connected
    # ... or the backend binds to a port the guest allocated for domain 0
    assert op(xen, 6, "<HHI", SELF, 0, 0) == 0
    u = out_u32(xen, 4)
    be2 = xen.xen.evtchn.backend_open()
    be2.bind(u)
    be2.notify()
    assert si.pending(u)
    with pytest.raises(ValueError):
        xen.xen.evtchn.backend_open().bind(u)
    be2.close()
    assert xen.xen.evtchn.ports[u].type == "unbound"


def test_event_list_and_inject_like_qmp(xen):
    si = map_shared(xen)
    p = ipi(xen)
    assert op(xen, 1, "<III", VIRQ_TIMER, 0, 0) == 0
    si.set_masked(p)
    xen.xen.evtchn.event_inject(p)
    rows = [r for r in xen.xen.evtchn.event_list() if r["port"] > 2]
    assert rows[0] == {"port": p, "vcpu": 0, "type": "ipi", "remote-domain": "", "target": 0,
                       "pending": True, "masked": True}
    assert rows[1]["type"] == "virq" and rows[1]["target"] == VIRQ_TIMER
    with pytest.raises(ValueError):
        xen.xen.evtchn.event_inject(999)


def test_map_pirq_gsi_and_the_gsi_edge_becomes_an_event(xen):
    si = map_shared(xen)
    xen.memory.write_struct(BUF, "<H2xiiiiiiiQ", SELF, 1, 5, -1, 0, 0, 0, 0, 0)
    assert call(xen, PHYSDEV, 13, BUF) == 0
    pirq = xen.memory.read_struct(BUF + 12, "<i")[0]
    assert pirq >= 16
    assert op(xen, 2, "<III", pirq, 0, 0) == 0
    port = out_u32(xen, 8)
    xen.gsi[5].source("test").set_level(True)
    assert si.pending(port)
    assert not xen.ioapic.state.irr >> 5 & 1               # the IOAPIC pin saw nothing
    si.set_pending(port, False)
    xen.memory.write_struct(BUF, "<I", pirq)
    assert call(xen, PHYSDEV, 12, BUF) == 0 and si.pending(port)   # still high at EOI: again
    xen.memory.write_struct(BUF, "<H2xi", SELF, pirq)
    assert call(xen, PHYSDEV, 14, BUF) == -errno.EBUSY     # bound: cannot unmap
    assert op(xen, 3, "<I", port) == 0
    assert xen.ioapic.state.irr >> 5 & 1                   # the line is the IOAPIC's again
    xen.memory.write_struct(BUF, "<H2xi", SELF, pirq)
    assert call(xen, PHYSDEV, 14, BUF) == 0
    xen.memory.write_struct(BUF, "<H2xiiiiiiiQ", SELF, 1, 99, -1, 0, 0, 0, 0, 0)
    assert call(xen, PHYSDEV, 13, BUF) == -errno.EINVAL
    xen.memory.write_struct(BUF, "<H2xiiiiiiiQ", SELF, 0, 5, -1, 0, 0, 0, 0, 0)
    assert call(xen, PHYSDEV, 13, BUF) == -errno.ENOSYS    # MSI can wait


def test_callback_via_switch_lowers_the_old_line_and_redelivers(xen):
    map_shared(xen)
    cb = xen.xen.callback
    set_via(xen, 20)                                       # GSI 20
    p = ipi(xen)
    assert op(xen, 4, "<I", p) == 0
    assert cb.level and xen.gsi[20].level and xen.ioapic.state.irr >> 20 & 1
    set_via(xen, 1 << 56 | (2 << 3) << 8)                 # PCI INTx of 00:02.0 INTA
    assert not xen.gsi[20].level
    assert cb.level and xen.gsi[17].level                  # slot 2 INTA -> PIRQ B -> GSI 17
    set_via(xen, 2 << 56 | 0xF3)
    assert not xen.gsi[17].level and not cb.level and cb.direct_pending(0) == 0xF3
    set_via(xen, 0)                                        # GSI 0: none
    assert cb.kind == "none"


def test_guest_setting_upcall_pending_itself_raises_nothing(xen):
    map_shared(xen)
    set_via(xen, 20)
    xen.xen.vcpu_info(0).upcall_pending = 1
    xen.xen.timer_fired(0)                                  # an event with no port: nothing
    assert not xen.gsi[20].level


def test_cli_event_inject_waits_for_the_port_to_open(xen):
    from xenicorn.cli import _schedule_inject, UsageError
    si = map_shared(xen)
    _schedule_inject(xen, "3@0")
    xen.clock.run_due()                                    # port 3 is not open yet: retried later
    assert not si.pending(3)
    assert ipi(xen) == 3
    xen.clock.wait_until(xen.clock.now_ns() + 2_000_000)
    xen.clock.run_due()
    assert si.pending(3)
    with pytest.raises(UsageError):
        _schedule_inject(xen, "one")
