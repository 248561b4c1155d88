"""Guest kernels from xenicorn/firmware, run end to end.

Each kernel checks itself and ends with one ``Test result:`` line; the tests
also check what it printed and the emulator's state. With
``XENICORN_FIRMWARE_DIR`` set (CI does, after rebuilding from source) they
run the rebuilt images instead of the committed ones.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from xenicorn import firmware
from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import MachineConfig
from xenicorn.boot import boot

RF = 1 << 16
FAULTS = {0, 6, 13, 14}


def run(name, **cfg):
    """Boot a firmware kernel; its console text is returned, Xen's log is ``machine.xen_log``."""
    path = firmware.find(name)
    assert path, f"firmware {name} is missing; run tools/build_firmware.py"
    cfg.setdefault("xen_log", "none")
    config = MachineConfig(debugcon="none", **cfg)
    machine, kernel = boot(config, path, console=ConsoleSink(None))
    status = machine.run()
    return machine, kernel, status, machine.console.text()


def frames(text):
    out = []
    for line in text.splitlines():
        if line.startswith("frame "):
            out.append({k: int(v, 0) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+|\d+)", line)})
    return out


@pytest.mark.parametrize("name,mode", [("hello32", "protected mode"), ("hello64", "long mode")])
def test_hello_prints_greeting_cmdline_and_memory_map(name, mode):
    machine, _, status, text = run(name, cmdline="console=hvc0 xenicorn=1")
    assert status == 0 and machine.shutdown_reason == "poweroff"
    assert f"Hello from xenicorn {name} ({mode}" in text
    assert 'command line: "console=hvc0 xenicorn=1"' in text
    assert "memory map: 0x100000-0x7ffffff RAM" in text
    assert text.rstrip().endswith("Test result: SUCCESS")
    assert machine.vcpu.long_mode() == (name == "hello64")


@pytest.mark.parametrize("name", ["exceptions32", "exceptions64"])
def test_exception_frames_match_the_sdm(name):
    machine, kernel, status, text = run(name)
    assert "FAIL" not in text, text
    assert text.rstrip().endswith("Test result: SUCCESS"), text
    assert status == 0
    got = frames(text)
    vectors = [f["vec"] for f in got]
    expected = [0, 6, 3, 64, 13] + ([13] if name.endswith("64") else []) + [14, 14]
    expected += ([65] if name.endswith("64") else []) + [8, 128, 13, 14, 129]
    assert vectors == expected
    sym = kernel.symbols
    by_ip = {f["ip"]: f for f in got}
    # faults save the faulting instruction, traps the next one
    assert sym["de_insn"] in by_ip and sym["ud_insn"] in by_ip and sym["gp_insn"] in by_ip
    assert sym["bp_after"] in by_ip and sym["int40_after"] in by_ip
    assert by_ip[sym["pf1_insn"]]["cr2"] == 0x40000010
    # SDM §17.3.1.1: RF is set in the saved RFLAGS image for faults, not for traps
    for f in got:
        if f["vec"] in FAULTS:
            assert f["flags"] & RF, f
        elif f["vec"] in (3, 64, 65, 128):
            assert not f["flags"] & RF, f
    # events from CPL3 pushed the user stack and selector RPL 3
    user = [f for f in got if f["cs"] & 3]
    assert [f["vec"] for f in user] == [128, 13, 14, 129]
    assert all(f["ss"] & 3 == 3 and "sp" in f for f in user)
    assert user[2]["err"] == 4                      # #PF from user mode: U/S set
    assert machine.vcpu.cpl() == 0


def test_misbehaving_kernels_end_with_the_documented_status():
    machine, _, status, text = run("wild32")
    assert status == 1 and machine.shutdown_reason == "crash" and "0xc0000000" in machine.shutdown_message
    machine, _, status, text = run("triple32")
    assert status == 1 and machine.shutdown_reason == "triple-fault"
    assert "#DE" in machine.shutdown_message and "#DF" in machine.shutdown_message
    machine, _, status, text = run("spin32", timeout=0.3)
    assert status == 124 and text == "spinning forever\n"


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU not installed")
@pytest.mark.parametrize("name", ["exceptions32", "exceptions64"])
def test_frames_agree_with_qemu_except_for_rf(name):
    """Real-x86 cross-check: QEMU TCG runs the same image; only RF may differ."""
    path = firmware.find(name)
    res = subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-m", "128", "-kernel", path,
                          "-debugcon", "stdio", "-device", "isa-debug-exit,iobase=0xf4",
                          "-display", "none", "-no-reboot"], capture_output=True, text=True, timeout=60)
    assert "Test result: SUCCESS" in res.stdout
    _, _, _, text = run(name)
    ours, qemus = frames(text), frames(res.stdout)
    for f in ours + qemus:
        f["flags"] &= ~RF
    assert ours == qemus


