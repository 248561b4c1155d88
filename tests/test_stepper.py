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
    assert ev["line-raise"].diff == {"ioapic.pin20.input": [0, 1]}
    assert ev["ioapic-message"].diff == {"ioapic.pin20.remote_irr": [0, 1]}
    assert ev["lapic-irr"].diff == {"lapic.irr": [[], [0x50]]}
    assert ev["lapic-ack"].diff == {"lapic.irr": [[0x50], []], "lapic.isr": [[], [0x50]], "lapic.ppr": [0, 0x50]}
    d = ev["deliver"].delivery
    assert d["vector"] == 0x50 and d["mode"] == "long" and d["gate"]["kind"] == "int64"
    assert [n for n, _ in d["pushed"]] == ["ss", "rsp", "rflags", "cs", "rip"]
    assert d["handler"][0].startswith(f"{d['new']['rip']:#x}:")
    assert ev["deliver"].diff["cpu.IF"] == [1, 0]
    # poll: the line drops at the first block after the guest's clearing store
    assert ev["deassert"].guest == {"vcpu0.upcall_pending": [1, 0]}
    assert ev["deassert"].diff == {"callback.line": [1, 0]}
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
    assert ev["pic-eoi"].guest["vcpu0.upcall_pending"] == [1, 0]
    assert ev["pic-eoi"].diff == {"pic.slave.isr": [0x4, 0]}
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
    assert first.startswith(f"{deliver.delivery['new']['rip']:#x} <isr_80>:")  # the handler's first instruction
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


# -- issue 21: each event's own change, the guest's apart -----------------------------------------
def test_each_event_shows_what_it_changed_and_the_guests_changes_apart():
    """evtchn32 via=gsi, poll: the case of the issue, event by event.

    Before, a diff was everything since the previous event: ``GSI20 raised``
    showed nothing and the pin's input rose under the IOAPIC's message; the
    guest's clearing store showed as the deassert's doing; the handler's
    ``evtchn.pending [3] -> []`` came under ``LAPIC 0 EOI``.
    """
    machine, kernel, status, events, out, _ = stepped("evtchn32", "gsi", commands=["n"] * 40)
    assert status == 0 and machine.console.text().rstrip().endswith("SUCCESS")
    path = first_upcall(events, "ioapic-eoi")
    ev = {e.kind: e for e in path}
    assert ev["evtchn-pending"].guest == {"cpu.IF": [0, 1]}          # the guest's STI before its send
    assert "cpu.IF" not in ev["evtchn-pending"].diff
    assert ev["line-raise"].diff == {"ioapic.pin20.input": [0, 1]}
    assert ev["ioapic-message"].diff == {"ioapic.pin20.remote_irr": [0, 1]}
    armed = next(e for e in path if e.kind == "poll-hook")
    assert armed.text == "poll hook armed" and armed.diff == {"callback.poll_hook": [0, 1]}
    assert all(not e.diff for e in path if e.kind == "poll")          # a poll that finds 1 changes nothing
    assert ev["deassert"].guest == {"vcpu0.upcall_pending": [1, 0]}
    assert ev["deassert"].diff == {"callback.line": [1, 0]}
    assert ev["lapic-eoi"].guest == {"evtchn.pending": [[3], []], "vcpu0.pending_sel": [1, 0]}
    assert set(ev["lapic-eoi"].diff) == {"lapic.isr", "lapic.ppr"}
    for e in path:                                                     # every change is told once
        assert not set(e.guest) & set(e.diff), e
    # what a person reads: the guest's part under its own heading, before the event's text
    block = out[out.index("[deassert]"):out.index("[line-lower]")]
    head, rest = block.split("callback GSI 20 deasserted")
    assert "the guest changed, since the last event:" in head and "vcpu0.upcall_pending" in head
    assert "callback.line" in rest and "vcpu0.upcall_pending" not in rest


def test_via_vector_the_handlers_clearing_is_not_folded_into_the_next_send():
    """evtchn32 via=vector: the second send (port 4) once read ``evtchn.pending [3] -> [4]``."""
    machine, kernel, status, events, out, _ = stepped("evtchn32", "vector", commands=["n"] * 12)
    assert status == 0
    second = next(e for e in events if e.kind == "evtchn-pending" and e.text.startswith("port 4 "))
    assert second.guest["evtchn.pending"] == [[3], []]                 # the handler cleared port 3
    assert second.guest["vcpu0.upcall_pending"] == [1, 0]
    assert second.diff["evtchn.pending"] == [[], [4]]                 # then the send set port 4
    assert second.diff["vcpu0.upcall_pending"] == [0, 1]
    assert "[3] -> [4]" not in out


def test_trace_json_keeps_the_guests_changes_apart(tmp_path):
    tj = tmp_path / "events.jsonl"
    r = cli("run", "evtchn32", "--append", "via=gsi", "--trace-json", str(tj))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in tj.read_text().splitlines()]
    deassert = next(e for e in events if e["kind"] == "deassert")
    assert deassert["guest"] == {"vcpu0.upcall_pending": [1, 0]} and deassert["diff"] == {"callback.line": [1, 0]}


# -- symbols ---------------------------------------------------------------------------------------
def elf_symbol(kernel, name):
    from elftools.elf.elffile import ELFFile
    with open(firmware.find(kernel), "rb") as f:
        return next(s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()
                    if s.name == name)


