"""The machine clock: timer ordering, cancelling, deterministic time."""
import pytest

from xenicorn.machine.clock import VirtualClock


class Counter:
    """A settable instruction count for the deterministic clock."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        return self.n


def test_deterministic_time_follows_instructions_and_skips_sleep():
    insns = Counter()
    clock = VirtualClock("deterministic", ns_per_insn=2.0, instructions=insns)
    assert clock.now_ns() == 0
    insns.n = 500
    assert clock.now_ns() == 1000
    clock.wait_until(5000)                       # asleep: time jumps, instructions don't
    assert clock.now_ns() == 5000
    insns.n = 510
    assert clock.now_ns() == 5020


def test_timers_fire_in_deadline_order_and_cancel():
    insns = Counter()
    clock = VirtualClock("deterministic", instructions=insns)
    fired = []
    clock.add_timer(300, lambda: fired.append("c"))
    t = clock.add_timer(200, lambda: fired.append("b"))
    clock.add_timer(100, lambda: fired.append("a"))
    clock.cancel(t)
    assert clock.next_deadline() == 100 and clock.budget() == 100
    insns.n = 250
    assert clock.run_due() == 1 and fired == ["a"]
    insns.n = 300
    assert clock.run_due() == 1 and fired == ["a", "c"]
    assert clock.next_deadline() is None and clock.budget(7) == 7


def test_host_time_moves_and_mode_is_checked():
    clock = VirtualClock("host")
    a = clock.now_ns()
    clock.wait_until(a + 2_000_000)
    assert clock.now_ns() >= a + 2_000_000
    with pytest.raises(ValueError):
        VirtualClock("sundial")
    with pytest.raises(ValueError):
        VirtualClock("deterministic")             # needs an instruction counter
