"""A QMP monitor: QEMU's JSON machine protocol on a UNIX socket.

``-qmp unix:PATH,server,wait=off`` (spelled as QEMU spells it) listens on
PATH. A client gets a greeting, negotiates with ``qmp_capabilities``, then
sends ``{"execute": NAME, "arguments": {...}, "id": ...}`` and receives
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` (the "id"
echoed), plus asynchronous events ``{"event": "STOP", "timestamp": ...}``.
Names, arguments and results follow QEMU's QAPI schema, so existing clients
(the ``qemu.qmp`` package, ``qmp-shell``) work.

Threads: one accepts connections and reads them; commands are queued and
run by the machine's run loop between two guest runs (it is kicked out of
``emu_start`` when one arrives), so no command ever races the guest. A
client that goes away in the middle of a command loses only its reply.
"""
from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time

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


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.negotiated = False
        self.lock = threading.Lock()
        self.alive = True

    def send(self, obj: dict) -> None:
        data = (json.dumps(obj) + "\r\n").encode()
        with self.lock:
            if not self.alive:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.alive = False


class QmpServer:
    """The monitor of one machine."""

    def __init__(self, machine, path: str):
        self.machine = machine
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.clients: list[_Client] = []
        self.commands: queue.Queue = queue.Queue()
        self.paused = False
        self.closed = False
        threading.Thread(target=self._accept, name="xenicorn-qmp", daemon=True).start()

    # -- threads: accept and read -------------------------------------------------------
    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            client = _Client(sock)
            self.clients.append(client)
            client.send(GREETING)
            threading.Thread(target=self._read, args=(client,), daemon=True).start()

    def _read(self, client: _Client) -> None:
        buf, decoder = "", json.JSONDecoder()
        while client.alive:
            try:
                data = client.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                client.alive = False
                break
            buf += data.decode("utf-8", "replace")
            while buf.strip():
                buf = buf.lstrip()
                try:
                    msg, end = decoder.raw_decode(buf)
                except json.JSONDecodeError as e:
                    if e.msg.startswith("Unterminated string") or (
                            e.msg.startswith("Expecting") and e.pos >= len(buf.rstrip()) - 1):
                        break                         # incomplete: wait for the rest
                    client.send({"error": {"class": "GenericError", "desc": f"JSON parse error, {e.msg}"}})
                    buf = ""
                    break
                buf = buf[end:]
                self.commands.put((client, msg))
                self.machine.kick_until(lambda: self.commands.empty() or self.closed, "monitor")
        if client in self.clients:
            self.clients.remove(client)

    # -- the run loop's side -------------------------------------------------------------------
    def service(self, wait: float = 0.0) -> bool:
        """Run queued commands (waiting up to ``wait`` s for one); True if any ran."""
        ran = False
        try:
            item = self.commands.get(timeout=wait) if wait > 0 else self.commands.get_nowait()
        except queue.Empty:
            return False
        while item is not None:
            client, msg = item
            reply = self._execute(client, msg)
            if reply is not None:
                client.send(reply)
            ran = True
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                item = None
        return ran

    def event(self, name: str, data: dict | None = None) -> None:
        now = time.time()
        msg = {"event": name, "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        if data is not None:
            msg["data"] = data
        for c in list(self.clients):
            if c.negotiated:
                c.send(msg)

    def close(self) -> None:
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        for c in list(self.clients):
            c.alive = False
            try:
                c.sock.close()
            except OSError:
                pass
        if os.path.exists(self.path):
            os.unlink(self.path)

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
        return [{"cpu-index": v.index, "qom-path": f"/machine/unattached/device[{v.index}]",
                 "thread-id": os.getpid(), "target": "x86_64",
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

    def _cmd_human_monitor_command(self, **kw) -> str:
        line = str(kw.get("command-line", "")).strip()
        words = line.split()
        if not words:
            return ""
        if words[:2] == ["info", "status"]:
            return f"VM status: {self._status()}\r\n"
        if words[0] == "xen-event-list":
            return "".join(f"port {e['port']:4d}: vcpu: {e['vcpu']} {e['type']}"
                           f"{' pending' if e['pending'] else ''}{' masked' if e['masked'] else ''}\r\n"
                           for e in self._xen().evtchn.event_list())
        if words[0] == "xen-event-inject" and len(words) == 2 and words[1].isdigit():
            self._xen().evtchn.event_inject(int(words[1]))
            return ""
        if words[0] == "xenstore-read" and len(words) == 2:
            return self._xen().xenstore_read(words[1]).decode("ascii", "replace") + "\r\n"
        if words[0] == "xenstore-write" and len(words) == 3:
            self._xen().xenstore_write(words[1], words[2].encode())
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