BUILD_TOOL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "build_firmware.py")


def build_tool():
    """tools/build_firmware.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("build_firmware", BUILD_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not shutil.which("gcc") or not shutil.which("ld"), reason="needs gcc and ld")
def test_rebuilt_firmware_is_byte_identical(tmp_path):
    tool = build_tool()
    recorded = tool.recorded_toolchain()
    assert recorded, f"{tool.TOOLCHAIN} is missing or malformed: rebuild the images with tools/build_firmware.py"
    why = tool.mismatch(recorded, tool.toolchain())
    if why:
        pytest.skip(why)                # another gcc or ld: working images, other bytes
    subprocess.run([sys.executable, BUILD_TOOL, "--out", str(tmp_path)], check=True, capture_output=True)
    for name in firmware.names():
        rebuilt = tmp_path / f"{name}.elf"
        assert rebuilt.read_bytes() == open(os.path.join(firmware.IMAGES, f"{name}.elf"), "rb").read(), name


def test_the_toolchain_record_names_both_tools_and_guards_partial_rebuilds(tmp_path, monkeypatch, capsys):
    tool = build_tool()
    recorded = tool.recorded_toolchain()
    assert recorded and recorded["gcc"].startswith("gcc ") and recorded["ld"].startswith("GNU ld ")
    here = {"gcc": "gcc (Debian 12.2.0-14+deb12u1) 12.2.0", "ld": "GNU ld (GNU Binutils for Debian) 2.40"}
    assert tool.mismatch(dict(here), here) is None
    other = dict(here, gcc="gcc (GCC) 14.1.0")
    why = tool.mismatch(here, other)
    assert here["gcc"] in why and here["ld"] in why and "gcc (GCC) 14.1.0" in why
    assert "does not say" in tool.mismatch(None, here)
    # rebuilding a few images into images/ with another toolchain is refused: the record would lie
    images = tmp_path / "images"
    images.mkdir()
    monkeypatch.setattr(tool, "IMAGES", str(images))
    monkeypatch.setattr(tool, "TOOLCHAIN", str(images / "TOOLCHAIN.json"))
    monkeypatch.setattr(tool, "toolchain", lambda: other)
    monkeypatch.setattr(tool.shutil, "which", lambda name: f"/usr/bin/{name}")     # refused before gcc runs
    (images / "TOOLCHAIN.json").write_text(json.dumps(here))
    assert tool.main(["hello64"]) == 2
    assert "rebuild all of them" in capsys.readouterr().err and list(images.iterdir()) == [images / "TOOLCHAIN.json"]
    (images / "TOOLCHAIN.json").write_text("{not json")
    assert tool.recorded_toolchain(str(images / "TOOLCHAIN.json")) is None
    assert tool.main(["hello64"]) == 2


def test_syscall64_round_trips_through_syscall_and_sysret():
    machine, kernel, status, text = run("syscall64")
    assert "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS"), text
    calls = re.findall(r"syscall (\d): kernel cs=(0x\w+) ss=(0x\w+) flags=(0x\w+) rcx=(0x\w+) r11=(0x\w+); "
                       r"user got (\d+), cs=(0x\w+) ss=(0x\w+)", text)
    assert len(calls) == 3
    for i, (_n, cs, ss, flags, rcx, r11, result, ucs, uss) in enumerate(calls):
        assert (int(cs, 16), int(ss, 16)) == (0x10, 0x18)              # from STAR[47:32]
        assert int(rcx, 16) == kernel.symbols["user_ret"]
        assert not int(flags, 16) & (1 << 9)                           # FMASK cleared IF
        assert int(r11, 16) & (1 << 9)                                 # the user ran with IF=1
        assert (int(ucs, 16), int(uss, 16)) == (0x33, 0x2B) and int(result) == (1000 + i) * 2 + 1
    assert machine.exit_counts["Syscall"] == 3
    assert status == 0


@pytest.mark.parametrize("name", ["irq32", "irq64"])
def test_interrupt_controllers_as_a_guest_programs_them(name, capsys):
    machine, _, status, text = run(name, trace={"int"})
    assert "FAIL" not in text and text.rstrip().endswith("Test result: SUCCESS"), text
    assert status == 0
    err = capsys.readouterr().err
    # the line -> controller -> vector -> IDT path shows in the trace
    for vector in ("0x40", "0x41", "0x42", "0x44", "0x24"):
        assert f"vector {vector} (external interrupt)" in err, vector
    assert machine.lapic.timer_fires >= 6
    assert machine.ioapic.deliveries >= 3                   # edge 0x44, level 0x45 twice
    assert machine.pit.irq_edges >= 3
    assert "level IOAPIC pin redelivered once while still high (2 calls)" in text
    assert "level 8259 input redelivered once while still high (2 calls)" in text
    assert machine.pic.master.state.isr == 0 and machine.lapic.state.isr == 0


def test_trace_irq_int_shows_line_controller_vector_idt(capsys):
    machine, _, status, _ = run("irq64", trace={"irq", "int"})
    assert status == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("[irq]", "[int]"))]
    i = lines.index("[irq] IOAPIC pin 4 -> vector 0x44 (edge) to APIC 0 (physical)")
    assert lines[i - 2:i] == ["[irq] IRQ4 raised", "[irq] GSI4 raised"]
    assert lines[i + 1] == "[irq] LAPIC 0 IRR gets vector 0x44 (edge)"
    assert lines[i + 2].startswith("[irq] LAPIC 0 takes vector 0x44")
    assert lines[i + 3].startswith("[int] vector 0x44 (external interrupt) via long gate int64")
    j = lines.index("[irq] 8259 INTA -> vector 0x24")
    # INTA moves the request to ISR, so the 8259 drops INT before it answers
    assert lines[j - 2:j] == ["[irq] LAPIC 0 LINT0 ExtINT: asks the 8259 for the vector",
                              "[irq] 8259 INT output lowered"]
    assert lines[j + 1].startswith("[int] vector 0x24 (external interrupt)")


@pytest.mark.parametrize("name", ["tickbench32", "tickbench64"])
def test_lapic_timer_ticks_while_computing_deterministic(name):
    """1 kHz of LAPIC timer at 1 ns per instruction: ticks match the model, sums agree."""
    machine, _, status, text = run(name, cmdline="n=1000000 hz=1000", clock="deterministic")
    assert status == 0 and text.rstrip().endswith("Test result: SUCCESS"), text
    per_ms = int(re.search(r"LAPIC timer: (\d+) counts per ms", text).group(1))
    assert abs(per_ms - 1_000_000) < 1_000                        # a 1 GHz bus clock, against the PIT
    ticks = int(re.search(r"ticking: \d+ cycles, (\d+) ticks", text).group(1))
    insns = machine.vcpu.instructions
    assert ticks >= 3 and ticks == machine.lapic.timer_fires
    assert ticks <= insns // 1_000_000                              # one per 1e6 ns of guest time


def test_lapic_timer_at_2_khz_on_host_time_never_replays_an_instruction():
    """Host time: hundreds of asynchronous stops land in a loop of ADD m, r."""
    machine, _, status, text = run("tickbench64", cmdline="n=4000000 hz=2000")
    assert status == 0 and text.rstrip().endswith("Test result: SUCCESS"), text
    ticks = int(re.search(r"ticking: \d+ cycles, (\d+) ticks", text).group(1))
    assert ticks > 20 and machine.lapic.timer_fires >= ticks
