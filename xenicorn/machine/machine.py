"""The PC: what a machine is made of, and the interface the rest of xenicorn uses.

:class:`Machine` is the composition root. It owns guest RAM, the two buses,
the vCPUs and the clock, and it builds the parts that each have one job:

====================================  ========================================
part                                  its job
====================================  ========================================
:mod:`~xenicorn.machine.wiring`       interrupt lines and controllers
:mod:`~xenicorn.machine.chipset`      which device sits at which port/address
:mod:`~xenicorn.machine.dispatch`     what to do for each exit
:mod:`~xenicorn.machine.runloop`      running, sleeping, injecting, agents
:mod:`xenicorn.xen`                   Xen, through :mod:`~xenicorn.xen.host`
====================================  ========================================

Process exit statuses (the CLI returns :attr:`Machine.status`): 0 clean
poweroff, ``(v << 1) | 1`` for isa-debug-exit, 1 guest crash or triple
fault, 124 on ``--timeout``, 2 for bad user input (never reached here).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from .. import exits as E
from ..devices.bus import PioBus, MmioBus
from ..devices.console import ConsoleSink, log_sink, stdout_sink
from ..engine.vcpu import VCpu
from ..x86 import cpumodel
from ..x86.cpuid import CpuidPolicy
from . import chipset
from .clock import VirtualClock
from . import cpuidfault
from . import crwrites
from .dispatch import KERNEL_START_INTEREST, MSR_IA32_APICBASE
from .dispatch import ExitDispatcher, STATUS_OK, STATUS_CRASH, STATUS_USAGE, STATUS_TIMEOUT  # noqa: F401
from .memory import GuestMemory
from .runloop import Agent, RunLoop
from .trace import Tracer
from .wiring import InterruptWiring
from .xenhost import XenHostServices


MAX_VCPUS = 8


@dataclass
class MachineConfig:
    """Everything a user chooses about a machine (the CLI fills it)."""

    ram_mib: int = 128
    smp: int = 1                         # vCPUs (-smp N), 1 to MAX_VCPUS
    cmdline: str = ""
    serial: str = "stdio"                # stdio | file:PATH | none
    debugcon: str = "stdio"              # stdio | none (port 0xE9)
    trace: set[str] = field(default_factory=set)
    max_insns: int = 0                   # 0 = no limit
    timeout: float = 0.0                 # seconds of host time, 0 = none
    vendor: str = "intel"
    cpu: str = "default"                 # --cpu MODEL[,+feat,-feat...] (x86/cpumodel.py)
    clock: str = "host"                  # host | deterministic (see machine/clock.py)
    ns_per_insn: float = 1.0             # deterministic time: guest ns per instruction
    xen: bool = True                     # the Xen HVM platform (CPUID leaves, hypercalls)
    callback_deassert: str = "poll"      # poll | eoi: how Xen's level callback line drops
    evtchn_fifo: bool = True             # offer the FIFO event-channel ABI (--no-evtchn-fifo: -ENOSYS, as QEMU)
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
    xen_log: str = "stderr"              # console_io lines, Xen's log: stdout | stderr | file:PATH | none
    count_instructions: bool = False     # exact instruction counts and stops (stepper, gdb, records)
    hpet: bool = True                    # the HPET at 0xFED00000 and its ACPI table (--no-hpet: none)
    testdev: bool = False                # -device pc-testdev: QEMU's ISA test device (kvm-unit-tests)
    acpi: bool = True                    # ACPI tables (MADT: LAPIC, IOAPIC) for the OS, as Xen gives PVH guests
    hvm_fep: bool = False                # Xen's hvm_fep: `ud2; .ascii "xen"` forces emulation (x86/fep.py)
    observe: set[str] = field(default_factory=set)   # trace categories delivered to observers, unprinted




class Machine(XenHostServices):
    """A one-socket x86 PC around Unicorn vCPUs."""

    power_on = None                  # the machine before its first instruction, for system_reset
    boot_protocol = "pvh"            # how boot() entered the kernel: pvh, linux or multiboot

    def __init__(self, config: MachineConfig | None = None, console: ConsoleSink | None = None,
                 xen_log: ConsoleSink | None = None):
        from .. import engine
        engine.probe()                   # the engine's layout checks; EngineUnsupported if unknown
        self.config = cfg = config or MachineConfig()
        self.tracer = Tracer(cfg.trace, observed=cfg.observe)
        self.symbols = None                  # the kernel's ELF symbols (debug/symbols.py), set at boot
        self.memory = GuestMemory(cfg.ram_mib << 20)
        self.pio = PioBus("pio", self._unclaimed("port"))
        self.mmio = MmioBus("mmio", self._unclaimed("mmio"))
        self.cpuid = CpuidPolicy(vendor=cfg.vendor, tsc_hz=lambda: self.tsc.hz(), model=cpumodel.parse(cfg.cpu))
        self.console = console or (stdout_sink() if cfg.debugcon == "stdio" else ConsoleSink(None))
        self.xen_log = xen_log or log_sink(cfg.xen_log)   # Xen's log (xl dmesg): console_io lines
        self.status: int | None = None
        self.shutdown_reason = ""
        self.shutdown_message = ""
        self.xen = None                      # the Xen layer, when built with one
        self._init_host_services()
        self.console_input: collections.deque = collections.deque()
        self.dispatch = ExitDispatcher(self)
        self.loop = RunLoop(self)
        # Run-loop agents (the stepper, the gdb stub, the QMP monitor, save
        # points): asked before each guest run, where they may pause the
        # machine and bound the run (runloop.Agent).
        self.agents: list[Agent] = []
        counting = (cfg.count_instructions or bool(cfg.max_insns) or cfg.clock == "deterministic" or bool(cfg.gdb))
        if not 1 <= cfg.smp <= MAX_VCPUS:
            raise ValueError(f"-smp {cfg.smp}: between 1 and {MAX_VCPUS} vCPUs")
        # vCPU 0 makes the engine; the others share it (engine/core.py) and
        # wait for a start-up IPI, as an AP does after power-on
        bsp = VCpu(self, 0, count_instructions=counting, vcpus=cfg.smp)
        self.vcpus = [bsp] + [VCpu(self, i, count_instructions=counting, core=bsp.core) for i in range(1, cfg.smp)]
        bsp.core.load(bsp)
        for ap in self.vcpus[1:]:
            self._init_ipi(ap.index)          # an AP after power-on is as after INIT: waiting for SIPI
        # deterministic time is made of every vCPU's instructions, as QEMU's icount
        self.clock = VirtualClock(cfg.clock, cfg.ns_per_insn,
                                  instructions=lambda: sum(v.instructions_now() for v in self.vcpus))
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
        # IA32_APIC_BASE, which Unicorn answers 0 ("APIC disabled"), and
        # CPUID faulting's MSRs are answered whenever the MSR window is open
        # (open_kernel_start_window; machine/cpuidfault.py)
        for vcpu in self.vcpus:
            vcpu.msr.watch(MSR_IA32_APICBASE)
            cpuidfault.watch(vcpu)                                     # and CPUID faulting's MSRs
            crwrites.arm(vcpu)              # CR0/CR4 (and EFER) writes checked as the SDM says (crwrites.py)
        emit_irq = (lambda text: self.tracer.emit("irq", text)) if self.tracer.on("irq") else None
        self.wiring = w = InterruptWiring(self.clock, kick=self.kick, pci_irqs=cfg.pci_irqs, trace=emit_irq,
                                          cpus=cfg.smp, lapic_notify=self._lapic_notify,
                                          on_init=self._init_ipi, on_sipi=self._startup_ipi)
        self.lapics = w.lapics
        if cfg.smp > 1:
            self.tracer.cpu = lambda: self.current_vcpu.index          # trace lines name the vCPU
        # the controllers and lines, by the names the rest of xenicorn knows them
        self.pic, self.ioapic, self.lapic = w.pic, w.ioapic, w.lapic
        self.gsi, self.pic_inputs, self.isa_irq = w.gsi, w.pic_inputs, w.isa_irq
        self.interrupt_source = self.lapic   # pending()/vector_pending()/acknowledge(): the local APIC
        chipset.build_interrupt_controllers(self)
        chipset.build_legacy_devices(self)
        chipset.build_pci(self, xen=cfg.xen)
        self._monitor = self._gdb = None
        if cfg.qmp or cfg.gdb:
            from ..debug.agents import attach_from_config
            attach_from_config(self)
        if cfg.xen:
            from ..xen.platform import XenPlatform, XenConfig
            self.xen = XenPlatform(self, XenConfig(version=cfg.xen_version, gnttab_max_frames=cfg.gnttab_max_frames,
                                                       evtchn_fifo=cfg.evtchn_fifo),
                                   callback_deassert=cfg.callback_deassert)

    def open_kernel_start_window(self) -> None:
        """Open every vCPU's MSR window from power-on, for a kernel that a PC's
        firmware started (multiboot, the Linux boot protocol): it reads
        IA32_APIC_BASE before anything else opens the window. It closes with
        ARCH_CAPABILITIES' interest at the first SYSCALL (machine/dispatch.py),
        so Linux runs with it closed; PVH guests find Xen's window instead."""
        for vcpu in self.vcpus:
            vcpu.msr.open(KERNEL_START_INTEREST)

    # -- parts, by the names tests and tools use ---------------------------------------
    @property
    def vcpu(self) -> VCpu:
        return self.vcpus[0]

    @property
    def exit_counts(self) -> dict[str, int]:
        return self.dispatch.counts

    @exit_counts.setter
    def exit_counts(self, counts: dict[str, int]) -> None:
        self.dispatch.counts = counts

    @property
    def recent_exits(self) -> collections.deque:
        return self.dispatch.recent

    @property
    def exit_listeners(self) -> list:
        return self.dispatch.listeners

    @property
    def guest_stop_listeners(self) -> list:
        """Callables(vcpu) each time the guest stops and the platform is about to act:
        before an exit is handled, after a run, at a block-start check (the stepper's watcher)."""
        return self.dispatch.stop_listeners

    @property
    def msr_handlers(self) -> dict:
        return self.dispatch.msr_handlers

    # -- the debugger and the monitor: run-loop agents ---------------------------------
    @property
    def gdb(self):
        """The gdb stub (``-gdb``), or None; setting it puts it in the run loop."""
        return self._gdb

    @gdb.setter
    def gdb(self, stub) -> None:
        from ..debug.agents import GdbAgent
        self._gdb = stub
        self._replace_agent(GdbAgent, GdbAgent(stub) if stub is not None else None)

    @property
    def monitor(self):
        """The QMP monitor (``-qmp``), or None; setting it puts it in the run loop."""
        return self._monitor

    @monitor.setter
    def monitor(self, server) -> None:
        from ..debug.agents import MonitorAgent
        self._monitor = server
        self._replace_agent(MonitorAgent, MonitorAgent(self, server) if server is not None else None)

    def _replace_agent(self, kind: type, agent: Agent | None) -> None:
        self.agents[:] = [a for a in self.agents if not isinstance(a, kind)]
        if agent is not None:
            self.agents.append(agent)

    # -- buses -----------------------------------------------------------------------
    def register_pio(self, base: int, size: int, device) -> None:
        """Put a device on the I/O port bus."""
        self.pio.register(base, size, device)

    def register_mmio(self, base: int, size: int, device) -> None:
        """Put a device on the memory bus and route that range to it on every vCPU."""
        self.mmio.register(base, size, device)
        for vcpu in self.vcpus:
            vcpu.map_mmio(base, size)

    def map_device_range(self, space: str, addr: int, size: int, device) -> None:
        """A PCI BAR was placed: ``space`` is "pio" or "mmio"."""
        (self.register_pio if space == "pio" else self.register_mmio)(addr, size, device)

    def unmap_device_range(self, space: str, device) -> None:
        """A PCI BAR moved or was turned off: its device leaves that bus."""
        (self.pio if space == "pio" else self.mmio).unregister(device)

    def _unclaimed(self, space: str):
        def report(kind: str, addr: int, size: int, value: int | None) -> None:
            if self.tracer.on("io"):
                what = f"write {value:#x}" if value is not None else "read -> all ones"
                self.tracer.emit("io", f"unclaimed {space} {addr:#x} size {size}: {what} (reported once)")
        return report

    # -- several vCPUs --------------------------------------------------------------------
    def interrupt_source_of(self, vcpu):
        """Where ``vcpu``'s external interrupts come from: its local APIC (vCPU 0: ``interrupt_source``)."""
        return self.interrupt_source if vcpu.index == 0 else self.lapics[vcpu.index]

    @property
    def current_vcpu(self) -> VCpu:
        """The vCPU the engine holds: the one running, or that ran last."""
        return self.vcpus[0].core.current

    def _lapic_notify(self, index: int) -> None:
        """LAPIC ``index`` may have an interrupt: stop the running vCPU if it or a sleeper can take it.

        A vCPU that is runnable but not running takes its interrupt when its
        turn comes (within a quantum); only a sleeping one is worth cutting
        the running vCPU's quantum short for: it may be the one everybody
        waits for (an IPI's target, a timer's CPU).
        """
        current = self.current_vcpu
        if index == current.index:
            self.kick("LAPIC")
        elif current._in_emu and self.vcpus[index].halted:
            lapic = self.lapics[index]
            if lapic.pending() or lapic.nmi_pending:
                current.request_stop(f"interrupt for vCPU {index}")

    def _vcpu_of_apic(self, apic_id: int) -> VCpu | None:
        return self.vcpus[apic_id] if 0 <= apic_id < len(self.vcpus) else None

    def _init_ipi(self, apic_id: int) -> None:
        """INIT: the CPU stops and waits for a start-up IPI (SDM vol. 3 §8.4.3)."""
        vcpu = self._vcpu_of_apic(apic_id)
        if vcpu is None:
            return
        vcpu.wait_for_sipi = vcpu.halted = True
        vcpu.sleep_kind = "wait-for-SIPI"
        vcpu.pending_sipi = None
        if vcpu._in_emu:
            vcpu.request_stop("INIT")

    def _startup_ipi(self, apic_id: int, vector: int) -> None:
        """SIPI: a CPU waiting for one starts at ``vector << 12``; one that runs ignores it (§8.4.4.1)."""
        vcpu = self._vcpu_of_apic(apic_id)
        if vcpu is None:
            return
        if not vcpu.wait_for_sipi or vcpu.pending_sipi is not None:
            if self.tracer.on("irq"):
                self.tracer.emit("irq", f"SIPI to vCPU {apic_id} ignored: it is not waiting for one")
            return
        vcpu.pending_sipi = vector
        self.kick("SIPI", force=True)

    # -- interrupt wiring ------------------------------------------------------------------
    def pic_input(self, irq: int, source: str):
        """One source's sub-line into 8259 input ``irq`` (created on first use)."""
        return self.wiring.pic_input(irq, source)

    def pci_gsi(self, slot: int, pin: int) -> int:
        """The GSI (= ISA IRQ below 16) that INTA+``pin`` of ``slot`` reaches: what the _PRT says."""
        return self.wiring.pci_gsi(slot, pin, self.pci.pirq_of)

    def pci_pic_irq(self, slot: int, pin: int) -> int:
        """The 8259 input (ISA IRQ) that INTA+``pin`` of ``slot`` reaches through the PIIX3."""
        return self.wiring.pci_pic_irq(slot, pin, self.pci.pirq_of)

    # -- running -----------------------------------------------------------------------
    def run(self) -> int:
        """Run until the guest shuts down or a limit is hit; return the exit status."""
        return self.loop.run()

    def handle_exit(self, vcpu: VCpu, ex: E.Exit) -> E.Action:
        """Do what the hardware (or Xen) does for ``ex`` (:mod:`~xenicorn.machine.dispatch`)."""
        return self.dispatch.handle(vcpu, ex)

    def inject_pending_interrupt(self, vcpu: VCpu) -> None:
        """Deliver an external interrupt if one waits and the guest accepts it (see RunLoop)."""
        self.loop.inject_pending_interrupt(vcpu)

    def kick(self, why: str, force: bool = False) -> None:
        """Something may want the CPU's attention: stop emu_start so the run loop looks."""
        self.loop.kick(why, force)

    def kick_until(self, taken, why: str) -> None:
        """From another thread: stop the guest until the run loop has taken what was posted."""
        self.loop.kick_until(taken, why)

    def _timer_armed(self) -> None:
        """A timer was armed mid-run before the deadline this run is bounded by.

        A LAPIC timer armed by an MMIO write, say: end the run so the next
        one is bounded by the new deadline (with a counting vCPU the stop may
        wait for the run quantum, see ``VCpu.request_stop``). A run that ends
        before the new deadline anyway (several vCPUs: a quantum) goes on:
        cutting every vCPU's quantum at each timer it re-arms left Linux with
        four vCPUs doing nothing but timer interrupts.
        """
        ends = self.loop.run_ends_ns
        if ends is not None:
            first = self.clock.next_deadline()
            if first is not None and first >= ends:
                return
        self.kick("timer-armed", force=True)

    def idle(self, vcpu: VCpu, why: str) -> None:
        """Put the vCPU to sleep (HLT, SCHEDOP_block, SCHEDOP_poll); the run loop waits."""
        vcpu.halted = True
        vcpu.sleep_kind = why
        if vcpu._in_emu:
            vcpu.request_stop(why)

    def deliver_exception(self, vcpu: VCpu, vector: int, error_code: int | None = None) -> E.Action:
        """Raise a hardware exception in the guest (a #GP for a bad WRMSR, say)."""
        from ..x86.interrupts import EventType
        return self.dispatch.deliver(vcpu, vector, EventType.HARDWARE_EXCEPTION, error_code)

    def guest_tsc(self) -> int:
        """The TSC a trapped RDTSC returns in deterministic mode: 1 GHz of machine time."""
        return self.clock.now_ns()

    def post_console_input(self, data: bytes) -> None:
        """Console input from another thread: queued, taken by the run loop."""
        self.console_input.append(bytes(data))
        self.kick_until(lambda: not self.console_input, "console input")

    def take_console_input(self) -> None:
        """On the machine's thread: hand queued console input to Xen's PV console."""
        while self.console_input and self._console_feed is not None:
            self._console_feed(self.console_input.popleft())

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

    def crash_report(self) -> list[str]:
        """Where the guest is and the exits that led there, oldest first (for a bad end),
        code addresses named by the kernel's symbols."""
        from ..debug.symbols import annotate
        return [annotate(self, line) for line in self.dispatch.crash_report(self.vcpu)]

    def describe_exit(self, vcpu: VCpu, ex: E.Exit) -> str:
        """One line for an exit, with the instruction that caused it."""
        return self.dispatch.describe(vcpu, ex)

    def close(self) -> None:
        if self.gdb is not None and not self.gdb.closed:
            self.gdb.close(None)
        for vcpu in self.vcpus:
            vcpu.close()
        self.xen_log.close()

    # -- snapshots (xenicorn.snapshot): taken and loaded between guest runs -----------------
    @property
    def save_points(self) -> tuple:
        """((instructions, path), ...) still to save, for --savevm FILE@N, sorted."""
        agent = self._save_points_agent()
        return agent.points if agent is not None else ()

    @property
    def snapshots_saved(self) -> tuple:
        """((path, instructions), ...) as they were written."""
        agent = self._save_points_agent()
        return agent.saved if agent is not None else ()

    def _save_points_agent(self):
        return next((a for a in self.agents if isinstance(a, SavePoints)), None)

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
        agent = self._save_points_agent()
        if agent is None:
            agent = SavePoints(self)
            self.agents.insert(0, agent)
        agent.points = tuple(sorted([*agent.points, (int(instructions), path)]))

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


class SavePoints(Agent):
    """``--savevm FILE@N``: save snapshots at the first pause after N instructions."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.points: tuple = ()          # ((instructions, path), ...), sorted
        self.saved: tuple = ()           # ((path, instructions), ...) as they were written

    def service(self) -> None:
        vcpu = self.machine.vcpu
        while self.points and vcpu.instructions >= self.points[0][0]:
            _, path = self.points[0]
            self.points = self.points[1:]
            self.machine.save_snapshot(path)
            self.saved = (*self.saved, (path, vcpu.instructions))
