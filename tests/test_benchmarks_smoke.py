"""The benchmark scripts still run (no timing is asserted: machines are noisy)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_json(script, timeout=120):
    """Run ``benchmarks/SCRIPT --quick --json``; its parsed results."""
    import json
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--json"],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_compute_benchmark_quick_run_reports_every_variant():
    data = quick_json("compute.py", timeout=120)
    assert set(data) == {"registers", "load", "store"}
    for r in data.values():
        assert r["instructions"] == 20_000 * 8 and r["xenicorn_mips"] > 0 and r["bare_mips"] > 0


def test_hypercall_benchmark_quick_run_reports_both_widths():
    data = quick_json("hypercalls.py", timeout=120)
    assert set(data) == {"32-bit", "64-bit"}
    assert all(r["calls"] == 2000 and r["calls_per_second"] > 0 for r in data.values())


def test_timer_benchmark_quick_run_reports_both_phases():
    data = quick_json("timer.py", timeout=120)
    assert set(data) == {"32-bit", "64-bit"}
    for r in data.values():
        assert r["iterations"] == 200_000 and r["instructions"] > 5 * 200_000
        assert r["quiet_mips"] > 0 and r["ticking_mips"] > 0


def test_evtchn_benchmark_quick_run_reports_every_design():
    data = quick_json("evtchn.py", timeout=180)
    assert set(data) == {f"{b}-bit {d}" for b in (32, 64) for d in ("vector", "gsi-poll", "gsi-eoi")}
    for key, r in data.items():
        assert r["events"] == 100 and r["events_per_second"] > 0
        if "gsi" in key:
            assert r["deassert_latency_insns"] >= 1 and r["compute_asserted_vs_deasserted"] > 0
    # the poll design deasserts at the next block; the resample waits for the EOI
    assert data["64-bit gsi-poll"]["deassert_latency_insns"] < data["64-bit gsi-eoi"]["deassert_latency_insns"]

