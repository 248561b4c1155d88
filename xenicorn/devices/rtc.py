"""The MC146818 real-time clock and CMOS RAM (ports 0x70/0x71).

Every PC since the AT has one; Xen emulates it for HVM guests, QEMU as
``mc146818rtc``. Software writes a register index to port 0x70 (bit 7 of
that byte is the NMI mask on real boards, ignored here) and reads or writes
the register at port 0x71. The first fourteen registers belong to the clock:

=====  ========================================================================
0x00   seconds (0x01 alarm seconds), 0x02 minutes (0x03 alarm), 0x04 hours
       (0x05 alarm), 0x06 day of week (1 = Sunday), 0x07 day, 0x08 month,
       0x09 year within the century (0x32, in CMOS RAM, holds the century)
0x0A   register A: UIP (bit 7, "update in progress": the time registers are
       being advanced and must not be read), divider and rate select
0x0B   register B: SET (bit 7, freezes the clock while software writes it),
       PIE/AIE/UIE interrupt enables, DM (bit 2: binary, else BCD),
       24/12 (bit 1: 24-hour mode)
0x0C   register C: interrupt flags, cleared by reading
0x0D   register D: VRT (bit 7, "valid RAM and time": the battery is good)
=====  ========================================================================

The rest is battery-backed RAM the firmware uses for its settings.

The hardware advances the time once a second and sets UIP for ~2 ms around
that; Linux polls until UIP is clear before reading. Here the time is
computed from the machine's clock at each read, so there is never an update
in progress and UIP reads 0. While SET is 1 the clock is frozen at the
fields software writes; clearing SET starts it from them. Interrupts (IRQ 8:
periodic, alarm, update-ended) are not raised: register C reads 0.
"""
from __future__ import annotations

import calendar
import time

from ..records import RecordError, field, hexbytes, integer, make_record, open_record, uint

INDEX_PORT = 0x70
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
B_SET, B_DM_BINARY, B_24H = 0x80, 0x04, 0x02
REG_A_DEFAULT = 0x26                  # 32.768 kHz divider, 1024 Hz rate; UIP 0
D_VRT = 0x80
TIME_FIELDS = (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09)
DETERMINISTIC_EPOCH = 1767225600      # 2026-01-01 00:00:00 UTC, as the Xen wall clock
# Times a snapshot may hold: gmtime() fails past about 2**55 s, and machine time (63-bit ns)
# adds less than 2**34 s; BCD years the guest writes (1900-9999, or nonsense digits) fit well.
MAX_SECONDS = 1 << 48


def _bcd(v: int) -> int:
    return (v // 10) << 4 | (v % 10)


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


class Rtc:
    """MC146818 with 128 bytes of CMOS; time = base + machine clock."""

    def __init__(self, now_ns, deterministic: bool = False):
        self._now_ns = now_ns                   # the machine clock (ns since power-on)
        start = DETERMINISTIC_EPOCH if deterministic else int(time.time())
        self.base = start                       # Unix seconds at machine time 0
        self.index = 0
        self.cmos = bytearray(128)
        self.cmos[REG_A] = REG_A_DEFAULT
        self.cmos[REG_B] = B_24H
        self.cmos[REG_D] = D_VRT
        self.frozen: int | None = None          # Unix seconds while SET is 1

    # -- time <-> registers -------------------------------------------------
    def seconds(self) -> int:
        if self.frozen is not None:
            return self.frozen
        return self.base + self._now_ns() // 1_000_000_000

    def _encode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _unbcd(v)

    def _time_register(self, reg: int) -> int:
        t = time.gmtime(self.seconds())
        if reg == 0x04:
            hour = t.tm_hour
            if self.cmos[REG_B] & B_24H:
                return self._encode(hour)
            pm = 0x80 if hour >= 12 else 0
            return self._encode(hour % 12 or 12) | pm
        value = {0x00: t.tm_sec, 0x02: t.tm_min, 0x06: (t.tm_wday + 1) % 7 + 1, 0x07: t.tm_mday,
                 0x08: t.tm_mon, 0x09: t.tm_year % 100, CENTURY: t.tm_year // 100}[reg]
        return self._encode(value)

    def _fields_to_seconds(self) -> int:
        c = self.cmos
        hour_raw = c[0x04]
        if c[REG_B] & B_24H:
            hour = self._decode(hour_raw)
        else:
            hour = self._decode(hour_raw & 0x7F) % 12 + (12 if hour_raw & 0x80 else 0)
        year = self._decode(c[CENTURY]) * 100 + self._decode(c[0x09])
        try:
            return calendar.timegm((year, self._decode(c[0x08]), self._decode(c[0x07]), hour,
                                    self._decode(c[0x02]), self._decode(c[0x00]), 0, 0, 0))
        except (ValueError, OverflowError):
            return self.seconds()              # nonsense written: keep the old time

    # -- the bus --------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self.index
        reg = self.index
        if reg in TIME_FIELDS or reg == CENTURY:
            if self.frozen is not None:
                return self.cmos[reg]
            return self._time_register(reg)
        if reg == REG_A:
            return self.cmos[REG_A] & 0x7F        # never an update in progress
        if reg == REG_C:
            return 0
        return self.cmos[reg]

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.index = value & 0x7F             # bit 7: NMI mask
            return
        reg = self.index
        if reg in (REG_C, REG_D):
            return                                # read-only
        if reg == REG_B:
            was_set = self.cmos[REG_B] & B_SET
            if value & B_SET and not was_set:
                # freeze: the registers now hold the current time, in the new format
                now = self.seconds()
                self.cmos[REG_B] = value
                self.frozen = now
                for r in TIME_FIELDS + (CENTURY,):
                    self.cmos[r] = self._time_register(r)
                return
            self.cmos[REG_B] = value
            if was_set and not value & B_SET:
                written = self._fields_to_seconds()
                self.frozen = None
                self.base = written - self._now_ns() // 1_000_000_000
            return
        if reg in TIME_FIELDS or reg == CENTURY:
            if self.frozen is not None:
                self.cmos[reg] = value
            return                                # writes outside SET are ignored
        self.cmos[reg] = value

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("mc146818", 1)

    def save(self) -> dict:
        """The time base, the index register, CMOS RAM and the frozen time (a copy)."""
        return {"base": self.base, "index": self.index, "cmos": self.cmos.hex(), "frozen": self.frozen}

    def restore(self, data: dict) -> None:
        """Load :meth:`save`'s output, validated."""
        self.apply_record(self.check_record(make_record(*self.RECORD, data)))

    def save_record(self) -> dict:
        return make_record(*self.RECORD, self.save())

    def check_record(self, record: dict):
        """128 bytes of CMOS, a 7-bit index, a clock frozen exactly while register B's SET is 1,
        and times within :data:`MAX_SECONDS` of 1970 (the registers are computed with gmtime)."""
        st = open_record(record, *self.RECORD)
        cmos = hexbytes(st, "cmos", 128)
        base = integer(field(st, "base"), "RTC time base", -MAX_SECONDS, MAX_SECONDS)
        frozen = field(st, "frozen")
        if frozen is not None:
            integer(frozen, "RTC frozen time", -MAX_SECONDS, MAX_SECONDS)
        if (frozen is not None) != bool(cmos[REG_B] & B_SET):
            raise RecordError("RTC frozen time without register B's SET bit, or SET without one")
        return base, uint(st, "index", 7), cmos, frozen

    def apply_record(self, prepared) -> None:
        self.base, self.index, cmos, self.frozen = prepared
        self.cmos[:] = cmos
