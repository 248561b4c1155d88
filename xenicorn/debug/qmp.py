"""A QMP monitor: QEMU's JSON machine protocol on a UNIX socket.

``-qmp unix:PATH,server,wait=off`` (spelled as QEMU spells it) listens on
PATH. A client gets a greeting, negotiates with ``qmp_capabilities``, then
sends ``{"execute": NAME, "arguments": {...}, "id": ...}`` and receives
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` (the "id"
echoed), plus asynchronous events ``{"event": "STOP", "timestamp": ...}``.
Names, arguments and results follow QEMU's QAPI schema, so existing clients
(the ``qemu.qmp`` package, ``qmp-shell``) work.

Threads (:mod:`.sockserver`, shared with the gdb stub): one accepts
connections, one per client reads it; commands are queued and run by the
machine's run loop between two guest runs (it is kicked out of
``emu_start`` when one arrives), so no command ever races the guest. A
client that goes away in the middle of a command loses only its reply; one
that stops reading replies and events is dropped after
:data:`SEND_TIMEOUT_S` rather than stalling the machine.
"""
from __future__ import annotations

import json
import threading
import time

from . import hmp_info
from .sockserver import Connection, SocketServer, unix_listener

SEND_TIMEOUT_S = 2               # a client that stops reading this long is dropped

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "xenicorn"},
                    "capabilities": []}}


def parse_spec(spec: str) -> str:
    """The socket path of ``unix:PATH[,server][,wait=off]``; ValueError otherwise."""
    if not spec.startswith("unix:"):
        raise ValueError(f"-qmp {spec}: only unix:PATH,server,wait=off is supported")
    path, *opts = spec[5:].split(",")
    for opt in opts:
        if opt not in ("server", "server=on", "wait=off", "nowait"):
            raise ValueError(f"-qmp {spec}: option {opt!r} is not supported (use server,wait=off)")
    if not path:
        raise ValueError(f"-qmp {spec}: no socket path")
    return path


class _Client(Connection):
    """A monitor client: JSON out, and whether it has negotiated capabilities yet."""

    def __init__(self, sock):
        super().__init__(sock)
        self.negotiated = False
        self.cpu = 0                    # the human monitor's current CPU ("cpu N")

    def send_json(self, obj: dict) -> None:
        self.send((json.dumps(obj) + "\r\n").encode())


def _json_objects(client: _Client):
    """The reader thread's decoder: one ``command`` per JSON value, however the bytes are split.

    An incomplete value waits for more bytes; a malformed one is answered
    at once (QEMU's "JSON parse error") and the rest of the buffer dropped.
    """
    buf, decoder = "", json.JSONDecoder()

    def feed(data: bytes):
        nonlocal buf
        buf += data.decode("utf-8", "replace")
        while buf.strip():
            buf = buf.lstrip()
            try:
                msg, end = decoder.raw_decode(buf)
            except json.JSONDecodeError as e:
                if e.msg.startswith("Unterminated string") or (
                        e.msg.startswith("Expecting") and e.pos >= len(buf.rstrip()) - 1):
                    break                         # incomplete: wait for the rest
                client.send_json({"error": {"class": "GenericError", "desc": f"JSON parse error, {e.msg}"}})
                buf = ""
                break
            buf = buf[end:]
            yield "command", msg
    return feed