def test_symbols_name_the_nearest_preceding_code_symbol():
    from xenicorn.debug.symbols import Symbols
    syms = Symbols(firmware.find("evtchn32"))
    store, cleared = elf_symbol("evtchn32", "upcall_clear_store"), elf_symbol("evtchn32", "upcall_cleared")
    assert syms.name(cleared) == "upcall_cleared"
    assert syms.name(store) == "upcall_clear_store"         # a label beats the function starting there
    assert syms.name(store + 2) == "upcall_clear_store+0x2"
    page = elf_symbol("evtchn32", "hypercall_page")
    assert syms.name(page + 0x408) == "hypercall_page+0x408"  # code in a sized data object
    assert syms.name(0x50) is None and syms.describe(0x50) == "0x50"
    assert syms.annotate(f"jmp {cleared:#x}, vector 0x50") == f"jmp {cleared:#x} <upcall_cleared>, vector 0x50"
    synthetic = Symbols(entries=[(0x1000, "f", False), (0x1010, "g", False)], sections=[(0x1000, 0x1020)])
    assert [synthetic.name(a) for a in (0xFFF, 0x1000, 0x100F, 0x1010, 0x101F, 0x1020)] == \
        [None, "f", "f+0xf", "g", "g+0xf", None]


def stripped_copy(kernel, tmp_path):
    """The kernel with no section headers, so no .symtab (its program headers still boot it)."""
    data = bytearray(open(firmware.find(kernel), "rb").read())
    if data[4] == 2:                                   # ELFCLASS64: e_shoff at 0x28, e_shnum at 0x3C
        data[0x28:0x30] = bytes(8)
        data[0x3C:0x40] = bytes(4)
    else:                                              # ELFCLASS32: e_shoff at 0x20, e_shnum at 0x30
        data[0x20:0x24] = bytes(4)
        data[0x30:0x34] = bytes(4)
    path = tmp_path / f"{kernel}-stripped.elf"
    path.write_bytes(bytes(data))
    return str(path)


def test_stepper_trace_and_crash_report_name_code(tmp_path, capsys):
    machine, kernel, status, events, out, _ = stepped("evtchn32", "gsi", commands=["n"] * 20)
    cleared = elf_symbol("evtchn32", "upcall_cleared")
    assert f"rip {cleared:#x} <upcall_cleared>" in out
    assert f"at block {cleared:#x} <upcall_cleared>)" in out
    assert " <isr_80>: push 0" in out                              # the handler's first instructions
    report = machine.crash_report()
    assert report[0].startswith("guest at 0x") and " <" in report[0].split(":")[0], report[0]
    r = cli("run", "evtchn32", "--append", "via=gsi", "--trace", "evtchn")
    assert r.returncode == 0, r.stderr
    assert f"read 0 at block {cleared:#x} <upcall_cleared>)" in r.stderr
    # no symbols: bare addresses, as before
    cfg = MachineConfig(cmdline="via=gsi", debugcon="none", trace={"evtchn"})
    machine, _ = boot(cfg, stripped_copy("evtchn32", tmp_path), console=ConsoleSink(None))
    capsys.readouterr()
    assert machine.run() == 0
    err = capsys.readouterr().err
    assert f"read 0 at block {cleared:#x})" in err and "<" not in err


# -- deterministic by default; the small ones ---------------------------------------------------------
def test_step_gives_the_same_bytes_twice():
    keys = "n\n" * 30 + "s\n" * 5 + "i\n" + "c\n"
    first = cli("step", "evtchn64", "--append", "via=gsi", stdin=keys)
    second = cli("step", "evtchn64", "--append", "via=gsi", stdin=keys)
    assert first.returncode == second.returncode == 0, first.stderr
    assert first.stdout.count("== #") >= 20
    assert first.stdout == second.stdout


def test_step_still_takes_the_host_clock():
    r = cli("step", "evtchn64", "--append", "via=gsi", "--clock", "host", stdin="n\n" * 3 + "q\n")
    assert r.returncode == 0 and r.stdout.count("== #") == 4, r.stderr      # the first stop, then 3 keys


def test_help_explains_the_dash_irqs_gsis_and_polls_and_i_has_a_header():
    machine, kernel, status, events, out, _ = stepped("evtchn64", "gsi", commands=["n", "?", "i", "c"])
    assert status == 0
    assert '"-" is "not there"' in out and "unprogrammed pin" in out
    assert "IRQ 0 (the PIT), which reaches GSI 2" in out and "GSI n is IOAPIC pin n" in out
    assert "more block polls than running" in out
    # ... which is so: a stepped instruction is a block of its own, polled (the GSI upcalls below)
    stepping = stepped("evtchn64", "gsi", commands=["n"] * 8 + ["s"] * 30)[0].xen.callback.stats["polls"]
    assert stepping > machine.xen.callback.stats["polls"]
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("-- interrupt state at insn"))
    assert lines[head + 1].split() == ["name", "value"] and lines[head + 2].split()[0] == "cpu.IF"


def test_from_insn_banner_gets_a_line_of_its_own():
    # 21000 instructions in, evtchn64 is in the middle of printing "ok shared_info mapped ..."
    r = cli("step", "evtchn64", "--append", "via=gsi", "--from-insn", "21000", stdin="q\n")
    assert r.returncode == 0, r.stderr
    banner = [line for line in r.stdout.splitlines() if "-- at instruction" in line]
    assert banner == ["-- at instruction 21000: stepping from here (? for keys)"]
    assert "ok shared_info mapped = 0 (e\n-- at instruction" in r.stdout   # it did land mid-line


@pytest.mark.parametrize("bad", ["-5", "lots"])
def test_from_insn_must_be_a_count(bad):
    r = cli("step", "evtchn64", "--from-insn", bad)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--from-insn" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
