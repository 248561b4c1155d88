"""``xenicorn plot``: draw a run record as a timeline PNG, or summarize it as text.

A run record (``xenicorn run --record FILE``) has every exit and interrupt
event of a run, plus the guest's stores to ``upcall_pending``, RFLAGS.IF at
block starts and the guest's console lines (:mod:`~xenicorn.debug.timeline`
says which rows are exact and which sampled). The picture puts them on one
x axis, guest instructions executed, so it shows the order of things inside
one upcall -- Xen sets the flag and raises the line, the IOAPIC sets Remote
IRR, the LAPIC's ISR takes the vector, IF drops, the handler's store clears
the flag, the EOI -- rather than host time.

Top panel, the levels along the interrupt's path (a bar where high): vCPU 0's
``upcall_pending``, the Xen callback line, each interrupt line that moved,
IOAPIC Remote IRR for each pin that used it, the 8259s' and the LAPIC's
ISR, RFLAGS.IF. A star marks each store that cleared ``upcall_pending``, and
an arrow from it to the line's fall gives the deassert latency in guest
instructions: one or two with ``--callback-deassert poll``, the rest of the
handler (up to its EOI) with ``eoi``. Bottom panel, the instants: EOIs by
controller, deliveries through the IDT by vector, exits by kind. The guest's
console lines (the test kernels' ``ok ...`` checks) are labels along the top:
the phases of the run.

Drawing needs matplotlib, the ``plot`` extra (``pip install "xenicorn[plot]"``);
``--summary`` prints the same rows as text and needs nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

from .timeline import load, parse_window, rows, summary, timeline, view

INSTALL = 'pip install "xenicorn[plot]"'
MAX_PHASE_LABELS = 60            # more console lines than this in view: every n-th is labelled
MAX_LATENCY_LABELS = 16          # upcalls annotated with their deassert latency
# a colour per kind of state (the legend's level entries), in row order
COLORS = {"guest RAM flag": "tab:orange", "Xen's level line": "tab:red", "interrupt line": "tab:blue",
          "controller state": "tab:purple", "CPU flag": "tab:green"}
EOI_MARKERS = {"LAPIC": "o", "IOAPIC": "s", "8259": "D"}


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display); PlotUnavailable without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(f"drawing needs matplotlib: {INSTALL} (--summary needs nothing)") from None
    return plt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("record", help="a file written by xenicorn run --record")
    p.add_argument("-o", "--output", default="timeline.png",
                   help="the picture to write: PNG (default timeline.png), or SVG/PDF by the name's ending")
    p.add_argument("--title", default="", help="the picture's title (default: the record's name and window)")
    p.add_argument("--window", metavar="FIRST:LAST", help="only these instruction counts (zoom in)")
    p.add_argument("--summary", action="store_true", help="print the rows as text instead of drawing")


def main(args: argparse.Namespace) -> int:
    """The subcommand: 0 on success, 2 with one line on bad input or without matplotlib."""
    try:
        window = parse_window(args.window) if args.window else None
        plt = None if args.summary else pyplot()
        tl = timeline(load(args.record))
        if window is not None and window[0] > tl["end"]:
            raise ValueError(f"--window {args.window}: the record ends at instruction {tl['end']}")
        shown = view(tl, window)
        if args.summary:
            print("\n".join(summary(shown)))
            return 0
        title = args.title or f"{os.path.basename(args.record)}: guest instructions " \
                              f"{window[0] if window else 0}-{window[1] if window else tl['end']}"
        draw(plt, shown, args.output, title, window)
    except (OSError, ValueError, PlotUnavailable) as e:
        text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"xenicorn: error: {text}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------
def draw(plt, tl: dict, out: str, title: str, window: tuple[int, int] | None = None) -> None:
    """Write the picture of ``tl`` (a :func:`~xenicorn.debug.timeline.timeline`, maybe cut by ``view``)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    lo, hi = window or (0, max(tl["end"], 1))
    levels = rows(tl)
    eoi_rows = [who for who in EOI_MARKERS if any(w == who for _, w, _ in tl["eois"])]
    events = ["clearing store"] + [f"{who} EOI" for who in eoi_rows] + ["IDT delivery"] + list(tl["exits"])
    n_lv, n_ev = len(levels), len(events)
    fig, (ax_ph, ax_lv, ax_ev) = plt.subplots(
        3, 1, sharex=True, figsize=(13, 2.6 + 0.42 * (n_lv + n_ev)),
        gridspec_kw={"height_ratios": [2.2, n_lv, n_ev + 0.5]})
    _phases(ax_ph, tl, lo, hi)
    fig.suptitle(title)
    for y, row in enumerate(levels):
        ax_lv.broken_barh([(a, max(b - a, (hi - lo) / 2000)) for a, b in row.intervals], (y - 0.35, 0.7),
                          color=COLORS[row.what])
    ax_lv.set_yticks(range(n_lv), [row.name for row in levels], fontsize=8)
    ax_lv.set_ylim(n_lv - 0.5, -0.5)
    _latencies(ax_lv, tl, levels)
    _instants(ax_ev, tl, eoi_rows)
    ax_ev.set_yticks(range(n_ev), events, fontsize=8)
    ax_ev.set_ylim(n_ev - 0.5, -0.7)
    ax_ev.set_xlabel("guest instructions executed")
    ax_ev.set_xlim(lo, hi)
    for ax in (ax_ph, ax_lv, ax_ev):              # the console lines cross every panel
        for insn, _ in tl["phases"]:
            ax.axvline(insn, color="0.75", linewidth=0.6, linestyle=":", zorder=0)
    handles = [Patch(color=c, label=f"high: {what}") for what, c in COLORS.items()]
    handles += [Line2D([], [], color="black", marker="*", linestyle="", markersize=9,
                       label="guest store clearing upcall_pending"),
                Line2D([], [], color="black", linewidth=1, label="store -> line drop (deassert latency)")]
    handles += [Line2D([], [], color="tab:brown", marker=m, linestyle="", label=f"{who} EOI")
                for who, m in EOI_MARKERS.items()]
    handles += [Line2D([], [], color="tab:green", marker="v", linestyle="", label="IDT delivery (vector)"),
                Line2D([], [], color="tab:gray", marker="|", linestyle="", markersize=9, label="exit"),
                Line2D([], [], color="0.6", linestyle=":", label="guest console line")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.98))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _phases(ax, tl: dict, lo: int, hi: int) -> None:
    """The guest's console lines as labels where it printed them."""
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    phases = tl["phases"]
    step = max(1, -(-len(phases) // MAX_PHASE_LABELS))
    for insn, text in phases[::step]:
        short = text if len(text) <= 44 else text[:43] + "..."
        ax.text(insn, 0.02, short, rotation=90, fontsize=6 if len(phases) > 8 else 7, va="bottom", ha="center",
                color="0.25")
    ax.set_ylim(0, 1)
    if not phases:
        ax.text(lo + (hi - lo) * 0.005, 0.1, "(no console line printed in this window)", fontsize=7, color="0.4")
    ax.set_ylabel("guest\nprints", fontsize=8, rotation=0, ha="right", va="center")


def _latencies(ax, tl: dict, levels: list) -> None:
    """A star at each clearing store (flag row) and an arrow from it to the line's fall (callback row)."""
    flag = 0
    line = next(i for i, row in enumerate(levels) if row.what == "Xen's level line")
    clears = [insn for insn, _rip, _old, new in tl["stores"] if new == 0]
    if clears:
        ax.plot(clears, [flag] * len(clears), "*", color="black", markersize=9, zorder=3)
    shown = [u for u in tl["upcalls"] if u.latency is not None][:MAX_LATENCY_LABELS]
    for up in shown:
        ax.annotate("", xy=(up.deasserted, line), xytext=(up.store, flag),
                    arrowprops={"arrowstyle": "->", "color": "black", "linewidth": 0.8})
        ax.annotate(f"{up.latency} insn", (up.deasserted, line), textcoords="offset points", xytext=(3, 6),
                    fontsize=7)


def _instants(ax, tl: dict, eoi_rows: list[str]) -> None:
    """Bottom panel, one row each: clearing stores, EOIs by controller, IDT deliveries, exits by kind."""
    clears = [insn for insn, _rip, _old, new in tl["stores"] if new == 0]
    ax.plot(clears, [0] * len(clears), "*", color="black", markersize=8)
    for y, who in enumerate(eoi_rows, start=1):
        xs = [insn for insn, w, _ in tl["eois"] if w == who]
        ax.plot(xs, [y] * len(xs), EOI_MARKERS[who], color="tab:brown", markersize=5)
    dy = 1 + len(eoi_rows)
    xs = [x for x, _ in tl["deliveries"]]
    ax.plot(xs, [dy] * len(xs), "v", color="tab:green")
    for x, v in tl["deliveries"][:40]:
        ax.annotate(f"{v:#x}", (x, dy), textcoords="offset points", xytext=(0, 5), fontsize=6, ha="center")
    for y, (_kind, insns) in enumerate(tl["exits"].items(), start=dy + 1):
        ax.plot(insns, [y] * len(insns), "|", markersize=8, color="tab:gray")
