"""The FIFO event-channel ABI: the fifo kernels through every callback via, the model from Python, snapshots.

The guest checks what it can see (its control block and event words, the
order its handler takes events in, Xen's error codes); the tests add what
only the machine knows: the ABI in use, the frames Xen holds, each port's
priority, the queues as Xen's model has them, and the callback line.
"""
import re

import pytest

from xenicorn import firmware
from xenicorn.boot import boot
from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import MachineConfig
from xenicorn.xen import errno
from xenicorn.xen.event_2l import TwoLevel
from xenicorn.xen.event_fifo import LINKED, MASKED, PENDING, Fifo
from xenicorn.records import RecordError

from test_evtchn import BUF, ipi, map_shared, op, set_via
from test_xen_hypercalls import call, xen  # noqa: F401 - the fixture

LEVEL_VIAS = {"gsi": 20, "intx": 17}
CB, ARRAY = 0x40000, 0x41000                  # frames for the Python-driven tests


def run(name, via, deassert="poll", **kw):
    machine, kernel = boot(MachineConfig(cmdline=f"via={via}", debugcon="none", callback_deassert=deassert, **kw),
                           firmware.find(name), console=ConsoleSink(None))
    steps = []

    def listen(category, text):
        info = machine.xen.vcpu_info(0)
        steps.append((category, text, machine.xen.callback.level, info.upcall_pending if info else None))
    machine.tracer.listeners.append(listen)
    status = machine.run()
    return machine, kernel, status, machine.console.text(), steps


CASES = [(bits, via, mode) for bits in (32, 64) for via in ("vector", "lapic", "gsi", "intx")
         for mode in ("poll", "eoi") if mode == "poll" or via in LEVEL_VIAS]


@pytest.mark.parametrize("bits,via,mode", CASES)
def test_fifo_kernel_passes_and_leaves_the_queues_xen_would(bits, via, mode):
    machine, kernel, status, text, steps = run(f"fifo{bits}", via, mode)
    assert status == 0 and text.rstrip().endswith("Test result: SUCCESS"), text
    assert "FAIL" not in text
    p3, masked, queued = map(int, re.search(r"ports p3=(\d+) masked=(\d+) queued=(\d+)", text).groups())
    ev = machine.xen.evtchn
    fifo = ev.abi
    assert isinstance(fifo, Fifo) and ev.nr_ports == 1 << 17
    # after EVTCHNOP_reset and a second init_control: one control block, at the last offset Xen accepts
    assert fifo.control == {0: kernel.symbols["control_pages"] + 4096 + 4096 - 72}
    assert fifo.pages == [kernel.symbols["event_array"] >> 12]
    assert fifo.priority == {p3: 3, queued: 5}
    assert fifo.queue(0, 5) == [queued] and fifo.ready(0) == 1 << 5 and fifo.tails[(0, 5)] == queued
    assert fifo.word(masked) & (PENDING | MASKED | LINKED) == PENDING | MASKED
    assert ev.is_pending(masked) and ev.is_masked(masked) and not ev.is_masked(queued)
    assert machine.xen.vcpu_info(0).upcall_pending == 1          # the last event waits for IRQs on
    rows = {e["port"]: e for e in ev.event_list()}
    assert rows[p3]["priority"] == 3 and rows[queued]["linked"] and not rows[masked]["linked"]
    ev.event_inject(p3)                                           # QMP's xen-event-inject, on a FIFO port
    assert fifo.queue(0, 3) == [p3] and fifo.ready(0) == 1 << 3 | 1 << 5
    assert "switched to the FIFO ABI" in [s[1] for s in steps] and "back to the 2-level ABI" in [s[1] for s in steps]
    cb = machine.xen.callback
    if via not in LEVEL_VIAS:
        assert cb.stats["asserts"] == 0 and cb.stats["vectors"] >= 5
        return
    # the level line follows upcall_pending with FIFO as with 2-level: high when Xen set it, low once cleared
    assert cb.level and machine.gsi[LEVEL_VIAS[via]].level           # the queued event's upcall is pending
    asserted = [s for s in steps if s[1].endswith(" asserted")]
    dropped = [s for s in steps if " deasserted (" in s[1]]
    assert len(asserted) == len(dropped) + 1 >= 6
    assert all(level and pending == 1 for _, _, level, pending in asserted)
    assert all(not level and pending == 0 for _, _, level, pending in dropped)
    if mode == "poll":
        cleared = kernel.symbols["upcall_cleared"]
        assert all(f"read 0 at block {cleared:#x}" in s[1] for s in dropped)
        assert cb.stats["eoi_checks"] == 0
    else:
        assert all(f"EOI at IOAPIC pin {LEVEL_VIAS[via]}" in s[1] for s in dropped)
        assert cb.stats["polls"] == 0


