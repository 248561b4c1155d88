"""The HPET: the PC's High Precision Event Timer at 0xFED00000, as Xen's vhpet.

Older PCs had two timer chips, each with its own interrupt: the 8254 PIT
(IRQ 0) and the RTC (IRQ 8). Intel's HPET (IA-PC HPET specification 1.0a,
2004) replaces both with one block of memory-mapped registers that an OS
finds through the ACPI ``HPET`` table. It has

* **one main counter**, an up-counter that runs at a fixed rate while the
  block is enabled (``ENABLE_CNF``) and stands still otherwise; its period
  in femtoseconds is in the top half of the capabilities register, so an
  OS can read time from it without calibrating anything. Linux makes it a
  clocksource (``clocksource: hpet``) and, early in boot, the *watchdog*
  that checks the TSC;
* **several comparators** ("timers"), each a register the main counter is
  compared with: when the counter reaches it, the timer raises its
  interrupt. A *one-shot* timer fires once; a *periodic* one adds its
  period to the comparator and fires again. Writing the comparator of a
  periodic timer sets the period, unless ``SETVAL`` is set first: then the
  write sets the comparator itself (the next match) and clears ``SETVAL``.
  A timer in 32-bit mode compares only the counter's low 32 bits;
* **interrupt routing** per timer: an IOAPIC input chosen among those its
  ``INT_ROUTE_CAP`` bits allow, edge or level. A level timer also sets its
  bit in the status register and holds its line until software writes 1
  to that bit. In *legacy replacement* mode (``LEG_RT_CNF``) timer 0 takes
  over IRQ 0 (the IOAPIC sees it on pin 2 through the ISA override, the
  8259 on input 0) and timer 1 IRQ 8, and the PIT's and RTC's own
  interrupts are cut, which is how an OS replaces the PIT by the HPET
  without touching its interrupt setup.

This one is Xen's (xen/arch/x86/hvm/hpet.c; registers and bits from
xen/arch/x86/include/asm/hpet.h, the saved state from
xen/include/public/arch-x86/hvm/save.h ``hvm_hw_hpet``):

=============  ===============================================================
register       Xen's vhpet
=============  ===============================================================
0x000 caps     0x00F42400_8086A201: vendor 0x8086, revision 1, three timers
               (NUM_TIM_CAP 2), a 64-bit counter, LegacyReplacementRoute
               capable; 16,000,000 fs a tick, 62.5 MHz (Xen's system time
               / 16, ``STIME_PER_HPET_TICK``)
0x010 config   ENABLE_CNF and LEG_RT_CNF writable, the rest reads 0
0x020 status   a timer's bit is set when a *level* timer fires; writing 1
               clears it and drops the line (edge timers never set it)
0x0F0 counter  the main counter; writable, meant to be written while halted
0x100+0x20n    timer n config: Tn_INT_ROUTE_CAP = GSIs 20-23 (bits 52-55),
               SIZE_CAP and PER_INT_CAP, no FSB (MSI) delivery; writable:
               INT_TYPE (level), INT_ENB, TYPE (periodic), VAL_SET, 32MODE,
               INT_ROUTE
0x108+0x20n    timer n comparator (or, periodic without VAL_SET, period)
0x110+0x20n    timer n FSB route: kept and read back, never used
=============  ===============================================================

Accesses may be 1, 2, 4 or 8 bytes, naturally aligned (a misaligned or
wider one reads all ones and writes nothing, ``hpet_check_access_length``);
a narrow write replaces only its bytes of the 64-bit register. Xen's
corner cases are kept: a periodic period below 100 us is raised to it, a
comparator in the past fires at once (in 32-bit mode one more than ~1 ms
behind waits for the counter to wrap), a level periodic timer runs as
one-shot and restarts when its status bit is cleared, and the periodic
comparator is advanced lazily (read it and it is the next match), against
the whole 64-bit counter even in 32-bit mode (so once the counter has
passed 2^32, a 32-bit periodic timer's first match comes within a period
of the write, not at the value written). A narrow write merges with the
register *as read*: for a periodic comparator that is the comparator, so
a 32-bit half written to a 64-bit periodic timer sets a period made of
that half and the comparator's other half (Unicorn splits every 8-byte
MMIO access into two 4-byte ones, docs/unicorn-notes.md, so a guest here
programs periodic timers in 32-bit mode, as Linux does). Two
differences: in legacy mode the PIT's IRQ 0 is cut for as long as the mode
is on (the spec's rule; Xen stops the PIT's timer once, when timer 0 is
armed), and a legacy timer set to level still sends edges (IRQ 0 and 8 are
edge-triggered ISA lines; Xen arms no timer at all then). The RTC here
raises no interrupts, so there is nothing of it to cut.

The counter is machine time (``clock.now_ns() // 16``, deterministic under
``--clock deterministic``); each armed comparator is one timer on the
machine clock at the exact nanosecond the counter reaches it. A periodic
timer that fell behind (a loaded host) delivers one interrupt and moves to
the next match after the counter, as Xen's comparator arithmetic does.
"""
from __future__ import annotations

