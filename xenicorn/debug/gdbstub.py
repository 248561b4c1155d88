"""A gdb remote stub: let ``gdb`` debug the guest over TCP (``-s``, ``-gdb tcp::PORT``).

gdb talks to a *remote stub* with its Remote Serial Protocol (RSP; gdb
manual, appendix "Remote Protocol"). QEMU has one (``gdbstub/gdbstub.c``,
``target/i386/gdbstub.c``) and this one offers gdb the same view of an x86
machine: one thread per vCPU (:mod:`.gdb.threads`), their registers, guest
memory at *linear* addresses, breakpoints, stepping and continuing.

The stub is in layers, each in its own module:

=============================  ===============================================
module                         what it knows
=============================  ===============================================
:mod:`.gdb.protocol`           the wire: ``$payload#cc``, acks, escapes, Ctrl-C
:mod:`.gdb.threads`            threads are vCPUs; what ``vCont`` asks of each
:mod:`.gdb.target`             the registers gdb is shown, the target XML
:mod:`.gdb.memory`             guest memory at linear addresses, RAM only
:mod:`.gdb.session`            what each packet does, breakpoints, stop replies
:mod:`xenicorn.engine.debugging`  hooks, exact stops, registers (Unicorn)
:mod:`.sockserver`             the socket, its threads, the queue
this module                    the run loop's side: :class:`GdbStub`
=============================  ===============================================

The session's life: as in QEMU (``gdbstub/system.c``), a connecting gdb
finds the guest stopped (it is stopped on connect, and ``?`` answers T05),
``D`` removes the breakpoints and lets the guest run on, ``k`` ends the
emulator with status 0 and one line on stderr, a stop reply or ``W`` (the
guest ended, with its exit status) is sent only while gdb waits for one.
Unlike QEMU, which leaves the VM paused when gdb's connection closes, a
gdb that disconnects here lets the guest run on, as ``D`` does: xenicorn
may have no monitor to resume it, and a vanished debugger must not leave
the machine stuck.

How it sits in the machine
--------------------------
One thread accepts a connection and reads it: it checks checksums, acks,
and queues packets (and Ctrl-C) for the machine. Replies go out from the
machine's thread with a send timeout, so a debugger that stops reading is
dropped instead of stalling the guest. Everything else happens
on the machine's own thread, in :meth:`GdbStub.service`, which the run loop
calls before each guest run: while gdb has the guest stopped the run loop
waits there. Before each run the loop also asks :meth:`GdbStub.before_run`
how many instructions it may execute: one for a single step, a short
quantum (200,000) while gdb is attached, so Ctrl-C is noticed within a few
milliseconds without an asynchronous ``emu_stop()``, which in Unicorn's
counting mode could replay a memory access (docs/unicorn-notes.md, "A stop
request rewinds to the last memory access").

A gdb stub needs exact stops, so a machine with one counts instructions
(``MachineConfig.gdb`` turns counting on): Unicorn then checks for a stop
before every instruction. A breakpoint ends the run before its
instruction (a :class:`~xenicorn.exits.Debug` exit, handed back to
:meth:`GdbStub.on_debug_exit`); a single step is a run with ``count=1``.
While stepping, interrupts are not injected, as QEMU's default
``SSTEP_NOIRQ``: ``stepi`` goes to the next instruction, not into a timer
handler. With several vCPUs the loop also asks :meth:`GdbStub.holds_vcpu`
which vCPUs may run: only the stepped one during a step (the others stay
stopped, see :mod:`.gdb.threads`). Instruction counts are per vCPU, so a
step is over when the stepped vCPU's count has moved.
"""
from __future__ import annotations

import os
import traceback

from .. import exits as E
from ..engine import debugging
from .gdb.protocol import (
    EINVAL,
    SIGINT,
    SIGTRAP,
    BadArgument,
    PacketReader,
    checksum,
    frame,
)
from .gdb.session import MAX_WATCH, RUNNING, STEPPING, STOPPED, Session
from .gdb.target import target_xml
from .sockserver import Connection, SocketServer, tcp_listener

# the interface: what the machine and the CLI use, and the protocol helpers a test client needs
__all__ = ["DEFAULT_PORT", "MAX_WATCH", "GdbStub", "checksum", "frame", "parse_spec", "target_xml"]

DEFAULT_PORT = 1234
ATTACHED_QUANTUM = 200_000       # instructions per run while gdb is attached and the guest runs
WAIT_S = 0.05                    # how often a stopped machine looks at its status
SEND_TIMEOUT_S = 2               # a debugger that stops reading this long is dropped


def parse_spec(spec: str) -> tuple[str, int]:
    """``tcp::PORT``, ``tcp:HOST:PORT`` or ``PORT`` (QEMU's spellings) -> (host, port)."""
    text = spec
    if text.startswith("tcp:"):
        text = text[4:]
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"-gdb {spec}: expected tcp::PORT or tcp:HOST:PORT")
    elif text.isdigit():
        host, port_text = "", text
    else:
        raise ValueError(f"-gdb {spec}: only tcp::PORT, tcp:HOST:PORT or PORT are supported")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"-gdb {spec}: {port_text!r} is not a TCP port")
    return host or "0.0.0.0", int(port_text)


