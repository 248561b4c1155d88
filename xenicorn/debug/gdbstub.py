"""A gdb remote stub: let ``gdb`` debug the guest over TCP (``-s``, ``-gdb tcp::PORT``).

gdb talks to a *remote stub* with its Remote Serial Protocol (RSP; gdb
manual, appendix "Remote Protocol"). QEMU has one (``gdbstub/gdbstub.c``,
``target/i386/gdbstub.c``) and this one offers gdb the same view of an x86
machine: one thread (vCPU 0), its registers, guest memory at *linear*
addresses, breakpoints, stepping and continuing.

The wire format
---------------
Everything is ASCII. A packet is ``$payload#cc``: ``cc`` is the sum of the
payload bytes modulo 256 in two hex digits. The receiver answers ``+``
(good) or ``-`` (bad checksum: send it again). Inside a payload, ``}`` escapes
the next byte (that byte XOR 0x20), so binary data (``X`` writes, the
``qXfer`` replies) can carry ``$``, ``#`` and ``}``; ``x*N`` is a run
length (``x`` repeated ``ord(N) - 29`` more times). One byte travels outside
packets: 0x03, which gdb sends when the user presses Ctrl-C while the target
runs. Numbers are hex; memory and register values are hex bytes in target
(little-endian) order.

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

Replies: ``OK``; ``E`` and two hex digits for an error (this stub uses E22,
EINVAL, for malformed arguments, E14, EFAULT, for memory it cannot reach,
as QEMU does); an *empty* reply for a packet the stub does not know, which
gdb reads as "not supported". Stop replies ``T05thread:01;`` say why the
target stopped (a signal number: 5 SIGTRAP for breakpoints and steps, 2
SIGINT after Ctrl-C) and which thread; ``W00`` says the program exited.

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
before every instruction. A breakpoint is a Unicorn code hook on exactly
its address (begin = end), so it costs nothing elsewhere and never changes
guest memory (``Z0`` and ``Z1`` are the same thing here); its hook ends the
run *before* the instruction executes (a :class:`~.exits.Debug` exit).
Watchpoints (``Z2`` write, ``Z3`` read, ``Z4`` access) are Unicorn memory
hooks on the RAM the watched range maps to; they stop the guest just after
the access, and the stop reply names the address (``watch:ADDR;``). A
single step is a run with ``count=1``. While stepping, interrupts are not
injected, as QEMU's default ``SSTEP_NOIRQ``: ``stepi`` goes to the next
instruction, not into a timer handler.

Memory requests use the guest's page tables (the current CR3, the walker in
:mod:`paging`, without setting Accessed/Dirty bits or checking write
permission, as a debugger's access should not change or be refused by the
guest's own protections); with paging off, linear is physical. Only RAM is
reachable: MMIO and holes answer E14, so reading a device register from gdb
never has a side effect.

Registers: the i386 or amd64 layout (gdb's ``org.gnu.gdb.i386.core`` and
``.sse`` features, for amd64 ``.segments`` with the FS/GS bases, and a
feature of our own for CR0-CR4 and EFER), chosen from the kernel's ELF
class (or, without a kernel, the CPU's mode when gdb asks) so that it
matches the ELF gdb loads. A 64-bit layout with the CPU in 32-bit mode
shows the general registers zero-extended from 32 bits (as QEMU). Segment
selectors and control registers are read-only here (writes are accepted
and ignored; QEMU's system-mode stub does not load selectors either).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import re
import socket
import struct
import threading
import traceback

from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE
from unicorn import x86_const as X

from .. import exits as E
from ..engine import icount
from ..machine.memory import PAGE_SIZE, GuestMemoryError
from ..x86.paging import CR4_SMAP, PageFault, translate

DEFAULT_PORT = 1234
PACKET_SIZE = 0x4000             # the largest packet we accept and advertise (qSupported)
MAX_INPUT = PACKET_SIZE * 2 + 64  # an unterminated packet longer than this is dropped
ATTACHED_QUANTUM = 200_000       # instructions per run while gdb is attached and the guest runs
WAIT_S = 0.05                    # how often a stopped machine looks at its status
SEND_TIMEOUT_S = 2               # a debugger that stops reading this long is dropped

SIGINT, SIGTRAP = 2, 5

# error replies carry an errno, as QEMU's: EINVAL for bad arguments, EFAULT for memory
EINVAL, EFAULT = "E22", "E14"

RUNNING, STOPPED, STEPPING = "running", "stopped", "stepping"
_SIGNIFICANT = re.compile(rb"[$\x03-]")  # the bytes that mean something between packets

# Z2/Z3/Z4: the stop reply's name for the hit, and the Unicorn memory hooks that see it
WATCH_KINDS = {"2": ("watch", UC_HOOK_MEM_WRITE), "3": ("rwatch", UC_HOOK_MEM_READ),
               "4": ("awatch", UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE)}
MAX_WATCH = PAGE_SIZE            # the longest range one watchpoint may cover
WIDEST_ACCESS = 64               # an access may start this far below a watched range and reach into it


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


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cc``."""
    return b"$" + payload + b"#%02x" % checksum(payload)


