"""CPUID faulting (MSRs 0xCE and 0x140, #GP for CPUID at CPL > 0), as Xen offers it to HVM guests."""
import pytest

from xenicorn import exits as E
from xenicorn.engine.msr import INTERCEPT_CPUID
from xenicorn.engine.vcpustate import VcpuRecord
from xenicorn.machine.cpuidfault import MSR_MISC_FEATURES_ENABLES
from xenicorn.records import RecordError

from test_firmware import run
from test_snapshot import make


@pytest.mark.parametrize("name", ["cpuidfault32", "cpuidfault64"])
def test_the_kernel_turns_faulting_on_and_off_and_user_cpuid_faults_only_while_on(name):
    machine, kernel, status, text = run(name)
    assert "FAIL" not in text, text
    assert text.rstrip().endswith("Test result: SUCCESS") and status == 0, text
    # the #GP's saved IP is the user CPUID itself, from user CS (RPL 3)
    line = next(ln for ln in text.splitlines() if "user CPUID is #GP(0)" in ln)
    assert f"ip={kernel.symbols['ucpuid_insn']:#x}" in line and ("cs=0x23" in line or "cs=0x33" in line)
    vcpu = machine.vcpu
    assert not vcpu.cpuid_faulting and not vcpu.msr.extra & INTERCEPT_CPUID    # off again at the end


def _stop_when_faulting_turns_on(machine):
    def listener(vcpu, ex):
        if isinstance(ex, E.Msr) and ex.msr == MSR_MISC_FEATURES_ENABLES and ex.write and ex.value == 1:
            vcpu.request_stop("test: a pause with CPUID faulting on")
    machine.dispatch.listeners.append(listener)


def test_faulting_on_survives_a_snapshot_and_old_records_load_with_it_off(tmp_path):
    path = str(tmp_path / "on.snap")
    saver = make("cpuidfault64", "")
    _stop_when_faulting_turns_on(saver)
    marks = []
    save = saver.save_snapshot
    saver.save_snapshot = lambda p: (marks.append((len(saver.console.data), saver.vcpu.cpuid_faulting)), save(p))[1]
    saver.save_at(1, path)
    assert saver.run() == 0
    assert len(marks) == 1 and marks[0][1], "the snapshot was not taken with faulting on"
    whole = bytes(saver.console.data)

    fresh = make("cpuidfault64", "")
    fresh.load_snapshot(path)
    assert fresh.vcpu.cpuid_faulting and fresh.vcpu.msr.extra & INTERCEPT_CPUID
    assert fresh.run() == 0
    assert whole[:marks[0][0]] + bytes(fresh.console.data) == whole       # the user CPUID still faulted
    assert b"user CPUID is #GP(0)" in bytes(fresh.console.data)

    # a record from before the field: faulting off (and no CPUID intercept)
    rec = VcpuRecord(fresh.vcpu).save_record()
    assert rec["state"]["cpuid_faulting"] is False
    del rec["state"]["cpuid_faulting"]
    assert VcpuRecord(fresh.vcpu).check_record(rec)["cpuid_faulting"] is False
    # faulting on without the intercept (or the reverse) is refused
    rec["state"]["cpuid_faulting"] = True
    with pytest.raises(RecordError, match="CPUID faulting"):
        VcpuRecord(fresh.vcpu).check_record(rec)
    rec["state"]["cpuid_faulting"] = "yes"
    with pytest.raises(RecordError):
        VcpuRecord(fresh.vcpu).check_record(rec)
