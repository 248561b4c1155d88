"""The run loop: KVM_RUN in a loop, timers, sleep, interrupt injection, agents.

:meth:`RunLoop.run` is the loop a KVM user space runs around ``KVM_RUN``::

    while running:
        run timers that are due
        inject an interrupt if one waits and the guest accepts it
        exit = vcpu.run(budget)       # Unicorn executes guest code
        handle(exit)                  # Python does what hardware/Xen would

A vCPU that halts (``HLT``, ``SCHEDOP_block``, ``SCHEDOP_poll``) costs
nothing: the loop lets time pass to the next timer deadline instead of
running it. Between runs the loop consults its *agents*, the things that
watch or steer a machine from outside: the interrupt stepper, the gdb stub,
the QMP monitor, ``--savevm`` save points (:class:`Agent`).
"""
from __future__ import annotations

import time

from .. import exits as E
from ..x86.interrupts import EventType, TripleFault, deliver
from .dispatch import STATUS_CRASH

COUNT_QUANTUM = 1_000_000          # longest run of a counting vCPU between looks at its timers
SMP_QUANTUM_US = 1000              # with several runnable vCPUs: each runs this long, then the next
SMP_QUANTUM_INSNS = 50_000         # ... or this many instructions when time is counted
HOST_NS_PER_INSN_GUESS = 10.0      # a counting vCPU on host time runs at ~100 MIPS
RFLAGS_IF = 1 << 9


class Agent:
    """Something the run loop consults between guest runs; every method has a no-op default.

    An agent sees the machine only between runs, on the machine's thread,
    so it may read and change anything there. While any agent is attached,
    external interrupts are delivered by Python (where they can be seen and
    stopped at), not by the CPU engine.
    """

    def at_start(self) -> None:
        """The run loop starts (before the first guest instruction of this ``run()``)."""

    def service(self) -> None:
        """Top of each loop iteration: take requests; may block while the agent holds the guest stopped."""

    def holds_interrupts(self) -> bool:
        """True while no interrupt may be injected (a debugger's single step: QEMU's SSTEP_NOIRQ)."""
        return False

    def holds_vcpu(self, vcpu) -> bool:
        """True while ``vcpu`` may not run, though it could (a debugger steps another vCPU).

        The round robin passes over a held vCPU as over a halted one; if
        only held and halted vCPUs are left, the machine sleeps until a
        halted one wakes. An agent must leave at least one vCPU unheld.
        With one vCPU it is not consulted: an agent that wants the only
        CPU stopped pauses in :meth:`service`.
        """
        return False

    def before_run(self, vcpu, count: int) -> int:
        """The guest is about to run ``count`` instructions (0: unbounded); return the bound wanted."""
        return count

    def wants_service(self) -> bool:
        """While the vCPU sleeps: True to come back to the loop (and :meth:`service`) now."""
        return False

    def takes_host_input(self) -> bool:
        """True if a host-side request (a monitor command) may wake the guest while it sleeps."""
        return False

    def wait_for_input(self, seconds: float) -> None:
        """The vCPU sleeps: wait up to ``seconds`` for a host request and carry it out."""

    def keeps_alive(self) -> bool:
        """True if a guest that can never wake should stay (a debugger may still want to look)."""
        return False

    def max_sleep(self) -> float | None:
        """The longest the loop may sleep at once without looking at this agent (None: no limit)."""
        return None

    def on_debug_exit(self, vcpu, ex: E.Debug) -> None:
        """A breakpoint or watchpoint ended the run."""

    def at_end(self, status: int | None) -> None:
        """The machine has stopped with ``status``."""


