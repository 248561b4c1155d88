"""Snapshot records: how each part of a machine saves and restores itself.

A machine snapshot is a set of *records*, one per component (the 8259
pair, the IOAPIC, a vCPU, the Xen domain, the xenstore tree...), keyed by
the component's place in the machine::

    {"pic":   {"type": "i8259-pair", "version": 1, "state": {...}},
     "vcpu0": {"type": "vcpu", "version": 1, "state": {...}, "blobs": {...}},
     ...}

``type`` names what the state describes, ``version`` its layout; ``state``
is plain JSON (no pickles: a snapshot file is untrusted input). The few
components with bulk binary state (guest RAM, the CPU context) add
``blobs``, which the file stores as raw sections. This is Xen's
``hvm_save_descriptor`` + ``hvm_hw_*`` pattern (xen/include/public/arch-x86/
hvm/save.h) and QEMU's VMState sections.

Every component implements :class:`Snapshottable`, and a load is two-phase
so that it stays all or nothing:

1. :meth:`~Snapshottable.check_record` parses and validates the record
   completely and returns a *prepared* value; it changes nothing. Like
   Xen's ``vpic_check``/``ioapic_check``/``lapic_check_regs``, it refuses a
   state the hardware cannot reach (an ELCR bit for IRQ 0, a vector base
   with low bits set, reserved bits in an LVT entry): that is a
   :class:`RecordError`, one line.
2. Once every record of the snapshot has passed, :meth:`~Snapshottable.
   apply_record` installs the prepared state *silently*: registers, line
   levels and each shared line's sources are put back as they were, never
   re-driven (re-driving a restored level into a restored IOAPIC would
   deliver an interrupt a second time).

A component that arms timers on the machine clock lists them in its state
as ``"timers": {clock name: [deadline_ns, seq]}`` and re-arms them with
the same deadline and sequence number (the clock's ``rearm``), so timers
with equal deadlines fire in the same order after a load. A snapshot of a
machine with an armed timer that no record lists is refused.

This module is the vocabulary every layer shares (like :mod:`xenicorn.
exits`), so it imports nothing from xenicorn; the helpers below read a
state's fields strictly (a bool is not an integer, a missing key is an
error) and say in one line what is wrong.
"""
from __future__ import annotations

from typing import Any, Protocol

RECORD_KEYS = {"type", "version", "state", "blobs"}


class RecordError(ValueError):
    """A record this component cannot take: malformed, or a state the hardware cannot be in."""


class Snapshottable(Protocol):
    """One part of a machine that saves and restores itself."""

    def save_record(self) -> dict:
        """``{type, version, state}`` (+ ``blobs``): a copy, so later changes do not reach it."""
        ...

    def check_record(self, record: dict) -> Any:
        """Parse and validate completely; return what :meth:`apply_record` installs. Changes nothing."""
        ...

    def apply_record(self, prepared: Any) -> None:
        """Install a checked state silently (no line is re-driven)."""
        ...


def make_record(type_: str, version: int, state: dict, blobs: dict[str, bytes] | None = None) -> dict:
    """A record of ``state`` (and raw ``blobs``)."""
    record = {"type": type_, "version": version, "state": state}
    if blobs:
        record["blobs"] = blobs
    return record


def open_record(record, type_: str, version: int) -> dict:
    """The state of a record of ``type_`` and ``version``; RecordError for anything else."""
    if not isinstance(record, dict) or not {"type", "version", "state"} <= set(record) <= RECORD_KEYS:
        raise RecordError("not a record ({type, version, state})")
    if record["type"] != type_:
        raise RecordError(f"a {record['type']!r} record where a {type_!r} record belongs")
    if record["version"] != version:
        raise RecordError(f"{type_} record version {record['version']!r}; this xenicorn reads version {version}")
    if not isinstance(record["state"], dict):
        raise RecordError(f"{type_} record without a state")
    return record["state"]


def blob(record: dict, name: str, size: int) -> bytes:
    """Raw section ``name`` of a record, which must be ``size`` bytes long."""
    data = record.get("blobs", {}).get(name)
    if not isinstance(data, (bytes, bytearray)) or len(data) != size:
        raise RecordError(f"{name} missing or not {size} bytes")
    return bytes(data)