from ..records import (RecordError, field, integer, listing, make_record, open_record, timer_refs, timers,
                       uint)

HPET_BASE = 0xFED00000
HPET_SIZE = 0x400                        # Xen's HPET_MMAP_SIZE: registers up to 0x3FF
NUM_TIMERS = 3                           # Xen's HPET_TIMER_NUM
TICK_NS = 16                             # Xen's STIME_PER_HPET_TICK: 62.5 MHz
PERIOD_FS = TICK_NS * 1_000_000
M32, M64 = (1 << 32) - 1, (1 << 64) - 1

ID, CFG, STATUS, COUNTER = 0x000, 0x010, 0x020, 0x0F0
TN_BASE, TN_STRIDE = 0x100, 0x20         # timer n: config +0, comparator +8, FSB route +0x10
CFG_ENABLE, CFG_LEGACY = 0x1, 0x2
ID_LEGSUP, ID_64BIT = 0x8000, 0x2000
CAPABILITIES = (PERIOD_FS << 32 | 0x8086 << 16 | ID_LEGSUP | ID_64BIT | (NUM_TIMERS - 1) << 8 | 0x01)

TN_LEVEL, TN_ENABLE, TN_PERIODIC, TN_PERIODIC_CAP = 0x002, 0x004, 0x008, 0x010
TN_64BIT_CAP, TN_SETVAL, TN_32BIT = 0x020, 0x040, 0x100
TN_ROUTE_SHIFT, TN_ROUTE = 9, 0x3E00
ROUTE_CAP = 0x00F00000                   # GSIs 20-23: Xen's HPET_TN_INT_ROUTE_CAP_VAL
ROUTE_GSIS = tuple(g for g in range(32) if ROUTE_CAP >> g & 1)
TN_CAPS = ROUTE_CAP << 32 | TN_64BIT_CAP | TN_PERIODIC_CAP
TN_WRITABLE = TN_LEVEL | TN_ENABLE | TN_PERIODIC | TN_SETVAL | TN_32BIT | TN_ROUTE
MIN_PERIOD = 100_000 // TICK_NS          # 100 us, the floor Xen puts under every periodic timer
TINY_TICKS = (1_000_000_000 >> 10) // TICK_NS   # Xen's HPET_TINY_TIME_SPAN: ~1 ms of ticks
LEGACY_IRQS = (0, 8)                     # timer 0 -> IRQ 0, timer 1 -> IRQ 8 (RTC_IRQ)
MAX_DEADLINE_NS = 1 << 62                # beyond it a comparator is "never" (292 years away)


