"""The socket side of the debug agents: listen, accept, read on threads, queue for the machine.

The gdb stub (TCP) and the QMP monitor (a UNIX socket) have the same shape,
the one of QEMU's chardev sockets behind its gdbstub and monitor:

- one *accept* thread takes connections (an agent may refuse one: gdb
  serves one debugger at a time);
- one *reader* thread per connection turns bytes into messages with the
  agent's decoder (gdb packets, JSON objects) and queues them, with the
  connection they came from, in :attr:`SocketServer.inbox`;
- the machine's thread takes them with :meth:`SocketServer.events`
  between two guest runs, so nothing an agent does races the guest
  (style: "one thread runs the machine; other threads only post requests");
- replies go out from the machine's thread through :meth:`Connection.send`,
  with a send timeout: a peer that stops reading is dropped, it does not
  stall the guest. Dropping it shuts the socket down, so its reader ends
  and the agent hears ``disconnect``.

Queued items are ``(kind, connection, data)``. ``kind`` is the decoder's
(``packet``, ``interrupt``, ``command``...) or, when the server was made
with ``announce=True``, ``connect`` and ``disconnect``, which the reader
thread queues last whatever ended it, so the agent always hears of it.
"""
from __future__ import annotations

import os
import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator


class Connection:
    """One peer: a socket that its reader thread reads and the machine's thread writes."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.alive = True
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        """Send all of ``data``, or drop the peer (gone, or not reading within the send timeout)."""
        with self.lock:
            if not self.alive:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.alive = False
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)   # its reader ends, the agent hears of it
                except OSError:
                    pass

    def close(self) -> None:
        """Drop the peer: its reader thread sees the end of the stream."""
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


_SUN_PATH_MAX = 108              # sizeof(sockaddr_un.sun_path) on Linux, the NUL included


def tcp_listener(host: str, port: int, backlog: int = 1) -> socket.socket:
    """A listening TCP socket (port 0: any free one); OSError (address in use...) as the bind gives it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def unix_listener(path: str, backlog: int = 4) -> socket.socket:
    """A listening UNIX socket at ``path``, replacing a stale socket file left there.

    The socket is bound and listening under a temporary name first and then
    renamed into place, so a client that sees ``path`` appear can connect
    (bound but not yet listening, it would be refused).
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    if len(os.fsencode(tmp)) >= _SUN_PATH_MAX:
        tmp = path                               # no room for a longer name: bind in place
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        sock.bind(tmp)
        sock.listen(backlog)
        if tmp != path:
            os.replace(tmp, path)                # also replaces a stale socket file
    except OSError:
        sock.close()
        if tmp != path and os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return sock


Decoder = Callable[[bytes], Iterable[tuple[str, object]]]


class SocketServer:
    """Accept and read connections on threads; queue what they say for the machine's thread.

    ``decoder(connection)`` makes, for each new connection, a function that
    takes received bytes and yields ``(kind, data)`` messages; it runs on
    the reader thread and may answer the peer directly (acks, parse errors).
    ``on_accept(connection)`` runs on the accept thread and returns False
    to refuse the connection. ``on_queued()`` runs after each message is
    queued (the monitor kicks the guest out of Unicorn there).
    """

    def __init__(self, listener: socket.socket, *, name: str, decoder: Callable[[Connection], Decoder],
                 connection: type[Connection] = Connection,
                 on_accept: Callable[[Connection], bool] | None = None,
                 on_queued: Callable[[], None] | None = None,
                 send_timeout: float | None = None, nodelay: bool = False, announce: bool = False,
                 unlink: str | None = None):
        self.listener = listener
        self.name = name
        self._decoder = decoder
        self._connection = connection
        self._on_accept = on_accept
        self._on_queued = on_queued
        self._send_timeout = send_timeout
        self._nodelay = nodelay
        self._announce = announce
        self._unlink = unlink                        # a UNIX socket's path, removed on close
        self.inbox: queue.Queue = queue.Queue()      # (kind, connection, data)
        self.connections: list[Connection] = []
        self.closed = False
        self.thread = threading.Thread(target=self._accept, name=name, daemon=True)   # the accept thread
        self.thread.start()

    @property
    def address(self):
        """Where the server listens (``(host, port)``, or a UNIX socket's path)."""
        return self.listener.getsockname()

    # -- threads: accept and read -------------------------------------------------------
    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if self.closed:                          # it arrived as we closed
                sock.close()
                return
            if self._nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._send_timeout is not None:
                # replies are sent from the machine's thread: a peer that does not read must not block it
                sec, usec = int(self._send_timeout), int(self._send_timeout % 1 * 1e6)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, usec))
            conn = self._connection(sock)
            if self._on_accept is not None and not self._on_accept(conn):
                sock.close()
                continue
            self.connections.append(conn)
            if self._announce:
                self.inbox.put(("connect", conn, None))
            threading.Thread(target=self._read, args=(conn,), name=f"{self.name}-read", daemon=True).start()

    def _read(self, conn: Connection) -> None:
        try:
            feed = self._decoder(conn)
            while conn.alive:
                try:
                    data = conn.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                for kind, item in feed(data):
                    self.inbox.put((kind, conn, item))
                    if self._on_queued is not None:
                        self._on_queued()
        finally:                                     # whatever happened, the machine hears of it
            conn.alive = False
            if conn in self.connections:
                self.connections.remove(conn)
            if self._announce:
                self.inbox.put(("disconnect", conn, None))

    # -- the machine's side ------------------------------------------------------------------
    def pending(self) -> bool:
        """Something is queued for the machine's thread."""
        return not self.inbox.empty()

    def events(self, wait: float = 0.0) -> Iterator[tuple[str, Connection, object]]:
        """What is queued: waits up to ``wait`` s for the first item, then takes what arrives meanwhile."""
        try:
            item = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            yield item
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        """Stop accepting, close every connection (their readers end), remove a UNIX socket's file."""
        self.closed = True
        # close() alone neither wakes an accept() blocked on another thread
        # nor stops the kernel from queueing connections while it waits;
        # shutdown() does both on Linux (accept fails with EINVAL)
        for end in (lambda: self.listener.shutdown(socket.SHUT_RDWR), self.listener.close):
            try:
                end()
            except OSError:
                pass
        for conn in list(self.connections):
            conn.close()
        if self._unlink is not None and os.path.exists(self._unlink):
            os.unlink(self._unlink)
