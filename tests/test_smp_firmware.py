"""The multiprocessor guest kernels smp32 and smp64 (xenicorn/firmware/src/smp).

Their plain-x86 part (AP start-up by INIT-SIPI-SIPI, IPIs, a spinlock,
cross-modifying code) runs under QEMU TCG, which is real x86 semantics
with real concurrency between vCPU threads: the kernels are checked there
with 1, 2 and 4 CPUs (skipped without ``qemu-system-x86_64``). QEMU offers
no Xen CPUID leaf, so the kernels print a SKIP line for their Xen part.
On xenicorn they run whole with ``-smp 2`` and ``-smp 4`` (tests/test_smp.py),
and with one vCPU skip the SMP steps and run the Xen part that needs only
vCPU 0: an event for vCPU 0 through the callback GSI.
"""
import re
import shutil
import subprocess

import pytest

from xenicorn import firmware
from xenicorn.boot import boot
from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import MachineConfig

KERNELS = ["smp32", "smp64"]
ITERATIONS = 100000
needs_qemu = pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU not installed")


def check_plain_part(text: str, cpus: int) -> None:
    """The lines of the plain-x86 part, the same on QEMU and on xenicorn."""
    assert "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS"), text
    assert f"cpus: {cpus} (APIC IDs {' '.join(str(i) for i in range(cpus))};" in text
    for cpu in range(1, cpus):
        assert re.search(rf"^ok CPU {cpu} \(APIC ID {cpu}\) up by (INIT-SIPI-SIPI|VCPUOP_initialise \+ VCPUOP_up): "
                         rf"CPUID says {cpu}, LAPIC ID {cpu}, arrived #\d$", text, re.M), cpu
        assert f"ok 100 IPI round trips with CPU {cpu} (vector 0x40 there, 0x41 back)" in text
    assert f"ok {cpus - 1} of {cpus - 1} APs arrived" in text
    assert f"ok all-excluding-self IPI: {cpus - 1} of {cpus - 1} APs once each, BSP 0" in text
    aps = sum(1 << cpu for cpu in range(1, cpus))
    assert "ok logical IPI to mask 0x2 (flat): CPU 1 only" in text
    assert f"ok logical IPI to mask {aps:#x} (flat): every AP once" in text
    total = cpus * ITERATIONS
    assert f"ok spinlock (lock cmpxchg): counter {total} = {cpus} x {ITERATIONS}" in text
    assert f"ok lock add: counter {total} = {cpus} x {ITERATIONS}" in text
    # the APs ran the old code first, then saw each patch: 1 -> 2 -> 3 by the BSP, 4 -> 5 by an AP
    assert "ok the APs ran patch_fn: 1 (the code as linked)" in text
    for v in (2, 3):
        assert f"ok BSP patched patch_fn to return {v}; after CPUID the APs run it: {v}" in text
    for v in (4, 5):
        assert f"ok CPU 1 patched it to return {v}; the BSP then runs it: {v}" in text
    assert f"ok no AP started twice: {cpus - 1} arrivals, {cpus - 1} trampoline entries, 0 strays" in text


def qemu(name, cpus):
    """Run a kernel under QEMU TCG on q35 (the library powers off through its ACPI PM1a port)."""
    path = firmware.find(name)
    assert path, f"firmware {name} is missing; run tools/build_firmware.py"
    res = subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-m", "128", "-smp", str(cpus), "-kernel", path,
                          "-debugcon", "stdio", "-device", "isa-debug-exit,iobase=0xf4", "-display", "none",
                          "-no-reboot"], capture_output=True, text=True, timeout=120)
    return res.stdout


@needs_qemu
@pytest.mark.parametrize("cpus", [2, 4])
@pytest.mark.parametrize("name", KERNELS)
def test_plain_x86_part_passes_under_qemu(name, cpus):
    text = qemu(name, cpus)
    check_plain_part(text, cpus)
    assert 'SKIP Xen part: not on Xen (no "XenVMMXenVMM" CPUID leaf)' in text


@needs_qemu
@pytest.mark.parametrize("name", KERNELS)
def test_one_cpu_under_qemu_skips_the_smp_steps(name):
    text = qemu(name, 1)
    assert "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS"), text
    assert "cpus: 1 (APIC IDs 0;" in text
    for step in ("AP start-up", "IPIs", "spinlock and lock add counters", "cross-modifying code"):
        assert f"SKIP {step}: one CPU" in text


@pytest.mark.parametrize("name", KERNELS)
def test_on_xenicorn_with_one_vcpu_the_callback_gsi_carries_vcpu0_events(name):
    path = firmware.find(name)
    assert path, f"firmware {name} is missing; run tools/build_firmware.py"
    machine, _ = boot(MachineConfig(debugcon="none"), path, console=ConsoleSink(None))
    status = machine.run()
    text = machine.console.text()
    assert status == 0 and "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS"), text
    assert "cpus: 1 (APIC IDs 0;" in text and "SKIP AP start-up: one CPU" in text
    assert "ok HVM_PARAM_CALLBACK_IRQ = GSI 20 (0)" in text
    assert "ok an event for vCPU 0 came through GSI 20 on vector 0x50, once (1)" in text
    assert "SKIP per-vCPU events: no vCPU 1" in text
