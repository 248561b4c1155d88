"""The gdb stub and the QMP monitor as run-loop agents.

The run loop (:mod:`xenicorn.machine.runloop`) knows only
:class:`~xenicorn.machine.runloop.Agent`: things it consults between guest
runs. These adaptors say what a debugger and a monitor want from it:

==================  ====================================  =====================
the loop asks       gdb                                   QMP
==================  ====================================  =====================
at_start            -                                     keep the power-on state
                                                          (for ``system_reset``)
service             stop replies, packets; waits while    commands; waits while
                    gdb has the guest stopped             ``stop`` has paused it
holds_interrupts    while single-stepping (SSTEP_NOIRQ)   -
holds_vcpu          the vCPUs a step or a ``vCont;c:N``   -
                    leaves stopped
before_run          one instruction per step; a quantum   -
                    while attached (to see Ctrl-C)
while asleep        come back for packets; never end a    wait for a command
                    guest that cannot wake while gdb is   (it may wake the
                    attached; look every 50 ms            guest)
at_end              ``W`` exit status, close              SHUTDOWN event, close
==================  ====================================  =====================
"""
from __future__ import annotations

from ..machine.runloop import Agent

GDB_LOOK_S = 0.05                 # how long a sleeping machine goes without looking at gdb


class GdbAgent(Agent):
    """The gdb stub (:mod:`xenicorn.debug.gdbstub`) in the run loop."""

    def __init__(self, stub):
        self.stub = stub

    def service(self) -> None:
        self.stub.service()            # waits here while gdb has the guest stopped

    def holds_interrupts(self) -> bool:
        return self.stub.stepping      # gdb steps with interrupts held (QEMU's SSTEP_NOIRQ)

    def holds_vcpu(self, vcpu) -> bool:
        return self.stub.holds_vcpu(vcpu)  # stepping one vCPU: the others stay stopped

    def before_run(self, vcpu, count: int) -> int:
        return self.stub.before_run(vcpu, count)

    def wants_service(self) -> bool:
        return self.stub.wants_service()

    def keeps_alive(self) -> bool:
        return self.stub.attached

    def max_sleep(self) -> float | None:
        return GDB_LOOK_S              # notice gdb's Ctrl-C

    def on_debug_exit(self, vcpu, ex) -> None:
        self.stub.on_debug_exit(vcpu, ex)

    def at_end(self, status: int | None) -> None:
        self.stub.close(status)


class MonitorAgent(Agent):
    """The QMP monitor (:mod:`xenicorn.debug.qmp`) in the run loop."""

    PAUSED_WAIT_S = 0.1

    def __init__(self, machine, monitor):
        self.machine = machine
        self.monitor = monitor

    def at_start(self) -> None:
        if self.machine.power_on is None:
            self.machine.capture_power_on()

    def service(self) -> None:
        mon = self.monitor
        mon.service()
        while mon.paused and self.machine.status is None:
            mon.service(wait=self.PAUSED_WAIT_S)

    def takes_host_input(self) -> bool:
        return True

    def wait_for_input(self, seconds: float) -> None:
        self.monitor.service(wait=seconds)

    def at_end(self, status: int | None) -> None:
        quit_ = self.machine.shutdown_reason == "quit"
        self.monitor.event("SHUTDOWN", {"guest": not quit_, "reason": "host-qmp-quit" if quit_ else "guest-shutdown"})
        self.monitor.close()


def attach_from_config(machine) -> None:
    """Start what ``-qmp`` and ``-gdb`` ask for and put them in the machine's run loop.

    The monitor comes first: the loop services agents in order, and a gdb
    stop still lets QMP commands through (the stub services the monitor).
    """
    cfg = machine.config
    if cfg.qmp:
        from .qmp import QmpServer, parse_spec
        machine.monitor = QmpServer(machine, parse_spec(cfg.qmp))      # the machine adds its agent
    if cfg.gdb:
        from .gdbstub import GdbStub, parse_spec as parse_gdb_spec
        machine.gdb = GdbStub(machine, *parse_gdb_spec(cfg.gdb), wait=cfg.gdb_wait)