@pytest.mark.parametrize("bits", [32, 64])
def test_each_vcpu_has_its_own_control_block_and_queues(bits):
    machine, kernel, status, text, _ = run(f"fifo{bits}", "gsi", smp=2)
    assert status == 0 and text.rstrip().endswith("Test result: SUCCESS") and "FAIL" not in text, text
    port = int(re.search(r"vcpu1 port=(\d+)", text).group(1))
    fifo = machine.xen.evtchn.abi
    page = kernel.symbols["control_pages"]
    assert fifo.control == {0: page + 4096 + 4096 - 72, 1: page + 0x800}
    assert fifo.queue(1, 7) == [port] and fifo.ready(1) == 1 << 7 and fifo.ready(0) == 1 << 5
    assert machine.xen.evtchn.ports[port].vcpu == 1 and machine.xen.vcpu_info(1).upcall_pending == 1
    # the GSI via serves vCPU 0 only (hvm_assert_evtchn_irq): vCPU 1's upcall raised the line no more
    one = run(f"fifo{bits}", "gsi")[0]
    assert machine.xen.callback.stats["asserts"] == one.xen.callback.stats["asserts"] >= 6


def test_without_the_fifo_abi_the_ops_are_enosys_as_under_qemu():
    machine, _, _, text, _ = run("fifo64", "vector", evtchn_fifo=False)
    assert "FAIL init_control(vCPU 7) = -38 (expected -2)" in text
    assert "FAIL init_control(vCPU 0) = -38 (expected 0)" in text
    assert "ok set_priority under the 2-level ABI = -38" in text
    assert text.rstrip().endswith("Test result: FAILURE")
    assert isinstance(machine.xen.evtchn.abi, TwoLevel) and machine.xen.evtchn.nr_ports == 4096


def test_cli_event_list_shows_fifo_priorities(capsys):
    from xenicorn.cli import main
    assert main(["run", "fifo64", "--append", "via=vector", "--xen-event-list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+ ipi ", line)]
    assert ["priority", "3"] == rows[0][-2:] and ["priority", "5", "linked"] == rows[2][-3:], rows


def test_cli_no_evtchn_fifo(capsys):
    from xenicorn.cli import main
    main(["run", "fifo64", "--append", "via=vector", "--no-evtchn-fifo"])
    out = capsys.readouterr().out
    assert "FAIL init_control(vCPU 0) = -38 (expected 0)" in out and "Test result: FAILURE" in out


# -- the model, driven by hypercalls from Python -----------------------------------------------
def init(m, gfn=CB >> 12, offset=0, vcpu=0):
    return op(m, 11, "<QII8x", gfn, offset, vcpu)


def start(m):
    si = map_shared(m)
    set_via(m, 2 << 56 | 0xF3)
    assert init(m) == 0 and m.memory.read_u8(BUF + 16) == 17         # link_bits
    assert op(m, 12, "<Q", ARRAY >> 12) == 0
    return si


def take_upcall(m):
    info = m.xen.vcpu_info(0)
    assert info.upcall_pending == 1
    info.upcall_pending = 0
    m.xen.callback.direct_taken(0)


def consume(m, port):
    """What the guest's handler does to a word it took from a queue: clear LINKED, LINK and PENDING."""
    m.memory.write_u32(ARRAY + 4 * port, m.memory.read_u32(ARRAY + 4 * port) & ~(LINKED | PENDING | 0x1FFFF))


