"""The APIC bus: IPIs by destination, shorthand and delivery mode (SDM vol. 3 §10.6)."""
from __future__ import annotations

import pytest

from xenicorn.devices.apicbus import ApicBus
from xenicorn.devices.lapic import Lapic, SVR_ENABLE

ICR_LOW, ICR_HIGH, LDR, DFR, SVR, TPR = 0x300, 0x310, 0x0D0, 0x0E0, 0x0F0, 0x080


def apics(n: int):
    events: list = []
    bus = ApicBus(on_init=lambda i: events.append(("init", i)), on_sipi=lambda i, v: events.append(("sipi", i, v)),
                  trace=lambda text: events.append(("trace", text)))
    lapics = [Lapic(apic_id=i) for i in range(n)]
    for lapic in lapics:
        lapic.mmio_write(SVR, 4, SVR_ENABLE | 0xFF)
        bus.attach(lapic)
    return bus, lapics, events


def send(lapic, low: int, dest: int = 0) -> None:
    lapic.mmio_write(ICR_HIGH, 4, dest << 24)
    lapic.mmio_write(ICR_LOW, 4, low)


def irr(lapic) -> set[int]:
    return {v for v in range(256) if lapic.state.irr >> v & 1}


def test_fixed_ipi_by_physical_id_reaches_only_that_cpu():
    _, cpus, _ = apics(4)
    send(cpus[0], 0x40, dest=2)
    assert [irr(c) for c in cpus] == [set(), set(), {0x40}, set()]


def test_physical_broadcast_and_the_shorthands():
    _, cpus, _ = apics(3)
    send(cpus[1], 0x41, dest=0xFF)
    assert all(irr(c) == {0x41} for c in cpus)
    send(cpus[1], 0x42 | (1 << 18))                       # self
    assert [0x42 in irr(c) for c in cpus] == [False, True, False]
    send(cpus[1], 0x43 | (2 << 18))                       # all including self
    assert all(0x43 in irr(c) for c in cpus)
    send(cpus[1], 0x44 | (3 << 18))                       # all excluding self
    assert [0x44 in irr(c) for c in cpus] == [True, False, True]


def test_logical_flat_and_cluster_destinations():
    _, cpus, _ = apics(4)
    for i, c in enumerate(cpus):
        c.mmio_write(LDR, 4, (1 << i) << 24)               # flat: one bit each
    send(cpus[0], 0x50 | (1 << 11), dest=0b1010)
    assert [0x50 in irr(c) for c in cpus] == [False, True, False, True]
    for i, c in enumerate(cpus):                           # cluster model: cluster i//2, member bit i%2
        c.mmio_write(DFR, 4, 0x0FFFFFFF)
        c.mmio_write(LDR, 4, (((i // 2) << 4) | (1 << (i % 2))) << 24)
    send(cpus[0], 0x51 | (1 << 11), dest=0x12)             # cluster 1, member 1: CPU 3
    assert [0x51 in irr(c) for c in cpus] == [False, False, False, True]


def test_lowest_priority_picks_one_cpu_with_the_lowest_tpr():
    _, cpus, _ = apics(3)
    cpus[0].mmio_write(TPR, 4, 0x20)
    cpus[2].mmio_write(TPR, 4, 0x10)
    send(cpus[0], 0x60 | (1 << 8), dest=0xFF)
    assert [0x60 in irr(c) for c in cpus] == [False, True, False]


def test_nmi_init_and_sipi():
    _, cpus, events = apics(2)
    send(cpus[0], (4 << 8), dest=1)                        # NMI
    assert cpus[1].nmi_pending and not cpus[0].nmi_pending
    cpus[1].mmio_write(TPR, 4, 0x30)
    send(cpus[0], (5 << 8) | (1 << 14) | (1 << 15), dest=1)   # INIT assert, level
    assert ("init", 1) in events and cpus[1].state.tpr == 0 and not cpus[1].nmi_pending
    assert cpus[1].state.id == 1                           # INIT keeps the APIC ID
    events.clear()
    send(cpus[0], (5 << 8) | (1 << 15), dest=1)            # INIT de-assert: no effect
    assert not [e for e in events if e[0] == "init"]
    send(cpus[0], (6 << 8) | 0x08, dest=1)                 # SIPI vector 8: start at 0x8000
    assert ("sipi", 1, 0x08) in events


@pytest.mark.parametrize("dest", [5, 0x80])
def test_an_ipi_to_a_missing_apic_is_dropped_and_traced(dest):
    bus, cpus, events = apics(2)
    send(cpus[0], 0x40, dest=dest)
    assert not irr(cpus[0]) and not irr(cpus[1]) and bus.dropped == 1
    assert any("addresses no APIC" in e[1] for e in events if e[0] == "trace")


ESR, LVTERR = 0x280, 0x370


def esr(lapic) -> int:
    lapic.mmio_write(ESR, 4, 0)                           # a write latches the pending errors
    return lapic.mmio_read(ESR, 4)


@pytest.mark.parametrize("lvterr, expect_esr, expect_irr", [
    (0x10000 | 0x33, 0x20, set()),                        # LVT error masked: only the send bit
    (0x33, 0x20, {0x33}),                                 # error interrupt on vector 0x33
    (0x0F, 0x60, set()),                                  # LVT error illegal too: receive bit (XTF xsa-462)
])
def test_an_ipi_with_an_illegal_vector_is_a_send_error_of_the_sender(lvterr, expect_esr, expect_irr):
    _, cpus, events = apics(2)
    cpus[0].mmio_write(LVTERR, 4, lvterr)
    assert esr(cpus[0]) == 0
    send(cpus[0], 0x0F, dest=1)                           # fixed, vector 15, to APIC 1
    assert irr(cpus[0]) == expect_irr
    assert irr(cpus[1]) == set() and esr(cpus[1]) == 0    # never sent: the target sees nothing
    assert esr(cpus[0]) == expect_esr
    assert esr(cpus[0]) == 0                              # the next latch finds nothing new
    assert any("illegal vector 0xf" in e[1] for e in events if e[0] == "trace")
