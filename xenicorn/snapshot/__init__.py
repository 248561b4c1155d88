r"""Snapshots of the whole machine: ``savevm``/``loadvm`` and ``system_reset``.

A snapshot is everything that decides what the machine does next, as one
*record* per component: each device, the machine's wiring, the clock,
guest memory, each vCPU and each part of the Xen layer saves and restores
itself through one interface (:mod:`xenicorn.records`), with the checks
Xen's ``*_check`` functions make on a load. Which components there are,
and in which order a load applies them, is :mod:`.components`:

================  ============================================================
part              what, and why it is machine state
================  ============================================================
memory            guest RAM and the hypervisor frames after it (grant table
                  frames, the xenstore and console rings): the guest's
                  memory, page tables, code and Xen's shared pages; where
                  hypervisor frames are mapped (they hide RAM there)
vcpuN             Unicorn's saved context (``CPUX86State``) and what Python
                  keeps beside it (:mod:`xenicorn.engine.vcpustate`)
clock             skipped time (deterministic) or guest time (host), the
                  timer sequence counter; each timer is re-armed by its
                  owner (PIT, LAPIC, Xen) with its deadline and sequence
devices           8259 pair, IOAPIC, LAPIC (and its timer), PIT, UART, RTC,
                  PCI configuration spaces + PIIX3 routing + xen-platform,
                  ACPI PM registers, the buses' once-only reports
machine           the level of every interrupt line and each source of a
                  shared line, PIRQ routing (:mod:`xenicorn.machine.
                  wiringstate`)
xen.*             :mod:`xenicorn.xen.savestate`
================  ============================================================

Not saved: host-side things a user sets up again on the same command line
(the console streams, the QMP socket, ``--xenstore-watch`` printers,
``--xen-event-inject`` timers, tracing). As QEMU requires for ``-loadvm``,
load a snapshot into a machine built with the same options: the options
that change the machine's shape (RAM size, Xen, vendor, clock, callback
deassert mode, grant frames, serial port present) must match.

File format (version 2), all integers little-endian::

    magic        b"XENICORN SNAPSHOT\0"                  18 bytes
    version      u32 format version (2)
    header_len   u32
    header       JSON: xenicorn and unicorn versions, the machine config
                 that must match, and the sections: name, encoding
                 (json | raw | zlib), stored length, SHA-256
    header_sha   SHA-256 of the 26 + header_len bytes before it
    sections     their stored bytes, in header order, nothing after

The ``state`` section is ``{component: {type, version, state}}``; each
component's raw parts (RAM, a CPU context) are sections named
``component/part``. Version 1 (before the per-component records) is
refused with one line naming the versions.

A snapshot file is untrusted input, so it holds no pickles: JSON for the
structured state, raw bytes for RAM and the CPU context. :func:`read`
checks the magic, the version, the length of every part, every checksum,
and decodes every section before anything else happens; :func:`restore`
then checks the config and has every component check its record, and
only then changes the machine. If the machine still refuses the state
while it is being installed (a PCI BAR moved onto another device), it is
put back as it was from a capture taken just before: a load is all or
nothing. Every refusal is a :class:`SnapshotError` with one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass

from ..records import RecordError

MAGIC = b"XENICORN SNAPSHOT\0"
FORMAT_VERSION = 2                 # 1: before per-component records (refused)
_PREFIX = struct.Struct("<II")
RAM_SECTION = "memory/ram"


class SnapshotError(Exception):
    """A snapshot that cannot be written, read or loaded (one line for the user)."""


@dataclass
class Snapshot:
    """A decoded snapshot: the header and each section's content."""

    header: dict
    state: dict                    # the "state" section (JSON): component -> record
    blobs: dict[str, bytes]        # raw sections ("component/part"): RAM, CPU contexts, MSR shadow pages


# -- what must match -------------------------------------------------------------
def compat_config(machine) -> dict:
    """The options that change the machine's shape; a snapshot needs the same ones."""
    c = machine.config
    return {"ram_mib": c.ram_mib, "xen": c.xen, "xen_version": list(c.xen_version), "vendor": c.vendor,
            "clock": c.clock, "ns_per_insn": c.ns_per_insn, "callback_deassert": c.callback_deassert,
            "gnttab_max_frames": c.gnttab_max_frames, "serial": machine.serial is not None,
            "hpet": machine.hpet is not None,
            "vcpus": len(machine.vcpus)} | _cpu_model(machine)