def escape_binary(data: bytes) -> bytes:
    """Binary reply data: ``#``, ``$``, ``}`` and ``*`` go as ``}`` + byte ^ 0x20."""
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def decode_payload(data: bytes, limit: int = MAX_INPUT) -> bytes | None:
    """Undo the framing of a received payload: ``}`` escapes and ``*`` run lengths.

    ``x*N`` repeats ``x`` ``ord(N) - 29`` more times (gdb manual, "Overview"
    of the protocol). None when the expansion would exceed ``limit``.
    """
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b == 0x7D and i + 1 < len(data):
            out.append(data[i + 1] ^ 0x20)
            i += 2
            continue
        if b == 0x2A and i + 1 < len(data) and out and 32 <= data[i + 1] <= 126:
            out += out[-1:] * (data[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
        if len(out) > limit:
            return None
    return bytes(out)


class BadArgument(Exception):
    """A packet's arguments do not parse: the reply is E22."""


def _hex(text: str) -> int:
    if not text or any(c not in "0123456789abcdefABCDEF" for c in text) or len(text) > 16:
        raise BadArgument(text)
    return int(text, 16)


# ----------------------------------------------------------------------
# registers: what gdb's target description calls them, and how to reach them
# ----------------------------------------------------------------------
# (name, bits, gdb type, how to read): the "how" is a Unicorn register, or
# one of the names _RegisterFile handles itself (st0-7, segment selectors).
_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(f"r{i}" for i in range(8, 16))
_GPR32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
_FPU_CTRL = (("fctrl", "FPCW"), ("fstat", "FPSW"), ("ftag", "FPTAG"), ("fiseg", "FCS"),
             ("fioff", "FIP"), ("foseg", "FDS"), ("fooff", "FDP"), ("fop", "FOP"))


def _layout(bits: int) -> list[tuple[str, int, str, str]]:
    """The register list of the i386 (32) or amd64 (64) description, in 'g' order."""
    regs: list[tuple[str, int, str, str]] = []
    if bits == 64:
        regs += [(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", n) for n in _GPR64]
        regs += [("rip", 64, "code_ptr", "rip"), ("eflags", 32, "i386_eflags", "eflags")]
    else:
        regs += [(n, 32, "data_ptr" if n in ("esp", "ebp") else "int32", "r" + n[1:]) for n in _GPR32]
        regs += [("eip", 32, "code_ptr", "rip"), ("eflags", 32, "i386_eflags", "eflags")]
    regs += [(s, 32, "int32", s) for s in _SEGS]
    regs += [(f"st{i}", 80, "i387_ext", f"st{i}") for i in range(8)]
    regs += [(n, 32, "int", uc) for n, uc in _FPU_CTRL]
    regs += [(f"xmm{i}", 128, "vec128", f"xmm{i}") for i in range(16 if bits == 64 else 8)]
    regs += [("mxcsr", 32, "i386_mxcsr", "mxcsr")]
    if bits == 64:
        # gdb 13 asserts (tdesc_use_registers) on an i386 description with this feature
        regs += [("fs_base", 64, "int", "fs_base"), ("gs_base", 64, "int", "gs_base")]
    regs += [(n, bits, "int", n) for n in ("cr0", "cr2", "cr3", "cr4")]
    regs += [("efer", 64, "int", "efer")]
    return regs


_FEATURE_OF = {"core": "org.gnu.gdb.i386.core", "sse": "org.gnu.gdb.i386.sse",
               "segments": "org.gnu.gdb.i386.segments", "sys": "org.xenicorn.x86.sys"}
_NARROW = frozenset(_GPR64[:8] + ("rip",))   # shown as 32-bit values outside 64-bit code


def _feature(name: str) -> str:
    if name.startswith("xmm") or name == "mxcsr":
        return "sse"
    if name in ("fs_base", "gs_base"):
        return "segments"
    if name.startswith("cr") or name == "efer":
        return "sys"
    return "core"


_EFLAGS_FIELDS = (("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8),
                  ("IF", 9), ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17),
                  ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21))
_MXCSR_FIELDS = (("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6),
                 ("IM", 7), ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15))


def target_xml(bits: int) -> str:
    """The target description gdb reads with ``qXfer:features:read:target.xml``.

    gdb's manual ("Target Descriptions", "i386 Features") names the
    features and registers it expects; the ``regnum`` order is the order of
    the ``g`` packet.
    """
    arch = "i386:x86-64" if bits == 64 else "i386"
    types = {
        "core": ['<flags id="i386_eflags" size="4">']
        + [f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in _EFLAGS_FIELDS] + ["</flags>"],
        "sse": ['<vector id="v8bf16" type="bfloat16" count="8"/>',
                '<vector id="v4f" type="ieee_single" count="4"/>',
                '<vector id="v2d" type="ieee_double" count="2"/>',
                '<vector id="v16i8" type="int8" count="16"/>',
                '<vector id="v8i16" type="int16" count="8"/>',
                '<vector id="v4i32" type="int32" count="4"/>',
                '<vector id="v2i64" type="int64" count="2"/>',
                '<union id="vec128">', '<field name="v8_bfloat16" type="v8bf16"/>',
                '<field name="v4_float" type="v4f"/>', '<field name="v2_double" type="v2d"/>',
                '<field name="v16_int8" type="v16i8"/>', '<field name="v8_int16" type="v8i16"/>',
                '<field name="v4_int32" type="v4i32"/>', '<field name="v2_int64" type="v2i64"/>',
                '<field name="uint128" type="uint128"/>', "</union>",
                '<flags id="i386_mxcsr" size="4">']
        + [f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in _MXCSR_FIELDS] + ["</flags>"],
    }
    by_feature: dict[str, list[str]] = {k: list(types.get(k, [])) for k in _FEATURE_OF}
    for regnum, (name, size, typ, _) in enumerate(_layout(bits)):
        group = ""
        if name.startswith("st") or name in dict(_FPU_CTRL):
            group = ' group="float"'
        elif name.startswith("xmm"):
            group = ' group="vector"'
        by_feature[_feature(name)].append(
            f'<reg name="{name}" bitsize="{size}" type="{typ}" regnum="{regnum}"{group}/>')
    # an empty feature would be read as one lacking its required registers
    body = "".join(f'<feature name="{_FEATURE_OF[k]}">{"".join(v)}</feature>'
                   for k, v in by_feature.items() if any(x.startswith("<reg") for x in v))
    return ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
            f"<target><architecture>{arch}</architecture>{body}</target>")


_UC = {"rip": X.UC_X86_REG_RIP, "eflags": X.UC_X86_REG_EFLAGS, "mxcsr": X.UC_X86_REG_MXCSR,
       "fs_base": X.UC_X86_REG_FS_BASE, "gs_base": X.UC_X86_REG_GS_BASE,
       **{n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in _GPR64 + _SEGS + ("cr0", "cr2", "cr3", "cr4")},
       **{f"xmm{i}": getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16)},
       **{uc: getattr(X, f"UC_X86_REG_{uc}") for _, uc in _FPU_CTRL}}
_READ_ONLY = set(_SEGS) | {"cr0", "cr2", "cr3", "cr4", "efer"}
EFER_MSR = 0xC0000080


class RegisterFile:
    """Read and write gdb's register numbers on one vCPU."""

    def __init__(self, vcpu, bits: int):
        self.vcpu = vcpu
        self.bits = bits
        self.layout = _layout(bits)

    def _narrow(self) -> bool:
        """Show general registers as 32-bit values (CPU not executing 64-bit code)?"""
        return self.bits == 32 or self.vcpu.code_bits() != 64

    def _st_index(self, i: int) -> int:
        top = (self.vcpu.uc.reg_read(X.UC_X86_REG_FPSW) >> 11) & 7
        return X.UC_X86_REG_FP0 + ((top + i) & 7)     # ST(i) is physical register TOP+i

    def read(self, n: int) -> bytes:
        _, size, _, how = self.layout[n]
        uc = self.vcpu.uc
        if how.startswith("st"):
            mantissa, exponent = uc.reg_read(self._st_index(int(how[2:])))
            return struct.pack("<QH", mantissa, exponent & 0xFFFF)
        if how == "efer":
            value = uc.msr_read(EFER_MSR)
        else:
            value = uc.reg_read(_UC[how])
        if how in _NARROW and self._narrow():
            value &= 0xFFFFFFFF
        return (value & ((1 << size) - 1)).to_bytes(size // 8, "little")

    def write(self, n: int, data: bytes) -> None:
        name, size, _, how = self.layout[n]
        if len(data) != size // 8:
            raise BadArgument(name)
        uc = self.vcpu.uc
        value = int.from_bytes(data, "little")
        if how in _READ_ONLY:
            return
        if how.startswith("st"):
            uc.reg_write(self._st_index(int(how[2:])), (value & ((1 << 64) - 1), value >> 64))
            return
        if how in _NARROW and self._narrow():
            value &= 0xFFFFFFFF
        if how == "eflags":
            value = (value & 0x3F7FD5) | 0x2          # reserved bits as the CPU keeps them
        uc.reg_write(_UC[how], value)

    def size(self, n: int) -> int:
        return self.layout[n][1] // 8


# ----------------------------------------------------------------------
# the connection: a reader thread that frames, checks and acks
# ----------------------------------------------------------------------
class _Connection:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.alive = True
        self.lock = threading.Lock()
        self.last = b""                  # the last packet sent, resent on "-"

    def send_raw(self, data: bytes) -> None:
        with self.lock:
            if not self.alive:
                return
            try:
                self.sock.sendall(data)
            except OSError:                   # gone, or not reading (SO_SNDTIMEO): drop it
                self.alive = False
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)   # its reader ends, the machine resumes
                except OSError:
                    pass

    def send(self, payload: bytes) -> None:
        self.last = frame(payload)
        self.send_raw(self.last)

    def close(self) -> None:
        with self.lock:
            self.alive = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class GdbStub:
    """The remote stub of one machine (vCPU 0 is gdb's thread 1)."""

    def __init__(self, machine, host: str, port: int, wait: bool = False):
        self.machine = machine
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
            self.listener.listen(1)
        except OSError as e:
            self.listener.close()
            e.gdb_socket = True                      # the CLI names -gdb in its one-line error
            raise
        self.port = self.listener.getsockname()[1]
        self.inbox: queue.Queue = queue.Queue()      # (kind, connection, payload)
        self.client: _Connection | None = None
        # -S: stopped before the first instruction until gdb continues
        self.state = STOPPED if wait else RUNNING
        self.waiting_for_client = wait
        self.breakpoints: dict[int, int] = {}       # linear address -> Unicorn hook handle
        self.watchpoints: dict[tuple[str, int, int], list[int]] = {}   # (Z type, addr, len) -> hooks
        self._watch_hit: tuple[str, int] | None = None  # (watch|rwatch|awatch, linear address)
        self._watch_step_hook: int | None = None     # code hook that stops after a watched access
        self._skip_once: int | None = None          # resuming at a breakpoint: let it run once
        self._step_mark = 0
        self._run_count = 0
        self.last_signal = SIGTRAP
        self.closed = False
        self._regs: RegisterFile | None = None
        # gdb waits for a stop reply only after it resumed the guest (c, s, vCont):
        # QEMU's allow_stop_reply; never send one it did not ask for
        self.reply_due = False
        threading.Thread(target=self._accept, name="xenicorn-gdb", daemon=True).start()

    # -- threads: accept and read ---------------------------------------------------
    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if self.attached:
                sock.close()                   # one debugger at a time
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # replies are sent from the machine's thread: a peer that does not read must not block it
            sec, usec = int(SEND_TIMEOUT_S), int(SEND_TIMEOUT_S % 1 * 1e6)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, usec))
            conn = _Connection(sock)
            self.client = conn
            self.inbox.put(("connect", conn, b""))
            threading.Thread(target=self._read, args=(conn,), name="xenicorn-gdb-read", daemon=True).start()

    def _read(self, conn: _Connection) -> None:
        try:
            self._read_packets(conn)
        finally:                                        # whatever happened, the machine hears of it
            conn.alive = False
            self.inbox.put(("disconnect", conn, b""))

    def _read_packets(self, conn: _Connection) -> None:
        buf = bytearray()
        while conn.alive:
            try:
                data = conn.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            while buf:
                c = buf[0]
                if c == 0x03:                           # Ctrl-C, outside any packet
                    del buf[0]
                    self.inbox.put(("interrupt", conn, b""))
                elif c == ord("-"):                     # our last packet arrived damaged
                    del buf[0]
                    if conn.last:
                        conn.send_raw(conn.last)
                elif c != ord("$"):                     # "+" acks and noise between packets
                    m = _SIGNIFICANT.search(buf, 1)
                    del buf[:m.start() if m else len(buf)]   # in one cut: a flood must not cost n^2
                else:
                    end = buf.find(b"#")
                    if end < 0 or len(buf) < end + 3:
                        if len(buf) > MAX_INPUT:        # never terminated: drop it, ask again
                            buf.clear()
                            conn.send_raw(b"-")
                        break
                    payload, cc = bytes(buf[1:end]), bytes(buf[end + 1:end + 3])
                    del buf[:end + 3]
                    try:
                        good = int(cc, 16) == checksum(payload)
                    except ValueError:
                        good = False
                    if not good:
                        conn.send_raw(b"-")
                        continue
                    payload = decode_payload(payload)
                    if payload is None:
                        conn.send_raw(b"-")
                        continue
                    conn.send_raw(b"+")
                    self.inbox.put(("packet", conn, payload))

    # -- the run loop's side ----------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self.client is not None and self.client.alive

    @property
    def stepping(self) -> bool:
        return self.state == STEPPING

    def wants_service(self) -> bool:
        """Something waits for the machine thread (a sleeping vCPU must come back to the loop)."""
        # a step of a sleeping vCPU waits, like the vCPU, for what wakes it
        return not self.inbox.empty() or self.state == STOPPED

    def service(self) -> None:
        """Called at the top of every run-loop iteration, on the machine's thread."""
        vcpu = self.machine.vcpu
        if self.state == STEPPING and vcpu.instructions != self._step_mark:
            self._report_stop(SIGTRAP)
        elif self._watch_hit is not None and self.state == RUNNING:
            self._report_stop(SIGTRAP)             # hit by the last instruction of a run
        self._drain(0)
        while self.state == STOPPED and self.machine.status is None:
            if self.machine.monitor is not None:
                self.machine.monitor.service()
            self._drain(WAIT_S)

    def before_run(self, vcpu, count: int) -> int:
        """The run loop is about to run the guest for ``count`` instructions (0: unbounded)."""
        if self.state == STEPPING:
            count = 1
        elif self.attached:
            count = min(count, ATTACHED_QUANTUM) if count else ATTACHED_QUANTUM
        pc = vcpu.pc
        self._skip_once = pc if pc in self.breakpoints else None
        self._run_count = count
        return count

    def on_debug_exit(self, vcpu, ex: E.Debug) -> None:
        """A breakpoint (or watchpoint) hook ended the run before the instruction at ``ex.pc``."""
        # Unicorn counted the instruction its hook stopped in front of
        # (docs/unicorn-notes.md): the run added min(counter, limit), one
        # too many when the limit did not end it.
        n = icount.read_counter(vcpu.uc)
        limit = self._run_count or n
        vcpu.instructions -= min(n, limit) - (n - 1)
        self._report_stop(SIGTRAP)

    def close(self, status: int | None) -> None:
        """The machine has ended: tell gdb the "process" exited (``W``), close everything."""
        self.closed = True
        client = self.client
        if client is not None and client.alive and status is not None and self.reply_due:
            client.send(b"W%02x" % (status & 0xFF))
        if client is not None:
            client.close()
        try:
            self.listener.close()
        except OSError:
            pass
        self._remove_all_breakpoints()

    # -- events from the connection -------------------------------------------------------
    def _drain(self, wait: float) -> None:
        try:
            item = self.inbox.get(timeout=wait) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, conn, payload = item
            if conn is self.client or kind == "connect":
                self._event(kind, conn, payload)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _event(self, kind: str, conn: _Connection, payload: bytes) -> None:
        if kind == "connect":
            # gdb expects a stopped target when it attaches (QEMU stops the VM then).
            self._remove_all_breakpoints()
            self._regs = None
            if self.state != STOPPED:
                self.state = STOPPED
                self.last_signal = SIGTRAP
            self.reply_due = False
            self.waiting_for_client = False
        elif kind == "disconnect":
            # a debugger that goes away leaves a running machine, not a stuck one
            self.client = None
            self._remove_all_breakpoints()
            self.state = RUNNING
            self.reply_due = False
        elif kind == "interrupt":
            if self.state != STOPPED:
                self._report_stop(SIGINT)
        else:
            try:
                reply = self._handle(payload.decode("latin-1"))
            except BadArgument:
                reply = EINVAL
            except Exception as exc:          # noqa: BLE001 - a bug of ours: an error reply, not a dead machine
                reply = "E01"
                if os.environ.get("XENICORN_DEBUG"):
                    traceback.print_exception(exc)
            if reply is not None:
                conn.send(reply.encode("latin-1") if isinstance(reply, str) else reply)

    def _report_stop(self, signal: int) -> None:
        self.state = STOPPED
        self.last_signal = signal
        reply = self._stop_reply(signal)
        if self._watch_hit is not None and signal == SIGTRAP:
            name, addr = self._watch_hit
            reply += f"{name}:{addr:x};"           # which watchpoint: gdb then shows old/new values
        self._watch_hit = None
        if self.client is not None and self.reply_due:
            self.client.send(reply.encode())
        self.reply_due = False

    @staticmethod
    def _stop_reply(signal: int) -> str:
        return f"T{signal:02x}thread:01;"

    # -- breakpoints ------------------------------------------------------------------------
    def _add_breakpoint(self, addr: int) -> None:
        if addr in self.breakpoints:
            return
        vcpu = self.machine.vcpu
        hook = vcpu.guarded_hook(self._on_breakpoint)
        self.breakpoints[addr] = vcpu.uc.hook_add(UC_HOOK_CODE, hook, None, addr, addr)
        # already-translated code was built without the hook (docs/unicorn-notes.md)
        vcpu.uc.ctl_flush_tb()

    def _remove_breakpoint(self, addr: int) -> bool:
        handle = self.breakpoints.pop(addr, None)
        if handle is None:
            return False
        vcpu = self.machine.vcpu
        vcpu.uc.hook_del(handle)
        vcpu.uc.ctl_flush_tb()
        return True

    def _remove_all_breakpoints(self) -> None:
        for addr in list(self.breakpoints):
            self._remove_breakpoint(addr)
        for key in list(self.watchpoints):
            self._remove_watchpoint(*key)
        self._watch_hit = None

    def _on_breakpoint(self, uc, address, size, _) -> None:
        if address == self._skip_once:
            self._skip_once = None              # the instruction we resume at runs once
            return
        if address not in self.breakpoints or self.state == STEPPING:
            return                              # a step ends by its count, not here
        self.machine.vcpu.stop_with(E.Debug(address, "breakpoint"))

    # -- watchpoints ---------------------------------------------------------------------------
    # Unicorn's memory hooks see *physical* addresses (measured: a hook on the
    # linear range of a paged guest never fires), so a watchpoint watches the
    # RAM its linear range maps to when it is set. Stopping inside a memory
    # hook is not safe in counting mode (the access would be replayed, see
    # docs/unicorn-notes.md), so the hook only records the hit and a code hook
    # on every instruction, present only while watchpoints exist, ends the run
    # before the next instruction: the stop lands just after the access, as
    # on hardware (a data breakpoint is a trap).
    def _add_watchpoint(self, kind: str, addr: int, length: int) -> bool:
        key = (kind, addr, length)
        if key in self.watchpoints:
            return True
        pieces = self._pieces(addr, length)
        if pieces is None:
            return False
        vcpu = self.machine.vcpu
        name, hook_type = WATCH_KINDS[kind]
        handles = []
        linear = addr
        for phys, n in pieces:
            def on_access(uc, access, address, size, value, _, lin=linear, base=phys, n=n, name=name):
                if address + size > base and address < base + n and self._watch_hit is None:
                    self._watch_hit = (name, lin + max(0, address - base))
            handles.append(vcpu.uc.hook_add(hook_type, vcpu.guarded_hook(on_access), None,
                                            max(0, phys - WIDEST_ACCESS + 1), phys + n - 1))
            linear += n
        self.watchpoints[key] = handles
        if self._watch_step_hook is None:
            self._watch_step_hook = vcpu.uc.hook_add(UC_HOOK_CODE, vcpu.guarded_hook(self._after_watched_access),
                                                     None, 1, 0)
        vcpu.uc.ctl_flush_tb()
        return True

    def _remove_watchpoint(self, kind: str, addr: int, length: int) -> None:
        handles = self.watchpoints.pop((kind, addr, length), None)
        if handles is None:
            return
        uc = self.machine.vcpu.uc
        for h in handles:
            uc.hook_del(h)
        if not self.watchpoints and self._watch_step_hook is not None:
            uc.hook_del(self._watch_step_hook)
            self._watch_step_hook = None
        uc.ctl_flush_tb()

    def _after_watched_access(self, uc, address, size, _) -> None:
        if self._watch_hit is not None and self.state != STEPPING:
            self.machine.vcpu.stop_with(E.Debug(address, "watchpoint"))

    # -- memory ------------------------------------------------------------------------------
    def _pieces(self, addr: int, length: int):
        """Physical (address, size) pieces of a linear range, or None if a page is unmapped."""
        vcpu = self.machine.vcpu
        # SMAP would refuse a supervisor read of a user page: not the debugger's business
        regs = dataclasses.replace(vcpu.paging_regs(), cr4=vcpu.reg("cr4") & ~CR4_SMAP)
        mem = self.machine.memory
        out = []
        while length:
            chunk = min(length, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            t = translate(regs, addr, mem.read_int)     # no A/D updates, no permission checks
            if isinstance(t, PageFault):
                return None
            if not mem.is_ram(t.phys, chunk):
                return None
            out.append((t.phys, chunk))
            addr = (addr + chunk) & ((1 << 64) - 1)
            length -= chunk
        return out

    def read_memory(self, addr: int, length: int) -> bytes | None:
        pieces = self._pieces(addr, length)
        if pieces is None:
            return None
        try:
            return b"".join(self.machine.memory.read(p, n) for p, n in pieces)
        except GuestMemoryError:
            return None

    def write_memory(self, addr: int, data: bytes) -> bool:
        pieces = self._pieces(addr, len(data))
        if pieces is None:
            return False
        mem = self.machine.memory
        pos = 0
        for phys, n in pieces:
            mem.write(phys, data[pos:pos + n])
            mem.code_written(phys, n)               # Unicorn must not run stale translations
            pos += n
        return True

    # -- packets ----------------------------------------------------------------------------
    def _bits(self) -> int:
        kernel = getattr(self.machine, "kernel", None)
        bits = getattr(kernel, "bits", None)
        if bits in (32, 64):
            return bits
        return 64 if self.machine.vcpu.long_mode() else 32

    def regs(self) -> RegisterFile:
        if self._regs is None:
            self._regs = RegisterFile(self.machine.vcpu, self._bits())
        return self._regs

    def _handle(self, p: str):
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
            n = _hex(p[1:])
            regs = self.regs()
            return regs.read(n).hex() if n < len(regs.layout) else "E14"
        if cmd == "P":
            num, eq, value = p[1:].partition("=")
            n = _hex(num)
            regs = self.regs()
            if not eq or n >= len(regs.layout):
                return "E14" if eq else EINVAL
            regs.write(n, _unhex(value))
            return "OK"
        if cmd == "m":
            addr, length = _addr_len(p[1:])
            if length > PACKET_SIZE // 2:
                return EINVAL
            data = self.read_memory(addr, length)
            return EFAULT if data is None else data.hex()
        if cmd in "MX":
            head, colon, body = p[1:].partition(":")
            if not colon:
                return EINVAL
            addr, length = _addr_len(head)
            data = _unhex(body) if cmd == "M" else body.encode("latin-1")   # X: unescaped on arrival
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
            if len(p) < 3 or p[1] not in "gcs":
                return EINVAL
            return "OK" if _thread_ok(p[2:]) else EINVAL
        if cmd == "T":
            return "OK" if _thread_ok(p[1:]) and p[1:] not in ("-1", "0") else EINVAL
        if cmd == "D":
            self._remove_all_breakpoints()
            self.state = RUNNING
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

    def _write_all_registers(self, body: str) -> str:
        data = _unhex(body)
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
        addr = _hex(args[0])
        length = _hex(args[1].split(";")[0])        # breakpoints: the instruction's "kind", unused
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
        if with_signal:
            sig, _, addr = args.partition(";")
            _hex(sig)                                # the signal itself means nothing to a CPU
        else:
            addr = args
        if addr:
            self.machine.vcpu.pc = _hex(addr)
        self.reply_due = True                        # gdb now waits for one stop reply (or W)
        if action == "s":
            self.state = STEPPING
            self._step_mark = self.machine.vcpu.instructions
        else:
            self.state = RUNNING
        return None                                  # the stop reply comes when the guest stops

    def _v_packet(self, p: str):
        if p == "vCont?":
            return "vCont;c;C;s;S"
        if p.startswith("vCont;"):
            chosen = None
            for action in p[6:].split(";"):
                what, _, thread = action.partition(":")
                if not what or what[0] not in "cCsS" or (thread and not _thread_ok(thread)):
                    return EINVAL
                if what[0] in "CS":
                    _hex(what[1:])
                elif len(what) != 1:
                    return EINVAL
                if chosen is None:                   # the first action that applies to thread 1 wins
                    chosen = what[0].lower()
            if chosen is None:
                return EINVAL
            return self._resume(chosen, "")
        if p.startswith("vKill"):
            self._kill()
            return "OK"
        return ""                                    # vMustReplyEmpty, vFile, vRun...: not offered

    def _query(self, p: str):
        if p.startswith("qSupported"):
            return f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;vContSupported+"
        if p.startswith("qXfer:features:read:"):
            annex, _, span = p[len("qXfer:features:read:"):].partition(":")
            offset, length = _addr_len(span)
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
            return "QC1"
        if p == "qfThreadInfo":
            return "m1"
        if p == "qsThreadInfo":
            return "l"
        if p.startswith("qThreadExtraInfo,"):
            if not _thread_ok(p.split(",", 1)[1]):
                return EINVAL
            return f"CPU#0 [{'halted' if self.machine.vcpu.halted else 'running'}]".encode().hex()
        if p == "qOffsets":
            return "Text=0;Data=0;Bss=0"             # the kernel runs where its ELF says
        return ""

    def _kill(self) -> None:
        # QEMU's stub ends the emulator with status 0 and one line on stderr
        self.machine.shutdown("gdb-kill", 0, "terminated via the gdb stub (gdb kill)")
        self.state = RUNNING


def _unhex(text: str) -> bytes:
    if len(text) % 2:
        raise BadArgument(text)
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise BadArgument(text) from None


def _addr_len(text: str) -> tuple[int, int]:
    addr, comma, length = text.partition(",")
    if not comma:
        raise BadArgument(text)
    return _hex(addr), _hex(length)


def _thread_ok(text: str) -> bool:
    """Thread ids gdb may name: 1 (our one thread), 0 (any) and -1 (all)."""
    if text.startswith("p"):                         # multiprocess form p<pid>.<tid>
        text = text.partition(".")[2] or "1"
    return text in ("-1", "0") or (text.isalnum() and all(c in "0123456789abcdefABCDEF" for c in text)
                                   and int(text, 16) == 1)
