"""Render the stepper's live state panel to docs/img/step-panel.svg.

A real stepping session: ``xenicorn step evtchn32 --append via=gsi --clock
deterministic`` with the panel, pressing ``n`` at every stop until the
first upcall's vector has been delivered through the IDT (the moment the
whole path is lit: upcall_pending 1, the callback line high, IOAPIC pin 20
with Remote IRR set, vector 0x50 in the LAPIC's ISR). The panel drawn at
that stop, highlights included, is what rich's recording console saves.

    python tools/step_panel_svg.py [--out docs/img/step-panel.svg] [--kernel evtchn32] [--via gsi]
"""
from __future__ import annotations

import argparse
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def session(kernel: str = "evtchn32", via: str = "gsi", until: str = "deliver"):
    """Step ``kernel`` to the first stop after an event of kind ``until``.

    Returns ``(panel, stepper_text)``: the :class:`~xenicorn.debug.panel.LivePanel`
    as it was drawn at that stop (its ``previous`` is the state shown, its
    ``last_render`` the renderable) and the stepper's text up to there.
    """
    from rich.console import Console

    from xenicorn import firmware
    from xenicorn.boot import boot
    from xenicorn.debug import panel as P
    from xenicorn.debug import stepper as S
    from xenicorn.devices.console import ConsoleSink
    from xenicorn.machine.machine import MachineConfig

    cfg = MachineConfig(cmdline=f"via={via}", debugcon="none", count_instructions=True,
                        observe=set(S.OBSERVED), clock="deterministic")
    machine, _ = boot(cfg, firmware.find(kernel), console=ConsoleSink(None))
    out = io.StringIO()
    seen = []
    state = {"done": False}

    def key() -> str:
        if state["done"]:
            return "q"
        if any(e.kind == until for e in seen) and not stepper.queue:
            state["done"] = True            # shown, and the panel for this stop was just drawn
            return "q"
        return "n"

    stepper = S.Stepper(machine, out=out, read_command=key)
    S.watcher_of(machine).sinks.append(seen.append)
    live = P.LivePanel(machine, console=Console(file=io.StringIO(), width=100))
    live.last_render = None

    def draw() -> None:
        state_now = P.snapshot(machine)
        if state_now != live.previous:
            live.last_render = live.render(state_now)
    stepper.before_prompt.append(draw)
    machine.run()
    machine.close()
    return live, out.getvalue()


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "step-panel.svg"))
    p.add_argument("--kernel", default="evtchn32")
    p.add_argument("--via", default="gsi")
    args = p.parse_args(argv)
    live, _ = session(args.kernel, args.via)
    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print(live.last_render)
    console.save_svg(args.out, title=f"xenicorn step {args.kernel} --append via={args.via}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
