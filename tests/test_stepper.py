"""The interrupt stepper, --trace-json and run records, on the evtchn kernels.

Each path an upcall can take is driven through the stepper and checked as
a sequence of events, each with the state it changed: the GSI through the
IOAPIC and LAPIC, the GSI through the 8259, and the callback vector.
"""
import io
import json
import os
import subprocess
import sys

import pytest

from xenicorn import firmware
from xenicorn.devices.console import ConsoleSink
from xenicorn.debug import stepper as S
from xenicorn.machine.machine import MachineConfig
from xenicorn.boot import boot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = {"poll", "poll-hook", "via", "line-lower", "pic-int-low"}


def stepped(kernel, via, deassert="poll", commands=("n",) * 60):
    cfg = MachineConfig(cmdline=f"via={via}", debugcon="none", callback_deassert=deassert,
                        count_instructions=True, observe=set(S.OBSERVED))
    machine, k = boot(cfg, firmware.find(kernel), console=ConsoleSink(None))
    keys = iter(list(commands) + ["c"])
    out = io.StringIO()
    events = []
    st = S.Stepper(machine, out=out, read_command=lambda: next(keys))
    S.watcher_of(machine).sinks.append(events.append)
    status = machine.run()
    return machine, k, status, events, out.getvalue(), st


def first_upcall(events, until):
    """The events of the first upcall on port 3, from the pending bit to ``until``."""
    start = next(i for i, e in enumerate(events) if e.kind == "evtchn-pending" and "port 3 " in e.text)
    end = next(i for i in range(start, len(events)) if events[i].kind == until)
    return events[start:end + 1]


def test_gsi_through_the_ioapic_step_by_step():
    machine, kernel, status, events, out, _ = stepped("evtchn64", "gsi")
    assert status == 0 and machine.console.text().rstrip().endswith("SUCCESS")
    path = first_upcall(events, "ioapic-eoi")
    kinds = [e.kind for e in path if e.kind not in QUIET]
    assert kinds == ["evtchn-pending", "assert", "line-raise", "ioapic-message", "lapic-irr", "lapic-ack",
                     "deliver", "deassert", "lapic-eoi", "ioapic-eoi"]
    ev = {e.kind: e for e in path}
    assert ev["evtchn-pending"].diff["vcpu0.upcall_pending"] == [0, 1]
    assert ev["evtchn-pending"].diff["evtchn.pending"] == [[], [3]]
    assert ev["assert"].diff == {"callback.line": [0, 1]}
    assert ev["ioapic-message"].diff == {"ioapic.pin20.input": [0, 1], "ioapic.pin20.remote_irr": [0, 1]}
    assert ev["lapic-irr"].diff == {"lapic.irr": [[], [0x50]]}
    assert ev["lapic-ack"].diff == {"lapic.irr": [[0x50], []], "lapic.isr": [[], [0x50]], "lapic.ppr": [0, 0x50]}
    d = ev["deliver"].delivery
    assert d["vector"] == 0x50 and d["mode"] == "long" and d["gate"]["kind"] == "int64"
    assert [n for n, _ in d["pushed"]] == ["ss", "rsp", "rflags", "cs", "rip"]
    assert d["handler"][0].startswith(f"{d['new']['rip']:#x}:")
    assert ev["deliver"].diff["cpu.IF"] == [1, 0]
    # poll: the line drops at the first block after the guest's clearing store
    assert ev["deassert"].diff == {"vcpu0.upcall_pending": [1, 0], "callback.line": [1, 0]}
    assert ev["deassert"].insn < ev["lapic-eoi"].insn
    assert ev["lapic-eoi"].diff["lapic.isr"] == [[0x50], []]
    assert ev["ioapic-eoi"].diff == {"ioapic.pin20.remote_irr": [1, 0]}
    # what a person sees
    assert "callback GSI 20 asserted" in out and "callback.line" in out
    assert "gate: long int64 for vector 0x50" in out and "handler:" in out
    assert "block poll(s) found upcall_pending still 1" in out


def test_gsi_through_the_8259_with_the_eoi_resample():
    machine, kernel, status, events, out, _ = stepped("evtchn32", "pic", deassert="eoi")
    assert status == 0 and machine.console.text().rstrip().endswith("SUCCESS")
    path = first_upcall(events, "deassert")
    kinds = [e.kind for e in path if e.kind not in QUIET]
    assert kinds == ["evtchn-pending", "assert", "line-raise", "pic-int", "lapic-extint", "pic-inta",
                     "deliver", "pic-eoi", "deassert"]
    ev = {e.kind: e for e in path}
    assert ev["pic-int"].diff["pic.slave.irr"] == [0, 0x4]           # IRQ 10 = slave input 2
    assert ev["pic-int"].diff["pic.master.irr"] == [0, 0x4]          # the cascade, master input 2
    assert ev["pic-inta"].diff.get("pic.slave.isr") == [0, 0x4]
    d = ev["deliver"].delivery
    assert d["vector"] == 0x2A and d["mode"] == "protected" and d["gate"]["kind"] == "int32"
    assert [n for n, _ in d["pushed"]] == ["eflags", "cs", "eip"]
    # eoi: the guest cleared upcall_pending long before; the line drops only at the EOI
    assert ev["pic-eoi"].diff["vcpu0.upcall_pending"] == [1, 0]
    assert ev["pic-eoi"].diff["pic.slave.isr"] == [0x4, 0]
    assert ev["deassert"].diff == {"callback.line": [1, 0]} and ev["deassert"].insn == ev["pic-eoi"].insn
    assert "EOI at 8259 IRQ 10" in ev["deassert"].text