class RunLoop:
    """Runs a machine's vCPU until the guest shuts down or a limit is hit."""

    def __init__(self, machine):
        self.machine = machine
        self.deadline: float | None = None        # --timeout, in host monotonic seconds
        self._last = 0                            # the vCPU that ran last (round robin)
        self.run_ends_ns: int | None = None       # machine time the running quantum ends by (several vCPUs)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        """Run until the guest shuts down or a limit is hit; return the exit status."""
        m = self.machine
        cfg = m.config
        smp = len(m.vcpus) > 1
        self.deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
        agents = m.agents
        for agent in agents:
            agent.at_start()
        while m.status is None:
            for agent in agents:
                agent.service()
                if m.status is not None:
                    break
            if m.status is not None:
                break
            m.clock.run_due()
            if m.console_input:
                m.take_console_input()
            if smp:
                self._start_and_wake()
            vcpu = self._next()
            if vcpu is None:
                self.sleep([v for v in m.vcpus if v.halted])
                continue
            if smp:
                vcpu.core.load(vcpu)
            if any(agent.holds_interrupts() for agent in agents):
                vcpu.disarm_interrupt_window()
            else:
                self.inject_pending_interrupt(vcpu)
            if m.status is not None or vcpu.halted:
                continue
            if m.block_watches:
                m.install_block_watches()      # e.g. Xen's callback deassert poll
            timeout_us, count = self.budget(vcpu)
            if smp and sum(not v.halted for v in m.vcpus) > 1:
                # others wait to run: a quantum each, as QEMU's round-robin TCG
                if vcpu.count_instructions:
                    count = min(count, SMP_QUANTUM_INSNS) if count else SMP_QUANTUM_INSNS
                else:
                    timeout_us = min(timeout_us, SMP_QUANTUM_US) if timeout_us else SMP_QUANTUM_US
            # The last attached agent bounds the run first; the first (the
            # monitor, then the debugger) has the last word and sees the
            # bound the run really gets.
            for agent in reversed(agents):
                count = agent.before_run(vcpu, count)
            if m.status is not None:
                break
            quantum = smp and timeout_us == SMP_QUANTUM_US and not vcpu.count_instructions
            self.run_ends_ns = m.clock.now_ns() + timeout_us * 1000 if quantum else None
            ex = vcpu.run(timeout_us=timeout_us, count=count)
            self.run_ends_ns = None
            for listener in m.dispatch.stop_listeners:      # what the guest changed in this run
                listener(vcpu)
            if isinstance(ex, E.Limit) and not self._limit_reached(vcpu):
                continue                  # a clock deadline, not the user's limit
            m.handle_exit(vcpu, ex)
        m.console.flush()
        for agent in agents:
            agent.at_end(m.status)
        return m.status

    def budget(self, vcpu) -> tuple[int, int]:
        """How long emu_start may run: until the user's limits or the next timer."""
        m = self.machine
        cfg = m.config
        timeout_us = 0
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                m.dispatch.limit(vcpu, E.Limit(vcpu.pc, "timeout"))
                return 0, 0
            timeout_us = max(1, int(left * 1e6))
        count = 0
        if cfg.max_insns:
            count = cfg.max_insns - vcpu.instructions
            if count <= 0:
                m.dispatch.limit(vcpu, E.Limit(vcpu.pc, "max-insns"))
                return 0, 0
        budget = m.clock.budget()
        if vcpu.count_instructions:
            # Bounded by instruction counts only: an asynchronous stop could
            # replay a memory access in this mode (docs/unicorn-notes.md).
            # The quantum bounds how late a stop requested during MMIO is.
            insns = COUNT_QUANTUM
            if budget is not None:
                per_insn = m.clock.ns_per_insn if m.clock.deterministic else HOST_NS_PER_INSN_GUESS
                insns = min(insns, max(1, int(budget / per_insn)))
            count = min(count, insns) if count else insns
        elif budget is not None:
            us = max(1, budget // 1000)
            timeout_us = min(timeout_us, us) if timeout_us else us
        return timeout_us, count

    def _limit_reached(self, vcpu) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        max_insns = self.machine.config.max_insns
        return bool(max_insns) and vcpu.instructions >= max_insns

    def _timed_out(self, vcpu) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.machine.dispatch.limit(vcpu, E.Limit(vcpu.pc, "timeout"))
            return True
        return False

    # -- scheduling ----------------------------------------------------------------------
    def _next(self):
        """The next vCPU to run, round robin after the last one; None when every vCPU sleeps.

        A vCPU an agent holds (:meth:`Agent.holds_vcpu`) is passed over.
        """
        m = self.machine
        vcpus = m.vcpus
        n = len(vcpus)
        for step in range(1, n + 1):
            vcpu = vcpus[(self._last + step) % n]
            if not vcpu.halted and not (n > 1 and any(agent.holds_vcpu(vcpu) for agent in m.agents)):
                self._last = vcpu.index
                return vcpu
        return None

    def _start_and_wake(self) -> None:
        """Several vCPUs: start those a SIPI reached; wake sleepers an interrupt or event is for."""
        m = self.machine
        for vcpu in m.vcpus:
            if vcpu.pending_state is not None:
                apply, vcpu.pending_state = vcpu.pending_state, None
                vcpu.core.load(vcpu)
                apply(vcpu)
            if vcpu.pending_sipi is not None:
                vector, vcpu.pending_sipi = vcpu.pending_sipi, None
                vcpu.reset_to_real_mode(vector)
                vcpu.wake()
                if m.tracer.on("irq"):
                    m.tracer.emit("irq", f"vCPU {vcpu.index} starts in real mode at {vector << 12:#x}")
            elif vcpu.halted and self._wakes(vcpu):
                vcpu.wake()

    # -- sleeping ------------------------------------------------------------------------
    def sleep(self, sleepers: list) -> None:
        """Every vCPU sleeps (HLT, SCHEDOP_block/poll, wait-for-SIPI): let time pass until one wakes.

        A maskable interrupt the guest accepts, an NMI, an event for a blocked
        vCPU, a poll timeout, or a start-up IPI ends the sleep. Time passes
        to the next timer deadline; when no timer is armed and nothing else
        could wake a vCPU, the run ends instead of hanging the host (status 1).
        """
        m = self.machine
        agents = m.agents
        vcpu = sleepers[0]
        while m.status is None and all(v.halted for v in sleepers):   # a loadvm/reset may wake one
            if any(agent.wants_service() for agent in agents):
                return                        # the loop services the agent; the vCPUs stay asleep
            m.clock.run_due()
            woken = [v for v in sleepers if (v.pending_sipi is not None) or self._wakes(v)]
            if woken:
                for v in woken:
                    if v.pending_sipi is None:
                        v.wake()
                return
            nxt = m.clock.next_deadline()
            listening = [a for a in agents if a.takes_host_input()]
            if listening and not m.clock.deterministic:
                # a monitor command (an injected event, quit) may wake it: wait for one
                wait = 0.05 if nxt is None else max(0.0, min(0.05, (nxt - m.clock.now_ns()) / 1e9))
                for agent in listening:
                    agent.service()
                for agent in listening:
                    agent.wait_for_input(wait)
                if self._timed_out(vcpu):
                    return
                continue
            cannot_wake = all(v.wait_for_sipi or v.down or (v.sleep_kind == "HLT" and not v.reg("rflags") & RFLAGS_IF)
                              for v in sleepers)
            if nxt is None or cannot_wake:
                if any(agent.keeps_alive() for agent in agents):
                    time.sleep(0.05)          # a debugger may still want to look (Ctrl-C)
                    continue
                pc = vcpu.pc
                if cannot_wake and vcpu.wait_for_sipi:
                    msg = f"vCPU {vcpu.index} waits for a start-up IPI and no other vCPU can send one"
                elif cannot_wake:
                    msg = f"vCPU halted at {pc:#x} with interrupts disabled"
                else:
                    msg = f"vCPU asleep ({vcpu.sleep_kind}) at {pc:#x} and nothing is left that could wake it"
                m.shutdown("halted", STATUS_CRASH, msg)
                return
            limit = None
            if self.deadline is not None:
                limit = self.deadline - time.monotonic()
                if limit <= 0:
                    self._timed_out(vcpu)
                    return
            for agent in agents:
                most = agent.max_sleep()
                if most is not None:
                    limit = min(limit, most) if limit is not None else most
            m.clock.wait_until(nxt, limit)

    def _wakes(self, vcpu) -> bool:
        m = self.machine
        if vcpu.wait_for_sipi or vcpu.down:
            return False                                 # only a SIPI (or VCPUOP_up) starts it
        src = m.interrupt_source_of(vcpu)
        if getattr(src, "nmi_pending", False) and not vcpu.nmi_blocked():
            return True
        direct = any(s.direct_pending(vcpu.index) is not None for s in m.direct_sources)
        if (direct or (src is not None and src.pending())) and vcpu.reg("rflags") & RFLAGS_IF:
            return True
        if vcpu.sleep_kind != "HLT":                     # asleep in a hypercall: its owner says
            return any(wakes(vcpu) for wakes in m.wake_sources)
        return False

    # -- interrupts ----------------------------------------------------------------------
    def inject_pending_interrupt(self, vcpu) -> None:
        """Deliver an external interrupt if one waits and the guest accepts it.

        x86 accepts a maskable interrupt only between instructions, with
        RFLAGS.IF = 1 and outside the one-instruction shadow of STI/MOV SS
        (SDM vol. 3 §6.8.3). When one waits but the window is closed, the
        vCPU asks for an exit when it opens (:mod:`~xenicorn.engine.irqwindow`).
        When it is open, the interrupt controller gives up its vector and
        either the CPU engine delivers it as the next run starts or, when
        deliveries are being watched, Python does (``VCpu.engine_delivers``).
        """
        m = self.machine
        src = m.interrupt_source_of(vcpu)
        if getattr(src, "nmi_pending", False):
            # After an NMI, NMIs are blocked until the next IRET (SDM vol. 3
            # §6.7.1): one arriving meanwhile waits, and an exit right after
            # that IRET delivers it (the NMI window, engine/irqwindow.py).
            if not (vcpu.nmi_blocked() and vcpu.arm_nmi_window()):
                vcpu.disarm_nmi_window()
                src.nmi_pending = False
                vcpu.halted = False
                vcpu.set_nmi_blocked(True)
                self._deliver(vcpu, 2, EventType.NMI)
                return
        elif vcpu.msr.nmi_window:
            vcpu.disarm_nmi_window()
        if vcpu.engine_delivery_pending:
            return                      # one at a time: the engine takes it as the next run starts
        direct, owner = None, None
        for source in m.direct_sources:
            direct = source.direct_pending(vcpu.index)
            if direct is not None:
                owner = source
                break
        if direct is None and (src is None or not src.pending()):
            vcpu.disarm_interrupt_window()
            return
        if not (vcpu.reg("rflags") & RFLAGS_IF) or vcpu.interrupt_shadow():
            vcpu.arm_interrupt_window()
            return
        vcpu.disarm_interrupt_window()
        if direct is not None:
            # Xen's callback vector: injected past the LAPIC (hvm_vcpu_has_pending_irq)
            owner.direct_taken(vcpu.index)
            vector = direct
        else:
            vector = src.acknowledge()
        if vector is None:
            return
        vcpu.halted = False
        # Xen's callback vector goes past the LAPIC; if the LAPIC's own
        # vector still waits, the run needs an exit where the handler's IRET
        # (or an STI) lets it in, or nothing might stop the run until it is
        # long overdue. The engine's delivery uses the same request as that
        # exit, so Python delivers this one and arms the window.
        lapic_waits = direct is not None and src is not None and src.vector_pending()
        if vcpu.engine_delivers() and not lapic_waits:
            vcpu.engine_deliver(vector)
            return
        self._deliver(vcpu, vector, EventType.EXTERNAL)
        if lapic_waits:
            vcpu.arm_interrupt_window()

    def _deliver(self, vcpu, vector: int, etype: EventType) -> None:
        try:
            deliver(vcpu, vector, etype)
        except TripleFault as tf:
            self.machine.shutdown("triple-fault", STATUS_CRASH, str(tf))

    # -- getting the loop's attention ------------------------------------------------------
    def kick(self, why: str, force: bool = False) -> None:
        """Something may want the CPU's attention: stop emu_start so the run loop looks."""
        m = self.machine
        vcpu = m.current_vcpu
        src = m.interrupt_source_of(vcpu)
        # an NMI pends outside the IRR (pending() ignores it) and needs no IF
        wants = src is not None and (src.pending() or getattr(src, "nmi_pending", False))
        if vcpu._in_emu and (force or wants):
            vcpu.request_stop(why)

    def kick_until(self, taken, why: str) -> None:
        """From another thread: stop the guest until the run loop has taken what was posted.

        A stop that reaches Unicorn just before ``emu_start`` clears its
        stop flag is lost (see :mod:`~xenicorn.engine.stoptimer`), so it is
        repeated every few milliseconds while ``taken()`` is false.
        """
        while not taken() and self.machine.status is None:
            self.kick(why, force=True)
            time.sleep(0.005)
