"""The engine boundary: one start-up check, one error, and the services the layers above use.

``engine.probe()`` checks the Unicorn build and the host once per process;
anything it does not know is refused with one line and exit status 2
before a guest runs. Faked failures here go through the real self-tests
(a wrong offset, a wrong exit vector) wherever that is safe, and the
probe's cache is reset around every test.
"""
import struct
import subprocess
import sys

import pytest

from xenicorn import cli, engine
from xenicorn.engine import icount, irqwindow, msr, rawctx, stopcheck
from xenicorn.engine.startup import WINDOW_FALLBACK_NOTE

from test_interrupts import protected


@pytest.fixture(autouse=True)
def fresh_probe():
    """Forget cached checks before and after (after the monkeypatches are undone)."""
    engine.reset_probe()
    yield
    engine.reset_probe()


def run_hello(capfd) -> tuple[int, str, str]:
    status = cli.main(["run", "hello64"])
    out, err = capfd.readouterr()
    return status, out, err


def refused(capfd, *needles: str) -> str:
    status, out, err = run_hello(capfd)
    assert status == 2
    assert "Traceback" not in err and "Test result" not in out       # refused before the guest ran
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("xenicorn: error: unsupported CPU engine: "), line
    for needle in needles:
        assert needle in line, line
    return line


def test_the_pinned_build_passes_every_check():
    info = engine.probe()
    assert info.unicorn_version == "2.1.4" and info.host == "linux x86_64"
    assert info.interrupt_window_exits
    assert engine.probe() is info                                    # cached per process


def test_another_unicorn_version_is_refused_in_one_line(monkeypatch, capfd):
    import unicorn
    monkeypatch.setattr(unicorn, "__version__", "2.1.5")
    refused(capfd, "unicorn 2.1.5", "2.1.4")


def test_a_binding_loading_another_engine_library_is_refused(monkeypatch, capfd):
    import unicorn
    monkeypatch.setattr(unicorn, "uc_version", lambda: (2, 2, 0x020200FF))
    refused(capfd, "2.2.0 engine library")


def test_another_host_architecture_is_refused(monkeypatch, capfd):
    import platform
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    refused(capfd, "host linux aarch64")


@pytest.mark.parametrize("module,name,wrong,needle", [
    (rawctx, "OFF_TR", rawctx.OFF_TR + 8, "CPU state layout"),           # a moved CPUX86State field
    (rawctx, "OFF_ERROR_CODE", rawctx.OFF_ERROR_CODE + 4, "CPU state layout"),
    (msr, "EXIT_VECTOR", msr.EXIT_VECTOR + 1, "MSR intercept window"),    # the intercept reports elsewhere
    (stopcheck, "JMP_BUFS", 64 * 100, "no_exit_request"),                 # another sigjmp_buf size
])
def test_a_failing_self_test_is_refused_in_one_line(monkeypatch, capfd, module, name, wrong, needle):
    monkeypatch.setattr(module, name, wrong)
    refused(capfd, needle, "2.1.4")


def test_an_unexpected_error_inside_a_self_test_becomes_the_one_error(monkeypatch, capfd):
    """A binding that changed shape (here: the counter search breaks) is not a traceback either."""
    def broken():
        raise struct.error("unpack_from requires a buffer of at least 8 bytes")
    monkeypatch.setattr(icount, "_find_offset", broken)
    refused(capfd, "instruction counter (icount) self-test failed", "struct.error")


def test_a_binding_without_its_callback_dicts_is_refused(monkeypatch, capfd):
    """Deleted hooks' thunks are kept through the binding's private dicts; without them, refuse."""
    import unicorn
    real_hook_add = unicorn.Uc.hook_add

    def forgetful_hook_add(self, *args, **kwargs):
        handle = real_hook_add(self, *args, **kwargs)
        self._callbacks.pop(handle, None)                  # as a binding that keeps them elsewhere
        return handle
    monkeypatch.setattr(unicorn.Uc, "hook_add", forgetful_hook_add)
    refused(capfd, "Uc._callbacks", "2.1.4")


