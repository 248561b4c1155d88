"""The gdb session: what each packet does to the machine, breakpoints, watchpoints, stop replies.

A :class:`Session` is the machine-side half of a gdb connection. It runs
on the machine's thread only: it gets whole packets (framing is
:mod:`.protocol`'s business, sockets :mod:`xenicorn.debug.gdbstub`'s),
answers them, and keeps the state gdb has given the target:

=========  ================================================================
state      meaning
=========  ================================================================
stopped    gdb has the guest; the run loop waits in ``GdbStub.service``
running    the guest runs (in quanta while gdb is attached, to hear Ctrl-C)
stepping   one instruction, then a stop reply (``s``, ``vCont;s``)
=========  ================================================================

A session, as gdb drives it::

    gdb -> qSupported:multiprocess+;...   stub -> PacketSize=4000;qXfer:features:read+;...
    gdb -> qXfer:features:read:target.xml:0,ffb
                                          stub -> l<target ...> (which registers exist)
    gdb -> ?                              stub -> T05thread:01;   (stopped, SIGTRAP)
    gdb -> g                              stub -> all registers, in XML order
    gdb -> m100000,40                     stub -> 64 bytes of memory, or E14
    gdb -> Z0,101fe0,1                    stub -> OK  (break kmain)
    gdb -> vCont;c                        (no reply while the guest runs)
                                          stub -> T05thread:01;  (hit kmain)
    gdb -> vCont;s                        stub -> T05thread:01;  (one instruction)
    gdb -> D                              stub -> OK  (detach: the guest runs on)

With several vCPUs, each is a thread (:mod:`.threads`): stop replies name
the vCPU that stopped (``T05thread:02;``), ``Hg2`` selects vCPU 1's
registers and page tables, ``vCont;s:2;c`` steps vCPU 1 while the others
stay stopped.

Breakpoints (``Z0``, and ``Z1``, the same thing here) are engine code
hooks on exactly their address (:mod:`xenicorn.engine.debugging`): they
end the run *before* the instruction executes (a :class:`~xenicorn.exits.Debug`
exit) and never change guest memory. Resuming a vCPU that stands on a breakpoint
lets that instruction run once, as the RF flag does for a hardware
breakpoint; a run that merely starts there (after an interrupt, a quantum
end) stops at it. Every vCPU meets the same breakpoints, each stop is
reported for the vCPU that was running.
Watchpoints (``Z2`` write, ``Z3`` read, ``Z4`` access) watch the RAM their
linear range maps to when they are set; they stop the guest just after
the access, and the stop reply names the address (``watch:ADDR;``), from
which gdb shows the old and new values.
"""
from __future__ import annotations

from ... import exits as E
from ...engine import debugging
from ...machine.memory import PAGE_SIZE
from . import threads
from .memory import DebugMemory
from .protocol import (
    EFAULT,
    EINVAL,
    PACKET_SIZE,
    SIGTRAP,
    addr_len,
    escape_binary,
    parse_hex,
    parse_thread,
    unhex,
)
from .target import RegisterFile, target_xml

RUNNING, STOPPED, STEPPING = "running", "stopped", "stepping"

# Z2/Z3/Z4: the stop reply's name for the hit, and the engine's kind of watchpoint
WATCH_KINDS = {"2": ("watch", debugging.WATCH_WRITE), "3": ("rwatch", debugging.WATCH_READ),
               "4": ("awatch", debugging.WATCH_ACCESS)}
MAX_WATCH = PAGE_SIZE            # the longest range one watchpoint may cover


