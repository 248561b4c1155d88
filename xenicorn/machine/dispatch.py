"""Exit dispatch: what the platform does for each exit a vCPU reports.

A KVM user space switches on ``kvm_run->exit_reason`` after ``KVM_RUN``
returns (firecracker's ``handle_kvm_exit``, QEMU's ``kvm_cpu_exec``);
:meth:`ExitDispatcher.handle` is that switch. Each exit type has one
handler, which does what the hardware (or Xen) would and returns an
:class:`~xenicorn.exits.Action`:

=====================  ==================================================
exit                   handler does
=====================  ==================================================
PortIO, Mmio           the bus finds the device at that port or address
Cpuid                  the CPUID policy answers (and watches leaf 7)
Msr                    the handler registered for that MSR, else reads 0
CrWrite                checked (crwrites.py): performed, or #GP(0)
SystemRead             SGDT/SIDT/SLDT/STR/SMSW with CR4.UMIP (umip.py):
                       #GP(0) at CPL > 0, else performed
Hlt                    the vCPU sleeps until an interrupt
InvalidInstruction     #UD through the IDT (with ``hvm_fep``: a forced
                       emulation prefix first, x86/fep.py)
Hypercall              the hypercall handler (Xen), else #UD
Exception_             delivered through the guest's IDT
Syscall                SYSCALL/SYSENTER's architectural effect
UnmappedAccess         reads float high (page becomes MMIO); a fetch is fatal
Shutdown, Limit        the machine ends (status, reason)
Request, Debug         nothing / the debugger's stop
=====================  ==================================================

Handlers reached from inside a Unicorn hook (port I/O, CPUID, exceptions)
run the same way; if one decides to stop, the vCPU ends the run and
``run()`` returns that exit.
"""
from __future__ import annotations

import collections

from .. import exits as E
from . import cpuidfault, umip
from ..x86.cpuid import ARCH_CAPABILITIES, LEAF7_EDX_ARCH_CAPABILITIES, MSR_ARCH_CAPABILITIES
from ..x86.crcheck import MSR_EFER
from ..x86.interrupts import EventType, TripleFault, deliver
from .crwrites import CrWriteChecker
from ..devices.lapic import LAPIC_BASE
from .memory import PAGE_SIZE
from .trace import disassemble

STATUS_OK, STATUS_CRASH, STATUS_USAGE, STATUS_TIMEOUT = 0, 1, 2, 124
IO_PORT_NS = 1000                  # deterministic time: one port access, as on an ISA bus
RECENT_EXITS = 12                  # exits kept for the report after a crash or hang
ARCH_CAPABILITIES_INTEREST = "arch-capabilities"     # the MSR window while the kernel starts
KERNEL_START_INTEREST = "kernel-start"                # the same, from power-on (IA32_APIC_BASE)
MSR_IA32_APICBASE = 0x1B
LEAF1_EDX_APIC = 1 << 9
APICBASE_BSP, APICBASE_EN = 1 << 8, 1 << 11              # bit 10 (x2APIC's EXTD) is reserved here
APICBASE_ADDR = ((1 << 40) - 1) & ~0xFFF                 # the page's address, below MAXPHYADDR (40)


