"""debug/sockserver: the accept and reader threads the gdb stub and the QMP monitor share."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from xenicorn.debug.sockserver import (
    Connection,
    SocketServer,
    tcp_listener,
    unix_listener,
)


def lines(conn: Connection):
    """A decoder: one ``line`` per newline-terminated line, however the bytes are split; acks each with '+'."""
    buf = bytearray()

    def feed(data: bytes):
        buf.extend(data)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            conn.send(b"+")                       # answered from the reader thread
            yield "line", line
    return feed


def take(server: SocketServer, n: int, timeout: float = 5.0) -> list:
    """The next ``n`` queued items (kind, data), in order, the connection checked separately."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += list(server.events(wait=0.1))
    assert len(out) == n, out
    return out


@pytest.fixture
def tcp():
    servers = []

    def make(**kw):
        server = SocketServer(tcp_listener("127.0.0.1", 0), name="test-sock", decoder=lines, **kw)
        servers.append(server)
        return server, server.address[1]
    yield make
    for s in servers:
        s.close()


def test_messages_are_queued_in_order_with_their_connection_between_connect_and_disconnect(tcp):
    server, port = tcp(announce=True)
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    c.sendall(b"one\ntw")
    c.sendall(b"o\n")
    items = take(server, 3)
    conn = items[0][1]
    assert [(k, d) for k, _, d in items] == [("connect", None), ("line", b"one"), ("line", b"two")]
    assert all(x[1] is conn for x in items) and server.connections == [conn]
    assert c.recv(2, socket.MSG_WAITALL) == b"++"
    c.close()
    assert take(server, 1) == [("disconnect", conn, None)]
    assert not conn.alive and server.connections == []


def test_events_waits_for_the_first_item_only_as_long_as_asked(tcp):
    server, _ = tcp()
    started = time.monotonic()
    assert list(server.events(wait=0.2)) == [] and 0.15 < time.monotonic() - started < 2
    assert list(server.events()) == [] and not server.pending()


def test_on_accept_may_refuse_and_on_queued_follows_each_message(tcp):
    queued = []
    server, port = tcp(on_accept=lambda conn: not server.connections, on_queued=lambda: queued.append(1))
    first = socket.create_connection(("127.0.0.1", port), timeout=5)
    first.sendall(b"a\nb\n")
    take(server, 2)
    assert len(queued) == 2
    second = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert second.recv(10) == b""                                   # refused: closed at once
    assert len(server.connections) == 1
    first.close()
    second.close()


def test_a_peer_that_stops_reading_is_dropped_within_the_send_timeout(tcp):
    server, port = tcp(announce=True, send_timeout=0.2)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", port))
    (_, conn, _), = take(server, 1)
    started = time.monotonic()
    for _ in range(2000):                                           # 128 MiB if it were all taken
        conn.send(b"x" * 65536)
        if not conn.alive:
            break
    assert not conn.alive and time.monotonic() - started < 5
    assert take(server, 1) == [("disconnect", conn, None)]          # its reader ended too
    c.close()


def test_close_stops_accepting_and_ends_every_connection(tcp):
    server, port = tcp()
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    deadline = time.monotonic() + 5
    while not server.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    server.close()
    assert c.recv(10) == b"" and server.closed
    server.thread.join(5)
    assert not server.thread.is_alive()                             # a blocked accept() was woken
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    c.close()


def test_a_unix_socket_replaces_a_stale_file_and_is_removed_on_close(tmp_path):
    path = str(tmp_path / "mon.sock")
    with open(path, "w") as f:
        f.write("stale")
    server = SocketServer(unix_listener(path), name="test-unix", decoder=lines, unlink=path)
    assert os.listdir(tmp_path) == ["mon.sock"]                     # no temporary name left behind
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    c.sendall(b"hi\n")
    assert [(k, d) for k, _, d in take(server, 1)] == [("line", b"hi")]
    server.close()
    assert c.recv(10) == b"+" and c.recv(10) == b""
    assert not os.path.exists(path)
    c.close()


def test_a_unix_socket_path_too_long_for_a_temporary_name_is_bound_in_place(tmp_path):
    base = str(tmp_path) + "/"
    path = base + "s" * (104 - len(base))                           # fits sun_path; path + ".PID.tmp" does not
    if len(path) != 104:
        pytest.skip("tmp_path is too long for this test")
    server = SocketServer(unix_listener(path), name="test-unix", decoder=lines, unlink=path)
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    c.close()
    server.close()
    assert os.listdir(tmp_path) == []


def test_a_path_appears_only_once_it_accepts_connections(tmp_path):
    """A client that polls for the path (as the tests and scripts do) is never refused."""
    path = str(tmp_path / "race.sock")
    refused = []

    def client():
        while not os.path.exists(path):
            pass
        c = socket.socket(socket.AF_UNIX)
        try:
            c.connect(path)
        except OSError as e:
            refused.append(e)
        c.close()
    for _ in range(20):
        t = threading.Thread(target=client)
        t.start()
        listener = unix_listener(path)
        t.join(5)
        listener.close()
        os.unlink(path)
    assert refused == []