def test_init_control_errors_in_xens_order(xen):
    map_shared(xen)
    assert init(xen, vcpu=1) == -errno.ENOENT
    assert init(xen, offset=4096 - 64) == -errno.EINVAL and init(xen, offset=12) == -errno.EINVAL
    assert init(xen, gfn=1 << 40) == -errno.EINVAL
    assert call(xen, 32, 11, 0xC0000000) == -errno.EFAULT
    assert isinstance(xen.xen.evtchn.abi, TwoLevel)                    # every failure left 2-level in place
    assert init(xen, offset=4096 - 72) == 0 and init(xen) == -errno.EINVAL


def test_a_port_moved_to_another_queue_leaves_the_old_tail_clean(xen):
    start(xen)
    fifo, info = xen.xen.evtchn.abi, xen.xen.vcpu_info(0)
    a, b = ipi(xen), ipi(xen)
    assert op(xen, 4, "<I", a) == 0 and fifo.queue(0, 7) == [a] and fifo.ready(0) == 1 << 7
    take_upcall(xen)
    assert op(xen, 4, "<I", b) == 0 and fifo.queue(0, 7) == [a, b] and not info.upcall_pending
    assert xen.memory.read_u32(ARRAY + 4 * a) & 0x1FFFF == b            # linked behind a, no new upcall
    consume(xen, a)
    consume(xen, b)
    xen.memory.write_u32(CB, 0)                                          # the guest took ready
    assert op(xen, 13, "<II", b, 1) == 0
    assert op(xen, 4, "<I", b) == 0                                      # b now goes to queue 1
    assert fifo.tails[(0, 7)] == 0 and fifo.tails[(0, 1)] == b and fifo.queue(0, 1) == [b]
    assert xen.memory.read_u32(CB + 8 + 4 * 1) == b and info.upcall_pending == 1
    take_upcall(xen)
    assert op(xen, 4, "<I", a) == 0 and xen.memory.read_u32(CB + 8 + 4 * 7) == a   # a new run on queue 7


def test_a_closed_port_still_linked_is_not_reused(xen):
    start(xen)
    a = ipi(xen)
    assert op(xen, 4, "<I", a) == 0 and op(xen, 3, "<I", a) == 0
    assert xen.xen.evtchn.abi.word(a) == LINKED                          # close cleared only PENDING
    assert ipi(xen) == a + 1                                             # get_free_port skips a busy port
    consume(xen, a)
    assert ipi(xen) == a


def test_an_event_beyond_the_array_is_held_until_its_page_arrives(xen):
    start(xen)
    ev = xen.xen.evtchn
    ev.ports[1500] = ev.ports[ipi(xen)]                                  # a port whose word is on page 1
    ev.set_pending(1500)
    assert 1500 in ev.abi.held and ev.is_masked(1500) and not ev.is_pending(1500)
    assert op(xen, 12, "<Q", (ARRAY >> 12) + 1) == 0
    assert ev.is_pending(1500) and ev.abi.queue(0, 7) == [1500] and not ev.abi.held


def test_reset_goes_back_to_2_level(xen):
    si = start(xen)
    assert op(xen, 10, "<H", 0x7FF0) == 0
    ev = xen.xen.evtchn
    assert isinstance(ev.abi, TwoLevel) and not ev.ports
    p = ipi(xen)
    assert op(xen, 13, "<II", p, 1) == -errno.ENOSYS and op(xen, 12, "<Q", ARRAY >> 12) == -errno.EOPNOTSUPP
    assert op(xen, 4, "<I", p) == 0 and si.pending(p)


def test_the_fifo_state_round_trips_and_what_xen_cannot_make_is_refused(xen):
    start(xen)
    ev = xen.xen.evtchn
    p = ipi(xen)
    assert op(xen, 13, "<II", p, 2) == 0 and op(xen, 4, "<I", p) == 0
    rec = ev.save_record()
    assert rec["state"]["fifo"]["priority"] == [[p, 2]]
    ev.abi = TwoLevel(ev)
    ev.apply_record(ev.check_record(rec))
    assert ev.abi.priority == {p: 2} and ev.abi.queue(0, 2) == [p] and ev.abi.pages == [ARRAY >> 12]
    assert ev.save_record() == rec
    fifo = rec["state"]["fifo"]
    for key, value, words in [("control", [[0, CB + 4]], "control block"), ("control", [[3, CB]], "out of range"),
                              ("control", [], "without a control block"), ("pages", [1 << 40], "not RAM"),
                              ("priority", [[p, 16]], "priority 16"), ("tails", [[0, 2, 1 << 17]], "port")]:
        bad = {**rec, "state": {**rec["state"], "fifo": {**fifo, key: value}}}
        with pytest.raises(RecordError, match=words):
            ev.check_record(bad)
    # a port beyond 4095 is one only the FIFO ABI has
    big = {**rec, "state": {**rec["state"], "ports": rec["state"]["ports"] + [[5000, rec["state"]["ports"][-1][1]]]}}
    ev.check_record(big)
    with pytest.raises(RecordError, match="5000"):
        ev.check_record({**big, "state": {**big["state"], "fifo": None}})


