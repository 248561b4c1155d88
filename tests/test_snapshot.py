"""Snapshots: save mid-run, load into a fresh machine, and end exactly as the unbroken run.

The final-state comparison does not trust the snapshot code's own idea of
what is state: :func:`machine_state` walks every attribute reachable from
the machine (devices, lines, Xen layer, xenstore tree, timers) and records
every plain value, so an attribute the snapshot forgot shows up as a
difference even if the guest's output happens not to change.
"""
import gzip
import hashlib
import os
import subprocess
import sys
import types
from collections import deque

import pytest

from xenicorn import firmware
from xenicorn.devices.console import ConsoleSink
from xenicorn.engine import vcpustate
from xenicorn.machine.machine import MachineConfig
from xenicorn.boot import boot
from xenicorn.snapshot import MAGIC, RAM_SECTION, SnapshotError, capture, decode, encode

# Host-side or per-run transient attributes, not machine state: host objects
# (engine, threads, streams, sockets), the mmap's host address, a host
# clock origin, exits and stop reasons of the run in flight.
SKIP = {"uc", "uc_list", "_mm", "buf", "host_addr", "tracer", "console", "monitor", "stop_timer", "tsc",
        "_start", "_seq", "_internal", "_pending_exit", "_stop_reasons", "_in_emu", "sink", "stream",
        "power_on", "save_points", "snapshots_saved", "kernel", "_handlers", "console_input", "agents",
        "host_watches", "f", "_poll_hook", "_poll_vcpu", "_window_hook", "_retired_callbacks", "live",
        "_irq_request", "_cache", "tree", "serial_file", "xen_log",
        "_heap",           # the clock's heap keeps cancelled timers until they surface; "timers" lists the live ones
        "last_delivery",   # the last IDT delivery, kept for diagnostics: it never steers execution
        "irq_count"}       # the monitor's "info irq" statistics: QEMU does not migrate them either


ROUTINES = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.BuiltinMethodType)


