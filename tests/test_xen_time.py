"""Xen time: deterministic runs, vCPU timers, poll timeouts, the watchdog."""

from xenicorn import firmware
from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import Machine, MachineConfig
from xenicorn.boot import boot
from xenicorn.xen import errno, pvclock

from test_xen_core import call32

BUF = 0x3000


def test_deterministic_runs_repeat_exactly():
    runs = []
    for _ in range(2):
        m, _ = boot(MachineConfig(clock="deterministic", debugcon="none"), firmware.find("xencore64"),
                    console=ConsoleSink(None))
        assert m.run() == 0
        runs.append((bytes(m.console.data), m.vcpu.instructions, m.clock.now_ns()))
    assert runs[0] == runs[1]
    assert b"Test result: SUCCESS" in runs[0][0] and runs[0][1] > 1_000_000
    assert m.exit_counts.get("Msr", 0) >= 1


def deterministic_machine():
    m = Machine(MachineConfig(ram_mib=16, clock="deterministic", debugcon="none"), console=ConsoleSink(None))
    m.vcpu.reset_to_flat32(0x100000, esp=0x9000)
    return m


def test_vcpu_timers_fire_on_the_machine_clock():
    m = deterministic_machine()
    now = m.clock.now_ns()
    m.memory.write_struct(BUF, "<QI", now + 1_000_000, 0)
    assert call32(m, 24, 8, 0, BUF) == 0                           # single-shot in 1 ms
    m.memory.write_struct(BUF, "<Q", 2_000_000)
    assert call32(m, 24, 6, 0, BUF) == 0                           # periodic every 2 ms
    vs = m.xen.vcpu_state(0)
    for step in range(1, 8):                                       # 7 ms in 1 ms steps
        m.clock.wait_until(now + step * 1_000_000)
        m.clock.run_due()
    assert vs.singleshot_ns is None
    assert vs.timer_events == 1 + 3                                # one shot + periodic at 2, 4, 6 ms
    assert call32(m, 24, 7, 0) == 0 and not m.clock.pending()


def test_set_timer_op_clamps_far_deadlines_to_100ms():
    m = deterministic_machine()
    now = m.clock.now_ns()
    far = now + (1 << 51)
    assert call32(m, 15, far & 0xFFFFFFFF, far >> 32) == 0
    assert m.xen.vcpu_state(0).singleshot_ns == now + 100_000_000
    assert call32(m, 15, 0, 0) == 0 and m.xen.vcpu_state(0).singleshot_ns is None


def test_watchdog_bites_a_sleeping_guest():
    m = deterministic_machine()
    # mov eax,29 ; mov ebx,6 ; mov ecx,0x3000 ; vmcall   (watchdog {0, 2 s})
    # mov eax,29 ; mov ebx,1 ; vmcall                     (SCHEDOP_block)
    code = bytes.fromhex("b81d000000" "bb06000000" "b900300000" "0f01c1"
                         "b81d000000" "bb01000000" "0f01c1" "f4")
    m.memory.write_struct(BUF, "<II", 0, 2)
    m.memory.write(0x100000, code)
    m.memory.code_written(0x100000, len(code))
    assert m.run() == 1
    assert m.shutdown_reason == "watchdog" and "watchdog 1" in m.shutdown_message
    assert m.clock.now_ns() >= 2_000_000_000


def test_block_without_any_wake_source_ends_the_run():
    m = deterministic_machine()
    code = bytes.fromhex("b81d000000" "bb01000000" "0f01c1" "f4")    # SCHEDOP_block
    m.memory.write(0x100000, code)
    m.memory.code_written(0x100000, len(code))
    assert m.run() == 1 and m.shutdown_reason == "halted"
    assert "SCHEDOP_block" in m.shutdown_message


def test_poll_port_checks():
    m = deterministic_machine()
    m.memory.write_struct(BUF, "<IIQ", BUF + 0x100, 1, 0)
    m.memory.write_u32(BUF + 0x100, 5000)                           # beyond 1024 ports (32-bit)
    assert call32(m, 29, 3, BUF) == -errno.EINVAL
    m.memory.write_struct(BUF, "<IIQ", 0xC0000000, 1, 0)
    assert call32(m, 29, 3, BUF) == -errno.EFAULT


class SkewedTsc:
    """A TSC 0.2% slower than the rate it reports: a calibration error made visible."""

    def __init__(self, clock):
        self.clock = clock

    def read(self) -> int:
        return self.clock.now_ns() * 998 // 1000

    def hz(self) -> float:
        return 1e9


def test_xen_time_is_the_guests_pv_clock_and_timers_wait_for_it():
    """Xen compares deadlines with the time the guest computes, not its own clock.

    With the TSC rate 0.2% off, the machine clock runs ahead of the guest's
    PV clock. A single-shot deadline the guest set 1 ms ahead must not fire
    when 1 ms of machine time has passed (the guest would find nothing
    expired and set it again: Linux's timer storm), only when the guest's
    clock reaches it.
    """
    m = deterministic_machine()
    m.xen.tsc, m.xen.time_base = SkewedTsc(m.clock), None
    m.clock.wait_until(5_000_000)
    m.xen.map_shared_info(0x5000, 64)
    m.clock.wait_until(9_000_000)
    record = pvclock.TimeInfo.unpack(m.memory.read(m.xen.vcpu_info(0).time_gpa, pvclock.VCPU_TIME_INFO_SIZE))
    guest_now = record.system_time + pvclock.ticks_to_ns(m.xen.tsc.read() - record.tsc_timestamp,
                                                         record.mul, record.shift)
    assert abs(m.xen.now_ns() - guest_now) <= 1
    assert m.clock.now_ns() - guest_now > 7_000                # 0.2% of the 4 ms since: the clocks differ

    m.memory.write_struct(BUF, "<QI", guest_now + 1_000_000, 0)
    assert call32(m, 24, 8, 0, BUF) == 0                       # VCPUOP_set_singleshot_timer
    vs = m.xen.vcpu_state(0)
    m.clock.wait_until(9_000_000 + 1_000_000)
    m.clock.run_due()
    assert vs.timer_events == 0 and vs.singleshot_ns == guest_now + 1_000_000
    m.clock.wait_until(9_000_000 + 1_000_000 + 30_000)          # guest clock: ~1.01 ms later
    m.clock.run_due()
    assert vs.timer_events == 1 and vs.singleshot_ns is None
    assert m.xen.now_ns() >= guest_now + 1_000_000
