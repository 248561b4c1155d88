"""The PC: RAM, buses, devices, vCPUs, and the exit-driven run loop.

:meth:`Machine.run` is the loop a KVM user space runs around ``KVM_RUN``::

    while running:
        exit = vcpu.run()             # Unicorn executes guest code
        machine.handle_exit(exit)     # Python does what hardware/Xen would

:meth:`Machine.handle_exit` maps each exit type to one handler and returns an
:class:`~xenicorn.exits.Action`. Handlers reached from inside a
Unicorn hook (port I/O, CPUID, exceptions, ...) run the same way; if one
decides to stop, the vCPU ends ``emu_start`` and ``run()`` returns that exit.

Process exit statuses (the CLI returns :attr:`Machine.status`): 0 clean
poweroff, ``(v << 1) | 1`` for isa-debug-exit, 1 guest crash or triple
fault, 124 on ``--timeout``, 2 for bad user input (never reached here).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from .. import exits as E
from ..x86.cpuid import CpuidPolicy, ARCH_CAPABILITIES, LEAF7_EDX_ARCH_CAPABILITIES, MSR_ARCH_CAPABILITIES
from .memory import GuestMemory, PAGE_SIZE
from .trace import Tracer, disassemble
from ..engine.vcpu import VCpu
from ..devices.bus import PioBus, MmioBus
from ..devices.console import (ConsoleSink, DebugCon, DebugExit, AcpiPmControl, AcpiPmEvent, AcpiSleepRegisters,
                               KeyboardControllerReset, stdout_sink)

STATUS_OK, STATUS_CRASH, STATUS_USAGE, STATUS_TIMEOUT = 0, 1, 2, 124


COUNT_QUANTUM = 1_000_000          # longest run of a counting vCPU between looks at its timers
HOST_NS_PER_INSN_GUESS = 10.0      # a counting vCPU on host time runs at ~100 MIPS
IO_PORT_NS = 1000                  # deterministic time: one port access, as on an ISA bus


ARCH_CAPABILITIES_INTEREST = "arch-capabilities"     # the MSR window while the kernel starts
RECENT_EXITS = 12                        # exits kept for the report after a crash or hang
PCI_ISA_IRQS = (10, 10, 11, 11)          # PIRQ A-D with pci_irqs="isa", as SeaBIOS routes them


@dataclass
class MachineConfig:
    """Everything a user chooses about a machine (the CLI fills it)."""

    ram_mib: int = 128
    cmdline: str = ""
    serial: str = "stdio"                # stdio | file:PATH | none
    debugcon: str = "stdio"              # stdio | none (port 0xE9)
    trace: set[str] = field(default_factory=set)
    max_insns: int = 0                   # 0 = no limit
    timeout: float = 0.0                 # seconds of host time, 0 = none
    vendor: str = "intel"
    clock: str = "host"                  # host | deterministic (see machine/clock.py)
    ns_per_insn: float = 1.0             # deterministic time: guest ns per instruction
    xen: bool = True                     # the Xen HVM platform (CPUID leaves, hypercalls)
    callback_deassert: str = "poll"      # poll | eoi: how Xen's level callback line drops
    # apic: PIRQ n is wired to IOAPIC input 16+n, as on QEMU's q35, and to the
    # 8259 input the PIIX3 routes it to (the firmware sets 10,10,11,11) for an OS
    # in 8259 mode; isa: that ISA IRQ is the only way in, to the 8259 and IOAPIC
    # input n, as SeaBIOS on QEMU's i440FX. The ACPI _PRT (per interrupt model)
    # and the MP table describe whichever is chosen.
    pci_irqs: str = "apic"
    gnttab_max_frames: int = 64          # grant table frames the guest may use
    qmp: str = ""                        # -qmp unix:PATH,server,wait=off
    gdb: str = ""                        # -gdb tcp::PORT (-s: tcp::1234), see debug/gdbstub.py
    gdb_wait: bool = False               # -S: no guest instruction runs until gdb continues
    xen_version: tuple[int, int] = (4, 17)
    record_console: bool = True
    count_instructions: bool = False     # exact instruction counts and stops (stepper, gdb, records)
    acpi: bool = True                    # ACPI tables (MADT: LAPIC, IOAPIC) for the OS, as Xen gives PVH guests
    observe: set[str] = field(default_factory=set)   # trace categories delivered to observers, unprinted


class Machine:
    """A one-socket x86 PC around Unicorn vCPUs."""

    def __init__(self, config: MachineConfig | None = None, console: ConsoleSink | None = None):
        from .. import engine
        engine.probe()                   # the engine's layout checks; EngineUnsupported if unknown
        self.config = config or MachineConfig()
        self.tracer = Tracer(self.config.trace, observed=self.config.observe)
        self.memory = GuestMemory(self.config.ram_mib << 20)
        self.pio = PioBus("pio", self._unclaimed("port"))
        self.mmio = MmioBus("mmio", self._unclaimed("mmio"))
        self.cpuid = CpuidPolicy(vendor=self.config.vendor, tsc_hz=lambda: self.tsc.hz())
        self.console = console or (stdout_sink() if self.config.debugcon == "stdio" else ConsoleSink(None))
        self.status: int | None = None
        self.shutdown_reason = ""
        self.shutdown_message = ""
        self.exit_counts: dict[str, int] = {}
        # the last exits, for the report when a run ends badly (a flight recorder:
        # one append per exit, formatted only if someone asks)
        self.recent_exits: collections.deque = collections.deque(maxlen=RECENT_EXITS)
        self.xen = None                      # the Xen layer, when built with one
        self._console_input: collections.deque = collections.deque()
        self.interrupt_source = None         # object with pending()/acknowledge(): the APIC/PIC
        self.msr_handlers: dict = {          # msr -> handler(vcpu, Msr exit), see engine/msr.py
            MSR_ARCH_CAPABILITIES: self._arch_capabilities}
        counting = (self.config.count_instructions or bool(self.config.max_insns)
                    or self.config.clock == "deterministic" or bool(self.config.gdb))
        self.vcpus = [VCpu(self, 0, count_instructions=counting)]
        from .clock import VirtualClock
        self.clock = VirtualClock(self.config.clock, self.config.ns_per_insn,
                                  instructions=lambda: self.vcpu.instructions_now())
        self.clock.on_new_first = self._timer_armed
        # the TSC the guest reads: machine ns when RDTSC is trapped, else the
        # host's (Xen's PV clock and CPUID leaf 0x15 both describe it)
        from ..engine.tsc import HostTsc
        from ..xen.pvclock import ClockTsc
        self.tsc = ClockTsc(self.clock) if self.clock.deterministic else HostTsc.shared()
        if self.clock.deterministic:
            # RDTSC reads the host TSC in Unicorn; trap it so guest time repeats.
            for vcpu in self.vcpus:
                vcpu.msr.intercept_rdtsc()
        self._handlers = {
            E.PortIO: self._handle_pio,
            E.Mmio: self._handle_mmio,
            E.Cpuid: self._handle_cpuid,
            E.Msr: self._handle_msr,
            E.Hlt: self._handle_hlt,
            E.InvalidInstruction: self._handle_invalid,
            E.Hypercall: self._handle_hypercall,
            E.Exception_: self._handle_exception,
            E.Syscall: self._handle_syscall,
            E.UnmappedAccess: self._handle_unmapped,
            E.Shutdown: self._handle_shutdown,
            E.Limit: self._handle_limit,
            E.Request: self._handle_request,
            E.Debug: self._handle_debug,
        }
        self._build_interrupts()
        self.pio.register(DebugCon.PORT, 1, DebugCon(self.console))
        self.pio.register(DebugExit.PORT, 1, DebugExit(self.shutdown))
        self.pio.register(AcpiPmEvent.PORT, 4, AcpiPmEvent())
        self.pio.register(KeyboardControllerReset.PORT, 1, KeyboardControllerReset(self.shutdown))
        self.pio.register(AcpiPmControl.PORT, 2, AcpiPmControl(self.shutdown))
        self.pio.register(AcpiSleepRegisters.PORT, 2, AcpiSleepRegisters(self.shutdown))
        from ..devices.rtc import INDEX_PORT, Rtc
        self.rtc = Rtc(self.clock.now_ns, deterministic=self.clock.deterministic)
        self.pio.register(INDEX_PORT, 2, self.rtc)
        from ..devices.uart16550 import attach_serial
        attach_serial(self, irq=self.isa_irq[4])
        self._build_pci()
        # Run-loop agents (the interrupt stepper, the gdb stub): asked before
        # each guest run, where they may pause the machine and bound the run.
        self.agents: list = []
        self.exit_listeners: list = []       # callables(vcpu, exit) after each handled exit: records
        self.monitor = None
        if self.config.qmp:
            from ..debug.qmp import QmpServer, parse_spec
            self.monitor = QmpServer(self, parse_spec(self.config.qmp))
        self.gdb = None
        if self.config.gdb:
            from ..debug.gdbstub import GdbStub, parse_spec as parse_gdb_spec
            self.gdb = GdbStub(self, *parse_gdb_spec(self.config.gdb), wait=self.config.gdb_wait)
        if self.config.xen:
            from ..xen.platform import XenPlatform, XenConfig
            XenPlatform(self, XenConfig(version=self.config.xen_version,
                                        gnttab_max_frames=self.config.gnttab_max_frames),
                        callback_deassert=self.config.callback_deassert)

    def _build_pci(self) -> None:
        """Bus 0: i440FX host bridge 00:00.0, PIIX3 00:01.0, xen-platform 00:02.0.

        xenicorn plays the firmware's part for BARs as SeaBIOS/hvmloader do
        (I/O from 0xC000, memory from 0xF0000000, decoding enabled), so a guest
        that only reads the BARs finds its device already placed.
        """
        from ..devices.pci import PciBus, Piix3Isa, host_bridge, CONFIG_ADDRESS
        self.pci = PciBus(self, pirq_sink=self._pirq_changed)
        self.register_pio(CONFIG_ADDRESS, 8, self.pci)
        self.pci.add(0, 0, host_bridge())
        self.piix3 = self.pci.add(1, 0, Piix3Isa())
        self.piix3.on_route_change = self._route_pirqs
        self.xen_platform = None
        if self.config.xen:
            from ..devices.xen_platform import XenPlatformDevice, FIXED_IOPORT
            dev = XenPlatformDevice(log=lambda text: self.tracer.emit("io", text))
            self.xen_platform = self.pci.add(2, 0, dev)
            self.register_pio(FIXED_IOPORT, 16, dev.fixed_ports)
            dev.config_write(0x10, 4, 0xC000)
            dev.config_write(0x14, 4, 0xF0000000)
        # What SeaBIOS does on QEMU's i440FX: PIRQ A-D -> IRQ 10, 10, 11, 11 in
        # the PIIX3. With the isa wiring that is the PCI interrupts' only path;
        # with apic it is their 8259 path, for an OS that keeps the PIC
        # (Linux's noapic; the DSDT's _PRT answers per interrupt model).
        for pirq, irq in enumerate(PCI_ISA_IRQS):
            self.piix3.config_write(0x60 + pirq, 1, irq)
        # each function's Interrupt Line register says where its pin went
        for devfn, dev in self.pci.functions.items():
            pin = dev.state.config[0x3D]
            if pin:
                dev.state.config[0x3C] = self.pci_gsi(devfn >> 3, pin - 1)

    def pci_gsi(self, slot: int, pin: int) -> int:
        """The GSI (= ISA IRQ below 16) that INTA+``pin`` of ``slot`` reaches: what the _PRT says."""
        from ..devices.pci import PciBus
        if self.config.pci_irqs == "isa":
            return self.pci_pic_irq(slot, pin)
        return 16 + PciBus.pirq_of(slot << 3, pin + 1)

    def pci_pic_irq(self, slot: int, pin: int) -> int:
        """The 8259 input (ISA IRQ) that INTA+``pin`` of ``slot`` reaches through the PIIX3."""
        from ..devices.pci import PciBus
        pirq = PciBus.pirq_of(slot << 3, pin + 1)
        return self.piix3.pirq_route(pirq) or PCI_ISA_IRQS[pirq]

    def _build_interrupts(self) -> None:
        """8259 pair, IOAPIC and local APIC, and the lines between them.

        GSI n drives IOAPIC pin n. ISA IRQ n drives 8259 input n and GSI n,
        except IRQ 0 (the PIT), which reaches the IOAPIC on pin 2 (the PC's
        interrupt source override; Xen's ``hvm_isa_irq_to_gsi``). PCI PIRQ
        A-D drive GSI 16-19 and the ISA IRQ the PIIX3 routes them to.
        """
        from ..devices.i8259 import PicPair
        from ..devices.ioapic import Ioapic, IOAPIC_BASE, NUM_PINS
        from ..devices.irq import IrqLine, SharedLine
        from ..devices.lapic import Lapic, LAPIC_BASE
        trace = self._trace_line if self.tracer.on("irq") else None
        self.pic = PicPair(output=lambda level: self.kick("PIC INT") if level else None)
        self.lapic = Lapic(self.clock, notify=lambda: self.kick("LAPIC"), pic=self.pic)
        self.ioapic = Ioapic(self.lapic)
        self.ioapic.state.id = 1             # APIC IDs are unique: the LAPIC has 0 (Xen's vIOAPIC is 1 too)
        self.lapic.ioapics.append(self.ioapic)
        self.interrupt_source = self.lapic
        if self.tracer.on("irq"):
            emit = lambda text: self.tracer.emit("irq", text)      # noqa: E731
            self.pic.trace = self.ioapic.trace = self.lapic.trace = emit
        self.register_pio(0x20, 2, self.pic.master_ports)
        self.register_pio(0xA0, 2, self.pic.slave_ports)
        self.register_pio(0x4D0, 2, self.pic.elcr_ports)
        self.register_mmio(IOAPIC_BASE, 0x1000, self.ioapic)
        self.register_mmio(LAPIC_BASE, 0x1000, self.lapic)
        self.gsi = [SharedLine(f"GSI{n}", trace) for n in range(NUM_PINS)]
        for n, line in enumerate(self.gsi):
            line.connect(lambda level, n=n: self._gsi_changed(n, level))
        # each 8259 input is wired-OR: its ISA IRQ, a PIRQ the PIIX3 routes
        # there, Xen's callback GSI n < 16
        self.pic_inputs = [SharedLine(f"PIC{n}") for n in range(16)]
        for n, line in enumerate(self.pic_inputs):
            line.connect(lambda level, n=n: self.pic.set_irq(n, level))
        self._pic_sources: dict[tuple[int, str], IrqLine] = {}
        self.isa_irq = []
        for irq in range(16):
            line = IrqLine(f"IRQ{irq}", trace)
            line.connect(self.pic_input(irq, "isa").set_level)
            line.connect(self.gsi[2 if irq == 0 else irq].source(f"isa{irq}").set_level)
            self.isa_irq.append(line)
        from ..devices.pit8254 import Pit8254, PIT_PORT, SPEAKER_PORT
        self._pirq_gsi = [self.gsi[16 + i].source(f"pirq{'ABCD'[i]}") for i in range(4)]
        self._pirq_pic: list[int | None] = [None] * 4
        self._pirq_level = [False] * 4
        self.pit = Pit8254(self.clock, irq0=self.isa_irq[0])
        self.register_pio(PIT_PORT, 4, self.pit)
        self.register_pio(SPEAKER_PORT, 1, self.pit.speaker_port)

    def _trace_line(self, name: str, level: bool) -> None:
        self.tracer.emit("irq", f"{name} {'raised' if level else 'lowered'}")

    def _gsi_changed(self, gsi: int, level: bool) -> None:
        """A GSI line moved: to its IOAPIC pin, unless Xen delivers it as a PIRQ event."""
        if self.xen is not None and self.xen.physdev.gsi_changed(gsi, level):
            return
        self.ioapic.set_irq(gsi, level)

    def kick_until(self, taken, why: str) -> None:
        """From another thread: stop the guest until the run loop has taken what was posted.

        A stop that reaches Unicorn just before ``emu_start`` clears its
        stop flag is lost (see :mod:`stoptimer`), so it is repeated every
        few milliseconds while ``taken()`` is false.
        """
        while not taken() and self.status is None:
            self.kick(why, force=True)
            time.sleep(0.005)

    def _service_monitor(self) -> None:
        mon = self.monitor
        mon.service()
        while mon.paused and self.status is None:
            mon.service(wait=0.1)

    def post_console_input(self, data: bytes) -> None:
        """Console input from another thread: queued, taken by the run loop."""
        self._console_input.append(bytes(data))
        self.kick_until(lambda: not self._console_input, "console input")

    def _take_console_input(self) -> None:
        while self._console_input and self.xen is not None:
            self.xen.pvconsole.feed(self._console_input.popleft())

    def pic_input(self, irq: int, source: str):
        """One source's sub-line into 8259 input ``irq`` (created on first use)."""
        key = (irq, source)
        if key not in self._pic_sources:
            self._pic_sources[key] = self.pic_inputs[irq].source(source)
        return self._pic_sources[key]

    def kick(self, why: str, force: bool = False) -> None:
        """Something may want the CPU's attention: stop emu_start so the run loop looks."""
        vcpu = self.vcpus[0]
        if vcpu._in_emu and (force or (self.interrupt_source is not None and self.interrupt_source.pending())):
            vcpu.request_stop(why)

    def _timer_armed(self) -> None:
        """A timer was armed mid-run before the deadline this run is bounded by.

        A LAPIC timer armed by an MMIO write, say: end the run so the next
        one is bounded by the new deadline (with a counting vCPU the stop may
        wait for the run quantum, see ``VCpu.request_stop``).
        """
        self.kick("timer-armed", force=True)

    def _pirq_changed(self, pirq: int, level: bool) -> None:
        """A PCI PIRQ line changed: GSI 16+n (apic wiring), and the ISA IRQ the PIIX3 routes it to."""
        self._pirq_level[pirq] = level
        if self.config.pci_irqs == "apic":
            self._pirq_gsi[pirq].set_level(level)
        self._route_pirqs()

    def _route_pirqs(self) -> None:
        """Re-drive the ISA IRQ lines after a PIRQ level or a PIIX3 route change.

        A PIRQ the PIIX3 routes to ISA IRQ n drives 8259 input n; with the
        isa wiring it is an ISA IRQ like any other and drives IOAPIC input n
        too (the IOAPIC's first 16 inputs are the ISA IRQs).
        """
        piix = getattr(self, "piix3", None)
        isa = self.config.pci_irqs == "isa"
        for pirq in range(4):
            irq = piix.pirq_route(pirq) if piix is not None else None
            name = f"pirq{'ABCD'[pirq]}"
            old = self._pirq_pic[pirq]
            if old not in (None, irq):
                self.pic_input(old, name).set_level(False)
                if isa:
                    self._isa_gsi_input(old, name).set_level(False)
            self._pirq_pic[pirq] = irq
            if irq is not None:
                self.pic_input(irq, name).set_level(self._pirq_level[pirq])
                if isa:
                    self._isa_gsi_input(irq, name).set_level(self._pirq_level[pirq])

    def _isa_gsi_input(self, irq: int, source: str):
        key = (-1 - irq, source)                 # beside the 8259 sources, keyed apart
        if key not in self._pic_sources:
            self._pic_sources[key] = self.gsi[2 if irq == 0 else irq].source(source)
        return self._pic_sources[key]

    def register_mmio(self, base: int, size: int, device) -> None:
        """Put a device on the memory bus and route that range to it on every vCPU."""
        self.mmio.register(base, size, device)
        for vcpu in self.vcpus:
            vcpu.map_mmio(base, size)

    def guest_tsc(self) -> int:
        """The TSC a trapped RDTSC returns in deterministic mode: 1 GHz of machine time."""
        return self.clock.now_ns()

    def register_pio(self, base: int, size: int, device) -> None:
        """Put a device on the I/O port bus."""
        self.pio.register(base, size, device)

    @property
    def vcpu(self) -> VCpu:
        return self.vcpus[0]

    # ------------------------------------------------------------------
    def _unclaimed(self, space: str):
        def report(kind: str, addr: int, size: int, value: int | None) -> None:
            if self.tracer.on("io"):
                what = f"write {value:#x}" if value is not None else "read -> all ones"
                self.tracer.emit("io", f"unclaimed {space} {addr:#x} size {size}: {what} (reported once)")
        return report

    def shutdown(self, reason: str, status: int, message: str = "") -> None:
        """Stop the machine (from any handler, inside or outside a hook)."""
        if self.status is not None:
            return
        self.status = status
        self.shutdown_reason = reason
        self.shutdown_message = message
        for vcpu in self.vcpus:
            if vcpu._in_emu:
                vcpu.stop_with(E.Shutdown(-1, reason, status, message))

    # ------------------------------------------------------------------
    # the run loop
    # ------------------------------------------------------------------
    def run(self) -> int:
        """Run until the guest shuts down or a limit is hit; return the exit status."""
        vcpu = self.vcpu
        cfg = self.config
        self._deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
        if self.power_on is None and self.monitor is not None:
            self.capture_power_on()
        while self.status is None:
            if self.save_points and vcpu.instructions >= self.save_points[0][0]:
                self._save_due()
            if self.monitor is not None:
                self._service_monitor()
                if self.status is not None:
                    break
            if self.gdb is not None:
                self.gdb.service()            # waits here while gdb has the guest stopped
                if self.status is not None:
                    break
            self.clock.run_due()
            if self._console_input:
                self._take_console_input()
            if vcpu.halted:
                self._sleep(vcpu)
                continue
            if self.gdb is not None and self.gdb.stepping:
                vcpu.disarm_interrupt_window()   # gdb steps with interrupts held (QEMU's SSTEP_NOIRQ)
            else:
                self.inject_pending_interrupt(vcpu)
            if self.status is not None or vcpu.halted:
                continue
            if self.xen is not None and self.xen.callback.poll_wanted:
                self.xen.callback.arm_poll(vcpu)
            timeout_us, count = self._run_budget(vcpu)
            for agent in self.agents:
                most = agent.before_run(vcpu)
                if most:
                    count = min(count, most) if count else most
            if self.status is not None:
                break
            if self.gdb is not None:
                count = self.gdb.before_run(vcpu, count)
            ex = vcpu.run(timeout_us=timeout_us, count=count)
            if isinstance(ex, E.Limit) and not self._limit_reached(vcpu):
                continue                  # a clock deadline, not the user's limit
            self.handle_exit(vcpu, ex)
        self.console.flush()
        if self.monitor is not None:
            quit_ = self.shutdown_reason == "quit"
            self.monitor.event("SHUTDOWN", {"guest": not quit_,
                                            "reason": "host-qmp-quit" if quit_ else "guest-shutdown"})
            self.monitor.close()
        if self.gdb is not None:
            self.gdb.close(self.status)
        return self.status

    def _run_budget(self, vcpu: VCpu) -> tuple[int, int]:
        """How long emu_start may run: until the user's limits or the next timer."""
        cfg = self.config
        timeout_us = 0
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._handle_limit(vcpu, E.Limit(vcpu.pc, "timeout"))
                return 0, 0
            timeout_us = max(1, int(left * 1e6))
        count = 0
        if cfg.max_insns:
            count = cfg.max_insns - vcpu.instructions
            if count <= 0:
                self._handle_limit(vcpu, E.Limit(vcpu.pc, "max-insns"))
                return 0, 0
        budget = self.clock.budget()
        if vcpu.count_instructions:
            # Bounded by instruction counts only: an asynchronous stop could
            # replay a memory access in this mode (docs/unicorn-notes.md).
            # The quantum bounds how late a stop requested during MMIO is.
            insns = COUNT_QUANTUM
            if budget is not None:
                per_insn = self.clock.ns_per_insn if self.clock.deterministic else HOST_NS_PER_INSN_GUESS
                insns = min(insns, max(1, int(budget / per_insn)))
            count = min(count, insns) if count else insns
        elif budget is not None:
            us = max(1, budget // 1000)
            timeout_us = min(timeout_us, us) if timeout_us else us
        return timeout_us, count

    def _limit_reached(self, vcpu: VCpu) -> bool:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return True
        return bool(self.config.max_insns) and vcpu.instructions >= self.config.max_insns

    def _sleep(self, vcpu: VCpu) -> None:
        """The vCPU sleeps (HLT, SCHEDOP_block/poll): let time pass until it wakes.

        A maskable interrupt the guest accepts, an event for a blocked vCPU,
        or a poll timeout ends the sleep. Time passes to the next timer
        deadline; when no timer is armed and nothing else could wake the
        vCPU, the run ends instead of hanging the host (status 1).
        """
        while self.status is None and vcpu.halted:         # a loadvm/reset may wake it
            if self.gdb is not None and self.gdb.wants_service():
                return                        # the run loop services gdb; the vCPU stays asleep
            self.clock.run_due()
            if self._wakes(vcpu):
                vcpu.halted = False
                vcpu.sleep_kind = ""
                return
            nxt = self.clock.next_deadline()
            if self.monitor is not None and not self.clock.deterministic:
                # a monitor command (an injected event, quit) may wake it: wait for one
                wait = 0.05 if nxt is None else max(0.0, min(0.05, (nxt - self.clock.now_ns()) / 1e9))
                self._service_monitor()
                self.monitor.service(wait=wait)
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._handle_limit(vcpu, E.Limit(vcpu.pc, "timeout"))
                    return
                continue
            if nxt is None or (vcpu.sleep_kind == "HLT" and not vcpu.reg("rflags") & (1 << 9)):
                if self.gdb is not None and self.gdb.attached:
                    time.sleep(0.05)          # a debugger may still want to look (Ctrl-C)
                    continue
                pc = vcpu.pc
                if vcpu.sleep_kind == "HLT" and not vcpu.reg("rflags") & (1 << 9):
                    msg = f"vCPU halted at {pc:#x} with interrupts disabled"
                else:
                    msg = f"vCPU asleep ({vcpu.sleep_kind}) at {pc:#x} and nothing is left that could wake it"
                self.shutdown("halted", STATUS_CRASH, msg)
                return
            limit = None
            if self._deadline is not None:
                limit = self._deadline - time.monotonic()
                if limit <= 0:
                    self._handle_limit(vcpu, E.Limit(vcpu.pc, "timeout"))
                    return
            if self.gdb is not None:
                limit = min(limit, 0.05) if limit is not None else 0.05   # notice gdb's Ctrl-C
            self.clock.wait_until(nxt, limit)

    def _wakes(self, vcpu: VCpu) -> bool:
        src = self.interrupt_source
        direct = self.xen is not None and self.xen.callback.direct_pending(vcpu.index) is not None
        if (direct or (src is not None and src.pending())) and vcpu.reg("rflags") & (1 << 9):
            return True
        if vcpu.sleep_kind != "HLT" and self.xen is not None:
            return self.xen.wakes(vcpu)
        return False

    def inject_pending_interrupt(self, vcpu: VCpu) -> None:
        """Deliver an external interrupt if one waits and the guest accepts it.

        x86 accepts a maskable interrupt only between instructions, with
        RFLAGS.IF = 1 and outside the one-instruction shadow of STI/MOV SS
        (SDM vol. 3 §6.8.3). When one waits but the window is closed, the
        vCPU asks for an exit when it opens (:mod:`irqwindow`). When it is
        open, the interrupt controller gives up its vector and either the
        CPU engine delivers it as the next run starts or, when deliveries
        are being watched, Python does (``VCpu.engine_delivers``).
        """
        src = self.interrupt_source
        if getattr(src, "nmi_pending", False):
            src.nmi_pending = False
            vcpu.halted = False
            from ..x86.interrupts import deliver, EventType, TripleFault
            try:
                deliver(vcpu, 2, EventType.NMI)
            except TripleFault as tf:
                self.shutdown("triple-fault", STATUS_CRASH, str(tf))
            return
        if vcpu.engine_delivery_pending:
            return                      # one at a time: the engine takes it as the next run starts
        direct = self.xen.callback.direct_pending(vcpu.index) if self.xen is not None else None
        if direct is None and (src is None or not src.pending()):
            vcpu.disarm_interrupt_window()
            return
        if not (vcpu.reg("rflags") & (1 << 9)) or vcpu.interrupt_shadow():
            vcpu.arm_interrupt_window()
            return
        vcpu.disarm_interrupt_window()
        if direct is not None:
            # Xen's callback vector: injected past the LAPIC (hvm_vcpu_has_pending_irq)
            self.xen.callback.direct_taken(vcpu.index)
            vector = direct
        else:
            vector = src.acknowledge()
        if vector is None:
            return
        vcpu.halted = False
        if vcpu.engine_delivers():
            vcpu.engine_deliver(vector)
            return
        from ..x86.interrupts import deliver, EventType, TripleFault
        try:
            deliver(vcpu, vector, EventType.EXTERNAL)
        except TripleFault as tf:
            self.shutdown("triple-fault", STATUS_CRASH, str(tf))

    # ------------------------------------------------------------------
    # exit dispatch
    # ------------------------------------------------------------------
    def handle_exit(self, vcpu: VCpu, ex: E.Exit) -> E.Action:
        if self.status is not None and not isinstance(ex, (E.Shutdown, E.Limit)):
            # emu_stop() takes effect at the end of the translated block, so
            # a few more instructions may run after a shutdown: they must not
            # reach devices or deliver exceptions any more.
            if isinstance(ex, E.PortIO) and not ex.write:
                ex.value = (1 << (8 * ex.size)) - 1
            return E.Action.STOP
        kind = type(ex)
        self.exit_counts[kind.__name__] = self.exit_counts.get(kind.__name__, 0) + 1
        self.recent_exits.append(ex)
        action = self._handlers[kind](vcpu, ex)
        if self.tracer.on("exits"):
            self.tracer.emit("exits", self.describe_exit(vcpu, ex))
        for listener in self.exit_listeners:
            listener(vcpu, ex)
        if action is E.Action.STOP and vcpu._in_emu and vcpu._pending_exit is None:
            vcpu.stop_with(ex)
        return action

    def crash_report(self) -> list[str]:
        """Where the guest is and the exits that led there, oldest first (for a bad end)."""
        vcpu = self.vcpu
        pc = vcpu.pc
        code = vcpu.fetch_bytes(pc, 16)
        where = disassemble(code, pc, vcpu.code_bits())[0] if code else f"{pc:#x} (not readable)"
        lines = [f"guest at {where}, cpl {vcpu.cpl()}, {vcpu.instructions or 'uncounted'} instructions",
                 f"last {len(self.recent_exits)} exits (oldest first):"]
        lines += ["  " + self.describe_exit(vcpu, ex) for ex in self.recent_exits]
        return lines

    def describe_exit(self, vcpu: VCpu, ex: E.Exit) -> str:
        fields = {k: v for k, v in vars(ex).items() if k != "pc"}
        parts = []
        for k, v in fields.items():
            parts.append(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v}")
        text = f"{ex.kind} " + " ".join(parts)
        if ex.pc >= 0:
            code = vcpu.fetch_bytes(ex.pc, 16)
            if code:
                text += f"  @ {disassemble(code, ex.pc, vcpu.code_bits())[0]}"
            else:
                text += f"  @ {ex.pc:#x}"
        return text

    def _handle_pio(self, vcpu: VCpu, ex: E.PortIO) -> E.Action:
        self.clock.charge(IO_PORT_NS)
        if ex.write:
            self.pio.write(ex.port, ex.size, ex.value)
        else:
            ex.value = self.pio.read(ex.port, ex.size)
        return E.Action.STOP if self.status is not None else E.Action.CONTINUE

    def _handle_mmio(self, vcpu: VCpu, ex: E.Mmio) -> E.Action:
        if ex.write:
            self.mmio.write(ex.addr, ex.size, ex.value)
        else:
            ex.value = self.mmio.read(ex.addr, ex.size)
        return E.Action.STOP if self.status is not None else E.Action.CONTINUE

    def _handle_cpuid(self, vcpu: VCpu, ex: E.Cpuid) -> E.Action:
        ex.result = self.cpuid.query(ex.leaf, ex.subleaf, vcpu.index)
        if ex.leaf == 7 and ex.result[3] & LEAF7_EDX_ARCH_CAPABILITIES:
            # The kernel is looking at its features and may read the MSR (Unicorn
            # would answer 0, "vulnerable to everything"): catch it until user mode.
            vcpu.msr.watch(MSR_ARCH_CAPABILITIES, read=True, write=True)
            vcpu.msr.open(ARCH_CAPABILITIES_INTEREST)
        if self.tracer.on("cpuid"):
            self.tracer.emit("cpuid", f"leaf {ex.leaf:#x}.{ex.subleaf} -> "
                             + " ".join(f"{r:#010x}" for r in ex.result))
        return E.Action.CONTINUE

    def _handle_msr(self, vcpu: VCpu, ex: E.Msr) -> E.Action:
        handler = self.msr_handlers.get(ex.msr)
        if handler is not None:
            return handler(vcpu, ex) or E.Action.CONTINUE
        # Same as outside the window, where Unicorn drops unknown MSRs: reads 0.
        if self.tracer.on("io"):
            self.tracer.emit("io", f"unhandled {'WRMSR' if ex.write else 'RDMSR'} {ex.msr:#x}")
        return E.Action.CONTINUE

    def _handle_hlt(self, vcpu: VCpu, ex: E.Hlt) -> E.Action:
        self.idle(vcpu, "HLT")
        return E.Action.CONTINUE

    def idle(self, vcpu: VCpu, why: str) -> None:
        """Put the vCPU to sleep (HLT, SCHEDOP_block, SCHEDOP_poll); the run loop waits."""
        vcpu.halted = True
        vcpu.sleep_kind = why
        if vcpu._in_emu:
            vcpu.request_stop(why)

    def _deliver(self, vcpu: VCpu, vector: int, etype, error_code: int | None = None) -> E.Action:
        from ..x86.interrupts import deliver, TripleFault
        try:
            deliver(vcpu, vector, etype, error_code)
        except TripleFault as tf:
            self.shutdown("triple-fault", STATUS_CRASH, str(tf))
            return E.Action.STOP
        return E.Action.CONTINUE

    def _handle_invalid(self, vcpu: VCpu, ex: E.InvalidInstruction) -> E.Action:
        from ..x86.interrupts import EventType
        return self._deliver(vcpu, 6, EventType.HARDWARE_EXCEPTION)

    def _handle_hypercall(self, vcpu: VCpu, ex: E.Hypercall) -> E.Action:
        if self.xen is not None:
            return self.xen.handle_hypercall(vcpu, ex)
        from ..x86.interrupts import EventType
        return self._deliver(vcpu, 6, EventType.HARDWARE_EXCEPTION)   # no Xen: VMCALL is #UD

    def _handle_exception(self, vcpu: VCpu, ex: E.Exception_) -> E.Action:
        from ..x86.interrupts import EventType
        if ex.software:
            etype = EventType.SOFTWARE_INTERRUPT
        else:
            etype = EventType.HARDWARE_EXCEPTION
        return self._deliver(vcpu, ex.vector, etype, ex.error_code)

    def _arch_capabilities(self, vcpu: VCpu, ex: E.Msr):
        """RDMSR 0x10A: the flaws this CPU does not have (cpuid.ARCH_CAPABILITIES); read-only."""
        if ex.write:
            from ..x86.interrupts import EventType
            return self._deliver(vcpu, 13, EventType.HARDWARE_EXCEPTION, 0)
        ex.value = ARCH_CAPABILITIES
        return E.Action.CONTINUE

    def _handle_syscall(self, vcpu: VCpu, ex: E.Syscall) -> E.Action:
        # User mode has started: the kernel has read its capabilities. Close the
        # MSR window they needed (an open window slows plain code ~9%).
        vcpu.msr.close(ARCH_CAPABILITIES_INTEREST)
        from ..x86 import syscall
        (syscall.do_syscall if ex.insn == "syscall" else syscall.do_sysenter)(vcpu)
        return E.Action.CONTINUE

    def _handle_unmapped(self, vcpu: VCpu, ex: E.UnmappedAccess) -> E.Action:
        if ex.access == "fetch":
            self.shutdown("crash", STATUS_CRASH,
                          f"guest jumped to {ex.addr:#x}, where there is no RAM to execute")
            return E.Action.STOP
        page = ex.addr & ~(PAGE_SIZE - 1)
        if self.tracer.on("mem"):
            self.tracer.emit("mem", f"{ex.access} of unassigned physical {ex.addr:#x}: "
                             "reads float high, writes are dropped")
        vcpu.map_mmio(page, PAGE_SIZE)
        return E.Action.CONTINUE

    def _handle_shutdown(self, vcpu: VCpu, ex: E.Shutdown) -> E.Action:
        self.shutdown(ex.reason, ex.status, ex.message)
        return E.Action.STOP

    def _handle_limit(self, vcpu: VCpu, ex: E.Limit) -> E.Action:
        if ex.what == "stopped":
            # a run that ended for no reason we know: a stop-timer repeat that
            # reached the engine between two runs (its cpu_exit is seen at the
            # next run's first block). Nothing to do but go on.
            return E.Action.CONTINUE
        if ex.what == "timeout":
            self.shutdown("timeout", STATUS_TIMEOUT, f"--timeout of {self.config.timeout:g}s reached")
        else:
            self.shutdown("max-insns", STATUS_TIMEOUT, f"--max-insns {self.config.max_insns} reached")
        return E.Action.STOP

    def _handle_request(self, vcpu: VCpu, ex: E.Request) -> E.Action:
        return E.Action.CONTINUE

    def _handle_debug(self, vcpu: VCpu, ex: E.Debug) -> E.Action:
        if self.gdb is not None:
            self.gdb.on_debug_exit(vcpu, ex)
        return E.Action.CONTINUE

    def close(self) -> None:
        if self.gdb is not None and not self.gdb.closed:
            self.gdb.close(None)
        for vcpu in self.vcpus:
            vcpu.close()

    # ------------------------------------------------------------------
    # snapshots (snapshot/): taken and loaded between guest runs
    # ------------------------------------------------------------------
    power_on = None                  # the machine before its first instruction, for system_reset
    save_points: tuple = ()          # ((instructions, path), ...) for --savevm FILE@N, sorted
    snapshots_saved: tuple = ()      # ((path, instructions), ...) as they were written

    def save_snapshot(self, path: str):
        """Write the whole machine to ``path`` (savevm); call between runs."""
        from .. import snapshot
        return snapshot.save(self, path)

    def load_snapshot(self, path: str):
        """Continue from the snapshot in ``path`` (loadvm); checked completely before anything changes."""
        from .. import snapshot
        return snapshot.load(self, path)

    def save_at(self, instructions: int, path: str) -> None:
        """Save a snapshot at the first pause between two runs once ``instructions`` have run.

        Not in the middle of a run: ending a run early changes when the run
        loop next looks at interrupts and timers, so the saved run would no
        longer be the run the user would have had. The snapshot's header
        records the exact count it was taken at.
        """
        if not self.vcpu.count_instructions:
            raise ValueError("saving at an instruction count needs an instruction-counting machine "
                             "(MachineConfig.count_instructions or --clock deterministic)")
        self.save_points = tuple(sorted([*self.save_points, (int(instructions), path)]))

    def _save_due(self) -> None:
        while self.save_points and self.vcpu.instructions >= self.save_points[0][0]:
            _, path = self.save_points[0]
            self.save_points = self.save_points[1:]
            self.save_snapshot(path)
            self.snapshots_saved = (*self.snapshots_saved, (path, self.vcpu.instructions))

    def capture_power_on(self) -> None:
        """Keep the state before the first instruction in memory (what system_reset restores).

        Timers no component owns (the command line's event injections) are
        left out: after a reset they are gone, as a host-side action is.
        """
        from .. import snapshot
        self.power_on = snapshot.capture(self, ended_ok=True, strict_timers=False)

    def system_reset(self) -> None:
        """Back to power-on: RAM (the kernel as loaded), CPU, devices, Xen, time."""
        from .. import snapshot
        if self.power_on is None:
            raise snapshot.SnapshotError("no power-on state was kept (call capture_power_on() before run())")
        snapshot.restore(self, self.power_on, "power-on state")


def boot(config: MachineConfig, kernel_path: str, *, initrd: str | None = None,
         load_addr: int | None = None, console: ConsoleSink | None = None,
         protocol: str = "pvh") -> "tuple[Machine, object]":
    """Build a machine, load a kernel and reset the vCPU to its entry.

    ``protocol`` "pvh": a PVH ELF (or the ELF inside a bzImage) or a flat
    binary, entered with hvm_start_info; "linux": a bzImage through the
    Linux/x86 boot protocol's 32-bit entry, with an MP table and an ACPI
    MADT (:mod:`.linuxboot`, :mod:`.mptable`, :mod:`.acpi`).
    """
    from ..boot import acpi
    from ..boot.loader import load_elf, load_flat, load_module, write_start_info
    machine = Machine(config, console=console)
    if protocol == "linux":
        from ..boot import linuxboot, mptable
        mptable.write(machine)
        rsdp = acpi.write(machine, hw_reduced=False) if config.acpi else 0
        kernel, machine.linux_boot = linuxboot.load_bzimage(machine.memory, kernel_path, config.cmdline, initrd,
                                                            rsdp=rsdp)
        machine.kernel = kernel
        linuxboot.enter_32bit(machine.vcpu, machine.linux_boot)
        return machine, kernel
    if protocol != "pvh":
        raise ValueError(f"boot protocol {protocol!r}: expected pvh or linux")
    if load_addr is not None:
        kernel = load_flat(machine.memory, kernel_path, load_addr)
    else:
        kernel = load_elf(machine.memory, kernel_path)
    if initrd:
        load_module(machine.memory, kernel, initrd)
    rsdp = acpi.write(machine) if config.acpi else 0
    start_info = write_start_info(machine.memory, kernel, config.cmdline, rsdp)
    machine.kernel = kernel
    machine.vcpu.reset_to_flat32(kernel.entry, ebx=start_info)
    return machine, kernel