class QmpServer:
    """The monitor of one machine."""

    def __init__(self, machine, path: str):
        self.machine = machine
        self.path = path
        self.paused = False
        self._client: _Client | None = None      # whose command runs (the HMP's current CPU is per client)
        self.listener = unix_listener(path, backlog=4)
        self.server = SocketServer(self.listener, name="xenicorn-qmp", decoder=_json_objects, connection=_Client,
                                   on_accept=self._greet, on_queued=self._kick, send_timeout=SEND_TIMEOUT_S,
                                   unlink=path)

    @property
    def closed(self) -> bool:
        """The machine has ended and the socket is gone."""
        return self.server.closed

    @property
    def clients(self) -> list[_Client]:
        """The connected clients."""
        return self.server.connections

    def _greet(self, client: _Client) -> bool:
        client.send_json(GREETING)
        return True

    def _kick(self) -> None:
        # a command waits between two guest runs: get the guest out of Unicorn until it is taken
        self.machine.kick_until(lambda: not self.server.pending() or self.closed, "monitor")

    # -- the run loop's side -------------------------------------------------------------------
    def service(self, wait: float = 0.0) -> bool:
        """Run queued commands (waiting up to ``wait`` s for one); True if any ran."""
        ran = False
        for _, client, msg in self.server.events(wait):
            reply = self._execute(client, msg)
            if reply is not None:
                client.send_json(reply)
            ran = True
        return ran

    def event(self, name: str, data: dict | None = None) -> None:
        """Send an asynchronous event (STOP, RESUME, SHUTDOWN...) to every negotiated client."""
        now = time.time()
        msg = {"event": name, "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        if data is not None:
            msg["data"] = data
        for c in list(self.clients):
            if c.negotiated:
                c.send_json(msg)

    def close(self) -> None:
        """Close every client and the socket, and remove the socket's file."""
        self.server.close()

    # -- commands ----------------------------------------------------------------------------
    def _execute(self, client: _Client, msg) -> dict | None:
        ident = msg.get("id") if isinstance(msg, dict) else None

        def out(obj: dict) -> dict:
            if ident is not None:
                obj["id"] = ident
            return obj

        def error(cls: str, desc: str) -> dict:
            return out({"error": {"class": cls, "desc": desc}})

        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            return error("GenericError", "QMP input must be a JSON object with an 'execute' string")
        name, args = msg["execute"], msg.get("arguments", {})
        if not isinstance(args, dict):
            return error("GenericError", "QMP input member 'arguments' must be an object")
        if not client.negotiated:
            if name != "qmp_capabilities":
                return error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
            client.negotiated = True
            return out({"return": {}})
        if name == "qmp_capabilities":
            return error("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        handler = getattr(self, "_cmd_" + name.replace("-", "_"), None)
        if handler is None:
            return error("CommandNotFound", f"The command {name} has not been found")
        self._client = client
        try:
            return out({"return": handler(**args)})
        except TypeError as e:
            return error("GenericError", f"Invalid arguments for {name}: {e}")
        except Exception as e:                        # noqa: BLE001 - a command never takes the machine down
            return error("GenericError", str(e))

    def _status(self) -> str:
        m = self.machine
        if m.status is not None:
            return "shutdown"
        return "paused" if self.paused else "running"

    def _cmd_query_status(self) -> dict:
        status = self._status()
        return {"running": status == "running", "singlestep": False, "status": status}

    def _cmd_stop(self) -> dict:
        if not self.paused:
            self.paused = True
            self.event("STOP")
        return {}

    def _cmd_cont(self) -> dict:
        if self.paused:
            self.paused = False
            self.event("RESUME")
        return {}

    def _cmd_quit(self) -> dict:
        self.machine.shutdown("quit", 0, "quit from the monitor")
        return {}

    def _cmd_query_cpus_fast(self) -> list:
        """Every vCPU, as QEMU's ``query-cpus-fast`` (qapi/machine.json ``CpuInfoFast``) lists it.

        - ``thread-id``: the host thread that runs the vCPU. All vCPUs take
          turns on the machine's one thread (as QEMU's single-threaded TCG),
          and commands run on that thread: the same id for every vCPU.
        - ``props``: the topology, one socket per vCPU (``socket-id`` = the
          index, one core, one thread), as QEMU's pc machine up to 6.1 lays
          out ``-smp N``. It is what the guest is told: CPUID leaf 1 has no
          HTT flag and leaf 0xB is empty, so each CPU is its own package.
        - ``qom-path``: the device path QEMU gives an unattached CPU.
        """
        tid = threading.get_native_id()
        return [{"cpu-index": v.index, "qom-path": f"/machine/unattached/device[{v.index}]",
                 "thread-id": tid, "target": "x86_64",
                 "props": {"core-id": 0, "thread-id": 0, "socket-id": v.index}} for v in self.machine.vcpus]

    def _xen(self):
        if self.machine.xen is None:
            raise ValueError("This machine has no Xen emulation")
        return self.machine.xen

    def _cmd_xen_event_list(self) -> list:
        return self._xen().evtchn.event_list()

    def _cmd_xen_event_inject(self, port: int) -> dict:
        if not isinstance(port, int):
            raise ValueError("Parameter 'port' expects an integer")
        self._xen().evtchn.event_inject(port)
        return {}

    # -- the human monitor (HMP) -------------------------------------------------------------
    # info subcommands: name -> (help, function(self, cpu) -> text); listed by a bare "info"
    INFO = {
        "status": ("show the current VM status (running|paused)", lambda self, cpu: f"VM status: {self._status()}\n"),
        "cpus": ("show infos for each CPU", lambda self, cpu: self._info_cpus(cpu)),
        "registers": ("show the cpu registers", lambda self, cpu: hmp_info.registers(self.machine, cpu)),
        "lapic": ("show local apic state", lambda self, cpu: hmp_info.lapic(self.machine, cpu)),
        "pic": ("show PIC state", lambda self, cpu: hmp_info.pic(self.machine)),
        "ioapic": ("show io apic state", lambda self, cpu: hmp_info.ioapic(self.machine)),
        "irq": ("show the interrupts statistics", lambda self, cpu: hmp_info.irq(self.machine)),
        "evtchn": ("show the Xen event channel ports (pending, masked, vCPU, FIFO priority)",
                   lambda self, cpu: hmp_info.evtchn(self.machine)),
    }

    def _info_cpus(self, current: int) -> str:
        """QEMU's ``info cpus``: ``*`` marks the monitor's current CPU."""
        return "".join(f"{'*' if v.index == current else ' '} CPU #{v.index}: pc=0x{v.pc:016x}"
                       f"{' (halted)' if v.halted else ''} thread_id={threading.get_native_id()}\n"
                       for v in self.machine.vcpus)

    def _info(self, words: list[str], cpu: int) -> str:
        if len(words) == 1:
            width = max(len(n) for n in self.INFO) + 5
            return "".join(f"{'info ' + n:<{width}s} -- {h}\n" for n, (h, _) in self.INFO.items())
        entry = self.INFO.get(words[1])
        if entry is None:
            return f"unknown command: 'info {words[1]}' (info alone lists them)\n"
        return entry[1](self, cpu)

    def _cmd_human_monitor_command(self, **kw) -> str:
        """One HMP command line; the reply is its text with CRLF line ends, as QEMU's."""
        return self._hmp(kw).replace("\r\n", "\n").replace("\n", "\r\n")

    def _hmp(self, kw: dict) -> str:
        line = str(kw.get("command-line", "")).strip()
        words = line.split()
        if not words:
            return ""
        client = self._client
        cpu = kw.get("cpu-index", client.cpu if client is not None else 0)
        if not isinstance(cpu, int) or not 0 <= cpu < len(self.machine.vcpus):
            raise ValueError(f"Parameter 'cpu-index' expects a vCPU index below {len(self.machine.vcpus)}")
        if words[0] == "info":
            return self._info(words, cpu)
        if words[0] == "cpu":
            # HMP "cpu N": the current CPU for info registers/lapic, kept per QMP client
            if len(words) != 2 or not words[1].isdigit() or int(words[1]) >= len(self.machine.vcpus):
                return "invalid CPU index\n"
            if client is not None:
                client.cpu = int(words[1])
            return ""
        if words[0] == "xen-event-list":
            return "".join(f"port {e['port']:4d}: vcpu: {e['vcpu']} {e['type']}"
                           f"{' pending' if e['pending'] else ''}{' masked' if e['masked'] else ''}\r\n"
                           for e in self._xen().evtchn.event_list())
        if words[0] == "xen-event-inject" and len(words) == 2 and words[1].isdigit():
            self._xen().evtchn.event_inject(int(words[1]))
            return ""
        if words[0] == "xenstore-read" and len(words) == 2:
            # a relative key is the guest's, as --xenstore's (XenPlatform.guest_key)
            xen = self._xen()
            return xen.xenstore_read(xen.guest_key(words[1])).decode("ascii", "replace") + "\r\n"
        if words[0] == "xenstore-write" and len(words) == 3:
            xen = self._xen()
            xen.xenstore_write(xen.guest_key(words[1]), words[2].encode())
            return ""
        if words[0] in ("savevm", "loadvm") and len(words) == 2:
            return self._hmp_snapshot(words[0], words[1])
        return f"unknown command: '{words[0]}'\r\n"

    # -- snapshots (snapshot/) ---------------------------------------------------
    def _cmd_system_reset(self) -> dict:
        """Back to the power-on state kept before the first instruction; QEMU's RESET event."""
        self.machine.system_reset()
        self.event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
        return {}

    def _hmp_snapshot(self, verb: str, path: str) -> str:
        """HMP ``savevm FILE`` / ``loadvm FILE``: a snapshot file (QEMU takes a tag in a disk image)."""
        from ..snapshot import SnapshotError
        try:
            if verb == "savevm":
                self.machine.save_snapshot(path)
            else:
                self.machine.load_snapshot(path)
        except SnapshotError as e:
            return f"Error: {e}\r\n"
        return ""