class _GdbConnection(Connection):
    """A debugger's connection: remembers the last packet, which gdb may NAK."""

    def __init__(self, sock):
        super().__init__(sock)
        self.last = b""                  # the last packet sent, resent on "-"

    def send_packet(self, payload: bytes) -> None:
        self.last = frame(payload)
        self.send(self.last)


def _packets(conn: _GdbConnection):
    """The reader thread's decoder: acks and resends go out at once, packets and Ctrl-C are queued."""
    reader = PacketReader()

    def feed(data: bytes):
        for kind, payload in reader.feed(data):
            if kind == "send":
                conn.send(payload)
            elif kind == "resend":
                if conn.last:
                    conn.send(conn.last)
            else:
                yield kind, payload
    return feed


class GdbStub(Session):
    """The remote stub of one machine (vCPU ``n`` is gdb's thread ``n + 1``): the run loop's side of it."""

    def __init__(self, machine, host: str, port: int, wait: bool = False):
        super().__init__(machine, wait)
        try:
            listener = tcp_listener(host, port, backlog=1)
        except OSError as e:
            e.gdb_socket = True                      # the CLI names -gdb in its one-line error
            raise
        self.listener = listener
        self.port = listener.getsockname()[1]
        self._run_count = 0
        self.closed = False
        self.server = SocketServer(listener, name="xenicorn-gdb", decoder=_packets, connection=_GdbConnection,
                                   on_accept=self._accept_one, send_timeout=SEND_TIMEOUT_S, nodelay=True,
                                   announce=True)

    def _accept_one(self, conn: _GdbConnection) -> bool:
        """On the accept thread: one debugger at a time."""
        if self.attached:
            return False
        self.client = conn
        return True

    # -- the run loop's side ----------------------------------------------------------
    @property
    def attached(self) -> bool:
        """A debugger is connected."""
        return self.client is not None and self.client.alive

    @property
    def stepping(self) -> bool:
        """gdb asked for one instruction: the run loop holds interrupts back."""
        return self.state == STEPPING

    def wants_service(self) -> bool:
        """Something waits for the machine thread (a sleeping vCPU must come back to the loop)."""
        # a step of a sleeping vCPU waits, like the vCPU, for what wakes it
        return self.server.pending() or self.state == STOPPED

    def service(self) -> None:
        """Called at the top of every run-loop iteration, on the machine's thread."""
        stepped = self._step_vcpu
        if self.state == STEPPING and stepped.instructions != self._step_mark:
            self.report_stop(SIGTRAP, stepped)
        elif self._watch_hit is not None and self.state == RUNNING:
            self.report_stop(SIGTRAP, self._watch_vcpu)   # hit by the last instruction of a run
        self._drain(0)
        while self.state == STOPPED and self.machine.status is None:
            if self.machine.monitor is not None:
                self.machine.monitor.service()
            self._drain(WAIT_S)

    def before_run(self, vcpu, count: int) -> int:
        """The run loop is about to run the guest for ``count`` instructions (0: unbounded)."""
        if self.state == STEPPING:
            count = debugging.SINGLE_STEP
        elif self.attached:
            count = min(count, ATTACHED_QUANTUM) if count else ATTACHED_QUANTUM
        # gdb resumed this vCPU on a breakpoint: its instruction runs once
        # (only at the first run since; a later run that starts there stops)
        resumed_at = self._resume_at.pop(vcpu.index, None)
        self._skip_once = resumed_at if resumed_at is not None and resumed_at == vcpu.pc else None
        self._run_count = count
        return count

    def on_debug_exit(self, vcpu, ex: E.Debug) -> None:
        """A breakpoint (or watchpoint) hook ended the run before the instruction at ``ex.pc``."""
        debugging.uncount_stopped_instruction(vcpu, self._run_count)
        self.report_stop(SIGTRAP, vcpu)

    def close(self, status: int | None) -> None:
        """The machine has ended: tell gdb the "process" exited (``W``), close everything."""
        self.closed = True
        client = self.client
        if client is not None and client.alive and status is not None and self.reply_due:
            client.send_packet(b"W%02x" % (status & 0xFF))
        if client is not None:
            client.close()
        self.server.close()
        self._remove_all_breakpoints()

    # -- events from the connection -------------------------------------------------------
    def _drain(self, wait: float) -> None:
        for kind, conn, payload in self.server.events(wait):
            if conn is self.client or kind == "connect":
                self._event(kind, conn, payload)

    def _event(self, kind: str, conn: _GdbConnection, payload: bytes | None) -> None:
        if kind == "connect":
            self.on_connect()
        elif kind == "disconnect":
            self.on_disconnect()
        elif kind == "interrupt":
            if self.state != STOPPED:
                self.report_stop(SIGINT, self._step_vcpu if self.state == STEPPING else None)
        else:
            try:
                reply = self.handle(payload.decode("latin-1"))
            except BadArgument:
                reply = EINVAL
            except Exception as exc:          # noqa: BLE001 - a bug of ours: an error reply, not a dead machine
                reply = "E01"
                if os.environ.get("XENICORN_DEBUG"):
                    traceback.print_exception(exc)
            if reply is not None:
                conn.send_packet(reply.encode("latin-1") if isinstance(reply, str) else reply)
