"""The HPET (devices/hpet.py): register semantics on a deterministic clock, its ACPI table,
the ``hpet32``/``hpet64`` guests end to end, and Linux with it.

Register facts are Xen's vhpet (xen/arch/x86/hvm/hpet.c): the capability
value, the writable bits, narrow accesses merged into 64-bit registers,
SETVAL, the 100 us period floor, 32-bit mode, level timers and their
write-1-to-clear status bits, legacy replacement routing.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import deterministic_clock
from test_records import changed, refuses, round_trip
from xenicorn import firmware
from xenicorn.boot import acpi, boot
from xenicorn.devices import hpet as H
from xenicorn.devices.console import ConsoleSink
from xenicorn.devices.irq import IrqLine
from xenicorn.machine.machine import Machine, MachineConfig

T0, T1, T2 = (H.TN_BASE + n * H.TN_STRIDE for n in range(3))


def rig():
    clock, insns = deterministic_clock()
    gsis = {g: IrqLine(f"GSI{g}") for g in H.ROUTE_GSIS}
    legacy = (IrqLine("IRQ0"), IrqLine("IRQ8"))
    return H.Hpet(clock, gsis, legacy), clock, insns, gsis, legacy


def advance(clock, insns, ns):
    insns.n += ns
    clock.run_due()


def route(gsi):
    return gsi << H.TN_ROUTE_SHIFT


# -- registers ----------------------------------------------------------------------------
def test_capabilities_are_xens_and_read_only():
    h, *_ = rig()
    assert h.mmio_read(0, 8) == 0x00F42400_8086A201           # Xen's hpet_set
    assert h.mmio_read(4, 4) == 16_000_000                    # fs per tick: 62.5 MHz
    assert h.mmio_read(0, 4) & 0x1F00 == 2 << 8               # NUM_TIM_CAP: three timers
    h.mmio_write(0, 8, 0)
    assert h.mmio_read(0, 8) == H.CAPABILITIES
    for n in range(3):                                        # routes 20-23, 64-bit and periodic capable, no FSB
        assert h.mmio_read(H.TN_BASE + 0x20 * n, 8) == 0x00F00000_00000030
        assert h.mmio_read(H.TN_BASE + 0x20 * n + 8, 8) == H.M64
    h.mmio_write(T0, 8, H.M64)                                # only the writable bits stick
    assert h.mmio_read(T0, 8) == H.TN_CAPS | (H.TN_WRITABLE & ~H.TN_SETVAL & ~H.TN_ROUTE) | route(20) | H.TN_SETVAL
    h.mmio_write(0x10, 8, H.M64)
    assert h.mmio_read(0x10, 8) == 3                          # ENABLE_CNF and LEG_RT_CNF only
    assert h.mmio_read(0x30, 8) == 0 and h.mmio_read(0x3F8, 8) == 0     # reserved reads 0


def test_misaligned_access_reads_ones_and_writes_nothing():
    h, *_ = rig()
    assert h.mmio_read(2, 4) == 0xFFFFFFFF and h.mmio_read(4, 8) == H.M64
    h.mmio_write(0x11, 2, 0xFFFF)
    assert h.mmio_read(0x10, 8) == 0
    assert h.mmio_read(0x12, 2) == 0 and h.mmio_read(0x6, 2) == 0x00F4    # aligned narrow reads are fine


def test_counter_runs_on_machine_time_only_while_enabled_and_is_writable_halted():
    h, clock, insns, *_ = rig()
    advance(clock, insns, 1000)
    assert h.mmio_read(0xF0, 8) == 0                          # halted at reset
    h.mmio_write(0xF0, 4, 0xFFFFFFF0)                         # a 32-bit write to the low half
    h.mmio_write(0xF4, 4, 0x1)
    assert h.mmio_read(0xF0, 8) == 0x1_FFFFFFF0
    h.mmio_write(0x10, 4, H.CFG_ENABLE)
    advance(clock, insns, 16 * 100)
    assert h.mmio_read(0xF0, 8) == 0x1_FFFFFFF0 + 100 and h.mmio_read(0xF4, 4) == 2
    h.mmio_write(0x10, 4, 0)                                  # halt: it keeps its count
    advance(clock, insns, 16 * 500)
    assert h.mmio_read(0xF0, 8) == 0x2_00000054


def test_one_shot_edge_timer_fires_once_on_its_gsi():
    h, clock, insns, gsis, _ = rig()
    h.mmio_write(T0, 4, H.TN_ENABLE | route(21))
    h.mmio_write(T0 + 8, 8, 1000)
    h.mmio_write(0x10, 4, H.CFG_ENABLE)
    advance(clock, insns, 16 * 999)
    assert gsis[21].edges == 0
    advance(clock, insns, 16)
    assert gsis[21].edges == 1 and not gsis[21].level and h.fired[0] == 1
    advance(clock, insns, 16 * 100_000)
    assert gsis[21].edges == 1 and h.mmio_read(0x20, 8) == 0     # edge timers never set status


def test_a_comparator_in_the_past_fires_at_once_and_an_unwritten_one_too():
    h, clock, insns, gsis, _ = rig()
    h.mmio_write(0x10, 4, H.CFG_ENABLE)
    advance(clock, insns, 16 * 5000)
    h.mmio_write(T1 + 8, 8, 10)
    h.mmio_write(T1, 4, H.TN_ENABLE | route(22))
    advance(clock, insns, 0)
    assert gsis[22].edges == 1
    h.mmio_write(T2, 4, H.TN_ENABLE)                          # route 0 is not allowed: moved to 20
    assert h.mmio_read(T2, 4) & H.TN_ROUTE == route(20)
    advance(clock, insns, 0)
    assert gsis[20].edges == 1                                # comparator ~0: "past" as a signed difference


def test_periodic_with_setval_sets_the_comparator_then_the_period():
    h, clock, insns, gsis, _ = rig()
    h.mmio_write(0x10, 4, H.CFG_ENABLE)
    h.mmio_write(T0, 4, H.TN_ENABLE | H.TN_PERIODIC | H.TN_SETVAL | route(23))
    h.mmio_write(T0 + 8, 8, 20_000)                          # first match (SETVAL)
    assert not h.mmio_read(T0, 4) & H.TN_SETVAL              # cleared by the write
    h.mmio_write(T0 + 8, 8, 10_000)                          # the period
    advance(clock, insns, 16 * 20_000)
    assert gsis[23].edges == 1 and h.mmio_read(T0 + 8, 8) == 30_000
    for _ in range(4):
        advance(clock, insns, 16 * 10_000)
    assert gsis[23].edges == 5 and h.mmio_read(T0 + 8, 8) == 70_000
    advance(clock, insns, 16 * 35_000)                       # a late host: one interrupt, next match ahead
    assert gsis[23].edges == 6 and h.mmio_read(T0 + 8, 8) == 100_000


def test_periodic_period_has_xens_100us_floor():
    h, clock, insns, gsis, _ = rig()
    h.mmio_write(T0, 4, H.TN_PERIODIC | route(20))
    h.mmio_write(T0 + 8, 8, 10)
    assert h.period[0] == 6250                                # 100 us / 16 ns
    # a 32-bit write merges with the register as read, the comparator (~0 at reset), as in Xen
    h.mmio_write(T0 + 8, 4, 10)
    assert h.period[0] == H.M64 >> 1
    h.mmio_write(T0, 4, H.TN_PERIODIC | H.TN_32BIT | route(20))
    h.mmio_write(T0 + 8, 8, 1 << 40)
    assert h.period[0] == 0x7FFFFFFF                          # half the 32-bit range at most


def test_a_period_truncated_by_32bit_mode_still_fires_at_most_every_100us():
    h, clock, insns, gsis, _ = rig()
    h.mmio_write(T0, 4, H.TN_PERIODIC | H.TN_SETVAL | route(20))
    h.mmio_write(T0 + 8, 8, 100)                              # the first match
    h.mmio_write(T0 + 8, 8, (1 << 32) + 1)                   # a 64-bit period...
    h.mmio_write(T0, 4, H.TN_ENABLE | H.TN_PERIODIC | H.TN_32BIT | route(20))
    assert h.period[0] == 1                                   # ...cut to one tick by 32-bit mode
    h.mmio_write(0x10, 4, H.CFG_ENABLE)
    for _ in range(100):
        advance(clock, insns, 16 * 625)                       # 1 ms in steps of 10 us
    assert 9 <= gsis[20].edges <= 11, gsis[20].edges         # ~10 kHz, not 62.5 MHz


def test_32bit_mode_compares_the_low_half_and_wraps():
    h, clock, insns, gsis, _ = rig()
    h.mmio_write(0xF0, 8, 0x3_FFFF_F000)
    h.mmio_write(0x10, 4, H.CFG_ENABLE)
    h.mmio_write(T0, 4, H.TN_ENABLE | H.TN_32BIT | route(20))
    h.mmio_write(T0 + 8, 4, 0x100)                           # after the low half wraps
    assert h.mmio_read(T0 + 8, 8) == 0x100                   # 32 bits read back
    advance(clock, insns, 16 * 0x1000)
    assert gsis[20].edges == 0
    advance(clock, insns, 16 * 0x100)
    assert gsis[20].edges == 1
    # more than ~1 ms behind: not "now" but after the counter wraps 2^32 ticks later
    h.mmio_write(T0 + 8, 4, (h.counter() - 100_000) & H.M32)
    advance(clock, insns, 16 * 1000)
    assert gsis[20].edges == 1 and h.armed[0].deadline_ns > clock.now_ns() + 16 * (1 << 31)
    h.mmio_write(T0 + 8, 4, (h.counter() - 10) & H.M32)     # just behind: at once
    advance(clock, insns, 0)
    assert gsis[20].edges == 2


def test_level_timer_sets_status_holds_its_line_until_written_1():
    h, clock, insns, gsis, _ = rig()
    h.mmio_write(0x10, 4, H.CFG_ENABLE)
    h.mmio_write(T2, 4, H.TN_ENABLE | H.TN_LEVEL | H.TN_PERIODIC | H.TN_SETVAL | route(22))
    h.mmio_write(T2 + 8, 8, 1000)
    h.mmio_write(T2 + 8, 8, 7000)                            # period
    advance(clock, insns, 16 * 1000)
    assert h.mmio_read(0x20, 8) == 4 and gsis[22].level
    advance(clock, insns, 16 * 50_000)                       # one-shot until acknowledged
    assert gsis[22].edges == 1 and h.armed[2] is None
    h.mmio_write(0x20, 4, 0x3)                               # writing 1s to other timers' bits: nothing
    assert h.mmio_read(0x20, 8) == 4 and gsis[22].level
    h.mmio_write(0x20, 4, 0x4)
    assert h.mmio_read(0x20, 8) == 0 and not gsis[22].level
    nxt = h.mmio_read(T2 + 8, 8)
    assert nxt > h.counter() and (nxt - 1000) % 7000 == 0    # restarted at the next period
    advance(clock, insns, 16 * (nxt - h.counter()))
    assert gsis[22].level and gsis[22].edges == 2 and h.isr == 4


def test_legacy_replacement_routes_timers_0_and_1_to_irq0_and_irq8():
    h, clock, insns, gsis, (irq0, irq8) = rig()
    h.mmio_write(0x10, 4, H.CFG_ENABLE | H.CFG_LEGACY)
    for reg in (T0, T1):
        h.mmio_write(reg, 4, H.TN_ENABLE | H.TN_LEVEL)       # level is ignored: ISA edges
        h.mmio_write(reg + 8, 8, 500)
    assert h.mmio_read(T0, 4) & H.TN_ROUTE == 0              # route 0 is valid in legacy mode
    advance(clock, insns, 16 * 500)
    assert (irq0.edges, irq8.edges) == (1, 1) and h.isr == 0
    assert not any(line.edges for line in gsis.values())
    h.mmio_write(0x10, 4, H.CFG_ENABLE)                      # legacy off: enabled timers get a real route
    assert h.mmio_read(T0, 4) & H.TN_ROUTE == route(20)


def test_the_pit_is_cut_from_irq0_in_legacy_mode():
    from xenicorn.devices.pit8254 import Pit8254
    h, clock, insns, *_ = rig()
    irq0 = IrqLine("IRQ0")
    pit = Pit8254(clock, irq0=H.LegacyGate(irq0, h))
    pit.pio_write(3, 1, 0x34)
    pit.pio_write(0, 1, 0xA9)
    pit.pio_write(0, 1, 0x04)                                # 1193: 1 kHz
    advance(clock, insns, 3_500_000)
    assert irq0.edges == 3
    h.mmio_write(0x10, 4, H.CFG_LEGACY)
    advance(clock, insns, 3_000_000)
    assert irq0.edges == 3 and pit.irq_edges == 6            # it counts on, its edges stop short
    h.mmio_write(0x10, 4, 0)
    advance(clock, insns, 1_000_000)
    assert irq0.edges == 4


def test_disabling_stops_timers_and_enabling_restarts_from_the_comparator():
    h, clock, insns, gsis, _ = rig()
    h.mmio_write(T0, 4, H.TN_ENABLE | route(20))
    h.mmio_write(T0 + 8, 8, 2000)
    h.mmio_write(0x10, 4, H.CFG_ENABLE)
    advance(clock, insns, 16 * 1000)
    h.mmio_write(0x10, 4, 0)
    advance(clock, insns, 16 * 5000)
    assert gsis[20].edges == 0 and h.armed[0] is None
    h.mmio_write(0x10, 4, H.CFG_ENABLE)                      # the counter resumes at 1000
    advance(clock, insns, 16 * 999)
    assert gsis[20].edges == 0
    advance(clock, insns, 16)
    assert gsis[20].edges == 1


# -- snapshots ----------------------------------------------------------------------------
def test_record_round_trips_armed_comparators_and_a_held_line():
    a, clock_a, insns_a, gsis_a, _ = rig()
    b, clock_b, insns_b, gsis_b, _ = rig()
    a.mmio_write(0x10, 4, H.CFG_ENABLE)
    a.mmio_write(T0, 4, H.TN_ENABLE | H.TN_PERIODIC | H.TN_SETVAL | H.TN_32BIT | route(21))
    a.mmio_write(T0 + 8, 4, 10_000)
    a.mmio_write(T0 + 8, 4, 10_000)
    a.mmio_write(T1, 4, H.TN_ENABLE | H.TN_LEVEL | route(23))
    a.mmio_write(T1 + 8, 8, 500)
    a.mmio_write(T2 + 0x10, 8, 0xFEE00000_00000041)          # FSB route: kept, unused
    insns_a.n = insns_b.n = 16 * 25_000
    clock_a.run_due()
    clock_b.apply_record(clock_b.check_record(clock_a.save_record()))
    rec = round_trip(a, b)
    assert set(rec["state"]["timers"]) == {"hpet0"} and rec["state"]["channels"][1]["held"] == 23
    assert b.mmio_read(0x20, 8) == 2 and b.mmio_read(T2 + 0x10, 8) == 0xFEE00000_00000041
    assert not gsis_b[23].level                               # restored, not re-driven (the wiring's record)
    for ticks in range(30_000, 61_000, 10_000):
        insns_a.n = insns_b.n = 16 * ticks
        clock_a.run_due()
        clock_b.run_due()
    assert a.fired == b.fired == [5, 1, 0] and b.save_record() == a.save_record()
    chans = rec["state"]["channels"]
    refuses(b, changed(rec, config=4), "config 0x4 sets reserved bits")
    refuses(b, changed(rec, isr=8), "isr 0x8 sets reserved bits")
    refuses(b, changed(rec, channels=chans[:2]), "2 timers")
    refuses(b, changed(rec, channels=[{**chans[0], "config": chans[0]["config"] | 0x8000}] + chans[1:]),
            "capability bits")                                # FSB_INT_DEL_CAP: Xen has none
    refuses(b, changed(rec, channels=[{**chans[0], "cmp": 1 << 40}] + chans[1:]), "cmp")
    refuses(b, changed(rec, channels=[chans[0], {**chans[1], "config": chans[1]["config"] & ~H.TN_ROUTE
                                                 | route(5)}, chans[2]]), "outside its INT_ROUTE_CAP")
    refuses(b, changed(rec, isr=0), "holds GSI 23 without its status bit")
    refuses(b, changed(rec, config=0), "timer 0 armed while it cannot fire")


# -- whole-machine snapshots ---------------------------------------------------------------
def test_hpet64_round_trips_with_comparators_armed_and_a_level_line_held(tmp_path):
    """Snapshots at pauses all through hpet64 continue to the same output and state."""
    from test_snapshot import round_trips
    armed, held = set(), 0
    for m, _ in round_trips(tmp_path, "hpet64", ""):
        armed |= {t.name for t in m.clock.pending() if t.name.startswith("hpet")}
        held += m.hpet.held[1] is not None
    assert {"hpet0", "hpet2"} <= armed and held >= 1, (armed, held)


def test_a_snapshot_with_an_hpet_needs_a_machine_with_one(tmp_path):
    from test_snapshot import make
    from xenicorn.snapshot import SnapshotError
    m = make("hpet64", "")
    m.save_at(30000, str(tmp_path / "h.snap"))
    assert m.run() == 0
    bare = make("hpet64", "", hpet=False)
    with pytest.raises(SnapshotError, match="snapshot of a machine with an HPET, this one has no HPET"):
        bare.load_snapshot(str(tmp_path / "h.snap"))


# -- the machine --------------------------------------------------------------------------
def test_the_machine_maps_it_and_the_acpi_table_describes_it():
    m = Machine(MachineConfig(debugcon="none", serial="none"))
    assert m.mmio.read(H.HPET_BASE, 4) == 0x8086A201
    assert m.mmio.read(H.HPET_BASE + 0x400, 4) == 0xFFFFFFFF       # past its 1 KiB: nobody
    tables = acpi.parse(m.memory.read, acpi.write(m, hw_reduced=False))
    t = tables[b"HPET"]
    assert len(t) == 56 and t[36:40] == (0x8086A201).to_bytes(4, "little")
    assert int.from_bytes(t[44:52], "little") == H.HPET_BASE and t[40] == 0       # system memory
    assert m.xen.state.params[11] == 1                                # HVM_PARAM_HPET_ENABLED
    bare = Machine(MachineConfig(debugcon="none", serial="none", hpet=False))
    assert bare.hpet is None and bare.mmio.read(H.HPET_BASE, 4) == 0xFFFFFFFF
    assert b"HPET" not in acpi.parse(bare.memory.read, acpi.write(bare, hw_reduced=False))
    assert bare.xen.state.params[11] == 0 and bare.pit.irq0 is bare.isa_irq[0]


# -- the guests ---------------------------------------------------------------------------
def run(name, **cfg):
    path = firmware.find(name)
    assert path, f"firmware {name} is missing; run tools/build_firmware.py"
    machine, _ = boot(MachineConfig(debugcon="none", **cfg), path, console=ConsoleSink(None))
    status = machine.run()
    return machine, status, machine.console.text()


OK_LINES = ["HPET table: block id 0x8086a201 at 0xfed00000",
            "capabilities: vendor 0x8086, 3 timers, 64-bit counter, legacy capable, 16000000 fs",
            "timer 0 routes 0xf00000",
            "routes 16-31 asked of every timer: only 20-23 kept, the others become 20",
            "main counter runs",
            "one-shot edge timer 2 on GSI 20",
            "periodic timer 2 with SETVAL",
            "level timer 1 on GSI 21",
            "status bit 1 cleared by writing 1",
            "legacy replacement: timer 0 on IRQ 0 through IOAPIC pin 2",
            "legacy replacement: timer 1 on IRQ 8",
            "legacy replacement: timer 0 on IRQ 0 through the 8259",
            "the PIT is cut from IRQ 0"]


@pytest.mark.parametrize("name", ["hpet32", "hpet64"])
@pytest.mark.parametrize("clock", ["host", "deterministic"])
def test_hpet_guest(name, clock):
    machine, status, text = run(name, clock=clock)
    assert "FAIL" not in text, text
    assert text.rstrip().endswith("Test result: SUCCESS"), text
    assert status == 0
    for line in OK_LINES:
        assert line in text, (line, text)
    h = machine.hpet
    # what the guest left: legacy mode on, timer 0 periodic on IRQ 0, timer 1's status cleared
    assert h.enabled and h.legacy and h.isr == 0 and h.held == [None] * 3
    assert h.fired[0] >= 8 and h.fired[1] == 2 and h.fired[2] >= 6, h.fired
    assert not machine.wiring.gsi[21].level and machine.wiring.gsi[21].sources["hpet"] is False
    # timer 0's edges went to IRQ 0 (8259 input 0, GSI 2) on its own line; the PIT's stopped short
    w = machine.wiring
    assert w.pic_input(0, "hpet").edges == w.isa_gsi_input(0, "hpet").edges == h.fired[0]
    assert w.pic_input(8, "hpet").edges == w.isa_gsi_input(8, "hpet").edges == 1
    assert machine.pic_inputs[0].edges >= h.fired[0] and machine.gsi[2].edges >= h.fired[0]
    assert 3 <= machine.isa_irq[0].edges < machine.pit.irq_edges
    periodic = re.search(r"periodic: (\d+) ticks in (\d+) counter ticks", text)
    assert periodic and int(periodic[1]) >= 5


def test_hpet_guest_is_deterministic():
    a = run("hpet64", clock="deterministic")
    b = run("hpet64", clock="deterministic")
    assert a[2] == b[2] and a[0].vcpu.instructions == b[0].vcpu.instructions
    assert a[0].hpet.save_record() == b[0].hpet.save_record()


def test_without_hpet_the_guest_says_so():
    machine, status, text = run("hpet64", hpet=False)
    assert "no ACPI HPET table" in text and "Test result: SKIP" in text, text


def test_cli_no_hpet(tmp_path):
    out = subprocess.run([sys.executable, "-m", "xenicorn", "run", "hpet32",
                          "--no-hpet", "--serial", "none"], capture_output=True, text=True, timeout=120)
    assert "no ACPI HPET table" in out.stdout, out.stdout + out.stderr


# Linux finding the HPET and checking the TSC against it: tests/test_linuxboot.py check_hpet,
# run on the GSI-through-IOAPIC boot (the same machine, one boot fewer).