class ExitDispatcher:
    """One handler per exit type; counts exits and keeps the last few for crash reports."""

    def __init__(self, machine):
        self.machine = machine
        self.counts: dict[str, int] = {}
        # the last exits, for the report when a run ends badly (a flight
        # recorder: one append per exit, formatted only if someone asks)
        self.recent: collections.deque = collections.deque(maxlen=RECENT_EXITS)
        self.listeners: list = []            # callables(vcpu, exit) after each handled exit: records
        self.stop_listeners: list = []       # callables(vcpu) before each exit is handled: the stepper
        self.hypercall_handler = None        # callable(vcpu, Hypercall) -> Action: Xen, when present
        self.msr_handlers: dict = {          # msr -> handler(vcpu, Msr exit), see engine/msr.py
            MSR_ARCH_CAPABILITIES: self._arch_capabilities, MSR_IA32_APICBASE: self._apic_base,
            **cpuidfault.handlers(self)}
        self.crwrites = CrWriteChecker(machine)
        self.msr_handlers[MSR_EFER] = self.crwrites.efer_write
        self._handlers = {
            E.PortIO: self._pio,
            E.Mmio: self._mmio,
            E.Cpuid: self._cpuid,
            E.Msr: self._msr,
            E.CrWrite: self.crwrites.cr_write,
            E.SystemRead: lambda vcpu, ex: umip.system_read(self, vcpu, ex),
            E.Hlt: self._hlt,
            E.InvalidInstruction: self._invalid,
            E.Hypercall: self._hypercall,
            E.Exception_: self._exception,
            E.Syscall: self._syscall,
            E.UnmappedAccess: self._unmapped,
            E.Shutdown: self._shutdown,
            E.Limit: self.limit,
            E.Request: self._request,
            E.Debug: self._debug,
        }

    def handle(self, vcpu, ex: E.Exit) -> E.Action:
        m = self.machine
        if m.status is not None and not isinstance(ex, (E.Shutdown, E.Limit)):
            # emu_stop() takes effect at the end of the translated block, so
            # a few more instructions may run after a shutdown: they must not
            # reach devices or deliver exceptions any more.
            if isinstance(ex, E.PortIO) and not ex.write:
                ex.value = (1 << (8 * ex.size)) - 1
            return E.Action.STOP
        for listener in self.stop_listeners:
            listener(vcpu)
        kind = type(ex)
        self.counts[kind.__name__] = self.counts.get(kind.__name__, 0) + 1
        self.recent.append(ex)
        action = self._handlers[kind](vcpu, ex)
        if m.tracer.on("exits"):
            m.tracer.emit("exits", self.describe(vcpu, ex))
        for listener in self.listeners:
            listener(vcpu, ex)
        if action is E.Action.STOP and vcpu._in_emu and vcpu._pending_exit is None:
            vcpu.stop_with(ex)
        return action

    # -- reports ------------------------------------------------------------------------
    def crash_report(self, vcpu) -> list[str]:
        """Where the guest is and the exits that led there, oldest first (for a bad end)."""
        pc = vcpu.pc
        code = vcpu.fetch_bytes(pc, 16)
        where = disassemble(code, pc, vcpu.code_bits())[0] if code else f"{pc:#x} (not readable)"
        lines = [f"guest at {where}, cpl {vcpu.cpl()}, {vcpu.instructions or 'uncounted'} instructions",
                 f"last {len(self.recent)} exits (oldest first):"]
        lines += ["  " + self.describe(vcpu, ex) for ex in self.recent]
        return lines

    @staticmethod
    def describe(vcpu, ex: E.Exit) -> str:
        """One line: the exit's fields and the guest instruction that caused it."""
        parts = []
        for k, v in vars(ex).items():
            if k == "pc":
                continue
            parts.append(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v}")
        text = f"{ex.kind} " + " ".join(parts)
        if ex.pc >= 0:
            code = vcpu.fetch_bytes(ex.pc, 16)
            text += f"  @ {disassemble(code, ex.pc, vcpu.code_bits())[0]}" if code else f"  @ {ex.pc:#x}"
        return text

    # -- delivering an exception --------------------------------------------------------
    def deliver(self, vcpu, vector: int, etype: EventType, error_code: int | None = None) -> E.Action:
        """Deliver an exception through the guest's IDT; a triple fault ends the machine."""
        try:
            deliver(vcpu, vector, etype, error_code)
        except TripleFault as tf:
            self.machine.shutdown("triple-fault", STATUS_CRASH, str(tf))
            return E.Action.STOP
        return E.Action.CONTINUE

    # -- the handlers -------------------------------------------------------------------
    def _pio(self, vcpu, ex: E.PortIO) -> E.Action:
        self.machine.clock.charge(IO_PORT_NS)
        return self._bus_access(self.machine.pio, ex.port, ex)

    def _mmio(self, vcpu, ex: E.Mmio) -> E.Action:
        return self._bus_access(self.machine.mmio, ex.addr, ex)

    def _bus_access(self, bus, addr: int, ex) -> E.Action:
        """The device at ``addr`` on ``bus`` takes the write, or answers the read into the exit."""
        if ex.write:
            bus.write(addr, ex.size, ex.value)
        else:
            ex.value = bus.read(addr, ex.size)
        return E.Action.STOP if self.machine.status is not None else E.Action.CONTINUE

    def _cpuid(self, vcpu, ex: E.Cpuid) -> E.Action:
        m = self.machine
        if cpuidfault.faults(vcpu):
            ex.result = None                         # #GP(0) at the CPUID (machine/cpuidfault.py)
            return self.deliver(vcpu, 13, EventType.HARDWARE_EXCEPTION, 0)
        if ex.leaf in (1, 7, 0xD) and not m.cpuid.model.is_default:
            # OSXSAVE, OSPKE and the XSAVE area size follow this vCPU's CR4 and XCR0
            ex.result = m.cpuid.query(ex.leaf, ex.subleaf, vcpu.index, cr4=vcpu.reg("cr4"), xcr0=vcpu.xcr0())
        else:
            ex.result = m.cpuid.query(ex.leaf, ex.subleaf, vcpu.index)
        if ex.leaf == 1 and not m.lapics[vcpu.index].hw_enabled:
            # a globally disabled APIC is not there (xen/arch/x86/cpuid.c clears it too)
            a, b, c, d = ex.result
            ex.result = (a, b, c, d & ~LEAF1_EDX_APIC)
        if ex.leaf == 7 and ex.result[3] & LEAF7_EDX_ARCH_CAPABILITIES:
            # The kernel is looking at its features and may read the MSR (Unicorn
            # would answer 0, "vulnerable to everything"): catch it until user mode.
            vcpu.msr.watch(MSR_ARCH_CAPABILITIES, read=True, write=True)
            vcpu.msr.open(ARCH_CAPABILITIES_INTEREST)
        if m.tracer.on("cpuid"):
            m.tracer.emit("cpuid", f"leaf {ex.leaf:#x}.{ex.subleaf} -> " + " ".join(f"{r:#010x}" for r in ex.result))
        return E.Action.CONTINUE

    def _msr(self, vcpu, ex: E.Msr) -> E.Action:
        handler = self.msr_handlers.get(ex.msr)
        if handler is not None:
            return handler(vcpu, ex) or E.Action.CONTINUE
        # Same as outside the window, where Unicorn drops unknown MSRs: reads 0.
        tracer = self.machine.tracer
        if tracer.on("io"):
            tracer.emit("io", f"unhandled {'WRMSR' if ex.write else 'RDMSR'} {ex.msr:#x}")
        return E.Action.CONTINUE

    def _arch_capabilities(self, vcpu, ex: E.Msr):
        """RDMSR 0x10A: the flaws this CPU does not have (cpuid.ARCH_CAPABILITIES); read-only."""
        if ex.write:
            return self.deliver(vcpu, 13, EventType.HARDWARE_EXCEPTION, 0)
        ex.value = ARCH_CAPABILITIES
        return E.Action.CONTINUE

    def _apic_base(self, vcpu, ex: E.Msr):
        """IA32_APIC_BASE (MSR 0x1B, SDM vol. 3 §10.4.4): where the local APIC's
        page is (bits 12-39), its global enable (bit 11), the BSP flag (bit 8).

        Unicorn has no APIC device and answers 0, "APIC globally disabled",
        which kvm-unit-tests' apic test asserts against. The value here is
        the machine's: the page at 0xFEE00000, the APIC's global enable, BSP
        on vCPU 0. A write with a reserved bit set (0-7, 9, above the 40
        physical address bits, or x2APIC's EXTD, bit 10, which CPUID does
        not offer) is #GP (Xen: ``guest_wrmsr_apic_base``). Clearing EN
        disables the APIC globally and setting it again resets it
        (devices/lapic.py ``set_hw_enabled``); moving the page is not
        modelled (traced, and the APIC stays). Read and written only while
        the MSR window is open (the kernel's start-up).
        """
        lapic = self.machine.lapics[vcpu.index]
        value = LAPIC_BASE | (APICBASE_EN if lapic.hw_enabled else 0) | (APICBASE_BSP if vcpu.index == 0 else 0)
        if not ex.write:
            ex.value = value
            return E.Action.CONTINUE
        if ex.value & ~(APICBASE_ADDR | APICBASE_EN | APICBASE_BSP):
            return self.deliver(vcpu, 13, EventType.HARDWARE_EXCEPTION, 0)
        lapic.set_hw_enabled(bool(ex.value & APICBASE_EN))
        if (ex.value ^ value) & APICBASE_ADDR and self.machine.tracer.on("io"):
            self.machine.tracer.emit("io", f"WRMSR IA32_APIC_BASE {ex.value:#x}: moving the local APIC "
                                           "is not modelled")
        return E.Action.CONTINUE

    def _hlt(self, vcpu, ex: E.Hlt) -> E.Action:
        self.machine.idle(vcpu, "HLT")
        return E.Action.CONTINUE

    def _invalid(self, vcpu, ex: E.InvalidInstruction) -> E.Action:
        return self._undefined_opcode(vcpu, ex)

    def _undefined_opcode(self, vcpu, ex: E.Exit) -> E.Action:
        """#UD, unless ``hvm_fep`` is on and the guest wrote the forced emulation prefix."""
        if self.machine.config.hvm_fep:
            from ..engine.debugging import RegisterAccess
            from ..x86.fep import forced_emulation
            forced = forced_emulation(vcpu, RegisterAccess(vcpu))
            if forced is not None:
                ex.fep = forced.summary()           # shown by --trace exits
                if self.machine.tracer.on("int"):
                    self.machine.tracer.emit("int", forced.summary())
                if forced.fault is None:
                    return E.Action.CONTINUE        # RIP is past the prefix: the instruction runs next
                return self.deliver(vcpu, forced.fault[0], EventType.HARDWARE_EXCEPTION, forced.fault[1])
        from ..x86.interrupts import icebp_length
        n = icebp_length(vcpu)
        if n:
            # ICEBP, which Unicorn does not decode: #DB as a trap, past the instruction
            vcpu.set_reg("rip", vcpu.reg("rip") + n)
            return self.deliver(vcpu, 1, EventType.PRIVILEGED_SOFTWARE_EXCEPTION)
        return self.deliver(vcpu, 6, EventType.HARDWARE_EXCEPTION)

    def _hypercall(self, vcpu, ex: E.Hypercall) -> E.Action:
        if self.hypercall_handler is not None:
            return self.hypercall_handler(vcpu, ex)
        return self.deliver(vcpu, 6, EventType.HARDWARE_EXCEPTION)   # no Xen: VMCALL is #UD

    def _exception(self, vcpu, ex: E.Exception_) -> E.Action:
        if ex.vector == 6 and not ex.software:
            return self._undefined_opcode(vcpu, ex)      # a #UD the engine raised from a helper
        etype = EventType.SOFTWARE_INTERRUPT if ex.software else EventType.HARDWARE_EXCEPTION
        vector = ex.vector
        if vector == 7 and not ex.software:          # the engine checks CR0.TS too early (x86/fpufault.py)
            from ..x86.fpufault import nm_or_ud
            bits = vcpu.code_bits()
            code = vcpu.instruction_bytes(ex.pc, bits)
            if code is not None:
                vector = nm_or_ud(code, bits, vcpu.reg("cr0"), vcpu.reg("cr4"))
        error_code = ex.error_code
        if vector in (13, 14) and not ex.software:   # segment checks the engine skips (x86/segcheck.py)
            from ..x86.segcheck import correct
            fix = correct(vcpu, vector, error_code, ex.pc)
            if fix is not None:
                ex.corrected = fix.summary()          # shown by --trace exits
                if self.machine.tracer.on("int"):
                    self.machine.tracer.emit("int", fix.summary())
                vector, error_code = fix.new
        if vector == 14 and ex.cr2 is not None:
            vcpu.set_reg("cr2", ex.cr2)               # the engine leaves CR2 to the delivery (engine/msr.py)
        return self.deliver(vcpu, vector, etype, error_code)

    def _syscall(self, vcpu, ex: E.Syscall) -> E.Action:
        # User mode has started: the kernel has read its capabilities. Close the
        # MSR window they needed (an open window slows plain code ~9%); CR4
        # writes are not seen after that, so look at UMIP once more (umip.py).
        if vcpu.msr.interests & {ARCH_CAPABILITIES_INTEREST, KERNEL_START_INTEREST}:
            umip.sync(vcpu, vcpu.reg("cr4"))
        vcpu.msr.close(ARCH_CAPABILITIES_INTEREST)
        vcpu.msr.close(KERNEL_START_INTEREST)
        from ..x86 import syscall
        (syscall.do_syscall if ex.insn == "syscall" else syscall.do_sysenter)(vcpu)
        return E.Action.CONTINUE

    def _unmapped(self, vcpu, ex: E.UnmappedAccess) -> E.Action:
        m = self.machine
        if ex.access == "fetch":
            m.shutdown("crash", STATUS_CRASH, f"guest jumped to {ex.addr:#x}, where there is no RAM to execute")
            return E.Action.STOP
        page = ex.addr & ~(PAGE_SIZE - 1)
        if m.tracer.on("mem"):
            m.tracer.emit("mem", f"{ex.access} of unassigned physical {ex.addr:#x}: "
                          "reads float high, writes are dropped")
        vcpu.map_mmio(page, PAGE_SIZE)
        return E.Action.CONTINUE

    def _shutdown(self, vcpu, ex: E.Shutdown) -> E.Action:
        self.machine.shutdown(ex.reason, ex.status, ex.message)
        return E.Action.STOP

    def limit(self, vcpu, ex: E.Limit) -> E.Action:
        """A run limit: the user's ``--timeout`` or ``--max-insns`` ends the machine."""
        m = self.machine
        if ex.what == "stopped":
            # a run that ended for no reason we know: a stop-timer repeat that
            # reached the engine between two runs (its cpu_exit is seen at the
            # next run's first block). Nothing to do but go on.
            return E.Action.CONTINUE
        if ex.what == "timeout":
            m.shutdown("timeout", STATUS_TIMEOUT, f"--timeout of {m.config.timeout:g}s reached")
        else:
            m.shutdown("max-insns", STATUS_TIMEOUT, f"--max-insns {m.config.max_insns} reached")
        return E.Action.STOP

    def _request(self, vcpu, ex: E.Request) -> E.Action:
        return E.Action.CONTINUE

    def _debug(self, vcpu, ex: E.Debug) -> E.Action:
        for agent in self.machine.agents:
            agent.on_debug_exit(vcpu, ex)
        return E.Action.CONTINUE
