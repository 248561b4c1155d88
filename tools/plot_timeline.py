#!/usr/bin/env python3
"""Draw a run record (``xenicorn run --record FILE``) as a timeline PNG.

The x axis is guest instructions executed, so the picture shows interrupt
activity against guest progress, not against host time. Rows, top down:

* the Xen callback line and vCPU0's ``evtchn_upcall_pending``: with
  ``--callback-deassert poll`` the line drops a few instructions after the
  flag, with ``eoi`` only at the handler's EOI. The flag is a byte of guest
  RAM the guest writes without an exit, so the record only *samples* it: at
  every exit and interrupt event, and (poll mode) at every block while the
  line is high; in eoi mode its fall shows at the EOI's exit at the latest;
* every interrupt line that moved (GSIs, ISA IRQs, the 8259's INT output);
* deliveries through the IDT, by vector;
* exits, one row per kind (port I/O, MMIO, hypercalls, ...).

Usage: ``python tools/plot_timeline.py RECORD.jsonl -o timeline.png``
(``--summary`` prints the intervals instead of drawing; needs no matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def load(path: str) -> list[dict]:
    """The records of a JSON-lines file; a bad line is one clear error."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record ({e.msg})") from None
    if not out or out[0].get("kind") != "start":
        raise ValueError(f"{path}: not a xenicorn run record (no start line)")
    return out


def levels(records: list[dict], key: str) -> list[tuple[int, int]]:
    """(insn, value) each time the state field ``key`` changed, from the event diffs."""
    first = records[0].get("state", {}).get(key)
    out = [(0, int(first or 0))]
    for r in records:
        for part in ("guest", "diff"):       # an event's "guest": what the guest did before it
            change = r.get(part, {}).get(key)
            if change is not None:
                out.append((r["insn"], int(change[1] or 0)))
    return out


def intervals(points: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    """[start, stop) instruction intervals where a level was high."""
    out, start = [], None
    for insn, value in points:
        if value and start is None:
            start = insn
        elif not value and start is not None:
            out.append((start, insn))
            start = None
    if start is not None:
        out.append((start, end))
    return out


def timeline(records: list[dict]) -> dict:
    """Everything the picture shows, as data (tests check this)."""
    end = records[-1].get("insn", 0)
    lines: dict[str, list] = defaultdict(lambda: [(0, 0)])
    deliveries, exits = [], defaultdict(list)
    for r in records:
        kind = r.get("kind")
        if kind in ("line-raise", "line-lower", "pic-int", "pic-int-low"):
            name = "8259 INT" if kind.startswith("pic") else r["text"].split()[0]
            lines[name].append((r["insn"], int(kind in ("line-raise", "pic-int"))))
        elif kind == "deliver":
            deliveries.append((r["insn"], r["delivery"]["vector"] if "delivery" in r else -1))
        elif r.get("cat") == "exit":
            exits[kind].append(r["insn"])
    return {
        "end": end,
        "callback": intervals(levels(records, "callback.line"), end),
        "upcall_pending": intervals(levels(records, "vcpu0.upcall_pending"), end),
        "lines": {name: intervals(points, end) for name, points in sorted(lines.items())},
        "deliveries": deliveries,
        "exits": dict(sorted(exits.items())),
    }


def draw(tl: dict, out: str, title: str = "", window: tuple[int, int] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("Xen callback line", tl["callback"], "tab:red"),
            ("vCPU0 upcall_pending\n(as last sampled)", tl["upcall_pending"], "tab:orange")]
    rows += [(name, iv, "tab:blue") for name, iv in tl["lines"].items()]
    fig, (ax_lv, ax_ev) = plt.subplots(2, 1, sharex=True, figsize=(12, 2 + 0.35 * (len(rows) + len(tl["exits"]))),
                                       gridspec_kw={"height_ratios": [max(1, len(rows)), max(1, len(tl["exits"]) + 1)]})
    for y, (_name, iv, color) in enumerate(rows):
        ax_lv.broken_barh([(a, max(b - a, 1)) for a, b in iv], (y - 0.35, 0.7), color=color)
    ax_lv.set_yticks(range(len(rows)), [name for name, _, _ in rows])
    ax_lv.invert_yaxis()
    ax_lv.set_title(title or "interrupt lines while high")
    names = list(tl["exits"])
    for y, name in enumerate(names):
        xs = tl["exits"][name]
        ax_ev.plot(xs, [y] * len(xs), "|", markersize=8, color="tab:gray")
    dy = len(names)
    if tl["deliveries"]:
        xs = [x for x, _ in tl["deliveries"]]
        ax_ev.plot(xs, [dy] * len(xs), "v", color="tab:green")
        for x, v in tl["deliveries"][:40]:
            ax_ev.annotate(f"{v:#x}", (x, dy), textcoords="offset points", xytext=(0, 5), fontsize=6,
                           ha="center")
    ax_ev.set_yticks(range(dy + 1), names + ["IDT delivery"])
    ax_ev.invert_yaxis()
    ax_ev.set_xlabel("guest instructions executed")
    ax_ev.set_xlim(*(window or (0, max(tl["end"], 1))))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("record", help="a file written by xenicorn run --record")
    p.add_argument("-o", "--output", default="timeline.png", help="PNG to write (default timeline.png)")
    p.add_argument("--title", default="")
    p.add_argument("--window", metavar="FIRST:LAST", help="draw only these instruction counts (zoom in)")
    p.add_argument("--summary", action="store_true", help="print the intervals instead of drawing")
    args = p.parse_args(argv)
    window = None
    if args.window:
        try:
            first, last = (int(x, 0) for x in args.window.split(":"))
            if first >= last:
                raise ValueError
            window = (first, last)
        except ValueError:
            print(f"plot_timeline: error: --window {args.window}: expected FIRST:LAST, FIRST < LAST",
                  file=sys.stderr)
            return 2
    try:
        tl = timeline(load(args.record))
    except (OSError, ValueError) as e:
        print(f"plot_timeline: error: {e}", file=sys.stderr)
        return 2
    if args.summary:
        print(f"instructions: {tl['end']}")
        print(f"callback high: {tl['callback']}")
        print(f"upcall_pending high: {tl['upcall_pending']}")
        for name, iv in tl["lines"].items():
            print(f"{name}: {len(iv)} high interval(s)")
        print(f"deliveries: {len(tl['deliveries'])}; exits: "
              + ", ".join(f"{k} {len(v)}" for k, v in tl["exits"].items()))
        return 0
    try:
        draw(tl, args.output, args.title, window)
    except ImportError:
        print("plot_timeline: error: drawing needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