class Session:
    """gdb's view of one machine (vCPU ``n`` is gdb's thread ``n + 1``), driven packet by packet."""

    def __init__(self, machine, wait: bool = False):
        self.machine = machine
        self.client = None                           # the connection stop replies go to
        # -S: stopped before the first instruction until gdb continues
        self.state = STOPPED if wait else RUNNING
        self.waiting_for_client = wait
        self.breakpoints: dict[int, debugging.DebugHook] = {}      # linear address -> hook
        self.watchpoints: dict[tuple[str, int, int], list[debugging.DebugHook]] = {}  # (Z type, addr, len)
        self._watch_hit: tuple[str, int] | None = None  # (watch|rwatch|awatch, linear address)
        self._watch_step_hook: debugging.DebugHook | None = None  # stops after a watched access
        self._watch_vcpu = None                     # the vCPU that made the watched access
        self._skip_once: int | None = None          # this run starts on a breakpoint gdb resumed at
        self._resume_at: dict[int, int] = {}        # vCPU index -> breakpoint it was resumed on
        boot = machine.vcpus[0]
        self.stop_vcpu = boot                        # the last stop's vCPU (thread:NN;, qC)
        self.g_vcpu = boot                           # Hg: registers and memory
        self.c_vcpu = boot                           # Hc: what "s" steps
        self.run_only: frozenset[int] | None = None  # vCPUs a resume lets run (None: all)
        self._step_vcpu = boot                       # the vCPU a step runs, and its count before it
        self._step_mark = 0
        self.last_signal = SIGTRAP
        self._bits_shown: int | None = None          # the layout gdb was given (fixed per connection)
        self.memory = DebugMemory(machine, lambda: self.g_vcpu)
        # gdb waits for a stop reply only after it resumed the guest (c, s, vCont):
        # QEMU's allow_stop_reply; never send one it did not ask for
        self.reply_due = False

    # -- connection events ----------------------------------------------------------------
    def on_connect(self) -> None:
        """gdb expects a stopped target when it attaches (QEMU stops the VM then)."""
        self._remove_all_breakpoints()
        self._bits_shown = None
        # QEMU's stub starts a connection on the first CPU
        self.stop_vcpu = self.g_vcpu = self.c_vcpu = self.machine.vcpus[0]
        self.run_only = None
        if self.state != STOPPED:
            self.state = STOPPED
            self.last_signal = SIGTRAP
        self.reply_due = False
        self.waiting_for_client = False

    def on_disconnect(self) -> None:
        """A debugger that goes away leaves a running machine, not a stuck one."""
        self.client = None
        self._remove_all_breakpoints()
        self.state = RUNNING
        self.run_only = None
        self.reply_due = False

    def report_stop(self, signal: int, vcpu=None) -> None:
        """The guest stopped on ``vcpu`` (default: the one that ran last): tell gdb if it waits for it.

        As QEMU's ``gdb_set_stop_cpu``, a stop selects that vCPU for
        registers and for stepping.
        """
        vcpu = vcpu if vcpu is not None else self.machine.current_vcpu
        self.state = STOPPED
        self.last_signal = signal
        self.stop_vcpu = self.g_vcpu = self.c_vcpu = vcpu
        reply = self._stop_reply(signal)
        if self._watch_hit is not None and signal == SIGTRAP:
            name, addr = self._watch_hit
            reply += f"{name}:{addr:x};"           # which watchpoint: gdb then shows old/new values
        self._watch_hit = None
        if self.client is not None and self.reply_due:
            self.client.send_packet(reply.encode())
        self.reply_due = False

    def _stop_reply(self, signal: int) -> str:
        return f"T{signal:02x}thread:{threads.thread_id(self.stop_vcpu):02x};"

    # -- breakpoints ------------------------------------------------------------------------
    def _add_breakpoint(self, addr: int) -> None:
        if addr not in self.breakpoints:
            self.breakpoints[addr] = debugging.add_breakpoint(self.machine.vcpu, addr, self._on_breakpoint)

    def _remove_breakpoint(self, addr: int) -> bool:
        hook = self.breakpoints.pop(addr, None)
        if hook is None:
            return False
        debugging.remove(hook)
        return True

    def _remove_all_breakpoints(self) -> None:
        for addr in list(self.breakpoints):
            self._remove_breakpoint(addr)
        for key in list(self.watchpoints):
            self._remove_watchpoint(*key)
        self._watch_hit = None
        self._resume_at = {}

    def _on_breakpoint(self, address: int) -> None:
        if address == self._skip_once:
            self._skip_once = None              # the instruction we resume at runs once
            return
        if address not in self.breakpoints or self.state == STEPPING:
            return                              # a step ends by its count, not here
        self.machine.current_vcpu.stop_with(E.Debug(address, "breakpoint"))   # whichever vCPU runs

    # -- watchpoints ---------------------------------------------------------------------------
    def _add_watchpoint(self, kind: str, addr: int, length: int) -> bool:
        key = (kind, addr, length)
        if key in self.watchpoints:
            return True
        pieces = self.memory.pieces(addr, length)
        if pieces is None:
            return False
        vcpu = self.machine.vcpu                # the engine's hooks: every vCPU's accesses
        name, engine_kind = WATCH_KINDS[kind]
        hooks = []
        linear = addr
        for phys, n in pieces:
            def on_access(address, size, lin=linear, base=phys, name=name):
                if self._watch_hit is None:     # the first access of the run is the one reported
                    self._watch_hit = (name, lin + max(0, address - base))
                    self._watch_vcpu = self.machine.current_vcpu
            hooks.append(debugging.add_watchpoint(vcpu, phys, n, engine_kind, on_access))
            linear += n
        self.watchpoints[key] = hooks
        if self._watch_step_hook is None:
            self._watch_step_hook = debugging.add_instruction_hook(vcpu, self._after_watched_access)
        return True

    def _remove_watchpoint(self, kind: str, addr: int, length: int) -> None:
        hooks = self.watchpoints.pop((kind, addr, length), None)
        if hooks is None:
            return
        if not self.watchpoints and self._watch_step_hook is not None:
            hooks.append(self._watch_step_hook)
            self._watch_step_hook = None
        debugging.remove(*hooks)

    def _after_watched_access(self, address: int) -> None:
        if self._watch_hit is not None and self.state != STEPPING:
            self.machine.current_vcpu.stop_with(E.Debug(address, "watchpoint"))

    # -- memory and registers --------------------------------------------------------------------
    def read_memory(self, addr: int, length: int) -> bytes | None:
        """Guest memory at a linear address as gdb sees it (None: unreachable)."""
        return self.memory.read(addr, length)

    def write_memory(self, addr: int, data: bytes) -> bool:
        """Write guest memory at a linear address as gdb does (False: unreachable, nothing written)."""
        return self.memory.write(addr, data)

    def _bits(self) -> int:
        kernel = getattr(self.machine, "kernel", None)
        bits = getattr(kernel, "bits", None)
        if bits in (32, 64):
            return bits
        return 64 if self.machine.vcpu.long_mode() else 32

    def regs(self) -> RegisterFile:
        """The selected vCPU's (``Hg``) registers, in the layout gdb was given (fixed per connection)."""
        if self._bits_shown is None:
            self._bits_shown = self._bits()
        return RegisterFile(self.g_vcpu, self._bits_shown)

    # -- packets ----------------------------------------------------------------------------
    def handle(self, p: str):
        """One packet -> the reply (str or bytes), or None when none is due yet."""
        if not p:
            return ""
        cmd = p[0]
        if cmd == "?":
            return self._stop_reply(self.last_signal)
        if cmd == "g":
            regs = self.regs()
            return b"".join(regs.read(i) for i in range(len(regs.layout))).hex()
        if cmd == "G":
            return self._write_all_registers(p[1:])
        if cmd == "p":
            n = parse_hex(p[1:])
            regs = self.regs()
            return regs.read(n).hex() if n < len(regs.layout) else EFAULT
        if cmd == "P":
            num, eq, value = p[1:].partition("=")
            n = parse_hex(num)
            regs = self.regs()
            if not eq or n >= len(regs.layout):
                return EFAULT if eq else EINVAL
            regs.write(n, unhex(value))
            return "OK"
        if cmd == "m":
            addr, length = addr_len(p[1:])
            if length > PACKET_SIZE // 2:
                return EINVAL
            data = self.read_memory(addr, length)
            return EFAULT if data is None else data.hex()
        if cmd in "MX":
            head, colon, body = p[1:].partition(":")
            if not colon:
                return EINVAL
            addr, length = addr_len(head)
            data = unhex(body) if cmd == "M" else body.encode("latin-1")   # X: unescaped on arrival
            if len(data) != length:
                return EINVAL
            if not length:
                return "OK"
            return "OK" if self.write_memory(addr, data) else EFAULT
        if cmd in "Zz":
            return self._breakpoint_packet(p)
        if cmd in "cCsS":
            return self._resume(cmd.lower(), p[1:], with_signal=cmd in "CS")
        if cmd == "H":
            return self._set_thread(p)
        if cmd == "T":                               # is this thread alive? every vCPU is
            return "OK" if self._thread(p[1:]) is not None else EINVAL
        if cmd == "D":
            self._remove_all_breakpoints()
            self.state = RUNNING
            self.run_only = None
            self.reply_due = False
            return "OK"
        if cmd == "k":
            self._kill()
            return None                              # gdb expects no reply to k
        if p.startswith("v"):
            return self._v_packet(p)
        if p.startswith("q"):
            return self._query(p)
        return ""

    def _thread(self, text: str):
        """The vCPU a thread id names, None for 0, -1 or a thread that does not exist."""
        return threads.vcpu_of(self.machine.vcpus, parse_thread(text))

    def _set_thread(self, p: str) -> str:
        """``Hg``/``Hc`` (``Hs``: as ``Hc``): select a vCPU; 0 and -1 keep the selection, as QEMU."""
        if len(p) < 3 or p[1] not in "gcs":
            return EINVAL
        if parse_thread(p[2:]) in (threads.ALL, threads.ANY):
            return "OK"
        vcpu = self._thread(p[2:])
        if vcpu is None:
            return EINVAL
        if p[1] == "g":
            self.g_vcpu = vcpu
        else:
            self.c_vcpu = vcpu
        return "OK"

    def _write_all_registers(self, body: str) -> str:
        data = unhex(body)
        regs = self.regs()
        sizes = [regs.size(i) for i in range(len(regs.layout))]
        if len(data) > sum(sizes):
            return EINVAL
        pos = 0
        for i, size in enumerate(sizes):
            if pos + size > len(data):
                break                                # gdb may send only the first registers
            regs.write(i, data[pos:pos + size])
            pos += size
        return "OK"

    def _breakpoint_packet(self, p: str) -> str:
        kind, *args = p[1:].split(",")
        if kind not in ("0", "1", "2", "3", "4") or len(args) != 2:
            return EINVAL
        addr = parse_hex(args[0])
        length = parse_hex(args[1].split(";")[0])   # breakpoints: the instruction's "kind", unused
        if kind in WATCH_KINDS:
            if not 0 < length <= MAX_WATCH:
                return EINVAL
            if p[0] == "z":
                self._remove_watchpoint(kind, addr, length)
                return "OK"
            return "OK" if self._add_watchpoint(kind, addr, length) else EFAULT
        if p[0] == "Z":
            self._add_breakpoint(addr)
            return "OK"
        self._remove_breakpoint(addr)
        return "OK"

    def _resume(self, action: str, args: str, with_signal: bool = False) -> str | None:
        """``c``/``s`` (``C``/``S``): continue every vCPU, or step the ``Hc`` one, optionally at ``addr``."""
        if with_signal:
            sig, _, addr = args.partition(";")
            parse_hex(sig)                           # the signal itself means nothing to a CPU
        else:
            addr = args
        vcpu = self.c_vcpu
        if addr:
            vcpu.pc = parse_hex(addr)
        if action == "s":
            return self._start(threads.Resume(step=vcpu, run=frozenset((vcpu.index,))))
        return self._start(threads.Resume(step=None, run=None))

    def _start(self, plan: threads.Resume) -> None:
        """Let the guest go as ``plan`` says; the stop reply comes when it stops."""
        self.reply_due = True                        # gdb now waits for one stop reply (or W)
        self.run_only = plan.run if len(self.machine.vcpus) > 1 else None
        # a vCPU resumed on a breakpoint executes that instruction once (see before_run)
        on_breakpoint = ((v.index, v.pc) for v in self.machine.vcpus) if self.breakpoints else ()
        self._resume_at = {i: pc for i, pc in on_breakpoint if pc in self.breakpoints}
        if plan.step is not None:
            self.state = STEPPING
            self._step_vcpu = plan.step
            self._step_mark = plan.step.instructions
        else:
            self.state = RUNNING

    def holds_vcpu(self, vcpu) -> bool:
        """May ``vcpu`` not run now? (a step of another vCPU, or a continue of only some)"""
        return self.run_only is not None and vcpu.index not in self.run_only and self.state != STOPPED

    def _v_packet(self, p: str):
        if p == "vCont?":
            return "vCont;c;C;s;S"
        if p.startswith("vCont;"):
            return self._start(threads.parse_vcont(p[6:], self.machine.vcpus, self.c_vcpu))
        if p.startswith("vKill"):
            self._kill()
            return "OK"
        return ""                                    # vMustReplyEmpty, vFile, vRun...: not offered

    def _query(self, p: str):
        if p.startswith("qSupported"):
            return f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;vContSupported+"
        if p.startswith("qXfer:features:read:"):
            annex, _, span = p[len("qXfer:features:read:"):].partition(":")
            offset, length = addr_len(span)
            if annex != "target.xml":
                return "E00"
            xml = target_xml(self._bits()).encode()
            if offset > len(xml):
                return "E00"
            chunk = xml[offset:offset + length]
            return (b"m" if offset + length < len(xml) else b"l") + escape_binary(chunk)
        if p == "qAttached" or p.startswith("qAttached:"):
            return "1"                               # attached to a running machine: detach, don't kill
        if p == "qC":
            return f"QC{threads.thread_id(self.c_vcpu):x}"
        if p == "qfThreadInfo":
            return threads.thread_list(self.machine.vcpus)
        if p == "qsThreadInfo":
            return "l"                               # all of them came with qfThreadInfo
        if p.startswith("qThreadExtraInfo,"):
            vcpu = self._thread(p.split(",", 1)[1])
            if vcpu is None:
                return EINVAL
            return threads.describe(vcpu).encode().hex()
        if p == "qOffsets":
            return "Text=0;Data=0;Bss=0"             # the kernel runs where its ELF says
        return ""

    def _kill(self) -> None:
        # QEMU's stub ends the emulator with status 0 and one line on stderr
        self.machine.shutdown("gdb-kill", 0, "terminated via the gdb stub (gdb kill)")
        self.state = RUNNING