def test_fifo_kernel_round_trips_through_snapshots(tmp_path):
    from test_snapshot import round_trips
    seen_fifo = 0
    for m, snap in round_trips(tmp_path, "fifo64", "via=gsi"):
        seen_fifo += isinstance(m.xen.evtchn.abi, Fifo) and snap.state["xen.evtchn"]["state"]["fifo"] is not None
    assert seen_fifo >= 3


def test_the_interrupt_watcher_sees_the_fifo_queues():
    """The stepper's state has vCPU 0's ready word once the FIFO ABI is on; events name their queue."""
    from xenicorn.debug import stepper as S
    cfg = MachineConfig(cmdline="via=gsi", debugcon="none", observe=set(S.OBSERVED))
    machine, _ = boot(cfg, firmware.find("fifo64"), console=ConsoleSink(None))
    events = []
    S.watcher_of(machine).sinks.append(events.append)
    assert machine.run() == 0
    texts = [e.text for e in events]
    assert "switched to the FIFO ABI" in texts and "back to the 2-level ABI" in texts
    queued = [e for e in events if e.kind == "evtchn-pending" and "(queue 2)" in e.text]
    assert queued and any("evtchn.fifo.ready" in e.diff for e in events)
    assert S.interrupt_state(machine)["evtchn.fifo.ready"] == 1 << 5


def test_hostile_fifo_guests_get_errnos_and_never_a_traceback(xen):
    """Random FIFO ops with random arguments, and a guest scribbling over its own event words and control
    block (LINK cycles, bits Xen owns): every op answers 0 or a Xen errno, and the queues stay walkable."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    m = xen
    map_shared(m)
    set_via(m, 2 << 56 | 0xF3)
    ops = st.one_of(
        st.tuples(st.just(11), st.sampled_from(["<QII8x"]), st.tuples(
            st.sampled_from([CB >> 12, ARRAY >> 12, 0, 1 << 40, (1 << 64) - 1]),
            st.sampled_from([0, 8, 4, 4024, 4032, 0xFFFFFFFF]), st.integers(0, 3))),
        st.tuples(st.just(12), st.just("<Q"), st.tuples(st.sampled_from([ARRAY >> 12, (ARRAY >> 12) + 1, CB >> 12,
                                                                          1 << 40]))),
        st.tuples(st.just(13), st.just("<II"), st.tuples(st.integers(0, 2000), st.integers(0, 20))),
        st.tuples(st.sampled_from([3, 4, 9]), st.just("<I"), st.tuples(st.integers(0, 2000))),
        st.tuples(st.just(7), st.just("<II"), st.tuples(st.integers(0, 1), st.just(0))),
        st.tuples(st.just("word"), st.integers(0, 1100), st.integers(0, (1 << 32) - 1)),
        st.tuples(st.just("cb"), st.integers(0, 17), st.integers(0, (1 << 32) - 1)))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(ops, max_size=30))
    def check(seq):
        for item in seq:
            if item[0] == "word":
                m.memory.write_u32(ARRAY + 4 * (item[1] % 2048), item[2])
            elif item[0] == "cb":
                m.memory.write_u32(CB + 4 * item[1], item[2])
            else:
                cmd, fmt, fields = item
                r = op(m, cmd, fmt, *fields)
                assert r == 0 or -r in errno.NAMES, (cmd, fields, r)
        ev = m.xen.evtchn
        if isinstance(ev.abi, Fifo):
            for vcpu in ev.abi.control:
                for q in range(16):
                    assert len(ev.abi.queue(vcpu, q)) <= 1 << 17
        ev.event_list()
    check()
