"""A run record as a timeline: what ``xenicorn plot`` draws, as data.

``xenicorn run --record FILE`` writes one JSON object per line: every exit,
every interrupt event with the state it changed (``diff``), and what the
guest did in between (:mod:`~xenicorn.debug.guestwatch`: its stores to
``upcall_pending``, its console lines). Each carries ``insn``, the guest
instructions executed so far, so the x axis of the timeline is guest
progress, not host time. This module turns the records into rows --
intervals where a level was high, instants where something happened --
with no drawing library, so the summary and the tests need no matplotlib.

What is exact and what is sampled matters for reading the picture:

* Device state (the callback line, IOAPIC Remote IRR, the LAPIC's and the
  8259s' ISR, interrupt lines) changes only inside the platform, at events
  the record sees: exact.
* ``upcall_pending`` is guest RAM. Xen's sets are events (exact); the guest's
  clearing store is recorded by a write watch (exact, ``upcall-store``).
  A record without those (an older one) only *samples* the flag at exits
  and events, and the row says so.
* RFLAGS.IF changes at CLI/STI/POPF/IRET without an exit. The record looks
  at it at every block start (``if`` records): IRET, STI and POPF end a
  translated block, so their change shows at the next instruction; a CLI
  shows at the end of its block. Without those records: sampled.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass

EOI_KINDS = {"lapic-eoi": "LAPIC", "ioapic-eoi": "IOAPIC", "pic-eoi": "8259"}
_REMOTE_IRR = re.compile(r"ioapic\.pin(\d+)\.remote_irr$")


def load(path: str) -> list[dict]:
    """The records of a JSON-lines file; a bad line is one clear error (ValueError)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("insn", 0), int):
                raise ValueError(f"{path}:{n}: not a xenicorn record (no instruction count)")
            out.append(rec)
    if not out or out[0].get("kind") != "start":
        raise ValueError(f"{path}: not a xenicorn run record (no start line)")
    return out