class Hpet:
    """Xen's vhpet: registers, three comparators and their interrupt lines.

    ``gsi_lines`` maps GSI 20-23 to the HPET's sub-line into each;
    ``legacy_lines`` are the lines of IRQ 0 and IRQ 8 it drives in legacy
    replacement mode (the wiring connects each to the 8259 and the IOAPIC).
    """

    def __init__(self, clock, gsi_lines: dict, legacy_lines: tuple):
        self.clock = clock
        self.gsi_lines = gsi_lines
        self.legacy_lines = legacy_lines
        self.config = 0
        self.isr = 0
        self.mc64 = 0                              # the counter while halted
        self.mc_offset = 0                         # counter = ticks + offset while running
        self.tn_config = [TN_CAPS] * NUM_TIMERS
        self.cmp = [M64] * NUM_TIMERS             # the comparator as read (32 bits in 32-bit mode)
        self.cmp64 = [M64] * NUM_TIMERS           # the running 64-bit comparator
        self.period = [0] * NUM_TIMERS
        self.fsb = [0] * NUM_TIMERS
        self.held: list[int | None] = [None] * NUM_TIMERS     # the GSI a level timer holds high
        self.armed: list = [None] * NUM_TIMERS                # the machine-clock timer of each
        self.fired = [0] * NUM_TIMERS                         # interrupts raised, per timer

    # -- time -------------------------------------------------------------------------
    def _ticks(self) -> int:
        return self.clock.now_ns() // TICK_NS

    @property
    def enabled(self) -> bool:
        return bool(self.config & CFG_ENABLE)

    @property
    def legacy(self) -> bool:
        """LegacyReplacementRoute is on: timers 0 and 1 own IRQ 0 and 8, the PIT's IRQ 0 is cut."""
        return bool(self.config & CFG_LEGACY)

    def counter(self, now: int | None = None) -> int:
        """The main counter at machine tick ``now`` (default: now)."""
        if not self.enabled:
            return self.mc64
        return ((self._ticks() if now is None else now) + self.mc_offset) & M64

    def _is(self, n: int, bit: int) -> bool:
        return bool(self.tn_config[n] & bit)

    def _route(self, n: int) -> int:
        return (self.tn_config[n] & TN_ROUTE) >> TN_ROUTE_SHIFT

    def _legacy_timer(self, n: int) -> bool:
        return n < 2 and self.legacy

    def _route_valid(self, n: int) -> bool:
        return self._legacy_timer(n) or bool(ROUTE_CAP >> self._route(n) & 1)

    def _sanitize_route(self, n: int) -> None:
        """An enabled timer with a route its caps do not allow gets the first allowed one
        (Xen's timer_sanitize_int_route); a disabled one gets route 0."""
        if self._route_valid(n):
            return
        self.tn_config[n] &= ~TN_ROUTE
        if self._is(n, TN_ENABLE):
            self.tn_config[n] |= ROUTE_GSIS[0] << TN_ROUTE_SHIFT

    def _comparator(self, n: int, now: int) -> int:
        """The comparator as read, a periodic one first moved past the counter (hpet_get_comparator)."""
        c = self.cmp64[n]
        p = self.period[n]
        if self.enabled and self._is(n, TN_PERIODIC) and p:
            elapsed = (self.counter(now) - c) & M64
            if elapsed < 1 << 63:                  # the counter reached it: the next match
                c = (c + (elapsed + p) // p * p) & M64
                self.cmp64[n] = c
        if self._is(n, TN_32BIT):
            c &= M32
        self.cmp[n] = c
        return c

    # -- the registers ---------------------------------------------------------------
    def _read64(self, reg: int, now: int) -> int:
        if reg == ID:
            return CAPABILITIES
        if reg == CFG:
            return self.config
        if reg == STATUS:
            return self.isr
        if reg == COUNTER:
            return self.counter(now)
        n, part = divmod(reg - TN_BASE, TN_STRIDE)
        if reg < TN_BASE or n >= NUM_TIMERS:
            return 0                                       # reserved: reads 0
        if part == 0:
            return self.tn_config[n]
        if part == 8:
            return self._comparator(n, now)
        if part == 0x10:
            return self.fsb[n]
        return 0

    @staticmethod
    def _bad_access(offset: int, size: int) -> bool:
        """Misaligned or wider than 8 bytes: all ones, writes dropped (hpet_check_access_length)."""
        return size > 8 or size not in (1, 2, 4, 8) or bool(offset & (size - 1))

    def mmio_read(self, offset: int, size: int) -> int:
        if self._bad_access(offset, size):
            return (1 << (8 * size)) - 1
        val = self._read64(offset & ~7, self._ticks())
        return (val >> (8 * (offset & 7))) & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if self._bad_access(offset, size):
            return
        now = self._ticks()
        reg, shift = offset & ~7, 8 * (offset & 7)
        old = self._read64(reg, now)
        if size == 8:
            new = value & M64
        else:                                              # only this access's bytes change
            mask = ((1 << (8 * size)) - 1) << shift
            new = ((value << shift) & mask) | (old & ~mask)
        start: set[int] = set()
        stop: set[int] = set()
        if reg == CFG:
            self._write_config(old, new, now, start, stop)
        elif reg == STATUS:
            self._clear_status(value << shift, start)     # write 1 to clear: the raw bits, not merged
        elif reg == COUNTER:
            self.mc64 = new
            if self.enabled:                               # Xen warns, and restarts every timer
                for n in range(NUM_TIMERS):
                    if self._is(n, TN_ENABLE):
                        stop.add(n)
                        start.add(n)
        elif TN_BASE <= reg < TN_BASE + NUM_TIMERS * TN_STRIDE:
            n, part = divmod(reg - TN_BASE, TN_STRIDE)
            if part == 0:
                self._write_timer_config(n, old, new, start, stop)
            elif part == 8:
                self._write_comparator(n, new, start, stop)
            elif part == 0x10:
                self.fsb[n] = new
        for n in sorted(stop):
            self._stop(n, now)
        for n in sorted(start):
            self._start(n, now)

    def _write_config(self, old: int, new: int, now: int, start: set, stop: set) -> None:
        self.config = new & (CFG_ENABLE | CFG_LEGACY)
        for n in range(NUM_TIMERS):
            self._sanitize_route(n)
        if not old & CFG_ENABLE and new & CFG_ENABLE:
            # the counter starts from where it stood; comparators restart from their registers
            self.mc_offset = (self.mc64 - now) & M64
            for n in range(NUM_TIMERS):
                self.cmp64[n] = self.cmp[n] & M32 if self._is(n, TN_32BIT) else self.cmp[n]
                if self._is(n, TN_ENABLE):
                    start.add(n)
        elif old & CFG_ENABLE and not new & CFG_ENABLE:
            self.mc64 = (self.mc_offset + now) & M64       # halt: keep the count
            for n in range(NUM_TIMERS):
                if self._is(n, TN_ENABLE):
                    stop.add(n)

    def _clear_status(self, bits: int, start: set) -> None:
        for n in range(NUM_TIMERS):
            if bits >> n & 1 and self.isr >> n & 1:
                self.isr &= ~(1 << n)
                if self.held[n] is not None:
                    self.gsi_lines[self.held[n]].set_level(False)
                    self.held[n] = None
                if self.enabled and self._is(n, TN_ENABLE) and self._is(n, TN_LEVEL) and self._is(n, TN_PERIODIC):
                    start.add(n)                           # a level periodic timer runs one period at a time

    def _write_timer_config(self, n: int, old: int, new: int, start: set, stop: set) -> None:
        self.tn_config[n] = (new & TN_WRITABLE) | (old & ~TN_WRITABLE)
        self._sanitize_route(n)
        if new & TN_32BIT:
            self.cmp[n] &= M32
            self.period[n] &= M32
        if not self.enabled:
            return
        if new & TN_ENABLE:
            if (new ^ old) & TN_PERIODIC or (new & TN_32BIT and not old & TN_32BIT):
                stop.add(n)                                # mode or width changed: start again
                start.add(n)
            elif not old & TN_ENABLE:
                start.add(n)
        elif old & TN_ENABLE:
            stop.add(n)

    def _write_comparator(self, n: int, new: int, start: set, stop: set) -> None:
        if self._is(n, TN_PERIODIC) and not self._is(n, TN_SETVAL):
            # the period, clamped to [100 us, half the counter's range] (Xen's hpet_write)
            biggest = (M32 if self._is(n, TN_32BIT) else M64) >> 1
            self.period[n] = min(max(new, MIN_PERIOD), biggest)
        else:
            self.tn_config[n] &= ~TN_SETVAL               # VAL_SET lasts for one comparator write
            self.cmp64[n] = new
            self.cmp[n] = new & M32 if self._is(n, TN_32BIT) else new
        if self.enabled and self._is(n, TN_ENABLE):
            stop.add(n)
            start.add(n)

    # -- the comparators on the machine clock --------------------------------------------
    def _stop(self, n: int, now: int) -> None:
        self.clock.cancel(self.armed[n])
        self.armed[n] = None
        self._comparator(n, now)                           # a read while stopped sees it up to date

    def _start(self, n: int, now: int, at_least: int = 0) -> None:
        """Arm timer ``n`` for the tick its comparator matches (Xen's hpet_set_timer), at least
        ``at_least`` ticks from now."""
        if not self._is(n, TN_ENABLE) or (self._is(n, TN_LEVEL) and self.isr >> n & 1):
            return                                         # a level timer waits for its status bit
        if not self._route_valid(n):
            return
        cmp, cur = self._comparator(n, now), self.counter(now)
        if self._is(n, TN_32BIT):
            cmp, cur = cmp & M32, cur & M32
        diff = (cmp - cur) & M64
        if diff >= 1 << 63:
            # in the past: now, except a 32-bit comparator more than ~1 ms behind, which
            # matches after the 32-bit counter wraps
            behind = -diff & M64
            diff = diff & M32 if self._is(n, TN_32BIT) and behind > TINY_TICKS else 0
        self.clock.cancel(self.armed[n])
        self.armed[n] = None
        deadline = (now + max(diff, at_least)) * TICK_NS
        if deadline < MAX_DEADLINE_NS:
            self.armed[n] = self.clock.add_timer(deadline, lambda: self._fire(n), f"hpet{n}")

    def _fire(self, n: int) -> None:
        """The counter reached timer ``n``'s comparator: raise its interrupt, re-arm a periodic one."""
        self.armed[n] = None
        self.fired[n] += 1
        if self._legacy_timer(n):
            self.legacy_lines[n].pulse()                   # IRQ 0 / IRQ 8 are edge-triggered ISA lines
        else:
            gsi = self._route(n)
            if gsi not in self.gsi_lines:
                return
            if self._is(n, TN_LEVEL):
                self.isr |= 1 << n                         # held until software writes the bit
                self.held[n] = gsi
                self.gsi_lines[gsi].set_level(True)
                return
            self.gsi_lines[gsi].pulse()
        if self._is(n, TN_PERIODIC) and self.period[n]:
            # Xen's vpt runs no periodic timer faster than every 100 us (create_periodic_time),
            # whatever the period register says (32-bit mode can truncate it to a few ticks)
            self._start(n, self._ticks(), at_least=MIN_PERIOD if self.period[n] < MIN_PERIOD else 0)

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("hpet", 1)
    TIMER_NAMES = tuple(f"hpet{n}" for n in range(NUM_TIMERS))

    def save_record(self) -> dict:
        """Xen's ``hvm_hw_hpet`` fields, the counter's offset from machine time, the GSI each
        level timer holds high, and each armed comparator's machine-clock timer."""
        chans = [{"config": self.tn_config[n], "cmp": self.cmp[n], "cmp64": self.cmp64[n],
                  "period": self.period[n], "fsb": self.fsb[n], "held": self.held[n], "fired": self.fired[n]}
                 for n in range(NUM_TIMERS)]
        armed = {f"hpet{n}": self.armed[n] for n in range(NUM_TIMERS)}
        return make_record(*self.RECORD, {"config": self.config, "isr": self.isr, "mc64": self.mc64,
                                          "mc_offset": self.mc_offset, "channels": chans,
                                          "timers": timer_refs(self.clock, armed)})

    def check_record(self, record: dict):
        """Only states the registers can reach: read-only capability bits as Xen sets them, no
        reserved bit, routes the caps allow, 32-bit values in 32-bit mode, a held line only
        behind a set status bit, and a comparator armed only while it can fire."""
        st = open_record(record, *self.RECORD)
        config = uint(st, "config", 64, reserved=~(CFG_ENABLE | CFG_LEGACY) & M64)
        isr = uint(st, "isr", 64, reserved=~((1 << NUM_TIMERS) - 1) & M64)
        mc64, mc_offset = uint(st, "mc64"), uint(st, "mc_offset")
        saved = listing(st, "channels", NUM_TIMERS)
        if len(saved) != NUM_TIMERS:
            raise RecordError(f"HPET with {len(saved)} timers, Xen's has {NUM_TIMERS}")
        armed = timers(st, self.TIMER_NAMES)
        chans = []
        for n, c in enumerate(saved):
            cfg = uint(c, "config")
            if cfg & ~TN_WRITABLE != TN_CAPS:
                raise RecordError(f"timer {n} config {cfg:#x}: capability bits are not {TN_CAPS:#x}")
            route = (cfg & TN_ROUTE) >> TN_ROUTE_SHIFT
            if not (n < 2 and config & CFG_LEGACY) and not ROUTE_CAP >> route & 1 \
                    and (route or cfg & TN_ENABLE):
                raise RecordError(f"timer {n} routed to GSI {route}, outside its INT_ROUTE_CAP")
            wide = 32 if cfg & TN_32BIT else 64
            ch = (cfg, uint(c, "cmp", wide), uint(c, "cmp64"), uint(c, "period", wide), uint(c, "fsb"),
                  field(c, "held"), integer(field(c, "fired"), f"timer {n} interrupts"))
            held = ch[5]
            if held is not None and (integer(held, f"timer {n} held GSI") not in ROUTE_GSIS or not isr >> n & 1):
                raise RecordError(f"timer {n} holds GSI {held} without its status bit")
            can_fire = config & CFG_ENABLE and cfg & TN_ENABLE and not (cfg & TN_LEVEL and isr >> n & 1)
            if f"hpet{n}" in armed and not can_fire:
                raise RecordError(f"timer {n} armed while it cannot fire")
            chans.append(ch)
        return config, isr, mc64, mc_offset, chans, armed

    def apply_record(self, prepared) -> None:
        """Install the registers and re-arm each comparator at its saved deadline (no line is driven)."""
        self.config, self.isr, self.mc64, self.mc_offset, chans, armed = prepared
        for n, (cfg, cmp, cmp64, period, fsb, held, fired) in enumerate(chans):
            self.clock.cancel(self.armed[n])
            self.tn_config[n], self.cmp[n], self.cmp64[n], self.period[n] = cfg, cmp, cmp64, period
            self.fsb[n], self.held[n], self.fired[n] = fsb, held, fired
            self.armed[n] = self.clock.rearm(armed.get(f"hpet{n}"), lambda n=n: self._fire(n), f"hpet{n}")


class IsaIrq:
    """An ISA IRQ as the HPET drives it in legacy mode: the 8259 input and the IOAPIC pin
    together, each through the HPET's own sub-line (which the machine's wiring record saves)."""

    def __init__(self, *lines):
        self.lines = lines

    def pulse(self) -> None:
        for line in self.lines:
            line.pulse()


class LegacyGate:
    """The PIT's IRQ 0 output, cut while the HPET is in legacy replacement mode.

    The HPET spec (1.0a, LEG_RT_CNF) says the 8254 then causes no
    interrupts; the PIT keeps counting (port 0x61 and read-back still see
    it), only its edges stop short of IRQ 0.
    """

    def __init__(self, line, hpet: Hpet):
        self.line, self.hpet = line, hpet

    def pulse(self) -> None:
        if not self.hpet.legacy:
            self.line.pulse()

    def set_level(self, level: bool) -> None:
        if not self.hpet.legacy or not level:
            self.line.set_level(level)