def _cpu_model(machine) -> dict:
    # recorded only for a model other than default, so older snapshots still load
    model = machine.cpuid.model
    return {} if model.is_default else {"cpu": ",".join(model.features)}


def _describe(key: str, value) -> str:
    if key == "cpu":
        return "the default CPU model" if value is None else f"CPU features {value} (--cpu)"
    if value is None:
        return f"no {key} recorded"
    return {"ram_mib": f"{value} MiB of RAM", "xen": "Xen" if value else "no Xen",
            "clock": f"--clock {value}", "vcpus": f"{value} vCPUs", "vendor": f"--vendor {value}",
            "xen_version": "Xen {}.{}".format(*value) if isinstance(value, list) and len(value) == 2 else value,
            "serial": "a serial port" if value else "no serial port", "hpet": "an HPET" if value else "no HPET",
            "callback_deassert": f"--callback-deassert {value}", "gnttab_max_frames": f"{value} grant frames",
            "ns_per_insn": f"{value} ns per instruction"}.get(key, f"{key} {value}")


# -- capture -----------------------------------------------------------------------
def capture(machine, *, ended_ok: bool = False, strict_timers: bool = True) -> Snapshot:
    """Take the machine's state now (between two guest runs, never inside a hook)."""
    from ..engine.vcpustate import UNICORN_VERSION, in_guest
    from .components import components
    if any(in_guest(v) for v in machine.vcpus):
        raise SnapshotError("cannot take a snapshot while the guest is running (only between runs)")
    if machine.status is not None and not ended_ok:
        raise SnapshotError(f"cannot take a snapshot of a machine that has ended ({machine.shutdown_reason})")
    state: dict[str, dict] = {}
    blobs: dict[str, bytes] = {}
    for name, part in components(machine):
        record = part.save_record()
        for part_name, data in record.pop("blobs", {}).items():
            blobs[f"{name}/{part_name}"] = data
        state[name] = record
    # What a file would hold, in memory too (power-on state, rollback): JSON types only
    state = json.loads(json.dumps(state))
    header = {"xenicorn": _xenicorn_version(), "unicorn": UNICORN_VERSION,
              "config": compat_config(machine), "instructions": machine.vcpu.instructions,
              "guest_ns": machine.clock.now_ns(), "host_timers": _check_timers(machine, state, strict_timers)}
    return Snapshot(header, state, blobs)


HOST_TIMERS = ("inject port ",)           # set up again by the command line (--xen-event-inject)


def _check_timers(machine, state: dict, strict: bool = True) -> list[str]:
    """Every armed timer must belong to a component that re-arms it on load.

    Components list their armed timers in their records (``timers``). A
    timer nobody lists would silently vanish from the loaded machine, so
    taking the snapshot fails instead; host-side timers (the command
    line's event injections) are listed in the header and left out.
    """
    pending = {(t.deadline_ns, t.seq): t.name for t in machine.clock.pending()}
    owned = {tuple(ref) for record in state.values() for ref in record["state"].get("timers", {}).values()}
    lost = [pending[k] for k in sorted(pending) if k not in owned]
    unknown = [name for name in lost if not name.startswith(HOST_TIMERS)]
    if unknown and strict:
        raise SnapshotError(f"cannot save: armed timer(s) {', '.join(unknown)} would not be restored")
    return lost


def _xenicorn_version() -> str:
    from .. import __version__
    return __version__


# -- the file -------------------------------------------------------------------------
def encode(snap: Snapshot) -> bytes:
    parts: list[tuple[str, str, bytes]] = [("state", "json", json.dumps(snap.state, sort_keys=True).encode())]
    for name, blob in snap.blobs.items():
        if name.endswith("/context"):               # CPU state: compresses poorly, read often
            parts.append((name, "raw", blob))
        else:
            parts.append((name, "zlib", zlib.compress(blob, 1)))
    header = dict(snap.header)
    header["sections"] = [{"name": n, "encoding": e, "length": len(b), "size": _plain_size(snap, n, b),
                           "sha256": hashlib.sha256(b).hexdigest()} for n, e, b in parts]
    hdr = json.dumps(header, sort_keys=True).encode()
    head = MAGIC + _PREFIX.pack(FORMAT_VERSION, len(hdr)) + hdr
    return head + hashlib.sha256(head).digest() + b"".join(b for _, _, b in parts)