def parse_window(text: str) -> tuple[int, int]:
    """``FIRST:LAST`` instruction counts (FIRST < LAST), or ValueError with the reason."""
    try:
        first, last = (int(x, 0) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--window {text}: expected FIRST:LAST, two instruction counts") from None
    if not 0 <= first < last:
        raise ValueError(f"--window {text}: expected 0 <= FIRST < LAST")
    return first, last


def _changes(r: dict) -> dict:
    """A record's state changes: the guest's since the last stop (``guest``), then the event's own (``diff``)."""
    return {**r.get("guest", {}), **r.get("diff", {})}


def levels(records: list[dict], key: str, value=bool) -> list[tuple[int, int]]:
    """(insn, 0 or 1) each time the state field ``key`` changed, from the diffs (``value`` judges high)."""
    out = [(0, int(value(records[0].get("state", {}).get(key) or 0)))]
    for r in records:
        change = _changes(r).get(key)
        if change is not None:
            out.append((r["insn"], int(value(change[1] or 0))))
    return out


def intervals(points: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    """[start, stop) instruction intervals where a level was high."""
    out, start = [], None
    for insn, high in points:
        if high and start is None:
            start = insn
        elif not high and start is not None:
            out.append((start, insn))
            start = None
    if start is not None:
        out.append((start, end))
    return out


def clip(ivs: list[tuple[int, int]], window: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The parts of intervals inside ``window`` (an instant interval ``(a, a)`` counts when a is inside)."""
    if window is None:
        return list(ivs)
    lo, hi = window
    return [(max(a, lo), min(b, hi)) for a, b in ivs if a <= hi and b >= lo and (b > lo or a == b == lo)]


@dataclass
class Upcall:
    """One assertion of the level callback line, and what ended it."""

    asserted: int                      # insn: Xen set upcall_pending and raised the line
    deasserted: int | None             # insn the line dropped (None: still high at the end)
    why: str                           # the deassert's reason, as the trace gives it
    store: int | None = None           # insn of the guest store that cleared upcall_pending
    store_rip: int | None = None       # ... and its address
    eoi: int | None = None             # the first EOI at or after the store (LAPIC, IOAPIC or 8259)

    @property
    def latency(self) -> int | None:
        """Guest instructions from the clearing store to the line dropping: the deassert latency."""
        if self.store is None or self.deasserted is None:
            return None
        return self.deasserted - self.store


def _upcalls(records: list[dict], stores: list[dict], eois: list[tuple[int, str, str]]) -> list[Upcall]:
    out: list[Upcall] = []
    for r in records:
        if r.get("cat") != "evtchn":
            continue
        if r.get("kind") == "assert":
            out.append(Upcall(r["insn"], None, ""))
        elif r.get("kind") == "deassert" and out and out[-1].deasserted is None:
            out[-1].deasserted = r["insn"]
            m = re.search(r"\((.*)\)\s*$", r.get("text", ""))
            out[-1].why = m.group(1) if m else ""
    for i, up in enumerate(out):
        stop = up.deasserted if up.deasserted is not None else float("inf")
        clears = [s for s in stores if s["new"] == 0 and up.asserted <= s["insn"] <= stop]
        if clears:
            up.store, up.store_rip = clears[-1]["insn"], clears[-1].get("rip")
        after = up.store if up.store is not None else up.asserted
        limit = out[i + 1].asserted if i + 1 < len(out) else float("inf")
        up.eoi = next((insn for insn, _, _ in eois if after <= insn < limit), None)
    return out


def timeline(records: list[dict]) -> dict:
    """Everything the picture shows, as data (the summary prints it, the tests check it)."""
    end = records[-1].get("insn", 0)
    lines: dict[str, list] = defaultdict(lambda: [(0, 0)])
    deliveries, exits = [], defaultdict(list)
    eois, phases, stores = [], [], []
    start = records[0].get("state", {})
    pending = [(0, int(bool(start.get("vcpu0.upcall_pending"))))]
    cpu_if, if_seen = [(0, int(bool(start.get("cpu.IF"))))], False
    for r in records:
        kind, cat = r.get("kind"), r.get("cat")
        diff = _changes(r)
        if "vcpu0.upcall_pending" in diff:            # Xen's set (exact) or a sample at an exit
            pending.append((r["insn"], int(bool(diff["vcpu0.upcall_pending"][1]))))
        if "cpu.IF" in diff:                          # a delivery (exact) or a sample
            cpu_if.append((r["insn"], int(bool(diff["cpu.IF"][1]))))
        if cat == "guest" and kind == "upcall-store":  # the guest's own store (exact)
            stores.append(r)
            pending.append((r["insn"], int(bool(r["new"]))))
        elif cat == "guest" and kind == "if":         # seen at a block start
            if_seen = True
            cpu_if.append((r["insn"], int(bool(r["new"]))))
        elif cat == "guest" and kind == "console":
            phases.append((r["insn"], r["text"]))
        elif kind in ("line-raise", "line-lower", "pic-int", "pic-int-low"):
            name = "8259 INT" if kind.startswith("pic") else r["text"].split()[0]
            lines[name].append((r["insn"], int(kind in ("line-raise", "pic-int"))))
        elif kind == "deliver":
            deliveries.append((r["insn"], r["delivery"]["vector"] if "delivery" in r else -1))
        elif kind in EOI_KINDS:
            eois.append((r["insn"], EOI_KINDS[kind], r.get("text", "")))
        elif cat == "exit":
            exits[kind].append(r["insn"])
    pins = sorted({int(m.group(1)) for r in records for k in _changes(r)
                   if (m := _REMOTE_IRR.match(k))})
    pic_isr = _merge_levels(records, ("pic.master.isr", "pic.slave.isr"))
    return {
        "end": end,
        "clock": records[0].get("clock", ""),
        "callback": intervals(levels(records, "callback.line"), end),
        "upcall_pending": intervals(pending, end),
        "upcall_exact": bool(stores),
        "stores": [(s["insn"], s.get("rip"), s["old"], s["new"]) for s in stores],
        "upcalls": _upcalls(records, stores, eois),
        "remote_irr": {pin: intervals(levels(records, f"ioapic.pin{pin}.remote_irr"), end) for pin in pins},
        "lapic_isr": intervals(levels(records, "lapic.isr"), end),
        "pic_isr": intervals(pic_isr, end),
        "cpu_if": intervals(cpu_if, end),
        "if_exact": if_seen,
        "lines": {name: intervals(points, end) for name, points in sorted(lines.items())},
        "eois": eois,
        "deliveries": deliveries,
        "exits": dict(sorted(exits.items())),
        "phases": phases,
    }


def _merge_levels(records: list[dict], keys: tuple[str, ...]) -> list[tuple[int, int]]:
    """Points where any of ``keys`` is nonzero (the two 8259s' ISRs as one row)."""
    now = {k: records[0].get("state", {}).get(k) or 0 for k in keys}
    out = [(0, int(any(now.values())))]
    for r in records:
        diff = _changes(r)
        if any(k in diff for k in keys):
            for k in keys:
                if k in diff:
                    now[k] = diff[k][1] or 0
            out.append((r["insn"], int(any(now.values()))))
    return out


# ---------------------------------------------------------------------------
# rows, in the order the interrupt travels
# ---------------------------------------------------------------------------
@dataclass
class Row:
    """One row of the picture: a level (intervals where high) with its legend entry."""

    name: str
    intervals: list[tuple[int, int]]
    what: str                          # the legend's entry: which kind of state this is


def rows(tl: dict) -> list[Row]:
    """The level rows, top down along the path: flag, line, controllers, CPU."""
    exact = "exact" if tl["upcall_exact"] else "sampled"
    out = [Row(f"vCPU0 upcall_pending\n({exact})", tl["upcall_pending"], "guest RAM flag"),
           Row("Xen callback line", tl["callback"], "Xen's level line")]
    out += [Row(name, iv, "interrupt line") for name, iv in tl["lines"].items()]
    out += [Row(f"IOAPIC pin {pin}\nRemote IRR", iv, "controller state") for pin, iv in tl["remote_irr"].items()]
    if tl["pic_isr"]:
        out.append(Row("8259 ISR", tl["pic_isr"], "controller state"))
    out.append(Row("LAPIC ISR", tl["lapic_isr"], "controller state"))
    out.append(Row("vCPU0 RFLAGS.IF\n" + ("(at block starts)" if tl["if_exact"] else "(sampled)"), tl["cpu_if"],
                   "CPU flag"))
    return out


def view(tl: dict, window: tuple[int, int] | None) -> dict:
    """The timeline cut to ``window`` (instruction counts): intervals clipped, instants inside kept."""
    if window is None:
        return tl
    lo, hi = window

    def inside(insn) -> bool:
        return lo <= insn <= hi
    return {
        **tl,
        "window": window,
        "callback": clip(tl["callback"], window),
        "upcall_pending": clip(tl["upcall_pending"], window),
        "stores": [s for s in tl["stores"] if inside(s[0])],
        "upcalls": [u for u in tl["upcalls"] if u.asserted <= hi and (u.deasserted is None or u.deasserted >= lo)],
        "remote_irr": {pin: iv for pin, ivs in tl["remote_irr"].items() if (iv := clip(ivs, window))},
        "lapic_isr": clip(tl["lapic_isr"], window),
        "pic_isr": clip(tl["pic_isr"], window),
        "cpu_if": clip(tl["cpu_if"], window),
        "lines": {name: iv for name, ivs in tl["lines"].items() if (iv := clip(ivs, window))},
        "eois": [e for e in tl["eois"] if inside(e[0])],
        "deliveries": [d for d in tl["deliveries"] if inside(d[0])],
        "exits": {k: xs for k, v in tl["exits"].items() if (xs := [x for x in v if inside(x)])},
        "phases": [p for p in tl["phases"] if inside(p[0])],
    }


def _spans(ivs: list[tuple[int, int]], most: int = 6) -> str:
    shown = ", ".join(f"{a}-{b}" for a, b in ivs[:most])
    more = f", ... ({len(ivs) - most} more)" if len(ivs) > most else ""
    return f"{len(ivs)} interval(s){': ' if ivs else ''}{shown}{more}"


def summary(tl: dict) -> list[str]:
    """The timeline (or its window, see :func:`view`) as text lines: ``xenicorn plot --summary``."""
    lo, hi = tl.get("window", (0, tl["end"]))
    out = [f"instructions {lo}-{hi}" + (f" of {tl['end']}" if "window" in tl else "")
           + (f" (clock {tl['clock']})" if tl["clock"] else "")]
    for row in rows(tl):
        out.append(f"{row.name.replace(chr(10), ' ')} high: {_spans(row.intervals)}")
    for up in tl["upcalls"]:
        store = f"cleared by the store at {up.store}" + (f" (rip {up.store_rip:#x})" if up.store_rip is not None
                                                          else "") if up.store is not None else "no clearing store"
        eoi = f", EOI at {up.eoi}" if up.eoi is not None else ""
        end = (f"deasserted at {up.deasserted} ({up.why})" if up.deasserted is not None else "still asserted")
        lat = f": {up.latency} instructions after the store" if up.latency is not None else ""
        out.append(f"upcall asserted at {up.asserted}, {store}{eoi}, {end}{lat}")
    kinds = defaultdict(int)
    for _, who, _ in tl["eois"]:
        kinds[who] += 1
    out.append(f"EOIs: {len(tl['eois'])}" + (" (" + ", ".join(f"{k} {n}" for k, n in kinds.items()) + ")"
                                             if kinds else ""))
    out.append(f"deliveries: {len(tl['deliveries'])}; exits: "
               + (", ".join(f"{k} {len(v)}" for k, v in tl["exits"].items()) or "none"))
    out += [f"guest at {insn}: {text}" for insn, text in tl["phases"]]
    return out
