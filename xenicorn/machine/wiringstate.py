"""The machine's own part of a snapshot: the wiring between its devices.

Devices save their registers themselves; what belongs to no device is the
PC's wiring, which :mod:`xenicorn.machine.wiring` builds:

=================  ==========================================================
field              why it is state
=================  ==========================================================
lines              the level of every interrupt line and sub-line (ISA IRQs,
                   8259 inputs, GSIs, PIRQs), its rising-edge count, and for
                   a shared (wired-OR) line the level of each source
pirq_routes        which ISA IRQ each PCI PIRQ was last routed to by the
                   PIIX3 (its line there is lowered when the route moves)
pirq_levels        the last level of each PIRQ line
exit_counts        exits handled, by kind (statistics)
=================  ==========================================================

Levels are restored, never re-driven: the devices at both ends of a line
have their own records, with the edge already latched or the request
already delivered. The checks are the wiring's invariants: a shared line
is high exactly while one of its sources is, and a source's sub-line has
the level its shared line records for it.

The tables come from :class:`~xenicorn.machine.wiring.InterruptWiring`;
the exit counts from the machine's dispatcher.
"""
from __future__ import annotations

import re

from ..devices.irq import IrqLine, SharedLine
from ..records import RecordError, boolean, counters, field, flag, integer, listing, make_record, open_record

# Sub-lines the machine makes on demand: 8259 input n from a source, and an
# ISA GSI from a PIRQ the PIIX3 routes there (the "isa" PCI wiring).
SOURCES = {"isa", "xen-callback", "hpet"} | {f"pirq{x}" for x in "ABCD"} | {f"isa{n}" for n in range(16)}
_SUBLINE = re.compile(r"(PIC|GSI)(\d+)<-(.+)")


def machine_lines(machine) -> dict[str, IrqLine]:
    """Every interrupt line and sub-line the machine holds, by name.

    A shared line's sub-lines are held by their drivers (the ISA IRQ lines'
    sinks, the PIRQ and 8259-input tables); the Xen callback's own GSI
    sub-line is the callback's to save.
    """
    m = machine
    lines: dict[str, IrqLine] = {}
    for line in m.wiring.lines() + list(m.wiring.pirq_gsi) + list(m.wiring.pic_sources.values()):
        lines[line.name] = line
    for line in m.isa_irq:
        for sink in line.sinks:
            sub = getattr(sink, "__self__", None)
            if isinstance(sub, IrqLine):
                lines[sub.name] = sub
    return lines


class WiringRecord:
    """Saves and restores a machine's wiring (see the module table)."""

    RECORD = ("machine-wiring", 1)

    def __init__(self, machine):
        self.machine = machine

    def save_record(self) -> dict:
        m = self.machine
        lines = {}
        for name, line in machine_lines(m).items():
            d = {"level": line.level, "edges": line.edges}
            if isinstance(line, SharedLine):
                d["sources"] = dict(line.sources)
            lines[name] = d
        return make_record(*self.RECORD, {"lines": lines, "pirq_routes": list(m.wiring.pirq_pic),
                                          "pirq_levels": list(m.wiring.pirq_level), "exit_counts": dict(m.exit_counts)})

    def check_record(self, record: dict):
        st = open_record(record, *self.RECORD)
        routes = listing(st, "pirq_routes", 4)
        levels = listing(st, "pirq_levels", 4)
        if len(routes) != 4 or len(levels) != 4:
            raise RecordError("PIRQ tables are not four entries long")
        routes = [None if r is None else integer(r, "PIRQ route", 3, 15) for r in routes]   # PIIX3: IRQ 3-15
        levels = [boolean(lv, "PIRQ level") for lv in levels]
        saved = field(st, "lines")
        if not isinstance(saved, dict):
            raise RecordError("lines is not a mapping")
        live = machine_lines(self.machine)
        lines = {}
        for name, d in saved.items():
            sources = None
            if "sources" in d:
                sources = field(d, "sources")
                if not isinstance(sources, dict) or not set(sources) <= SOURCES:
                    raise RecordError(f"line {name}: sources {sorted(map(str, sources))}")
                sources = {s: flag(sources, s) for s in sources}
            if name not in live and not _makeable(name):
                raise RecordError(f"no interrupt line {name!r} on this machine")
            lines[name] = (flag(d, "level"), integer(field(d, "edges"), f"line {name} edges"), sources)
        for name, (level, _, sources) in lines.items():
            if sources is not None and level != any(sources.values()):
                raise RecordError(f"shared line {name} {'high' if level else 'low'} with sources {sources}")
            parent, arrow, source = name.partition("<-")
            if arrow and parent in lines and lines[parent][2] is not None \
                    and lines[parent][2].get(source, False) != level:
                raise RecordError(f"sub-line {name} is {'high' if level else 'low'}, {parent} says otherwise")
        return lines, routes, levels, counters(st, "exit_counts")

    def apply_record(self, prepared) -> None:
        """After the Xen callback made its sub-lines: make the saved ones, then set every level."""
        m = self.machine
        lines, routes, levels, exit_counts = prepared
        for name in lines:
            match = _SUBLINE.fullmatch(name)
            if match and match[1] == "PIC":
                m.pic_input(int(match[2]), match[3])
            elif match and match[3].startswith("pirq") and 0 < int(match[2]) < 16:
                m.wiring.isa_gsi_input(int(match[2]), match[3])     # a PIRQ the PIIX3 routed to that IRQ
        for name, line in machine_lines(m).items():
            if name not in lines:
                line.level = False
                continue
            line.level, line.edges, sources = lines[name]
            if isinstance(line, SharedLine) and sources is not None:
                line.sources = dict(sources)
        m.wiring.pirq_pic, m.wiring.pirq_level = list(routes), list(levels)
        m.exit_counts = dict(exit_counts)


def _makeable(name: str) -> bool:
    """A sub-line :meth:`Machine.pic_input` or the PIIX3 routing would make on this machine."""
    match = _SUBLINE.fullmatch(name)
    if not match or match[3] not in SOURCES:
        return False
    n = int(match[2])
    return n < 16 if match[1] == "PIC" else 0 < n < 16 and match[3].startswith("pirq")
