"""The MC146818 RTC: the time Linux reads at boot, SET, formats, CMOS RAM."""
import calendar

from xenicorn.devices.rtc import Rtc, REG_A, REG_B, REG_C, REG_D, B_SET, B_DM_BINARY, B_24H, DETERMINISTIC_EPOCH


class Clock:
    """A settable nanosecond clock."""

    def __init__(self):
        self.ns = 0

    def __call__(self):
        return self.ns


def read(rtc, reg):
    rtc.pio_write(0, 1, reg)
    return rtc.pio_read(1, 1)


def write(rtc, reg, value):
    rtc.pio_write(0, 1, reg)
    rtc.pio_write(1, 1, value)


def test_deterministic_time_starts_at_the_fixed_epoch_and_follows_the_clock():
    clock = Clock()
    rtc = Rtc(clock, deterministic=True)
    # 2026-01-01 00:00:00, a Thursday (day of week 5), in BCD and 24-hour mode
    assert [read(rtc, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [0, 0, 0, 5, 1, 1, 0x26, 0x20]
    clock.ns = (13 * 3600 + 59 * 60 + 7) * 10**9
    assert [read(rtc, r) for r in (0, 2, 4)] == [0x07, 0x59, 0x13]
    assert read(rtc, REG_A) & 0x80 == 0                  # never an update in progress
    assert read(rtc, REG_D) == 0x80 and read(rtc, REG_C) == 0


def test_binary_and_12_hour_formats():
    clock = Clock()
    rtc = Rtc(clock, deterministic=True)
    clock.ns = 13 * 3600 * 10**9
    write(rtc, REG_B, B_DM_BINARY)                       # binary, 12-hour
    assert read(rtc, 4) == 0x80 | 1                      # 1 pm
    write(rtc, REG_B, B_DM_BINARY | B_24H)
    assert read(rtc, 4) == 13 and read(rtc, 9) == 26


def test_set_freezes_and_the_written_time_runs_from_there():
    clock = Clock()
    rtc = Rtc(clock, deterministic=True)
    clock.ns = 5 * 10**9
    write(rtc, REG_B, B_SET | B_24H)
    for reg, value in ((0, 0x30), (2, 0x15), (4, 0x08), (7, 0x29), (8, 0x02), (9, 0x28), (0x32, 0x20)):
        write(rtc, reg, value)
    clock.ns = 50 * 10**9                                # frozen: still the written fields
    assert read(rtc, 0) == 0x30
    write(rtc, REG_B, B_24H)
    assert rtc.seconds() == calendar.timegm((2028, 2, 29, 8, 15, 30, 0, 0, 0))
    clock.ns = 52 * 10**9
    assert read(rtc, 0) == 0x32


def test_time_registers_ignore_writes_outside_set_and_cmos_ram_keeps_bytes():
    clock = Clock()
    rtc = Rtc(clock, deterministic=True)
    write(rtc, 0, 0x59)
    assert read(rtc, 0) == 0
    write(rtc, 0x40, 0xAB)
    assert read(rtc, 0x40) == 0xAB
    rtc.pio_write(0, 1, 0x80 | 0x40)                     # NMI-mask bit set with the index
    assert rtc.pio_read(1, 1) == 0xAB
    write(rtc, REG_D, 0)                                 # read-only
    assert read(rtc, REG_D) == 0x80


def test_host_time_is_now():
    import time
    rtc = Rtc(Clock())
    assert abs(rtc.seconds() - time.time()) < 5
    assert rtc.seconds() != DETERMINISTIC_EPOCH


def test_save_and_restore():
    clock = Clock()
    rtc = Rtc(clock, deterministic=True)
    write(rtc, 0x41, 7)
    other = Rtc(Clock())
    other.restore(rtc.save())
    assert read(other, 0x41) == 7 and other.base == rtc.base
