"""The command line as a user meets it: output, exit statuses, one-line errors."""
import subprocess
import sys

import pytest

from xenicorn import firmware


def xenicorn(*args, timeout=60):
    res = subprocess.run([sys.executable, "-m", "xenicorn", *args], capture_output=True, text=True,
                         timeout=timeout)
    return res.returncode, res.stdout, res.stderr


def guest_failure(stderr):
    """A guest that ends badly: one line saying why, then where it was and its last exits."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert lines[1].startswith("xenicorn: guest at "), stderr
    assert lines[2].startswith("xenicorn: last ") and "exits (oldest first)" in lines[2], stderr
    assert all(line.startswith("xenicorn:   ") for line in lines[3:]), stderr
    return lines[0]


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_runs_a_bundled_kernel_by_name():
    status, out, err = xenicorn("run", "hello64", "--append", "from the cli")
    assert status == 0 and err == ""
    assert 'command line: "from the cli"' in out and "Test result: SUCCESS" in out


def test_runs_a_kernel_by_path():
    status, out, _ = xenicorn("run", firmware.find("hello32"))
    assert status == 0 and "hello32" in out


def test_firmware_lists_the_images():
    status, out, _ = xenicorn("firmware")
    assert status == 0 and "exceptions64" in out


@pytest.mark.parametrize("args,needle", [
    (["run", "/no/such/kernel.elf"], "no such file"),
    (["run", "no-such-firmware"], "no bundled firmware"),
    (["run", "-m", "1", "hello64"], "guest RAM"),
    (["run", "--serial", "tcp:1", "hello64"], "--serial"),
    (["run", "--trace", "bogus", "hello64"], "unknown trace categories"),
])
def test_bad_input_is_one_line_and_status_2(args, needle):
    status, out, err = xenicorn(*args)
    assert status == 2
    assert needle in one_line(err)


@pytest.mark.parametrize("args,expected", [
    (["run", "hello64", "--foo"], "xenicorn: error: unrecognized arguments: --foo (see xenicorn run --help)"),
    (["step", "--from-insn", "q", "hello64"],
     "xenicorn: error: argument --from-insn: not a number: 'q' (see xenicorn step --help)"),
    (["bogus"], "xenicorn: error: argument command: invalid choice: 'bogus' "
                "(choose from 'run', 'step', 'firmware', 'plot', 'xtf') (see xenicorn --help)"),
])
def test_a_mistyped_option_is_one_line_naming_the_help_to_read(args, expected):
    status, out, err = xenicorn(*args)
    assert (status, out, one_line(err)) == (2, "", expected)


def test_a_program_that_is_no_kernel_is_refused_in_one_line():
    """/bin/ls is a PIE (ET_DYN): no PVH note, no multiboot or bzImage header, no load address."""
    status, out, err = xenicorn("run", "/bin/ls")
    assert status == 2 and out == ""
    assert one_line(err) == ("xenicorn: error: /bin/ls: a position-independent executable or shared object "
                             "(ET_DYN) with no PVH note, multiboot or bzImage header: no entry a PC could boot")


def test_non_elf_and_foreign_elf_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just text\n")
    status, _, err = xenicorn("run", str(text))
    assert status == 2 and "not an ELF" in one_line(err)
    arm = tmp_path / "arm.elf"
    data = bytearray(open(firmware.find("hello32"), "rb").read())
    data[18:20] = (40).to_bytes(2, "little")                    # e_machine = EM_ARM
    arm.write_bytes(bytes(data))
    status, _, err = xenicorn("run", str(arm))
    assert status == 2 and "not x86" in one_line(err)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    status, _, err = xenicorn("run", str(empty), "--load-addr", "0x100000")
    assert status == 2 and "empty" in one_line(err)


def test_truncated_elf(tmp_path):
    cut = tmp_path / "cut.elf"
    cut.write_bytes(open(firmware.find("hello64"), "rb").read()[:200])
    status, _, err = xenicorn("run", str(cut))
    assert status == 2 and "cut.elf" in one_line(err)


def test_guest_that_jumps_to_unmapped_memory():
    status, out, err = xenicorn("run", "wild32")
    assert status == 1 and out == "W\n"
    assert "0xc0000000" in guest_failure(err)
    assert "UnmappedAccess addr=0xc0000000" in err                   # the exit that ended it


def test_guest_that_triple_faults():
    status, out, err = xenicorn("run", "triple32")
    assert status == 1 and "triple fault" in guest_failure(err)


def test_guest_that_spins_forever_hits_the_timeout():
    status, out, err = xenicorn("run", "spin32", "--timeout", "2")
    assert status == 124 and out == "spinning forever\n"
    assert "--timeout" in guest_failure(err)
    assert "jmp" in err.splitlines()[1]                              # guest at ...: the spin loop


def test_max_insns_stops_exactly(tmp_path):
    status, out, err = xenicorn("run", "spin32", "--max-insns", "1000")
    assert status == 124 and "--max-insns 1000" in one_line(err)


def test_max_insns_counts_exactly_through_the_api():
    from xenicorn.devices.console import ConsoleSink
    from xenicorn.machine.machine import MachineConfig
    from xenicorn.boot import boot
    machine, _ = boot(MachineConfig(max_insns=1000), firmware.find("spin32"), console=ConsoleSink(None))
    assert machine.run() == 124
    assert machine.vcpu.instructions == 1000


def test_isa_debug_exit_status_and_flat_binary(tmp_path):
    flat = tmp_path / "exit.bin"
    flat.write_bytes(bytes.fromhex("b021e6e9" "b00ae6e9" "b005e6f4"))   # '!' '\n' then out 0xf4 <- 5
    status, out, err = xenicorn("run", str(flat), "--load-addr", "0x100000")
    assert status == (5 << 1) | 1 and out == "!\n" and err == ""


def test_serial_output_to_a_file(tmp_path):
    flat = tmp_path / "uart.bin"
    # mov dx,0x3f8 ; mov al,'U' ; out dx,al ; mov al,10 ; out dx,al ; poweroff
    flat.write_bytes(bytes.fromhex("66baf803" "b055ee" "b00aee" "66b80020" "66ba0406" "66ef" "f4"))
    log = tmp_path / "serial.log"
    status, out, err = xenicorn("run", str(flat), "--load-addr", "0x100000", "--serial", f"file:{log}")
    assert status == 0 and out == ""
    assert log.read_text() == "U\n"


def test_pci_irqs_defaults_to_the_machines_wiring():
    """The CLI and MachineConfig agree on the PCI interrupt wiring a run gets by default."""
    from xenicorn.cli import _parser
    from xenicorn.machine.machine import MachineConfig
    assert _parser().parse_args(["run", "hello64"]).pci_irqs == MachineConfig().pci_irqs == "apic"


README = __import__("pathlib").Path(__file__).resolve().parent.parent / "README.md"


def test_help_and_the_readme_usage_name_every_trace_category():
    from xenicorn.machine.trace import CATEGORIES
    status, out, _ = xenicorn("run", "--help")
    assert status == 0
    assert ",".join(CATEGORIES) in " ".join(out.split())            # argparse wraps the help text
    assert f"[--trace {','.join(CATEGORIES)}|all]" in README.read_text()


def _readme_trace_runs():
    """The README's ``$ xenicorn run ... --trace ...`` blocks: (command words, head N or None, shown lines)."""
    import re
    import shlex
    for block in re.findall(r"```\n(\$ xenicorn run [^\n]*--trace [^\n]*)\n(.*?)```", README.read_text(), re.S):
        command, shown = block
        words = shlex.split(command[2:].split(" 2>&1")[0])
        head = re.search(r"\| head -(\d+)$", command)
        yield words[1:], int(head.group(1)) if head else None, shown.splitlines()


def test_the_readme_trace_excerpts_are_what_a_run_prints():
    """Regenerate with the command shown; ``| head -N`` blocks are the first N lines, others a selection in order."""
    import re
    runs = list(_readme_trace_runs())
    assert any("evtchn" in words for words, _, _ in runs) and any("hypercalls" in words for words, _, _ in runs)

    def untimed(line):
        return re.sub(r"\d+(\.\d+)?(ms|us|ns|s)\b", "T", line)
    for words, head, shown in runs:
        status, _, err = xenicorn(*words)
        assert status == 0, (words, err)
        real = [untimed(line) for line in err.splitlines() if line.startswith("[")]
        shown = [untimed(line) for line in shown]
        if head is not None:
            assert shown == real[:head], words
        else:
            it = iter(real)
            assert all(line in it for line in shown), (words, shown)


def test_a_reader_that_goes_away_ends_the_listing_quietly():
    """`xenicorn firmware | head -1`: the pipe closes under the listing; no traceback, status 0."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "xenicorn", "firmware"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()                          # the reader is gone before the listing is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err, err
