"""The 8254 programmable interval timer (ports 0x40-0x43) and port 0x61.

Three 16-bit down-counters clocked at 1.193182 MHz (Intel 8254 datasheet).
Counter 0's output is IRQ 0 (the PC's system timer); counter 2's gate and
output are wired to port 0x61 (the speaker port), which is how Linux
calibrates the TSC against a known clock.

Control word (port 0x43):

========  ===================================================================
bits      meaning
========  ===================================================================
7:6       counter 0-2; 11 = read-back command
5:4       access: 00 latch the count, 01 low byte, 10 high byte, 11 low then high
3:1       mode 0-5 (6, 7 are 2, 3)
0         BCD counting (accepted, counted in binary)
========  ===================================================================

Modes used by PC software: **0** interrupt on terminal count (OUT goes
high when the count reaches 0 and stays high), **2** rate generator (OUT
pulses low for one clock every N clocks: a periodic interrupt), **3** square
wave (OUT high for N/2, low for N/2), **4** software strobe. Modes 1 and 5
start on a rising gate edge (only counter 2 has a gate you can drive). A
count of 0 means 65536. Port 0x61: bit 0 gate 2, bit 1 speaker enable,
bit 5 (read) OUT2, bit 4 (read) toggles, like the refresh clock.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..records import (RecordError, field, flag, integer, listing, make_record, open_record, optional,
                       timer_refs, timers, uint)

PIT_HZ = 1_193_182
PIT_PORT, SPEAKER_PORT = 0x40, 0x61


def ticks_to_ns(ticks: int) -> int:
    return ticks * 1_000_000_000 // PIT_HZ


def ns_to_ticks(ns: int) -> int:
    return ns * PIT_HZ // 1_000_000_000


@dataclass
class CounterState:
    """One counter (Xen's ``hvm_hw_pit_channel``)."""

    count: int = 0x10000          # reload value N (0 written = 65536)
    mode: int = 0
    rw: int = 3                   # access mode of the last control word
    bcd: bool = False
    start_ns: int = 0             # machine time the current count started
    gate: bool = True
    latched: int | None = None    # latched count, read out byte by byte
    status_latched: int | None = None
    read_high: bool = False       # next read returns the high byte (rw = 3)
    write_high: bool = False      # next write sets the high byte (rw = 3)
    low_byte: int = 0
    armed: bool = False           # a count was written (the counter runs)
    null_count: bool = True


class Counter:
    """One of the three counters: its registers and, for counter 0, the timer of its next IRQ 0 edge."""

    def __init__(self, pit: "Pit8254", index: int):
        self.pit, self.index = pit, index
        self.state = CounterState()
        self.timer = None
        self.last_edge_ns = -1                  # time of the last IRQ edge fired

    def _elapsed(self) -> int:
        st = self.state
        if not st.armed or not st.gate and st.mode in (0, 2, 3, 4):
            return 0
        return ns_to_ticks(self.pit.now() - st.start_ns)

    def value(self) -> int:
        """The count the chip would return now."""
        st = self.state
        n, t = st.count, self._elapsed()
        if st.mode in (2, 3):
            v = n - t % n
            if st.mode == 3:
                v = (v * 2) % n or n      # counts down by two, twice per period
            return v & 0xFFFF
        return (n - t) & 0xFFFF           # modes 0/1/4/5 wrap after terminal count

    def output(self) -> bool:
        st = self.state
        if not st.armed:
            return st.mode != 0
        n, t = st.count, self._elapsed()
        if st.mode == 0:
            return t >= n
        if st.mode == 2:
            return t % n != n - 1
        if st.mode == 3:
            return t % n < (n + 1) // 2
        if st.mode in (1, 5):
            return t >= n if st.mode == 1 else t != n
        return t != n                       # mode 4: low for one clock at terminal count

    def next_edge_ns(self, after: int) -> int | None:
        """When OUT next rises (the IRQ 0 edge) strictly after time ``after``, or None.

        Edges are computed in ticks from the start of the count and turned
        into nanoseconds once, so rounding can neither repeat nor skip one.
        """
        st = self.state
        if not st.armed or (not st.gate and st.mode in (0, 2, 3, 4)):
            return None
        n = st.count
        if st.mode in (2, 3):
            k = max(1, ns_to_ticks(max(0, after - st.start_ns)) // n)
            while st.start_ns + ticks_to_ns(k * n) <= after:
                k += 1
            return st.start_ns + ticks_to_ns(k * n)
        ticks = n + 1 if st.mode in (4, 5) else n      # one edge per count
        when = st.start_ns + ticks_to_ns(ticks)
        return when if when > after else None

    def load(self, count: int) -> None:
        st = self.state
        st.count = count or 0x10000
        st.start_ns = self.pit.now()
        st.armed = st.mode not in (1, 5)    # 1 and 5 wait for a gate edge
        st.null_count = False
        self.last_edge_ns = st.start_ns - 1
        self.pit.reschedule(self)

    def set_gate(self, level: bool) -> None:
        st = self.state
        rising = level and not st.gate
        if not level and st.gate and st.mode in (0, 2, 3, 4) and st.armed:
            st.count = self.value() or 0x10000   # freeze where it is
        st.gate = level
        if rising:
            st.start_ns = self.pit.now()
            self.last_edge_ns = st.start_ns - 1
            if st.mode in (1, 5, 2, 3):
                st.armed = not st.null_count
        self.pit.reschedule(self)

    # -- the data port -----------------------------------------------------------
    def read(self) -> int:
        st = self.state
        if st.status_latched is not None:
            v, st.status_latched = st.status_latched, None
            return v
        v = st.latched if st.latched is not None else self.value()
        if st.rw == 1:
            st.latched = None
            return v & 0xFF
        if st.rw == 2:
            st.latched = None
            return v >> 8
        if st.read_high:
            st.read_high = False
            st.latched = None
            return v >> 8
        st.read_high = True
        return v & 0xFF

    def write(self, value: int) -> None:
        st = self.state
        if st.rw == 1:
            self.load(value)
        elif st.rw == 2:
            self.load(value << 8)
        elif not st.write_high:
            st.low_byte = value
            st.write_high = True
            if st.mode == 0:
                st.armed = False            # writing the first byte stops mode 0
        else:
            st.write_high = False
            self.load(st.low_byte | value << 8)

    def status(self) -> int:
        st = self.state
        return ((0x80 if self.output() else 0) | (0x40 if st.null_count else 0) | st.rw << 4
                | st.mode << 1 | int(st.bcd))


class Pit8254:
    """Three counters; ``irq0`` is a line with ``set_level`` (ISA IRQ 0)."""

    def __init__(self, clock, irq0=None):
        self.clock = clock
        self.irq0 = irq0
        self.counters = [Counter(self, i) for i in range(3)]
        self.speaker = 0                     # port 0x61 bits 0-1
        self.irq_edges = 0
        self.speaker_port = _SpeakerPort(self)

    def now(self) -> int:
        return self.clock.now_ns()

    def reschedule(self, counter: Counter) -> None:
        if counter.index != 0 or self.clock is None:
            return
        self.clock.cancel(counter.timer)
        counter.timer = None
        when = counter.next_edge_ns(counter.last_edge_ns)
        if when is not None:
            counter.timer = self.clock.add_timer(when, lambda: self._irq0_edge(when), "pit")

    def _irq0_edge(self, when: int) -> None:
        self.counters[0].timer = None
        self.counters[0].last_edge_ns = when
        self.irq_edges += 1
        if self.irq0 is not None:
            self.irq0.pulse()                # an edge for the 8259/IOAPIC pin
        self.reschedule(self.counters[0])

    # -- ports 0x40-0x43 ------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        return self.counters[offset].read() if offset < 3 else 0xFF

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset < 3:
            self.counters[offset].write(value)
            return
        sc = value >> 6
        if sc == 3:                          # read-back
            for i in range(3):
                if value & (2 << i):
                    c = self.counters[i]
                    if not value & 0x20:
                        c.state.latched = c.value()
                        c.state.read_high = False
                    if not value & 0x10:
                        c.state.status_latched = c.status()
            return
        c = self.counters[sc]
        rw = (value >> 4) & 3
        if rw == 0:                          # counter latch command
            if c.state.latched is None:
                c.state.latched = c.value()
                c.state.read_high = False
            return
        st = c.state
        st.rw, st.mode, st.bcd = rw, (value >> 1) & 7, bool(value & 1)
        if st.mode > 5:
            st.mode -= 4
        st.read_high = st.write_high = False
        st.latched = None
        st.null_count = True
        st.armed = False
        self.reschedule(c)

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("i8254", 1)

    def save(self) -> dict:
        """Counters and the speaker port bits (a copy)."""
        return {"counters": [dict(vars(c.state)) for c in self.counters], "speaker": self.speaker}

    def restore(self, data: dict) -> None:
        """Load :meth:`save`'s output, validated; counter 0's IRQ timer starts again from it."""
        saved = data["counters"]
        if not isinstance(saved, list) or len(saved) != len(self.counters):
            raise RecordError(f"PIT: {len(saved) if isinstance(saved, list) else 'no'} counters, the 8254 has 3")
        state = {"counters": [{**c, "last_edge_ns": ctr.last_edge_ns}
                              for c, ctr in zip(saved, self.counters, strict=True)],
                 "speaker": data["speaker"], "irq_edges": self.irq_edges, "toggle": self.speaker_port.toggle,
                 "timers": {}}
        self.apply_record(self.check_record(make_record(*self.RECORD, state)))
        self.reschedule(self.counters[0])

    def save_record(self) -> dict:
        counters = [{**vars(c.state), "last_edge_ns": c.last_edge_ns} for c in self.counters]
        return make_record(*self.RECORD, {"counters": counters, "speaker": self.speaker, "irq_edges": self.irq_edges,
                                          "toggle": self.speaker_port.toggle,
                                          "timers": timer_refs(self.clock, {"pit": self.counters[0].timer})})

    def check_record(self, record: dict):
        """Counters as the control word and count writes leave them (Xen's ``hvm_hw_pit_channel``).

        Modes 0-5 (6 and 7 are stored as 2 and 3), access modes 1-3 (0 is
        the latch command, never stored), counts 1-65536, latched values of
        16 bits and status bytes of 8; port 0x61 keeps two bits. Only
        counter 0 drives an interrupt, so only it has a timer.
        """
        st = open_record(record, *self.RECORD)
        saved = listing(st, "counters", 3)
        if len(saved) != 3:
            raise RecordError(f"PIT with {len(saved)} counters")
        counters = []
        for i, c in enumerate(saved):
            cs = CounterState(count=integer(field(c, "count"), f"counter {i} count", 1, 0x10000),
                              mode=integer(field(c, "mode"), f"counter {i} mode", 0, 5),
                              rw=integer(field(c, "rw"), f"counter {i} access mode", 1, 3),
                              bcd=flag(c, "bcd"), start_ns=uint(c, "start_ns", 63), gate=flag(c, "gate"),
                              latched=optional(c, "latched", 16), status_latched=optional(c, "status_latched", 8),
                              read_high=flag(c, "read_high"), write_high=flag(c, "write_high"),
                              low_byte=uint(c, "low_byte", 8), armed=flag(c, "armed"),
                              null_count=flag(c, "null_count"))
            counters.append((cs, integer(field(c, "last_edge_ns"), f"counter {i} last edge", -1, (1 << 63) - 1)))
        return (counters, uint(st, "speaker", 2), uint(st, "irq_edges"), flag(st, "toggle"),
                timers(st, ("pit",)).get("pit"))

    def apply_record(self, prepared) -> None:
        """Install the counters and re-arm counter 0's next IRQ edge at its saved deadline."""
        counters, self.speaker, self.irq_edges, self.speaker_port.toggle, timer = prepared
        for c, (cs, edge) in zip(self.counters, counters, strict=True):
            if self.clock is not None:
                self.clock.cancel(c.timer)
            c.state, c.last_edge_ns, c.timer = replace(cs), edge, None
        if timer is not None and self.clock is not None:
            when = timer[0]
            self.counters[0].timer = self.clock.rearm(timer, lambda: self._irq0_edge(when), "pit")


class _SpeakerPort:
    """Port 0x61: gate 2 (bit 0), speaker enable (bit 1), OUT2 (bit 5), toggle (bit 4)."""

    def __init__(self, pit: Pit8254):
        self.pit = pit
        self.toggle = False

    def pio_read(self, offset: int, size: int) -> int:
        self.toggle = not self.toggle
        out2 = self.pit.counters[2].output()
        return self.pit.speaker | (0x20 if out2 else 0) | (0x10 if self.toggle else 0)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.pit.speaker = value & 3
        self.pit.counters[2].set_gate(bool(value & 1))

