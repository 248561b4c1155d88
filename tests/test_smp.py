"""Several vCPUs (``-smp N``): the smp32/smp64 kernels end to end, determinism, snapshots, bad input.

The kernels start their APs with INIT-SIPI-SIPI (and, with Xen and three
or more vCPUs, the last one with VCPUOP_initialise + VCPUOP_up), send IPIs
by physical and logical destination and shorthand, count under a spinlock
and with ``lock add``, patch code on one CPU and run it on another, and
check Xen's per-vCPU rule: an event for vCPU 1 sets only vCPU 1's
``evtchn_upcall_pending`` and raises no callback GSI, a per-vCPU upcall
vector then reaches vCPU 1, and vCPU 0's events still come through the GSI
(``hvm_assert_evtchn_irq``). The same plain-x86 lines pass under QEMU
(tests/test_smp_firmware.py).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from test_smp_firmware import check_plain_part
from xenicorn import firmware
from xenicorn.boot import boot
from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import MachineConfig


def run_smp(name: str, cpus: int, **config):
    machine, _ = boot(MachineConfig(debugcon="none", serial="none", smp=cpus, timeout=120, **config),
                      firmware.find(name), console=ConsoleSink(None))
    status = machine.run()
    return machine, status, machine.console.text()


@pytest.mark.parametrize("deassert", ["poll", "eoi"])
@pytest.mark.parametrize("clock", ["host", "deterministic"])
@pytest.mark.parametrize("cpus", [2, 4])
@pytest.mark.parametrize("name", ["smp32", "smp64"])
def test_smp_kernels_pass_on_xenicorn(name, cpus, clock, deassert):
    machine, status, text = run_smp(name, cpus, clock=clock, callback_deassert=deassert)
    assert status == 0, text
    check_plain_part(text, cpus)
    # Xen, per vCPU
    assert "ok no callback GSI at vCPU 0 (0) and no upcall on vCPU 1: the GSI is for vCPU 0's events only" in text
    assert "ok vCPU 1: HVMOP_set_evtchn_upcall_vector(0xf4) = 0" in text
    assert "ok an event for vCPU 0 came through GSI 20 on vector 0x50, once (1)" in text
    # a send from vCPU 1 ends vCPU 0's poll of a masked port (Linux's PV spinlock wait)
    assert re.search(r"^ok SCHEDOP_poll \(no timeout\) on masked port \d+ ended when vCPU 1 sent on it", text, re.M)
    assert "ok the masked port raised no upcall (0 GSIs, upcall_pending 0)" in text
    if cpus >= 3:
        last = cpus - 1
        assert f"ok vCPU {last} is down before VCPUOP_up (is_up 0)" in text
        assert f"ok CPU {last} (APIC ID {last}) up by VCPUOP_initialise + VCPUOP_up" in text
    # the machine afterwards: every vCPU ran, each LAPIC kept its ID, the line is low
    assert all(not v.wait_for_sipi and v.instructions >= 0 for v in machine.vcpus)
    assert [lapic.state.id for lapic in machine.lapics] == list(range(cpus))
    assert machine.ioapic.state.id == cpus and not machine.gsi[20].level
    assert machine.vcpus[0].core.switches > cpus
    assert machine.xen.callback.stats["asserts"] >= 1 and machine.xen.state.upcall_vectors.get(1) == 0xF4
    assert len(machine.xen.vcpu_state(0).poll_ports) == 1 and "vcpu0-poll" not in str(machine.xen.vcpu_state(0).timers)


def test_two_deterministic_smp_runs_are_identical(tmp_path):
    outputs = []
    for i in range(2):
        trace = tmp_path / f"t{i}.json"
        res = subprocess.run([sys.executable, "-m", "xenicorn", "run", "smp64", "-smp", "2", "--clock",
                              "deterministic", "--serial", "none", "--trace-json", str(trace)],
                             capture_output=True, timeout=120)
        assert res.returncode == 0, res.stderr
        outputs.append((res.stdout, trace.read_bytes()))
    assert outputs[0] == outputs[1]
    records = [json.loads(line) for line in outputs[0][1].splitlines()]
    assert {r.get("cpu") for r in records} == {0, 1}            # events name the vCPU that acted
    assert any("SIPI vector 0x8 to APIC 1" in r.get("text", "") for r in records)


def test_a_snapshot_of_two_vcpus_continues_byte_for_byte(tmp_path):
    ref, status, text = run_smp("smp64", 2, clock="deterministic", count_instructions=True)
    assert status == 0
    total = sum(v.instructions for v in ref.vcpus)
    path = str(tmp_path / "smp.snap")
    saver, _ = boot(MachineConfig(debugcon="none", serial="none", smp=2, clock="deterministic",
                                  count_instructions=True), firmware.find("smp64"), console=ConsoleSink(None))
    saver.save_at(saver.vcpu.instructions + total // 3, path)
    saver.run()
    assert saver.snapshots_saved, "no snapshot was taken"
    fresh, _ = boot(MachineConfig(debugcon="none", serial="none", smp=2, clock="deterministic",
                                  count_instructions=True), firmware.find("smp64"), console=ConsoleSink(None))
    fresh.load_snapshot(path)
    assert fresh.run() == 0
    done = saver.console.text()
    cut = len(done) - len(fresh.console.text())
    assert done[:cut] + fresh.console.text() == text and fresh.console.text().endswith("Test result: SUCCESS\n")


@pytest.mark.parametrize("arg", ["0", "9", "x", "cpus=0"])
def test_bad_smp_values_are_one_line_and_status_2(arg):
    res = subprocess.run([sys.executable, "-m", "xenicorn", "run", "hello64", "-smp", arg],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "-smp" in res.stderr


def test_the_madt_lists_every_cpu():
    from xenicorn.boot import acpi
    machine, status, _ = run_smp("hello64", 3)
    assert status == 0
    _, _, entries = acpi.parse_madt(machine.memory.read, machine.linux_boot.rsdp if hasattr(machine, "linux_boot")
                                    else acpi.ACPI_BASE)
    lapics = [e for kind, e in entries if kind == 0]
    assert [(e[2], e[3], e[4] & 1) for e in lapics] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]   # UID, APIC ID, enabled