# -- strict field readers --------------------------------------------------------------
def field(state: dict, key: str):
    """``state[key]``, or a RecordError naming the missing key."""
    if not isinstance(state, dict) or key not in state:
        raise RecordError(f"no {key!r}")
    return state[key]


def integer(value, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    """An integer in ``[lo, hi]`` (bools are not integers here)."""
    if type(value) is not int:
        raise RecordError(f"{what} is not an integer ({value!r})")
    if not lo <= value <= hi:
        raise RecordError(f"{what} {_show(value)} out of range {_show(lo)}-{_show(hi)}")
    return value


def _show(n: int) -> str:
    return str(n) if -0x10000 < n < 0x10000 else f"{n:#x}"


def uint(state: dict, key: str, bits: int = 64, reserved: int = 0) -> int:
    """Field ``key``: an unsigned ``bits``-bit integer with no bit of ``reserved`` set."""
    value = integer(field(state, key), key, 0, (1 << bits) - 1)
    if value & reserved:
        raise RecordError(f"{key} {value:#x} sets reserved bits {value & reserved:#x}")
    return value


def boolean(value, what: str) -> bool:
    """True or false (not 0 or 1)."""
    if type(value) is not bool:
        raise RecordError(f"{what} is not true/false ({value!r})")
    return value


def flag(state: dict, key: str) -> bool:
    """Field ``key``: true or false."""
    return boolean(field(state, key), key)


def optional(state: dict, key: str, bits: int = 64) -> int | None:
    """Field ``key``: null or an unsigned ``bits``-bit integer."""
    value = field(state, key)
    return None if value is None else integer(value, key, 0, (1 << bits) - 1)


def hexbytes(state: dict, key: str, size: int | None = None, most: int | None = None) -> bytes:
    """Field ``key``: bytes as hex, exactly ``size`` or at most ``most`` long."""
    value = field(state, key)
    try:
        data = bytes.fromhex(value)
    except (TypeError, ValueError):
        raise RecordError(f"{key} is not hex bytes") from None
    if (size is not None and len(data) != size) or (most is not None and len(data) > most):
        raise RecordError(f"{key} is {len(data)} bytes long")
    return data


def text(state: dict, key: str, most: int = 4096) -> str:
    """Field ``key``: a string of at most ``most`` characters."""
    value = field(state, key)
    if not isinstance(value, str) or len(value) > most:
        raise RecordError(f"{key} is not a string of at most {most} characters")
    return value


def listing(state: dict, key: str, most: int = 1 << 20) -> list:
    """Field ``key``: a list of at most ``most`` items."""
    value = field(state, key)
    if not isinstance(value, list) or len(value) > most:
        raise RecordError(f"{key} is not a list of at most {most} items")
    return value


def counters(state: dict, key: str) -> dict[str, int]:
    """Field ``key``: statistics, a mapping of names to non-negative integers."""
    value = field(state, key)
    if not isinstance(value, dict) or len(value) > 4096:
        raise RecordError(f"{key} is not a mapping of counters")
    return {str(k): integer(v, f"{key}[{k!r}]") for k, v in value.items()}


def timers(state: dict, names) -> dict[str, list[int]]:
    """The ``timers`` field: clock name -> ``[deadline_ns, seq]``, each name one ``names`` allows.

    ``names`` is a collection of the names this component arms, or a
    predicate on a name.
    """
    value = field(state, "timers")
    if not isinstance(value, dict):
        raise RecordError("timers is not a mapping")
    allowed = names if callable(names) else (lambda n: n in names)
    out = {}
    for name, ref in value.items():
        if not isinstance(name, str) or not allowed(name):
            raise RecordError(f"timer {name!r} is not one this component arms")
        if not isinstance(ref, list) or len(ref) != 2:
            raise RecordError(f"timer {name} is not [deadline, seq]")
        out[name] = [integer(ref[0], f"timer {name} deadline", 0, (1 << 63) - 1),
                     integer(ref[1], f"timer {name} sequence", 0, (1 << 63) - 1)]
    return out


def timer_refs(clock, armed: dict) -> dict[str, list[int]]:
    """``{name: [deadline_ns, seq]}`` for each timer in ``armed`` (name -> Timer or None) still armed."""
    out = {}
    for name, timer in armed.items():
        ref = clock.ref(timer) if clock is not None else None
        if ref is not None:
            out[name] = ref
    return out