def test_the_callback_vector_bypasses_every_controller():
    machine, kernel, status, events, out, _ = stepped("evtchn64", "vector")
    assert status == 0
    path = first_upcall(events, "deliver")
    assert [e.kind for e in path] == ["evtchn-pending", "upcall", "deliver"]
    deliver = path[-1]
    assert deliver.delivery["vector"] == 0xF3
    assert not any(k.startswith(("lapic.", "ioapic.", "pic.")) for k in deliver.diff)


def test_single_steps_run_one_instruction_each_and_show_the_handler_clearing_the_flag():
    # stop at the delivery of the first GSI upcall, then step until the line drops
    machine, kernel, status, events, out, st = stepped(
        "evtchn64", "gsi", commands=["n"] * 8 + ["s"] * 60 + ["c"])
    assert status == 0
    steps = [line for line in out.splitlines() if line.startswith("-- stepped ")]
    assert len(steps) == 60
    counts = [int(line.split("(insn ")[1].split(",")[0]) for line in steps]
    assert counts == list(range(counts[0], counts[0] + 60))          # exactly one instruction each
    first = steps[0].split("-- stepped ")[1]
    deliver = next(e for e in events if e.kind == "deliver")
    assert first.startswith(f"{deliver.delivery['new']['rip']:#x}:")  # the handler's first instruction
    # the guest's own stores show under the step that made them
    assert "vcpu0.pending_sel" in out and "callback GSI 20 deasserted" in out


def test_quit_from_the_stepper_powers_off():
    machine, kernel, status, events, out, _ = stepped("evtchn64", "gsi", commands=["n", "i", "q"])
    assert status == 0 and machine.shutdown_reason == "quit"
    assert "lapic.isr" in out and "ioapic.pin20.vector" in out    # 'i' printed the whole state


def test_the_watcher_needs_an_observing_machine():
    machine, _ = boot(MachineConfig(debugcon="none"), firmware.find("hello64"), console=ConsoleSink(None))
    with pytest.raises(ValueError, match="observe"):
        S.InterruptWatcher(machine)


def cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "xenicorn", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_cli_step_reads_keys_from_a_pipe():
    r = cli("step", "evtchn64", "--append", "via=gsi", stdin="n\n" * 8 + "s\ns\nq\n")
    assert r.returncode == 0, r.stderr
    assert "== #8 [deliver]" in r.stdout or "[deliver]" in r.stdout
    assert r.stdout.count("-- stepped ") == 2
    assert "error" not in r.stderr


def test_the_stepper_names_the_vcpu_of_each_event_with_several():
    """smp64 -smp 2: IPIs and Xen upcalls reach both vCPUs; each event says whose it is."""
    r = cli("step", "smp64", "-smp", "2", stdin="n\n" * 400 + "q\n")
    assert r.returncode == 0, r.stderr
    heads = [line for line in r.stdout.splitlines() if line.startswith("== #")]
    assert any(" vCPU 0 insn " in h for h in heads) and any(" vCPU 1 insn " in h for h in heads), heads[:20]
    assert all(" vCPU " in h for h in heads)


def test_trace_json_and_record_lines(tmp_path):
    tj, rec = tmp_path / "events.jsonl", tmp_path / "run.jsonl"
    r = cli("run", "evtchn64", "--append", "via=gsi", "--trace-json", str(tj), "--record", str(rec))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in tj.read_text().splitlines()]
    assert events[0]["kind"] == "start" and events[-1]["kind"] == "end" and events[-1]["status"] == 0
    kinds = [e["kind"] for e in events]
    assert kinds.count("deliver") >= 6 and kinds.count("assert") == kinds.count("deassert") >= 5
    d = next(e for e in events if e["kind"] == "deliver")["delivery"]
    assert {"gate", "pushed", "handler", "old", "new"} <= d.keys()
    run = [json.loads(line) for line in rec.read_text().splitlines()]
    exits = [e for e in run if e["cat"] == "exit"]
    assert {"PortIO", "Hypercall"} <= {e["kind"] for e in exits}
    insns = [e["insn"] for e in run[1:]]
    assert insns == sorted(insns)                                     # a timeline
    assert len([e for e in run if e["cat"] not in ("exit", "guest")]) == len(events)   # guest: guestwatch.py


def test_bad_record_inputs_get_one_line(tmp_path):
    r = cli("run", "hello64", "--record", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "xenicorn: error:" in r.stderr


def test_from_insn_runs_silently_first():
    r = cli("step", "evtchn64", "--append", "via=gsi", "--from-insn", "39000", stdin="n\n" * 3 + "q\n")
    assert r.returncode == 0, r.stderr
    assert "-- at instruction 39000: stepping from here" in r.stdout
    shown = [int(line.split(" insn ")[1].split()[0]) for line in r.stdout.splitlines() if line.startswith("== #")]
    assert shown and min(shown) >= 39000
