"""The stepper's live state panel (xenicorn/debug/panel.py) on a real stepping session.

evtchn32 with the GSI callback is stepped as ``tools/step_panel_svg.py``
does, to the stop after the first upcall's IDT delivery: the panel must
show the whole path lit (port 3 pending, upcall_pending 1, the line high,
pin 20 with its input high and Remote IRR set, 0x50 in the LAPIC's ISR
and PPR) and highlight what changed since the previous stop. Then the CLI:
``--panel`` draws it into a pipe, the default (stdout not a terminal) and
``--no-panel`` leave the stepper's plain text as it was.
"""
import io
import os
import subprocess
import sys

from rich.console import Console

from xenicorn.debug import panel as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import step_panel_svg  # noqa: E402


def rows(state, section):
    return {r[0]: r[1:] for r in state[section]}


def test_the_panel_at_the_first_delivery_shows_the_whole_path(tmp_path):
    live, text = step_panel_svg.session("evtchn32", "gsi", until="deliver")
    state = live.previous
    ev = rows(state, "Xen: events (vCPU 0)")
    assert ev["pending"] == ("3",) and ev["upcall_pending"] == ("1",) and ev["masked"] == ("-",)
    assert ev["callback via"] == ("GSI 20",) and ev["callback line"] == ("HIGH",)
    assert rows(state, "IOAPIC")["20"] == ("0x50", "level", "-", "HIGH", "SET")
    lapic = rows(state, "LAPIC 0")
    assert lapic["ISR"] == ("0x50",) and lapic["IRR"] == ("-",) and lapic["PPR"] == ("0x50",)
    assert lapic["RFLAGS.IF"] == ("0",) and lapic["LINT0"] == ("ExtINT",)
    assert rows(state, "8259s")["IMR"] == ("all", "all")
    # the stepper's own text is there too, up to the delivery
    assert "callback GSI 20 asserted" in text and "[deliver]" in text
    # rendered: the row of pin 20 reads as a person sees it
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(live.last_render)
    lines = console.export_text().splitlines()
    assert any(" Remote IRR" in line for line in lines)
    pin20 = [line for line in lines if " 20    0x50 " in line]
    assert len(pin20) == 1 and pin20[0].split()[-2:] == ["SET", "│"], pin20
    # the SVG the README shows is made by the same renderer
    step_panel_svg.main(["--out", str(tmp_path / "p.svg")])
    svg = (tmp_path / "p.svg").read_text()
    assert svg.startswith("<svg") and "Remote&#160;IRR" in svg


def test_changed_cells_are_highlighted_and_only_those():
    before = {"LAPIC 0": [("IRR", "0x50"), ("ISR", "-")], "IOAPIC": [("20", "0x50", "level", "-", "HIGH", "-")]}
    after = {"LAPIC 0": [("IRR", "-"), ("ISR", "-")], "IOAPIC": [("20", "0x50", "level", "-", "HIGH", "SET")]}
    panel = P.build(after, before, "t")
    grid = panel.renderable
    right = grid.columns[1]._cells[0].renderables              # the Group of the non-Xen tables
    styles = {}
    for table in right:
        for col in table.columns[1:]:
            for row, cell in zip(table.columns[0]._cells, col._cells, strict=True):
                styles[(table.title, str(row), col.header, str(cell))] = cell.style
    assert styles[("LAPIC 0", "IRR", "", "-")] == P.CHANGED
    assert styles[("LAPIC 0", "ISR", "", "-")] == ""
    assert styles[("IOAPIC", "20", "Remote IRR", "SET")] == P.CHANGED
    assert styles[("IOAPIC", "20", "input", "HIGH")] == ""
    # the first draw has nothing to compare with: nothing highlighted
    first = P.build(after, None, "t").renderable.columns[1]._cells[0].renderables
    assert all(c.style == "" for t in first for col in t.columns[1:] for c in col._cells)


def step_cli(*extra):
    keys = "n\n" * 12
    r = subprocess.run([sys.executable, "-m", "xenicorn", "step", "evtchn32", "--append", "via=gsi",
                        "--clock", "deterministic", "--max-insns", "60000", *extra],
                       input=keys, capture_output=True, text=True, cwd=ROOT, timeout=100)
    return r.stdout


def test_cli_panel_only_when_asked_or_on_a_terminal():
    with_panel = step_cli("--panel")
    assert "Remote IRR" in with_panel and "interrupt state at insn" in with_panel
    plain = step_cli()                                   # stdout is a pipe: plain text
    assert "Remote IRR" not in plain and "╭" not in plain
    assert step_cli("--no-panel") == plain
    # the panel adds to the text, it removes nothing
    assert [ln for ln in with_panel.splitlines() if ln.startswith("== #")] == \
        [ln for ln in plain.splitlines() if ln.startswith("== #")]


def test_cli_panel_is_on_by_default_on_a_terminal():
    """stdout a terminal (a pty), keys from a pipe: the panel is drawn without --panel."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "xenicorn", "step", "evtchn32", "--append", "via=gsi",
                          "--clock", "deterministic", "--max-insns", "30000"],
                         stdin=subprocess.PIPE, stdout=slave, stderr=slave, cwd=ROOT)
    os.close(slave)
    p.stdin.write(b"n\n" * 12)
    p.stdin.close()
    out = b""
    while True:                         # read until the child closes the terminal (EIO on Linux)
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(timeout=100) == 124                  # --max-insns ran out, as asked
    text = out.decode("utf-8", "replace")
    assert "Remote IRR" in text and "interrupt state at insn" in text and "== #1 [via]" in text