def test_the_old_error_classes_are_the_one_error():
    for cls in (rawctx.UnsupportedUnicornBuild, stopcheck.FlagNotFound, icount.CounterNotFound):
        assert issubclass(cls, engine.EngineUnsupported)


def test_a_machine_is_not_built_on_an_unsupported_engine(monkeypatch):
    import unicorn
    from xenicorn.machine.machine import Machine, MachineConfig
    monkeypatch.setattr(unicorn, "__version__", "3.0.0")
    with pytest.raises(engine.EngineUnsupported, match="unicorn 3.0.0"):
        Machine(MachineConfig(ram_mib=16, debugcon="none"))


def test_the_command_line_refuses_as_a_process_too():
    """The same check in a fresh interpreter: exit status 2, one line, no traceback."""
    code = ("import sys, unicorn; unicorn.__version__ = '2.0.1'; "
            "from xenicorn.cli import main; sys.exit(main(['run', 'hello64']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "xenicorn: error: unsupported CPU engine: unicorn 2.0.1 is installed, but xenicorn knows the private "
        "layout of unicorn 2.1.4 only (pip install unicorn==2.1.4)"]
    assert res.stdout == ""


def test_the_interrupt_window_fallback_is_said_once_per_process(monkeypatch, capfd):
    """Without the exact window exit, the block hook takes over and stderr says so once."""
    monkeypatch.setattr(irqwindow, "_exits", lambda code: [])          # the exit never comes
    for _ in range(2):
        status, out, err = run_hello(capfd)
        assert status == 0 and "Test result: SUCCESS" in out
        if _ == 0:
            assert err.strip().splitlines() == [WINDOW_FALLBACK_NOTE]
        else:
            assert err == ""
    assert not engine.probe().interrupt_window_exits


def test_under_the_fallback_the_block_hook_opens_the_window(monkeypatch, capfd):
    from xenicorn.devices.console import ConsoleSink
    from xenicorn.machine.machine import Machine, MachineConfig
    from test_irqwindow import run_with_interrupt_waiting
    monkeypatch.setattr(irqwindow, "_exits", lambda code: [])
    m = Machine(MachineConfig(ram_mib=16, debugcon="none"), console=ConsoleSink(None))
    try:
        assert m.vcpu._irq_request is None
        # mov ecx, 100000 ; l: dec ecx ; jnz l ; sti ; nop ; inc eax ; hlt
        code = bytes.fromhex("b9a0860100" "ffc9" "75fc" "fb" "90" "40" "f4")
        assert run_with_interrupt_waiting(m, code) == 0x100000 + 11
        assert m.vcpu.window_exits == 0
    finally:
        m.close()
    assert capfd.readouterr().err.count("interrupt-window exit") == 1


# -- the services the layers above use ------------------------------------------------------

def test_block_checks_run_at_block_starts_until_removed(machine):
    vcpu = protected(machine)
    # l: dec ecx ; jnz l ; hlt
    machine.memory.write(0x100000, bytes.fromhex("ffc9" "75fc" "f4"))
    vcpu.set_reg("rcx", 5)
    seen = []
    handle = vcpu.add_block_check(seen.append)
    machine.config.max_insns = 1000
    machine.run()
    assert seen.count(0x100000) == 5 and vcpu.reg("rcx") == 0
    vcpu.remove_block_check(handle)
    seen.clear()
    machine.status = None
    vcpu.set_reg("rip", 0x100000)
    vcpu.set_reg("rcx", 3)
    vcpu.run()
    assert seen == [] and vcpu.reg("rcx") == 0


