"""``xenicorn plot`` and the run record it reads.

Two recorded runs of evtchn64 with the callback on GSI 20 (deterministic
clock), one per deassert design. The rows the picture is drawn from must
show the guest's clearing store of ``upcall_pending`` where it happened:
at the handler's ``upcall_clear_store`` (an ELF symbol of the guest), well
before the EOI that drops the line in ``eoi`` mode, one instruction before
the poll drops it in ``poll`` mode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from elftools.elf.elffile import ELFFile

from xenicorn import cli, firmware
from xenicorn.debug import timeline as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = (26000, 27000)          # the first upcall of evtchn64 via=gsi on deterministic time


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """mode -> the path of a ``run --record`` file of evtchn64 via=gsi."""
    out = {}
    for mode in ("poll", "eoi"):
        path = tmp_path_factory.mktemp("rec") / f"{mode}.jsonl"
        r = subprocess.run([sys.executable, "-m", "xenicorn", "run", "evtchn64", "--append", "via=gsi",
                            "--clock", "deterministic", "--callback-deassert", mode, "--record", str(path)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0 and "Test result: SUCCESS" in r.stdout, r.stderr
        out[mode] = str(path)
    return out


def symbol(name: str) -> int:
    with open(firmware.find("evtchn64"), "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


def callback_upcalls(tl: dict) -> list:
    """The upcalls a handler ended (the last one ends with the kernel's switch to another via)."""
    ups = [u for u in tl["upcalls"] if u.why != "via changed"]
    assert len(ups) >= 5
    return ups


def test_eoi_mode_shows_the_clearing_store_before_the_eoi(records):
    tl = T.timeline(T.load(records["eoi"]))
    store = symbol("upcall_clear_store")
    flag = dict(tl["upcall_pending"])                 # rise -> fall of vCPU0's upcall_pending
    for up in callback_upcalls(tl):
        assert up.store_rip == store                  # the handler's store, found by the write watch
        assert up.asserted < up.store < up.eoi == up.deasserted
        assert up.latency == up.deasserted - up.store > 10      # the rest of the handler, up to its EOI
        assert flag[up.asserted] == up.store          # the flag's row falls at the store, not at the EOI
        assert "EOI at IOAPIC pin 20, upcall_pending 0" in up.why
        assert (up.asserted, up.deasserted) in tl["remote_irr"][20]   # Remote IRR: message to EOI
    assert tl["upcall_exact"] and tl["if_exact"]
    # without the guest's records (an older record) the flag is only sampled: it seems to fall at the EOI
    sampled = T.timeline([r for r in T.load(records["eoi"]) if r["cat"] != "guest"])
    first = callback_upcalls(tl)[0]
    assert not sampled["upcall_exact"] and dict(sampled["upcall_pending"])[first.asserted] == first.eoi


def test_poll_mode_drops_the_line_at_the_block_after_the_store(records):
    tl = T.timeline(T.load(records["poll"]))
    for up in callback_upcalls(tl):
        assert up.store_rip == symbol("upcall_clear_store")
        assert up.latency == 1                        # the store's block ends with one jmp; the poll is next
        assert "upcall_pending read 0 at block" in up.why
        assert up.deasserted < up.eoi                 # the EOI comes later and changes nothing
        assert up.asserted in [a for a, _ in tl["remote_irr"][20]]


def test_rows_follow_the_path_in_a_window(records):
    tl = T.view(T.timeline(T.load(records["eoi"])), WINDOW)
    names = [row.name for row in T.rows(tl)]
    assert names == ["vCPU0 upcall_pending\n(exact)", "Xen callback line", "GSI20", "IOAPIC pin 20\nRemote IRR",
                     "LAPIC ISR", "vCPU0 RFLAGS.IF\n(at block starts)"]
    (up,) = tl["upcalls"]
    rows = {row.name: row.intervals for row in T.rows(tl)}
    assert rows["LAPIC ISR"] == [(up.asserted, up.eoi)]
    # IF drops with the delivery and comes back at the handler's IRET, after the EOI
    (delivered, vector), = tl["deliveries"]
    assert vector == 0x50 and delivered == up.asserted
    off = [b for a, b in rows["vCPU0 RFLAGS.IF\n(at block starts)"] if b < WINDOW[1]]
    back = [a for a, b in rows["vCPU0 RFLAGS.IF\n(at block starts)"] if a > WINDOW[0]]
    assert off == [delivered] and up.eoi < back[0] < up.eoi + 40
    assert [who for _, who, _ in tl["eois"]] == ["LAPIC", "IOAPIC"]
    assert [text for _, text in tl["phases"]] == ["ok bind_ipi(vCPU 0) = 0 (expected 0)"]


def test_plot_writes_a_png(records, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    assert cli.main(["plot", records["eoi"], "-o", str(png), "--window", f"{WINDOW[0]}:{WINDOW[1]}"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert capsys.readouterr().out == f"wrote {png}\n"
    whole = tmp_path / "whole.png"
    assert cli.main(["plot", records["poll"], "-o", str(whole), "--title", "all of it"]) == 0
    assert whole.stat().st_size > 10_000
    capsys.readouterr()
    assert cli.main(["plot", records["poll"], "-o", str(tmp_path / "no" / "such.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No such file or directory" in err


def test_summary_honours_the_window(records, capsys):
    assert cli.main(["plot", records["eoi"], "--summary"]) == 0
    whole = capsys.readouterr().out.splitlines()
    assert cli.main(["plot", records["eoi"], "--summary", "--window", f"{WINDOW[0]}:{WINDOW[1]}"]) == 0
    part = capsys.readouterr().out.splitlines()
    end = T.timeline(T.load(records["eoi"]))["end"]
    assert whole[0].startswith(f"instructions 0-{end} (clock deterministic)")
    assert part[0] == f"instructions {WINDOW[0]}-{WINDOW[1]} of {end} (clock deterministic)"
    assert sum(line.startswith("upcall asserted") for line in whole) >= 6
    upcalls = [line for line in part if line.startswith("upcall asserted")]
    assert len(upcalls) == 1 and "48 instructions after the store" in upcalls[0]
    assert [line for line in part if line.startswith("guest at")] == \
        ["guest at 26596: ok bind_ipi(vCPU 0) = 0 (expected 0)"]
    assert "Xen callback line high: 1 interval(s): 26626-26708" in part
    assert "EOIs: 2 (LAPIC 1, IOAPIC 1)" in part


def test_without_matplotlib_one_line_names_the_extra(records, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    png = tmp_path / "t.png"
    assert cli.main(["plot", records["poll"], "-o", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xenicorn: error:") and 'pip install "xenicorn[plot]"' in err
    assert not png.exists()
    assert cli.main(["plot", records["poll"], "--summary"]) == 0     # the summary needs nothing
    assert capsys.readouterr().out.startswith("instructions 0-")


@pytest.mark.parametrize("args, says", [
    (["--window", "5:3"], "0 <= FIRST < LAST"),
    (["--window", "abc"], "expected FIRST:LAST"),
    (["--window", "999999999:1000000000"], "the record ends at instruction"),
])
def test_bad_windows_are_one_line(records, capsys, args, says):
    assert cli.main(["plot", records["poll"], "--summary", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


def test_bad_records_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    missing = tmp_path / "missing.jsonl"
    other = tmp_path / "other.jsonl"
    other.write_text('{"kind": "exit", "insn": 3}\n')
    for path, says in ((bad, "not a JSON record"), (missing, "No such file"), (other, "no start line")):
        assert cli.main(["plot", str(path), "--summary"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "Traceback" not in err


def test_the_store_watch_follows_a_registered_vcpu_info():
    """xencore64 moves vCPU 0's vcpu_info (VCPUOP_register_vcpu_info): the watch moves with it."""
    import io
    from xenicorn.boot import boot
    from xenicorn.devices.console import ConsoleSink
    from xenicorn.debug.stepper import OBSERVED, JsonLines
    from xenicorn.machine.machine import MachineConfig
    machine, _ = boot(MachineConfig(debugcon="none", clock="deterministic", count_instructions=True,
                                    observe=set(OBSERVED)), firmware.find("xencore64"), console=ConsoleSink(None))
    out = io.StringIO()
    record = JsonLines(machine, out, exits=True)
    places = []
    follow = record.guest.follow

    def noting():
        follow()
        if not places or places[-1] != record.guest.gpa:
            places.append(record.guest.gpa)
    record.guest.follow = noting
    assert machine.run() == 0
    info = machine.xen.vcpu_info(0)
    shared = machine.xen.state.shared_info_gpa
    assert places == [None, shared, info.gpa] and info.gpa != shared   # none, shared_info, the registered page
    record.close()
    assert record.guest.gpa is None and record.guest not in machine.agents
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert any(r["kind"] == "console" and r["text"] == "ok register_vcpu_info = 0 (expected 0)" for r in lines)