def machine_state(machine) -> dict:
    """Every plain value reachable from the machine, by attribute path (plus RAM, CPU and timers)."""
    out: dict[str, object] = {}
    seen: set[int] = set()

    def walk(obj, path: str) -> None:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            out[path] = obj
            return
        if isinstance(obj, (bytes, bytearray)):
            out[path] = bytes(obj)
            return
        if isinstance(obj, ROUTINES):
            return
        if not hasattr(obj, "__dataclass_fields__"):     # plain records may be shared (Perm lists)
            if id(obj) in seen:
                return
            seen.add(id(obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(obj, (list, tuple, deque)):
            out[path + ".len"] = len(obj)
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif isinstance(obj, (set, frozenset)):
            out[path] = sorted(map(repr, obj))
        elif type(obj).__module__.startswith("xenicorn") and hasattr(obj, "__dict__"):
            for k, v in vars(obj).items():
                if k not in SKIP:
                    walk(v, f"{path}.{k}")
    walk(machine, "m")
    out["ram"] = hashlib.sha256(machine.memory.buf).hexdigest()
    for v in machine.vcpus:
        out[f"cpu{v.index}"] = vcpustate.context_bytes(v.uc)
    out["timers"] = [(t.deadline_ns, t.seq, t.name) for t in machine.clock.pending()]
    out["now"] = machine.clock.now_ns()
    return out


def differences(a: dict, b: dict) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "<absent>"), b.get(k, "<absent>")
        if x != y and k.startswith("cpu"):
            out.append(f"{k}: context bytes differ at {[i for i in range(len(x)) if x[i] != y[i]][:16]}")
        elif x != y:
            out.append(f"{k}: {x!r} != {y!r}")
    return out[:20]


def make(name="evtchn64", append="via=gsi", **kw):
    kw.setdefault("ram_mib", 32)             # the kernels need little; snapshots are quicker
    kw.setdefault("xen_log", "none")         # recorded in .xen_log.data, not printed
    cfg = MachineConfig(cmdline=append, debugcon="stdio", clock="deterministic", **kw)
    machine, _ = boot(cfg, firmware.find(name), console=ConsoleSink(None))
    return machine


def pauses(name, append):
    """Run once, unbroken: the final machine and the instruction counts of its pauses between runs."""
    m = make(name, append)
    counts = []
    run = m.vcpu.run

    def counted(*a, **kw):
        ex = run(*a, **kw)
        counts.append(m.vcpu.instructions)
        return ex
    m.vcpu.run = counted
    assert m.run() == 0
    counts = sorted(set(counts[:-1]))           # the last run ended the machine
    return m, counts[::max(1, len(counts) // 8)]


def round_trips(tmp_path, name, append):
    """Save at every pause of one run; load each snapshot into a fresh machine and finish it there.

    Yields (snapshot's machine before it runs on, snapshot) after checking
    that output before the save + output after the load is the unbroken
    run's output (on the console and in Xen's log), and that the final
    states are equal.
    """
    ref, counts = pauses(name, append)
    ref_out, ref_log, ref_state = bytes(ref.console.data), bytes(ref.xen_log.data), machine_state(ref)
    saver = make(name, append)
    paths = {n: str(tmp_path / f"at{n}.snap") for n in counts}
    for n, path in paths.items():
        saver.save_at(n, path)
    marks = {}
    save = saver.save_snapshot
    saver.save_snapshot = lambda p: (marks.setdefault(p, (len(saver.console.data), len(saver.xen_log.data))),
                                     save(p))[1]
    assert saver.run() == 0
    assert bytes(saver.console.data) == ref_out                # saving does not disturb the run
    assert bytes(saver.xen_log.data) == ref_log
    assert set(marks) == set(paths.values())
    for n, path in paths.items():
        fresh = make(name, append)
        snap = fresh.load_snapshot(path)
        assert snap.header["instructions"] == fresh.vcpu.instructions == n
        yield fresh, snap
        assert fresh.run() == 0
        out_mark, log_mark = marks[path]
        assert ref_out[:out_mark] + bytes(fresh.console.data) == ref_out, f"snapshot at {n}"
        assert ref_log[:log_mark] + bytes(fresh.xen_log.data) == ref_log, f"snapshot at {n}"
        assert differences(ref_state, machine_state(fresh)) == [], f"snapshot at {n}"


def test_evtchn_gsi_round_trips_mid_delivery(tmp_path):
    """Acceptance: snapshots taken while the callback GSI is asserted and the upcall not yet handled."""
    mid = 0
    for m, _ in round_trips(tmp_path, "evtchn64", "via=gsi"):
        cb, info = m.xen.callback, m.xen.vcpu_info(0)
        if cb.level and info.upcall_pending and m.gsi[20].level and cb.poll_wanted:
            mid += 1                    # line high, upcall_pending 1, the deassert poll still to run
    assert mid >= 3


def test_evtchn_vector_round_trips_with_an_injection_waiting(tmp_path):
    waiting = sum(1 for m, _ in round_trips(tmp_path, "evtchn64", "via=vector") if m.xen.callback.direct)
    assert waiting >= 3


def test_xen_timers_poll_and_watchdog_round_trip(tmp_path):
    """xencore64: periodic and single-shot vCPU timers, a SCHEDOP_poll timeout, a watchdog."""
    armed = set()
    for m, _ in round_trips(tmp_path, "xencore64", ""):
        armed |= {t.name for t in m.clock.pending()}
    assert {"vcpu0-periodic", "vcpu0-singleshot", "vcpu0-poll", "watchdog1"} <= armed


def test_lapic_pit_and_uart_round_trip(tmp_path):
    """irq64: LAPIC timers waking HLT, the PIT, the UART's interrupt, PCI enumeration."""
    armed = set()
    for m, _ in round_trips(tmp_path, "irq64", ""):
        armed |= {t.name for t in m.clock.pending()}
    assert "lapic-timer" in armed


def test_power_on_snapshot_of_the_xenstore_kernel(tmp_path):
    """Saved before the first instruction: dom0's store, rings and special frames come back."""
    m = make("xenstore64", "")
    m.save_at(0, str(tmp_path / "p.snap"))
    assert m.run() == 0
    fresh = make("xenstore64", "")
    fresh.xen.xenstore_write("/local/domain/1/data/stale", b"gone after the load")
    fresh.load_snapshot(str(tmp_path / "p.snap"))
    assert fresh.run() == 0
    assert fresh.console.data == m.console.data
    assert differences(machine_state(m), machine_state(fresh)) == []


def test_xenstore_transactions_watches_and_events_round_trip():
    from xenicorn.xen.xenstore.store import Perm, Store
    a = Store()
    a.write(0, "/local/domain/1/x", b"1")
    a.set_perms(0, "/local/domain/1/x", [Perm(1, "n")])
    a.watch(1, "/local/domain/1/x", "tok")
    tx = a.transaction_start(1)
    a.write(1, "/local/domain/1/x", b"2", tx)
    a.set_perms(1, "/local/domain/1/x", [Perm(1, "r")], tx)
    b = Store()
    b.apply_record(b.check_record(a.save_record()))
    assert b.save_record() == a.save_record()
    for s in (a, b):                                  # they go on alike
        s.write(0, "/local/domain/1/x", b"3")
        with pytest.raises(Exception, match="EAGAIN"):
            s.transaction_end(1, tx, True)
    assert b.save_record() == a.save_record() and b.take_events(1) == a.take_events(1)


# -- refusals -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    m = make()
    m.save_at(20000, str(tmp_path_factory.mktemp("s") / "good.snap"))
    path = m.save_points[0][1]
    assert m.run() == 0
    with open(path, "rb") as f:
        return f.read()


def refused(tmp_path, data: bytes, **kw) -> str:
    path = tmp_path / "bad.snap"
    path.write_bytes(data)
    target = make(**kw)
    before = machine_state(target)
    with pytest.raises(SnapshotError) as e:
        target.load_snapshot(str(path))
    assert differences(before, machine_state(target)) == []          # untouched
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_truncated_snapshots_are_refused(tmp_path, good):
    for cut in (10, len(MAGIC) + 4, 200, len(good) // 2, len(good) - 1):
        assert "truncated" in refused(tmp_path, good[:cut])


def test_a_flipped_byte_anywhere_is_refused(tmp_path, good):
    for pos in (len(MAGIC) + 12, 300, len(good) // 3, len(good) - 5):
        bad = bytearray(good)
        bad[pos] ^= 0x40
        msg = refused(tmp_path, bytes(bad))
        assert "checksum" in msg or "JSON" in msg


def test_foreign_files_and_other_versions_are_refused(tmp_path, good):
    assert "not a xenicorn snapshot" in refused(tmp_path, os.urandom(4096))
    assert "not a xenicorn snapshot" in refused(tmp_path, b"")
    v3 = good[:len(MAGIC)] + (3).to_bytes(4, "little") + good[len(MAGIC) + 4:]
    assert "format version 3" in refused(tmp_path, v3)
    assert "unexpected bytes" in refused(tmp_path, good + b"\0")


def test_a_snapshot_of_another_machine_shape_is_refused(tmp_path, good):
    assert "snapshot of a machine with 32 MiB of RAM, this one has 64 MiB" in refused(tmp_path, good, ram_mib=64)
    snap = decode(good)
    snap.header["unicorn"] = "2.0.1"
    assert "unicorn 2.0.1" in refused(tmp_path, encode(snap))


def reheader(data: bytes, change) -> bytes:
    """The same file with its JSON header edited (and its checksum made right again)."""
    import hashlib
    import json
    import struct
    version, hlen = struct.unpack_from("<II", data, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(data[start:start + hlen])
    change(header)
    hdr = json.dumps(header).encode()
    head = MAGIC + struct.pack("<II", version, len(hdr)) + hdr
    return head + hashlib.sha256(head).digest() + data[start + hlen + 32:]


def test_a_header_that_lies_about_sizes_is_refused_without_inflating(tmp_path, good):
    def huge(h):
        next(s for s in h["sections"] if s["name"] == RAM_SECTION)["size"] = 1 << 40
    assert "RAM section has the wrong size" in refused(tmp_path, reheader(good, huge))

    def shorter(h):
        next(s for s in h["sections"] if s["name"] == "state")["length"] -= 1
    assert "unexpected bytes" in refused(tmp_path, reheader(good, shorter))
    assert "header has no machine config" in refused(tmp_path, reheader(good, lambda h: h.pop("config")))


def test_a_section_that_does_not_parse_is_refused_before_anything_changes(tmp_path, good):
    snap = decode(good)
    snap.state["xen.evtchn"]["state"]["ports"].append([5000, {"type": "ipi", "vcpu": 0, "remote_domid": 0,
                                                       "remote_port": 0, "virq": 0, "pirq": 0}])
    assert "does not parse" in refused(tmp_path, encode(snap))
    snap = decode(good)
    del snap.state["lapic"]["state"]["timers"]
    assert "does not parse" in refused(tmp_path, encode(snap))


def test_a_state_this_machine_cannot_take_is_rolled_back(tmp_path, good):
    """Parsed fine, refused while being applied (xen-platform's BAR1 onto the IOAPIC): all or nothing."""
    snap = decode(good)
    for devfn, fn in snap.state["pci"]["state"]["functions"]:
        if devfn == 0x10:
            cfg = bytearray.fromhex(fn["state"]["config"])
            cfg[0x14:0x18] = (0xFE000000 | 8).to_bytes(4, "little")     # 16 MiB over the IOAPIC and LAPIC
            fn["state"]["config"] = cfg.hex()
    msg = refused(tmp_path, encode(snap))
    assert "cannot take that state (BusConflict" in msg and "nothing was changed" in msg
    # a machine in the middle of its run, with a host-side timer armed, is put back just as well
    (tmp_path / "good.snap").write_bytes(good)
    busy = make()
    busy.load_snapshot(str(tmp_path / "good.snap"))
    busy.clock.add_timer(busy.clock.now_ns() + 5, lambda: None, "inject port 1")
    before = machine_state(busy)
    with pytest.raises(SnapshotError, match="nothing was changed"):
        busy.load_snapshot(str(tmp_path / "bad.snap"))
    assert differences(before, machine_state(busy)) == []
    assert busy.run() == 0 and b"Test result: SUCCESS" in busy.console.data


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def test_a_version_1_file_from_before_the_records_is_refused_with_one_line(tmp_path):
    """A real file of format 1, written by the code before this layout (tests/data/README.md)."""
    with gzip.open(os.path.join(DATA, "evtchn64-format1.snap.gz")) as f:
        old = f.read()
    assert old.startswith(MAGIC) and int.from_bytes(old[len(MAGIC):len(MAGIC) + 4], "little") == 1
    msg = refused(tmp_path, old, ram_mib=2)           # the machine it was taken of
    assert msg.endswith(": snapshot format version 1 (written before components saved their own records); "
                        "this xenicorn reads version 2")
    path = str(tmp_path / "bad.snap")
    loaded = cli("evtchn64", "--append", "via=gsi", "--clock", "deterministic", "-m", "2", "--loadvm", path)
    assert loaded.returncode == 2 and loaded.stdout == b""
    assert loaded.stderr.decode().splitlines() == [f"xenicorn: error: --loadvm: {msg}"]


def _set(path: str, value):
    """A change to one field of a record's state, by a dotted path (list indexes are numbers)."""
    def change(state):
        *parents, last = path.split(".")
        for key in parents:
            state = state[int(key)] if isinstance(state, list) else state[key]
        if isinstance(state, list):
            state[int(last)] = value(state[int(last)]) if callable(value) else value
        else:
            state[last] = value(state[last]) if callable(value) else value
    return change


# component -> (a change to its state that no hardware or Xen could reach, words of the refusal)
IMPOSSIBLE = {
    "pic": [(_set("master.elcr", 0x01), "ELCR makes IRQ 0 level-triggered"),
            (_set("slave.elcr", 0x21), "ELCR makes IRQ 8, 13 level-triggered"),
            (_set("master.vector_base", 0x21), "8259 master: ICW2 vector base 0x21 has bits 2:0 set"),
            (lambda st: st["slave"].update(init_step=3, single=True), "step 3 cannot follow its ICW1"),
            (_set("master.imr", 0x100), "8259 master: imr 256 out of range")],
    "ioapic": [(_set("redirtbl.3", lambda x: x | 1 << 40), "redirection entry 3"),
               (_set("redirtbl.5", 1 << 64), "redirection entry 5 0x10000000000000000 out of range"),
               (_set("redirtbl.7", lambda x: x & ~(1 << 15) | 1 << 14), "redirection entry 7"),
               (_set("redirtbl", lambda t: t + [0x10000]), "not a list of at most 48"),
               (_set("id", 16), "id 16 out of range")],
    "lapic": [(_set("lvt.0", lambda x: x | 1 << 12), "LVT entry timer"),
              (_set("lvt.3", lambda x: x | 1 << 20), "LVT entry LINT0"),
              (_set("irr", 1 << 3), "irr 0x8 sets reserved bits"),
              (_set("dfr", 0), "DFR 0x0")],
    "pit": [(_set("counters.0.mode", 6), "counter 0 mode 6 out of range"),
            (_set("counters.1.count", 0), "counter 1 count 0"),
            (_set("counters.2.rw", 0), "counter 2 access mode 0")],
    "uart": [(_set("ier", 0x10), "ier 16 out of range"),
             (_set("rx", [1, 2]), "rx is not a list of at most 1 items"),
             (_set("lsr", 0x61), "line status 0x61 with 0 bytes received")],
    "rtc": [(_set("cmos", "00" * 64), "cmos is 64 bytes long"),
            (_set("frozen", 1767225600), "frozen time without register B's SET bit")],
    "hpet": [(_set("config", 4), "config 0x4 sets reserved bits"),
             (_set("channels.2.config", lambda c: c | 0x8000), "timer 2 config"),     # an FSB capability
             (_set("isr", 1 << 3), "isr 0x8 sets reserved bits")],
    "pci": [(_set("address", 0x80000003), "address 0x80000003 sets reserved bits"),
            (_set("functions.0.1.state.config", lambda c: "ffff" + c[4:]), "byte 0x00 is 0xff"),
            (_set("functions.2.1.state.platform.unplugged", 8), "unplugged 8 out of range")],
    "acpi-pm1-control": [(_set("value", 1 << 13), "value 0x2000 sets reserved bits")],
    "clock": [(_set("mode", "host"), "clock mode 'host'")],
    "memory": [(_set("frames", [[300, 0x1000]]), "frame index 300 out of range")],
    "vcpu0": [(_set("sleep_kind", "nap"), "sleep kind 'nap'"), (_set("index", 1), "vCPU 1 for vCPU 0")],
    "machine": [(_set("lines.GSI4.level", True), "shared line GSI4 high"),
                (_set("lines.IRQ4.edges", -1), "line IRQ4 edges -1 out of range")],
    "xen": [(_set("upcall_vectors", [[0, 5]]), "upcall vector below 0x10"),
            (_set("timers", {"watchdog9": [1, 1]}), "timer watchdog9 armed for nothing")],
    "xen.evtchn": [(_set("ports.0.1.type", "bogus"), "port 1 (bogus"),
                   (_set("ports.2.1.vcpu", 5), "port 3 vCPU 5 out of range"),
                   (_set("backends.0.1", 2), "interdomain port 1: its other end does not name it"),
                   (_set("fifo", {"control": [], "pages": [], "priority": [], "lastq": [], "tails": [], "held": []}),
                    "FIFO ABI without a control block")],
    "xen.callback": [(_set("via", 0), "callback via 0x0 with vector 0x0, level True"),
                     (lambda st: st.update(level=False, lines=[["GSI20<-xen-callback", False, 1]]), "poll True")],
    "xen.physdev": [(_set("levels", [False] * 3), "3 GSI levels")],
    "xen.gnttab": [(_set("nr_frames", 1000), "1000 grant frames, this domain may have 64")],
    "xen.store": [(_set("root.p", [[0, "x"]]), "invalid permissions")],
    "xen.xenstore": [(_set("in", "00" * 5000), "in is 5000 bytes long")],
}


@pytest.mark.parametrize("component", sorted(IMPOSSIBLE))
def test_a_state_no_hardware_reaches_is_refused_and_the_machine_untouched(tmp_path, good, component):
    """Each component checks its record as Xen's *_check functions do; the refusal names it."""
    for change, words in IMPOSSIBLE[component]:
        snap = decode(good)
        change(snap.state[component]["state"])
        msg = refused(tmp_path, encode(snap))
        assert f"machine state does not parse ({component}: " in msg and words in msg, msg


def test_a_record_of_another_type_or_version_is_refused(tmp_path, good):
    snap = decode(good)
    snap.state["lapic"]["version"] = 2
    assert "(lapic: lapic record version 2; this xenicorn reads version 1)" in refused(tmp_path, encode(snap))
    snap = decode(good)
    snap.state["pic"], snap.state["ioapic"] = snap.state["ioapic"], snap.state["pic"]
    assert "(pic: a 'ioapic' record where a 'i8259-pair' record belongs)" in refused(tmp_path, encode(snap))
    snap = decode(good)
    snap.state["mystery"] = snap.state.pop("rtc")
    assert "snapshot has state for mystery, which this machine does not have" in refused(tmp_path, encode(snap))


def test_every_component_reads_back_the_record_it_was_loaded_from(tmp_path, good):
    """save -> restore -> save: each component's record survives a load unchanged."""
    (tmp_path / "good.snap").write_bytes(good)
    m = make()
    snap = m.load_snapshot(str(tmp_path / "good.snap"))
    again = capture(m)
    assert set(again.state) == set(snap.state) and again.blobs.keys() == snap.blobs.keys()
    for name in snap.state:
        assert again.state[name] == snap.state[name], name
    for name in snap.blobs:
        assert again.blobs[name] == snap.blobs[name], name


def test_a_missing_file_is_one_line():
    with pytest.raises(SnapshotError, match="cannot read snapshot /nonexistent.snap: No such file"):
        make().load_snapshot("/nonexistent.snap")


# -- system_reset, the CLI and the monitor --------------------------------------------------
def test_system_reset_boots_the_guest_again_from_power_on():
    m = make()
    m.capture_power_on()
    assert m.run() == 0
    first = bytes(m.console.data)
    end_state = machine_state(m)
    m.system_reset()                        # RAM, CPU, devices, Xen and time as before the first instruction
    assert m.status is None and m.vcpu.instructions == 0 and m.clock.now_ns() == 0
    assert m.xen.state.shared_info_gpa is None and not m.xen.evtchn.virqs
    assert m.run() == 0
    assert bytes(m.console.data) == first + first
    assert differences(end_state, machine_state(m)) == []


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}        # this checkout's xenicorn, whatever is installed


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "xenicorn", "run", *args], capture_output=True, timeout=120,
                          check=False, env=ENV, **kw)


def test_cli_savevm_then_loadvm_continues_byte_for_byte(tmp_path):
    snap = str(tmp_path / "cli.snap")
    common = ["evtchn64", "--append", "via=gsi", "--clock", "deterministic", "-m", "32"]
    saved = cli(*common, "--savevm", f"{snap}@40000")
    assert saved.returncode == 0, saved.stderr
    n = int(saved.stderr.decode().split(" at ")[1].split()[0])
    assert f"snapshot saved to {snap} at {n} instructions" in saved.stderr.decode() and n >= 40000
    loaded = cli(*common, "--loadvm", snap)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout and saved.stdout.endswith(loaded.stdout) and len(loaded.stdout) < len(saved.stdout)
    assert b"Test result: SUCCESS" in loaded.stdout
    bad = cli("evtchn64", "--clock", "deterministic", "--loadvm", snap)          # 128 MiB, not 32
    assert bad.returncode == 2 and bad.stdout == b""
    assert bad.stderr.decode().splitlines() == [
        f"xenicorn: error: --loadvm: {snap}: snapshot of a machine with 32 MiB of RAM, this one has 128 MiB of RAM"]
    with open(snap, "r+b") as f:
        f.truncate(5000)
    cut = cli(*common, "--loadvm", snap)
    assert cut.returncode == 2 and b"truncated" in cut.stderr and len(cut.stderr.splitlines()) == 1


def test_qmp_system_reset_and_hmp_savevm_loadvm(tmp_path):
    qmp = pytest.importorskip("qemu.qmp")
    import asyncio
    import time
    sock = str(tmp_path / "qmp.sock")
    snap = str(tmp_path / "hmp.snap")
    proc = subprocess.Popen([sys.executable, "-m", "xenicorn", "run", "spin32", "-qmp", f"unix:{sock},server,wait=off",
                             "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)

    async def go():
        client = qmp.QMPClient("test")
        await client.connect(sock)
        events = []

        async def collect():
            async for ev in client.events:
                events.append(ev)
        task = asyncio.create_task(collect())
        await asyncio.sleep(0.3)                             # the guest printed its banner and spins
        assert await client.execute("system_reset") == {}
        await asyncio.sleep(0.3)
        def hmp(line):
            return client.execute("human-monitor-command", {"command-line": line})
        assert await hmp(f"savevm {snap}") == ""
        assert await hmp(f"loadvm {snap}") == ""
        assert (await hmp(f"loadvm {snap}.missing")).startswith(f"Error: cannot read snapshot {snap}.missing")
        assert (await client.execute("query-status"))["status"] == "running"
        await client.execute("quit")
        await asyncio.sleep(0.2)
        task.cancel()
        try:
            await client.disconnect()
        except EOFError:
            pass
        return events
    events = asyncio.run(go())
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    resets = [e for e in events if e["event"] == "RESET"]
    assert len(resets) == 1 and resets[0]["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    assert out.count(b"spinning forever") == 2                 # booted again from the start
    assert os.path.getsize(snap) > 0


def test_a_timer_no_component_restores_makes_saving_fail(tmp_path):
    m = make()
    m.clock.add_timer(10**9, lambda: None, "inject port 3")        # the command line's: left out, listed
    snap = capture(m)
    assert snap.header["host_timers"] == ["inject port 3"]
    m.clock.add_timer(10**9, lambda: None, "mystery")
    with pytest.raises(SnapshotError, match="armed timer.s. mystery would not be restored"):
        m.save_snapshot(str(tmp_path / "x.snap"))
    assert not os.path.exists(tmp_path / "x.snap")


def test_unicorn_context_bytes_carry_the_whole_cpu_into_a_fresh_engine():
    """The Unicorn fact the vCPU section rests on (docs/unicorn-notes.md)."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn import x86_const as X
    a = Uc(UC_ARCH_X86, UC_MODE_64)
    a.mem_map(0, 0x10000)
    code = bytes.fromhex("66480f6ed8" "d9e8" "f4")          # movq xmm3, rax; fld1; hlt
    a.mem_write(0x1000, code)
    a.reg_write(X.UC_X86_REG_RAX, 0x1122334455667788)
    a.emu_start(0x1000, 0x1000 + len(code) - 1)
    a.msr_write(0xC0000082, 0xFFFF800000001234)             # LSTAR
    a.reg_write(X.UC_X86_REG_FS_BASE, 0x7777000)
    b = Uc(UC_ARCH_X86, UC_MODE_64)
    vcpustate.context_into(b, vcpustate.context_bytes(a))
    for reg in (X.UC_X86_REG_XMM3, X.UC_X86_REG_ST0, X.UC_X86_REG_FPSW, X.UC_X86_REG_RIP, X.UC_X86_REG_FS_BASE,
                X.UC_X86_REG_CR0, X.UC_X86_REG_CR4, X.UC_X86_REG_RFLAGS):
        assert b.reg_read(reg) == a.reg_read(reg)
    for msr in (0xC0000080, 0xC0000082):                    # EFER, LSTAR
        assert b.msr_read(msr) == a.msr_read(msr)
    assert vcpustate.context_bytes(b) == vcpustate.context_bytes(a)