def _plain_size(snap: Snapshot, name: str, stored: bytes) -> int:
    return len(snap.blobs[name]) if name in snap.blobs else len(stored)


def save(machine, path: str) -> Snapshot:
    """Write a snapshot file (atomically: a half-written file never has the final name)."""
    snap = capture(machine)
    data = encode(snap)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SnapshotError(f"cannot write snapshot {path}: {e.strerror or e}") from None
    return snap


def read(path: str, machine=None) -> Snapshot:
    """Read and verify a snapshot file completely (nothing is loaded here).

    With ``machine``, the header is checked against it before any section
    is decompressed, so a file for another machine (or one that claims a
    huge RAM) is refused without inflating anything.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SnapshotError(f"cannot read snapshot {path}: {e.strerror or e}") from None
    return decode(data, path, machine)


def decode(data: bytes, where: str = "snapshot", machine=None) -> Snapshot:
    def bad(why: str) -> SnapshotError:
        return SnapshotError(f"{where}: {why}")

    if not data.startswith(MAGIC):
        raise bad("not a xenicorn snapshot (bad magic)")
    pos = len(MAGIC)
    if len(data) < pos + _PREFIX.size:
        raise bad("truncated (no header)")
    version, hlen = _PREFIX.unpack_from(data, pos)
    if version != FORMAT_VERSION:
        older = " (written before components saved their own records)" if version == 1 else ""
        raise bad(f"snapshot format version {version}{older}; this xenicorn reads version {FORMAT_VERSION}")
    pos += _PREFIX.size
    if len(data) < pos + hlen + 32:
        raise bad("truncated (in the header)")
    hdr = data[pos:pos + hlen]
    if hashlib.sha256(data[:pos + hlen]).digest() != data[pos + hlen:pos + hlen + 32]:
        raise bad("header checksum mismatch (the file is corrupt)")
    pos += hlen + 32
    try:
        header = json.loads(hdr)
        sections = [(s["name"], s["encoding"], int(s["length"]), int(s["size"]), s["sha256"])
                    for s in header["sections"]]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise bad("header is not valid JSON of a snapshot") from None
    if machine is not None:
        _check_header(machine, header, where)
        if {n: size for n, _, _, size, _ in sections}.get(RAM_SECTION) != len(machine.memory.buf):
            raise bad("RAM section has the wrong size")
    total = pos + sum(n for _, _, n, _, _ in sections)
    if len(data) < total:
        raise bad(f"truncated: {len(data)} bytes, the header describes {total}")
    if len(data) > total:
        raise bad(f"{len(data) - total} unexpected bytes after the last section")
    state, blobs = None, {}
    for name, enc, length, size, digest in sections:
        stored = data[pos:pos + length]
        pos += length
        if hashlib.sha256(stored).hexdigest() != digest:
            raise bad(f"section {name!r} checksum mismatch (the file is corrupt)")
        try:
            if enc == "zlib":
                d = zlib.decompressobj()
                plain = d.decompress(stored, size + 1)
                if not d.eof or len(plain) != size:
                    raise ValueError("length")
            elif enc in ("raw", "json"):
                plain = stored
            else:
                raise ValueError(enc)
            if enc == "json":
                state = json.loads(plain)
            else:
                blobs[name] = plain
        except (ValueError, zlib.error, RecursionError, MemoryError):
            raise bad(f"section {name!r} does not decode") from None
    if not isinstance(state, dict):
        raise bad("no machine state section")
    return Snapshot(header, state, blobs)


# -- restore ----------------------------------------------------------------------------
def _check_header(machine, h: dict, where: str) -> None:
    from ..engine.vcpustate import UNICORN_VERSION
    if h.get("unicorn") != UNICORN_VERSION:
        raise SnapshotError(f"{where}: taken with unicorn {h.get('unicorn')}, this is unicorn {UNICORN_VERSION}"
                            " (CPU contexts do not carry over)")
    mine = compat_config(machine)
    theirs = h.get("config")
    if not isinstance(theirs, dict):
        raise SnapshotError(f"{where}: header has no machine config")
    for key in [*mine, *({"cpu"} & set(theirs) - set(mine))]:
        value = mine.get(key)
        if theirs.get(key) != value:
            raise SnapshotError(f"{where}: snapshot of a machine with {_describe(key, theirs.get(key))}, "
                                f"this one has {_describe(key, value)}")


def check_compatible(machine, snap: Snapshot, where: str = "snapshot") -> None:
    """Refuse a snapshot of another machine shape or Unicorn build (the components check the rest)."""
    _check_header(machine, snap.header, where)
    if len(snap.blobs.get(RAM_SECTION, b"")) != len(machine.memory.buf):
        raise SnapshotError(f"{where}: RAM section has the wrong size")


def check(machine, snap: Snapshot, where: str = "snapshot") -> list:
    """Have every component check its record; ``[(component, prepared)]`` in apply order.

    Nothing changes here. A record that does not parse, or describes a
    state the hardware cannot be in, is one SnapshotError naming the
    component.
    """
    from .components import components
    parts = components(machine)
    names = {name for name, _ in parts}
    extra = sorted(set(snap.state) - names)
    if extra:
        raise SnapshotError(f"{where}: snapshot has state for {', '.join(extra)}, which this machine does not have")
    plan = []
    for name, part in parts:
        record = snap.state.get(name)
        if record is None:
            raise SnapshotError(f"{where}: snapshot has no state for {name}")
        prefix = name + "/"
        blobs = {k[len(prefix):]: v for k, v in snap.blobs.items() if k.startswith(prefix)}
        try:
            plan.append((part, part.check_record({**record, "blobs": blobs} if blobs else record)))
        except RecordError as e:
            raise SnapshotError(f"{where}: machine state does not parse ({name}: {e})") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as e:
            raise SnapshotError(f"{where}: machine state does not parse ({name}: {type(e).__name__}: {e})") \
                from None
    return plan


def restore(machine, snap: Snapshot, where: str = "snapshot", *, rollback: bool = True) -> None:
    """Make ``machine`` continue from ``snap``: all checks first, then every change."""
    from ..engine.vcpustate import in_guest
    if any(in_guest(v) for v in machine.vcpus):
        raise SnapshotError("cannot load a snapshot while the guest is running (only between runs)")
    check_compatible(machine, snap, where)
    plan = check(machine, snap, where)
    # Everything parsed; what can still fail is the machine refusing a layout
    # (a BAR moved onto another device, a frame where nothing may be mapped).
    # Then the machine goes back to how it was: a load is all or nothing.
    before = capture(machine, ended_ok=True, strict_timers=False) if rollback else None
    timers = machine.clock.pending()
    status = (machine.status, machine.shutdown_reason, machine.shutdown_message)
    try:
        for part, prepared in plan:
            part.apply_record(prepared)
        machine.status = None                 # a machine that had ended runs again
        machine.shutdown_reason = machine.shutdown_message = ""
    except Exception as e:                    # any refusal: reported as one line, machine restored
        if before is None:
            raise
        restore(machine, before, "the state before the failed load", rollback=False)
        rearmed = {(t.deadline_ns, t.seq) for t in machine.clock.pending()}
        for t in timers:                      # timers no component owns (host-side) come back as they were
            if (t.deadline_ns, t.seq) not in rearmed:
                machine.clock.rearm([t.deadline_ns, t.seq], t.callback, t.name)
        machine.status, machine.shutdown_reason, machine.shutdown_message = status
        raise SnapshotError(f"{where}: this machine cannot take that state ({type(e).__name__}: {e}); "
                            "nothing was changed") from None


def load(machine, path: str) -> Snapshot:
    """Read ``path`` completely, then restore it into ``machine`` (all or nothing)."""
    snap = read(path, machine)
    restore(machine, snap, path)
    return snap
