"""The ``xenicorn`` command line (flags shaped like QEMU's where one exists).

``xenicorn run KERNEL`` boots a PVH ELF kernel (or a firmware image by name,
e.g. ``hello64``) and returns the machine's exit status: 0 after a clean
poweroff, ``(v << 1) | 1`` after ``isa-debug-exit``, 1 when the guest
crashed, 2 for bad input or a CPU engine xenicorn cannot use (one line
naming what is unsupported: ``engine.probe()``), 124 when
``--timeout``/``--max-insns`` ran out.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from .engine import EngineUnsupported
from .machine.machine import MachineConfig, STATUS_USAGE, STATUS_CRASH


class UsageError(Exception):
    """Bad user input: reported as one line, exit status 2."""


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _count(text: str) -> int:
    """A number of instructions: 0 or more."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a count of instructions, 0 or more")
    return n


def _smp(text: str) -> int:
    """``-smp N`` or ``-smp cpus=N`` (QEMU's spelling; the other topology keys are not offered)."""
    from .machine.machine import MAX_VCPUS
    value = text[5:] if text.startswith("cpus=") else text
    try:
        n = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of vCPUs (N or cpus=N), not {text!r}") from None
    if not 1 <= n <= MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"{n} vCPUs: xenicorn runs 1 to {MAX_VCPUS}")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse, but bad input is one line (argparse prints the whole usage first).

    The line names the help to read: ``xenicorn run --help`` for a mistyped
    ``run`` option, even when argparse reports it from the top parser
    (unrecognized arguments are collected there, after the subcommand ran).
    """

    argv: list[str] = []

    def parse_args(self, args=None, namespace=None):
        _Parser.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str):
        prog = self.prog
        if prog == "xenicorn":
            words = [a for a in _Parser.argv if not a.startswith("-")]
            if words and words[0] in _SUBCOMMANDS:
                prog = f"xenicorn {words[0]}"
        self.exit(2, f"xenicorn: error: {message} (see {prog} --help)\n")


_SUBCOMMANDS = ("run", "step", "firmware", "xtf")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xenicorn", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="boot a kernel")
    _run_options(r)
    r.add_argument("--trace-json", metavar="FILE",
                   help="write every interrupt event (evtchn bits, lines, PIC/IOAPIC/LAPIC, IDT delivery) "
                        "with what it changed, one JSON object per line")
    r.add_argument("--record", metavar="FILE",
                   help="write the run's timeline: every exit and interrupt event with its instruction "
                        "count, one JSON object per line (xenicorn plot draws it)")
    s = sub.add_parser("step", help="boot a kernel and stop at each interrupt event (keys: n s c i q ?)")
    _run_options(s)
    s.add_argument("--from-insn", type=_count, default=0, metavar="N",
                   help="run the first N guest instructions without stopping")
    s.add_argument("--trace-json", metavar="FILE", help="also write the events as JSON lines")
    s.add_argument("--panel", action=argparse.BooleanOptionalAction, default=None,
                   help="draw the interrupt state panel at each stop (default: when stdout is a terminal)")
    sub.add_parser("firmware", help="list the bundled guest kernels")
    from .debug import plot
    plot.add_arguments(sub.add_parser("plot", help="draw a run --record file as a timeline PNG "
                                                   "(matplotlib: the plot extra), or --summary as text"))
    from . import xtf
    xtf.add_arguments(sub.add_parser("xtf", help="run Xen Test Framework images, as xtf-runner does"))
    return p


def _run_options(r: argparse.ArgumentParser) -> None:
    """The options ``run`` and ``step`` share: the machine and how to boot it."""
    r.add_argument("kernel", nargs="?",
                   help="PVH ELF kernel, bzImage, flat binary (with --load-addr), or a firmware name")
    r.add_argument("--kernel-deb", metavar="PACKAGE",
                   help="boot a Debian kernel package (e.g. linux-image-cloud-amd64): apt-get download, "
                        "unpack its vmlinux, and (without --initrd) a busybox initramfs; cached")
    r.add_argument("-m", "--memory", type=_int, default=None, metavar="MiB",
                   help="guest RAM (default 128, 512 with --kernel-deb)")
    r.add_argument("-smp", "--smp", type=_smp, default=1, metavar="N",
                   help="vCPUs, 1 to 8 (QEMU's syntax: N or cpus=N); they share one CPU engine and "
                        "take turns, as QEMU's single-threaded TCG")
    from .linux.guest import DEFAULT_CMDLINE, PVH_CMDLINE
    r.add_argument("--append", "-append", default=None, metavar="CMDLINE",
                   help=f"kernel command line (with --kernel-deb, default: '{DEFAULT_CMDLINE}'; "
                        f"with --boot pvh too: '{PVH_CMDLINE}')")
    r.add_argument("--initrd", "-initrd", metavar="FILE",
                   help="initrd: module 0 of hvm_start_info (pvh), the zero page's ramdisk (linux)")
    r.add_argument("--load-addr", type=_int, metavar="ADDR", help="load KERNEL as a flat binary here")
    r.add_argument("--boot", choices=("auto", "pvh", "linux", "multiboot"), default="auto",
                   help="pvh: enter the ELF's PVH entry (a bzImage: the ELF inside it); linux: a bzImage "
                        "through the Linux/x86 boot protocol as an HVM guest, with an MP table and an ACPI "
                        "MADT; multiboot: a Multiboot v1 kernel (--initrd 'FILE ARGS,...' as modules); "
                        "auto (default): linux for a bzImage, pvh for an ELF with a PVH note, multiboot "
                        "for a multiboot header, else pvh")
    r.add_argument("--serial", "-serial", default="stdio", metavar="stdio|file:PATH|none", help="COM1 output")
    from .machine.trace import CATEGORIES
    r.add_argument("--trace", default="", metavar="CATS",
                   help=f"trace categories, comma-separated: {','.join(CATEGORIES)} or all")
    r.add_argument("--max-insns", type=_int, default=0, metavar="N", help="stop after N guest instructions")
    r.add_argument("--timeout", type=float, default=0.0, metavar="S", help="stop after S seconds (status 124)")
    r.add_argument("--vendor", choices=("intel", "amd"), default="intel",
                   help="CPUID vendor (Intel guests use VMCALL, AMD guests VMMCALL)")
    r.add_argument("--cpu", "-cpu", default="default", metavar="MODEL[,+feat,-feat...]",
                   help="CPU model, as QEMU's -cpu: default (xenicorn's own) or max (every feature the CPU "
                        "engine executes: SMEP, SMAP, PKU, RDTSCP, XSAVE, CLWB...); +feat/-feat add or remove "
                        "features by QEMU's names")
    r.add_argument("--clock", choices=("host", "deterministic"), default=None,
                   help="guest time: host clock (fast; run's default) or executed instructions (repeatable, "
                        "~3x slower; step's default, so guest time stands still while you read)")
    r.add_argument("-device", "--device", action="append", default=[], choices=("pc-testdev",),
                   help="add a device: pc-testdev is QEMU's ISA test device (ports 0xE0-0xEB and the IRQ "
                        "lines at 0x2000) that kvm-unit-tests' x86 tests use")
    r.add_argument("--no-xen", action="store_true", help="a plain PC: no Xen CPUID leaves or hypercalls")
    r.add_argument("--no-acpi", action="store_true",
                   help="no ACPI tables (by default the guest gets an RSDP, FADT, DSDT and a MADT listing "
                        "the LAPIC and IOAPIC, as Xen gives PVH guests)")
    r.add_argument("--hvm-fep", action="store_true",
                   help="Xen's hvm_fep (debug builds): the prefix ud2 + \"xen\" makes the next instruction emulated")
    r.add_argument("--no-hpet", action="store_true",
                   help="no HPET at 0xFED00000 and no ACPI HPET table (QEMU's -no-hpet, Xen's hpet=0)")
    r.add_argument("--xen-version", default="4.17", metavar="MAJOR.MINOR",
                   help="what XENVER_version and CPUID report (default 4.17)")
    r.add_argument("--callback-deassert", choices=("poll", "eoi"), default="poll",
                   help="how Xen's level-triggered callback (GSI, PCI INTx) drops: poll vCPU0's "
                        "upcall_pending at every block while asserted (as Xen and QEMU), or "
                        "resample it when the guest EOIs the interrupt")
    r.add_argument("--no-evtchn-fifo", dest="evtchn_fifo", action="store_false",
                   help="offer only the 2-level event-channel ABI: the FIFO ops (init_control, "
                        "expand_array, set_priority) answer -ENOSYS, as under QEMU")
    r.add_argument("--pci-irqs", choices=("isa", "apic"), default=MachineConfig.pci_irqs,
                   help="PCI interrupt routing the ACPI _PRT describes: apic (default) gives PIRQ n "
                        "IOAPIC input 16+n (Linux asks for the xen-platform device's PCI INTx); isa "
                        "routes PIRQ A-D to ISA IRQs 10,10,11,11 as SeaBIOS does on QEMU's PC (Linux "
                        "then asks Xen for its callback on that GSI)")
    r.add_argument("--xen-event-list", action="store_true",
                   help="at the end, print every event channel port (like QMP's xen-event-list)")
    r.add_argument("--xen-event-inject", action="append", default=[], metavar="PORT[@MS]",
                   help="raise an event on PORT (like QMP's xen-event-inject) once MS ms of guest time "
                        "have passed and the guest has opened the port; repeatable")
    r.add_argument("--xenstore", action="append", default=[], metavar="KEY=VALUE",
                   help="write KEY (relative to the guest's /local/domain/N, or absolute) before boot, "
                        "as the toolstack (dom0); repeatable")
    r.add_argument("--xenstore-watch", action="append", default=[], metavar="PATH",
                   help="print each change to PATH (or below it) while the guest runs; repeatable")
    r.add_argument("--gnttab-max-frames", type=_int, default=64, metavar="N",
                   help="grant table frames the guest may use (as QEMU's xen-gnttab-max-frames)")
    r.add_argument("--console-input", choices=("none", "stdin"), default="none",
                   help="feed standard input to the guest's PV console")
    r.add_argument("--xen-log", default="stderr", metavar="stdout|stderr|file:PATH|none",
                   help="Xen's log (xl dmesg): the guest's console_io lines, each prefixed (d1) as Xen "
                        "prints them (default stderr); the PV console is the guest's console (stdout)")
    r.add_argument("-qmp", "--qmp", default="", metavar="unix:PATH,server,wait=off",
                   help="a QMP monitor on a UNIX socket (QEMU's spelling and protocol)")
    r.add_argument("-gdb", "--gdb", default="", metavar="tcp::PORT",
                   help="wait for gdb's remote protocol on a TCP port (tcp::PORT, tcp:HOST:PORT or PORT)")
    r.add_argument("-s", dest="gdb_default", action="store_true", help="shorthand for -gdb tcp::1234")
    r.add_argument("-S", dest="start_stopped", action="store_true",
                   help="do not run the first guest instruction until gdb continues (or, with only "
                        "-qmp, until the monitor's cont)")
    r.add_argument("--savevm", action="append", default=[], metavar="FILE@N",
                   help="save a snapshot of the whole machine to FILE at the first pause between two "
                        "guest runs once N instructions have run (counts instructions); repeatable")
    r.add_argument("--loadvm", metavar="FILE",
                   help="continue from a snapshot taken with the same kernel and options")


def _resolve_kernel(name: str) -> str:
    if os.path.exists(name) or os.sep in name or name.endswith(".elf"):
        return name
    from . import firmware
    path = firmware.find(name)
    if path is None:
        raise UsageError(f"{name}: no such file, and no bundled firmware of that name "
                         f"(bundled: {', '.join(firmware.names())})")
    return path


# the ends that print where the guest was and its last exits (a guest panic
# reaches us as SCHEDOP_shutdown(crash) or a triple fault; a hang as the timeout)
BAD_ENDS = ("crash", "triple-fault", "timeout", "halted", "watchdog", "internal-error", "emulator-error")


def run(args: argparse.Namespace) -> int:
    from .boot.loader import LoadError
    from .boot import boot
    from .snapshot import SnapshotError
    from . import engine
    engine.probe()                              # refuse an unknown engine before fetching a kernel
    from .x86.cpumodel import CpuModelError, parse as parse_cpu
    try:
        cpu = parse_cpu(args.cpu).spec
    except CpuModelError as e:
        raise UsageError(str(e)) from None
    protocol = args.boot
    if args.kernel_deb:
        if args.kernel:
            raise UsageError("give either KERNEL or --kernel-deb, not both")
        protocol = "pvh" if args.boot == "pvh" else "linux"     # the path: HVM
        args.kernel, initrd = _debian_guest(args.kernel_deb, protocol)
        args.initrd = args.initrd or initrd
        if args.append is None:
            from .linux.guest import DEFAULT_CMDLINE, PVH_CMDLINE
            args.append = PVH_CMDLINE if protocol == "pvh" else DEFAULT_CMDLINE
    elif not args.kernel:
        raise UsageError("no kernel: give KERNEL (a file or a firmware name) or --kernel-deb PACKAGE")
    if protocol == "linux" and args.load_addr is not None:
        raise UsageError("--load-addr loads a flat binary; --boot linux takes a bzImage")
    if args.append is None:
        args.append = ""
    if args.memory is None:
        args.memory = 512 if args.kernel_deb else 128
    if args.memory < 2 or args.memory > 3584:
        raise UsageError(f"-m {args.memory}: guest RAM must be between 2 and 3584 MiB")
    config = MachineConfig(ram_mib=args.memory, cmdline=args.append, serial="stdio",
                           trace={t for t in args.trace.split(",") if t},
                           max_insns=args.max_insns, timeout=args.timeout, vendor=args.vendor, smp=args.smp)
    config.cpu = cpu
    try:
        major, minor = (int(x) for x in args.xen_version.split("."))
    except ValueError:
        raise UsageError(f"--xen-version {args.xen_version}: expected MAJOR.MINOR, e.g. 4.17") from None
    config.xen = not args.no_xen
    config.acpi = not args.no_acpi
    config.hpet = not args.no_hpet
    config.testdev = "pc-testdev" in args.device
    config.hvm_fep = args.hvm_fep
    # step: the same keys give the same bytes, and no guest time passes at the prompt
    config.clock = args.clock or ("deterministic" if args.command == "step" else "host")
    config.xen_version = (major, minor)
    config.callback_deassert = args.callback_deassert
    config.evtchn_fifo = args.evtchn_fifo
    config.pci_irqs = args.pci_irqs
    config.qmp = args.qmp
    _gdb_options(args, config)
    stepping = args.command == "step"
    json_path = args.trace_json or getattr(args, "record", None)
    if stepping or json_path:
        from .debug.stepper import OBSERVED
        config.count_instructions = True          # exact positions, one-instruction steps
        config.observe = set(OBSERVED)
    if not 1 <= args.gnttab_max_frames <= 128:
        raise UsageError(f"--gnttab-max-frames {args.gnttab_max_frames}: expected 1 to 128")
    config.gnttab_max_frames = args.gnttab_max_frames
    save_points = [_save_point(spec) for spec in args.savevm]
    if save_points:
        config.count_instructions = True
    serial = args.serial
    if serial not in ("stdio", "none") and not serial.startswith("file:"):
        raise UsageError(f"--serial {serial}: expected stdio, file:PATH or none")
    config.serial = serial
    if args.xen_log not in ("stdout", "stderr", "none") and not args.xen_log.startswith("file:"):
        raise UsageError(f"--xen-log {args.xen_log}: expected stdout, stderr, file:PATH or none")
    config.xen_log = args.xen_log
    try:
        machine, _ = boot(config, _resolve_kernel(args.kernel), initrd=args.initrd, load_addr=args.load_addr,
                          protocol=protocol)
    except LoadError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:            # bad trace category, bad RAM size, bad -qmp
        raise UsageError(str(e)) from None
    except OSError as e:               # the -qmp or -gdb socket
        which = f"-gdb {config.gdb}" if getattr(e, "gdb_socket", False) else f"-qmp {args.qmp}"
        raise UsageError(f"{which}: {e.strerror or e}") from None
    if machine.boot_protocol == "pvh" and re.search(r"(^|\s)console=ttyS", config.cmdline):
        # Xen gives a PVH guest no 8259 and no ISA IRQs: the UART's interrupt
        # never comes, so a Linux user space writing to ttyS0 prints nothing.
        print("xenicorn: warning: console=ttyS* in a PVH machine: its UART has no interrupt line, "
              "user space output may be lost (a bzImage boots with --boot linux)", file=sys.stderr)
    if args.start_stopped and not config.gdb:
        machine.monitor.paused = True
    for path in args.xenstore_watch:
        _watch_xenstore(machine, path)
    for spec in args.xenstore:
        _seed_xenstore(machine, spec)
    if args.loadvm:
        if machine.monitor is not None:
            machine.capture_power_on()        # system_reset goes back to boot, not to the snapshot
        try:
            machine.load_snapshot(args.loadvm)
        except SnapshotError as e:
            raise UsageError(f"--loadvm: {e}") from None
    for n, path in save_points:
        machine.save_at(n, path)
    if args.console_input == "stdin":
        if machine.xen is None:
            raise UsageError("--console-input needs Xen (drop --no-xen)")
        _read_stdin_into(machine)
    for spec in args.xen_event_inject:
        _schedule_inject(machine, spec)
    records = []
    for path, exits in ((args.trace_json, False), (getattr(args, "record", None), True)):
        if path:
            records.append(_open_record(machine, path, exits))
    if stepping:
        from .debug.stepper import Stepper
        stepper = Stepper(machine, from_insn=args.from_insn)
        if args.panel or (args.panel is None and sys.stdout.isatty()):
            from .debug.panel import attach
            attach(stepper)
    try:
        status = machine.run()
    except SnapshotError as e:                 # --savevm could not write its file
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        machine.console.flush()
        print("xenicorn: interrupted", file=sys.stderr)
        return 130
    finally:
        for rec in records:
            rec.close()
            rec.stream.close()
    machine.console.flush()
    machine.xen_log.flush()
    for path, n in machine.snapshots_saved:
        print(f"xenicorn: snapshot saved to {path} at {n} instructions", file=sys.stderr)
    for n, path in machine.save_points:
        print(f"xenicorn: --savevm {path}@{n}: not saved, the guest ended at {machine.vcpu.instructions} "
              "instructions", file=sys.stderr)
    if machine.shutdown_reason not in ("poweroff", "debug-exit", "quit") or status == STATUS_CRASH:
        print(f"xenicorn: {machine.shutdown_reason}: {machine.shutdown_message}", file=sys.stderr)
        if machine.shutdown_reason in BAD_ENDS:
            for line in machine.crash_report():
                print(f"xenicorn: {line}", file=sys.stderr)
    if args.xen_event_list:
        _print_events(machine)
    machine.close()
    return status


def _debian_guest(package: str, protocol: str) -> tuple[str, str]:
    from .linux import guest
    from .linux.debian import PackageError
    try:
        image = guest.bzimage(package) if protocol == "linux" else guest.kernel(package)
        return image, guest.initramfs()
    except PackageError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--kernel-deb {package}: {e.strerror or e}") from None


def _open_record(machine, path: str, exits: bool):
    from .debug.stepper import JsonLines
    try:
        stream = open(path, "w", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None
    return JsonLines(machine, stream, exits=exits)


def _gdb_options(args: argparse.Namespace, config: MachineConfig) -> None:
    """-s, -gdb SPEC and -S (QEMU's spellings) into the machine's configuration."""
    from .debug.gdbstub import DEFAULT_PORT, parse_spec
    if args.gdb_default and args.gdb:
        raise UsageError("-s and -gdb both choose the gdb port: give one of them")
    config.gdb = f"tcp::{DEFAULT_PORT}" if args.gdb_default else args.gdb
    if config.gdb:
        try:
            parse_spec(config.gdb)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.start_stopped and not (config.gdb or config.qmp):
        raise UsageError("-S waits for a debugger or monitor: add -s, -gdb tcp::PORT or -qmp")
    config.gdb_wait = args.start_stopped and bool(config.gdb)


def _save_point(spec: str) -> tuple[int, str]:
    """--savevm FILE@N: where to save, and after how many guest instructions."""
    path, at, count = spec.rpartition("@")
    try:
        n = int(count, 0)
    except ValueError:
        n = -1
    if not at or not path or n < 0:
        raise UsageError(f"--savevm {spec}: expected FILE@N, N the guest instructions to run first")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--savevm {spec}: cannot write in {folder}")
    return n, path


def _seed_xenstore(machine, spec: str) -> None:
    key, eq, value = spec.partition("=")
    if not eq or not key:
        raise UsageError(f"--xenstore {spec}: expected KEY=VALUE")
    if machine.xen is None:
        raise UsageError("--xenstore needs Xen (drop --no-xen)")
    from .xen.xenstore.store import XsError
    path = machine.xen.guest_key(key)
    try:
        machine.xen.xenstore_write(path, value.encode())
    except XsError as e:
        raise UsageError(f"--xenstore {spec}: {e}") from None


def _read_stdin_into(machine) -> None:
    """A thread that hands what arrives on stdin to the PV console."""
    import threading

    def pump() -> None:
        while True:
            try:
                data = os.read(sys.stdin.fileno(), 4096)
            except OSError:
                return
            if not data:
                return
            machine.post_console_input(data)
    threading.Thread(target=pump, name="xenicorn-stdin", daemon=True).start()


def _watch_xenstore(machine, path: str) -> None:
    if machine.xen is None:
        raise UsageError("--xenstore-watch needs Xen (drop --no-xen)")
    from .xen.xenstore.store import XsError
    full = machine.xen.guest_key(path)

    def changed(node: str) -> None:
        try:
            value = machine.xen.xenstore_read(node).decode("ascii", "replace")
        except XsError:
            value = "(removed)"
        print(f"xenstore-watch: {node} = {value}", file=sys.stderr)
    try:
        machine.xen.xenstore_watch(full, changed)
    except XsError as e:
        raise UsageError(f"--xenstore-watch {path}: {e}") from None


def _schedule_inject(machine, spec: str) -> None:
    """--xen-event-inject PORT[@MS]: a timer on the machine clock that waits for the port."""
    port_text, _, ms_text = spec.partition("@")
    try:
        port, ms = int(port_text, 0), float(ms_text or 0)
    except ValueError:
        raise UsageError(f"--xen-event-inject {spec}: expected PORT or PORT@MILLISECONDS") from None
    if machine.xen is None:
        raise UsageError("--xen-event-inject needs Xen (drop --no-xen)")
    clock = machine.clock

    def fire() -> None:
        if port in machine.xen.evtchn.ports:
            machine.xen.evtchn.event_inject(port)
        elif machine.status is None:
            clock.add_timer(clock.now_ns() + 1_000_000, fire, f"inject port {port}")
    clock.add_timer(int(ms * 1e6), fire, f"inject port {port}")


def _print_events(machine) -> None:
    if machine.xen is None:
        print("xen-event-list: no Xen in this machine", file=sys.stderr)
        return
    from .debug.hmp_info import evtchn_table
    print("\n".join(evtchn_table(machine)))


def _list_firmware() -> None:
    """``xenicorn firmware``: each image, its source folder and what it shows (firmware/catalog.py)."""
    from . import firmware
    from .firmware import catalog
    print(f"images in {firmware.image_dir()}, built from xenicorn/firmware/src/ by tools/build_firmware.py")
    for name in firmware.names():
        row = catalog.describe(name)
        src = ",".join(f"src/{d}/" for d in row.sources) if row else "?"
        text = catalog.summary(row.text, 88) if row else "(no description in xenicorn/firmware/catalog.py)"
        print(f"{name:13s} {src:16s} {text}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "firmware":
            _list_firmware()
            return 0
        if args.command == "plot":
            from .debug import plot
            return plot.main(args)
        if args.command == "xtf":
            from . import xtf
            return xtf.main(args)
        return run(args)
    except UsageError as e:
        print(f"xenicorn: error: {e}", file=sys.stderr)
        return STATUS_USAGE
    except EngineUnsupported as e:              # this host or Unicorn build: nothing the guest did
        print(f"xenicorn: error: unsupported CPU engine: {e}", file=sys.stderr)
        return STATUS_USAGE
    except BrokenPipeError:
        # the reader went away (`xenicorn firmware | head`, `... 2>&1 | head`): stop
        # quietly, as a shell tool does, and keep the interpreter's exit flush from
        # raising the same error again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
