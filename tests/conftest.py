"""Shared fixtures: build machines around test code without the CLI."""
from __future__ import annotations

import pytest

from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import Machine, MachineConfig


@pytest.fixture
def machine():
    """A 16 MiB machine whose console and Xen log are recorded (``.console``, ``.xen_log``), not printed."""
    m = Machine(MachineConfig(ram_mib=16, debugcon="none", xen_log="none"), console=ConsoleSink(None))
    yield m
    m.close()


class InstructionCount:
    """A settable instruction counter that drives a deterministic clock in tests."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        return self.n


def deterministic_clock():
    """(clock, counter): advance guest time by adding to ``counter.n``."""
    from xenicorn.machine.clock import VirtualClock
    counter = InstructionCount()
    return VirtualClock("deterministic", instructions=counter), counter