def test_a_block_check_that_raises_ends_the_run_as_an_internal_error(machine):
    from xenicorn import exits as E
    vcpu = protected(machine)
    machine.memory.write(0x100000, bytes.fromhex("90" "f4"))

    def broken(address):
        raise RuntimeError(f"bug at {address:#x}")
    vcpu.add_block_check(broken)
    ex = vcpu.run()
    assert isinstance(ex, E.Shutdown) and ex.reason == "internal-error"
    assert "RuntimeError: bug at 0x100000" in ex.message


def test_cpu_state_commits_segment_loads_when_the_block_ends(machine):
    from xenicorn.x86.segments import flat_code32, flat_data
    vcpu = protected(machine)
    with vcpu.cpu_state() as state:
        state.load_segments(cs=flat_code32(0x08, dpl=3), ss=flat_data(0x13, dpl=3))
        assert vcpu.cpl() == 0                      # not yet: a copy
    assert vcpu.cpl() == 3 and vcpu.reg("ss") == 0x13
    with vcpu.cpu_state() as state:
        assert state.segment("ss").dpl == 3 and state.cpl == 3
        assert state.gprs()[4] == vcpu.reg("rsp") and state.rip == vcpu.reg("rip")
        assert state.cr(0) == vcpu.reg("cr0")


def test_msrs_and_descriptor_tables_through_the_vcpu(machine):
    vcpu = machine.vcpu
    vcpu.msr_write(0x175, 0x1234_5678)              # IA32_SYSENTER_ESP
    assert vcpu.msr_read(0x175) == 0x1234_5678
    vcpu.set_descriptor_table("gdtr", 0x5000, 0x27)
    with vcpu.cpu_state() as state:
        gdt = state.segment("gdt")
    assert (gdt.base, gdt.limit) == (0x5000, 0x27)


def test_the_vcpu_offers_what_the_architecture_code_asks_for():
    """x86/ reaches the engine only through the protocol in x86/cpu.py; VCpu implements it."""
    from xenicorn.engine.rawctx import RawContext
    from xenicorn.engine.vcpu import VCpu
    from xenicorn.x86 import cpu
    for proto, impl in ((cpu.Vcpu, VCpu), (cpu.CpuState, RawContext)):
        wanted = {n for n in vars(proto) if not n.startswith("_")} - {"machine"}
        assert wanted and all(callable(getattr(impl, n, None)) or isinstance(getattr(impl, n, None), property)
                              for n in wanted), sorted(n for n in wanted if not hasattr(impl, n))


def test_host_buffers_map_into_the_engine_at_their_address(machine):
    """Guest RAM is one host buffer: a byte Python writes is the byte the guest loads."""
    from xenicorn.engine.hostmem import buffer_address
    import ctypes
    mem = machine.memory
    assert buffer_address(mem._mm) == mem.host_addr
    mem.write(0x2000, b"\xAB")
    assert ctypes.c_uint8.from_address(mem.host_addr + 0x2000).value == 0xAB
    assert machine.vcpu in mem.engines


def test_a_frame_placed_before_a_vcpu_exists_is_mapped_when_it_attaches():
    from xenicorn.machine.memory import GuestMemory, PAGE_SIZE

    class Recorder:
        def __init__(self):
            self.calls = []

        def map_overlay(self, gpa, host):
            self.calls.append(("map", gpa, host))

        def unmap_overlay(self, gpa):
            self.calls.append(("unmap", gpa))

        def drop_translations(self, start, end):
            self.calls.append(("drop", start, end))

    mem = GuestMemory(2 << 20)
    mem.map_frame(3, 0xF000_0000)
    engine_ = Recorder()
    mem.attach(engine_)
    host = mem.host_addr + mem.size + 3 * PAGE_SIZE
    assert engine_.calls == [("map", 0xF000_0000, host)]
    mem.code_written(0x1234, 2)
    mem.unmap_frame(3)
    assert engine_.calls[1:] == [("drop", 0x1000, 0x2000), ("unmap", 0xF000_0000)]
    mem.close()
