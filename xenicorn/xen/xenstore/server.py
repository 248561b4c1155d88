r"""xenstored's side of the guest's xenstore ring.

The toolstack gives an HVM guest a page and an event channel for xenstore
(``HVM_PARAM_STORE_PFN``, ``HVM_PARAM_STORE_EVTCHN``). The page holds two
1 KiB byte rings and their free-running indices
(xen/include/public/io/xs_wire.h, ``struct xenstore_domain_interface``)::

    0x000 req[1024]   guest -> xenstored       0x800 req_cons, 0x804 req_prod
    0x400 rsp[1024]   xenstored -> guest       0x808 rsp_cons, 0x80C rsp_prod
    0x810 server_features   0x814 connection   0x818 error

A producer writes bytes at ``idx & 1023``, then advances its index and
notifies the event channel; a message may wrap around the ring's end. Each
message is a 16-byte header ``{u32 type, req_id, tx_id, len}`` and ``len``
(at most 4096) bytes of payload: NUL-terminated strings, the value of a
WRITE running to the end. Replies echo ``req_id`` and ``tx_id``; failures
are ``XS_ERROR`` with the error's name ("ENOENT\0"); watch events are
``XS_WATCH_EVENT`` messages ("path\0token\0") xenstored sends unasked.

A ring whose indices are impossible (the producer more than a ring ahead
of the consumer) is broken: xenstored stops reading it and says so in the
``error`` field (XENSTORE_ERROR_RINGIDX), as it advertises in
``server_features`` (XENSTORE_SERVER_FEATURE_ERROR). A message longer than
4096 bytes gets E2BIG and what was buffered is dropped.
"""
from __future__ import annotations

import struct

from ...records import RecordError, flag, hexbytes, listing, make_record, open_record, uint
from .store import Store, XsError, Perm, DOM0

(XS_DEBUG, XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH, XS_TRANSACTION_START,
 XS_TRANSACTION_END, XS_INTRODUCE, XS_RELEASE, XS_GET_DOMAIN_PATH, XS_WRITE, XS_MKDIR, XS_RM,
 XS_SET_PERMS, XS_WATCH_EVENT, XS_ERROR, XS_IS_DOMAIN_INTRODUCED, XS_RESUME, XS_SET_TARGET,
 XS_RESTRICT, XS_RESET_WATCHES, XS_DIRECTORY_PART) = range(23)
TYPE_NAMES = {v: k[3:] for k, v in dict(globals()).items() if k.startswith("XS_") and isinstance(v, int)}
PAYLOAD_MAX = 4096
RING = 1024
REQ, RSP, REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 0, 0x400, 0x800, 0x804, 0x808, 0x80C
SERVER_FEATURES, CONNECTION, ERROR = 0x810, 0x814, 0x818
XENSTORE_SERVER_FEATURE_RECONNECTION, XENSTORE_SERVER_FEATURE_ERROR = 1, 2
XENSTORE_ERROR_NONE, XENSTORE_ERROR_RINGIDX = 0, 2
HEADER = struct.Struct("<IIII")


def _shown(payload: bytes) -> str:
    """A payload for a trace line: NULs as |, cut at 60 bytes."""
    return payload[:60].replace(b"\0", b"|").decode("ascii", "replace")


class XenstoreServer:
    """Serve one domain's ring from a :class:`Store` (xenicorn is dom0's xenstored)."""

    def __init__(self, store: Store, memory, gpa: int, domid: int, notify, trace=None):
        self.store, self.mem, self.gpa, self.domid = store, memory, gpa, domid
        self.notify = notify                  # raise the guest's event channel
        self.trace = trace
        self._in = bytearray()                # request bytes taken off the ring
        self._out = bytearray()               # reply bytes waiting for ring space
        self.relative_watches: set[tuple[str, str]] = set()
        self.broken = False
        self.requests = 0

    def reset_page(self) -> None:
        self.mem.fill(self.gpa, 4096)
        self.mem.write_u32(self.gpa + SERVER_FEATURES, XENSTORE_SERVER_FEATURE_ERROR)

    # -- the ring ---------------------------------------------------------------------------
    def _u32(self, off: int) -> int:
        return self.mem.read_u32(self.gpa + off)

    def kick(self) -> None:
        """The guest notified us (or a watch fired): read requests, write replies and events."""
        if self.broken:
            return
        cons, prod = self._u32(REQ_CONS), self._u32(REQ_PROD)
        avail = (prod - cons) & 0xFFFFFFFF
        if avail > RING:
            self._break(f"request ring indices {cons:#x}/{prod:#x}")
            return
        for i in range(avail):
            self._in.append(self.mem.read_u8(self.gpa + REQ + ((cons + i) & (RING - 1))))
        self.mem.write_u32(self.gpa + REQ_CONS, prod)
        while len(self._in) >= HEADER.size:
            kind, req_id, tx_id, length = HEADER.unpack_from(self._in)
            if length > PAYLOAD_MAX:
                self._in.clear()
                self._reply(XS_ERROR, req_id, tx_id, b"E2BIG\0")
                break
            if len(self._in) < HEADER.size + length:
                break
            payload = bytes(self._in[HEADER.size:HEADER.size + length])
            del self._in[:HEADER.size + length]
            self.requests += 1
            self._reply(*self.handle(kind, req_id, tx_id, payload))
        for path, token in self.store.take_events(self.domid):
            self._event(path, token)
        self.flush()

    def _break(self, why: str) -> None:
        self.broken = True
        self.mem.write_u32(self.gpa + ERROR, XENSTORE_ERROR_RINGIDX)
        if self.trace:
            self.trace(f"ring broken: {why}; no longer served")

    def _reply(self, kind: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if self.trace:
            self.trace(f"-> {TYPE_NAMES.get(kind, kind)} req {req_id} tx {tx_id}: {_shown(payload)}")
        self._out += HEADER.pack(kind, req_id, tx_id, len(payload)) + payload

    def _event(self, path: str, token: str) -> None:
        """A watch event; the path is relative if the watch was registered relative."""
        home = f"/local/domain/{self.domid}/"
        shown = path
        for wpath, wtoken in self.relative_watches:
            if wtoken == token and (path == wpath or path.startswith(wpath + "/")) and path.startswith(home):
                shown = path[len(home):]
        self._reply(XS_WATCH_EVENT, 0, 0, shown.encode() + b"\0" + token.encode() + b"\0")

    def flush(self) -> None:
        """Copy as much pending output as fits into the response ring, then notify."""
        if not self._out or self.broken:
            return
        cons, prod = self._u32(RSP_CONS), self._u32(RSP_PROD)
        used = (prod - cons) & 0xFFFFFFFF
        if used > RING:
            self._break(f"response ring indices {cons:#x}/{prod:#x}")
            return
        n = min(RING - used, len(self._out))
        for i in range(n):
            self.mem.write_int(self.gpa + RSP + ((prod + i) & (RING - 1)), 1, self._out[i])
        del self._out[:n]
        self.mem.write_u32(self.gpa + RSP_PROD, (prod + n) & 0xFFFFFFFF)
        if n:
            self.notify()

    # -- one request ----------------------------------------------------------------------------
    def handle(self, kind: int, req_id: int, tx_id: int, payload: bytes) -> tuple[int, int, int, bytes]:
        name = TYPE_NAMES.get(kind, str(kind))
        if self.trace:
            self.trace(f"<- {name} req {req_id} tx {tx_id}: {_shown(payload)}")
        try:
            out = self._dispatch(kind, tx_id, payload)
            return kind, req_id, tx_id, out
        except XsError as e:
            return XS_ERROR, req_id, tx_id, e.name.encode() + b"\0"

    @staticmethod
    def _strings(payload: bytes, n: int) -> list[str]:
        """The first ``n`` NUL-terminated strings (EINVAL when missing or not ASCII)."""
        if payload.count(b"\0") < n:
            raise XsError("EINVAL", "missing string")
        try:
            return [p.decode("ascii") for p in payload.split(b"\0")[:n]]
        except UnicodeDecodeError:
            raise XsError("EINVAL", "not ASCII") from None

    def _path(self, payload: bytes) -> str:
        if not payload.endswith(b"\0"):
            raise XsError("EINVAL", "path not NUL-terminated")
        return self._strings(payload, 1)[0]

    def _dispatch(self, kind: int, tx: int, payload: bytes) -> bytes:
        st, me = self.store, self.domid
        if tx and tx not in st.transactions and kind != XS_TRANSACTION_START:
            raise XsError("ENOENT", f"transaction {tx}")
        if kind == XS_READ:
            return st.read(me, self._path(payload), tx)
        if kind == XS_WRITE:
            path, _, value = payload.partition(b"\0")
            if not _:
                raise XsError("EINVAL", "WRITE without a path terminator")
            st.write(me, self._strings(path + b"\0", 1)[0], value, tx)
            return b"OK\0"
        if kind == XS_MKDIR:
            st.mkdir(me, self._path(payload), tx)
            return b"OK\0"
        if kind == XS_RM:
            st.rm(me, self._path(payload), tx)
            return b"OK\0"
        if kind == XS_DIRECTORY:
            out = b"".join(c.encode() + b"\0" for c in st.directory(me, self._path(payload), tx))
            if len(out) > PAYLOAD_MAX:
                raise XsError("E2BIG", "use DIRECTORY_PART")
            return out
        if kind == XS_DIRECTORY_PART:
            path, offset = self._strings(payload, 2)
            if not offset.isdigit():
                raise XsError("EINVAL", f"offset {offset!r}")
            names = b"".join(c.encode() + b"\0" for c in st.directory(me, path, tx))
            gen = f"{st.generation(me, path, tx)}".encode() + b"\0"
            start = int(offset)
            if start > len(names):
                raise XsError("EINVAL", "offset beyond the list")
            chunk, room = b"", PAYLOAD_MAX - len(gen) - 1
            for name in names[start:].split(b"\0")[:-1]:
                if len(chunk) + len(name) + 1 > room:
                    return gen + chunk
                chunk += name + b"\0"
            return gen + chunk + b"\0"                      # an empty name: the end
        if kind == XS_GET_PERMS:
            return b"".join(str(p).encode() + b"\0" for p in st.get_perms(me, self._path(payload), tx))
        if kind == XS_SET_PERMS:
            parts = payload.split(b"\0")
            if len(parts) < 3 or parts[-1] != b"":
                raise XsError("EINVAL", "SET_PERMS needs a path and permissions")
            try:
                texts = [p.decode("ascii") for p in parts[:-1]]
            except UnicodeDecodeError:
                raise XsError("EINVAL", "not ASCII") from None
            st.set_perms(me, texts[0], [Perm.parse(t) for t in texts[1:]], tx)
            return b"OK\0"
        if kind in (XS_WATCH, XS_UNWATCH):
            path, token = self._strings(payload, 2)
            canon = st.canonical(me, path)
            if kind == XS_WATCH:
                st.watch(me, path, token)
                if not path.startswith(("/", "@")):
                    self.relative_watches.add((canon, token))
            else:
                st.unwatch(me, path, token)
                self.relative_watches.discard((canon, token))
            return b"OK\0"
        if kind == XS_RESET_WATCHES:
            st.reset_watches(me)
            self.relative_watches.clear()
            return b"OK\0"
        if kind == XS_TRANSACTION_START:
            if tx:
                raise XsError("EBUSY", "nested transaction")
            return f"{st.transaction_start(me)}".encode() + b"\0"
        if kind == XS_TRANSACTION_END:
            if not tx:
                raise XsError("ENOENT", "no transaction")
            (flag,) = self._strings(payload, 1)
            if flag not in ("T", "F"):
                raise XsError("EINVAL", f"TRANSACTION_END {flag!r}")
            st.transaction_end(me, tx, flag == "T")
            return b"OK\0"
        if kind == XS_GET_DOMAIN_PATH:
            (dom,) = self._strings(payload, 1)
            if not dom.isdigit():
                raise XsError("EINVAL", f"domain {dom!r}")
            return f"/local/domain/{int(dom)}".encode() + b"\0"
        if kind == XS_IS_DOMAIN_INTRODUCED:
            (dom,) = self._strings(payload, 1)
            return b"T\0" if dom.isdigit() and int(dom) in (DOM0, me) else b"F\0"
        if kind in (XS_INTRODUCE, XS_RELEASE, XS_RESUME, XS_SET_TARGET, XS_DEBUG, XS_RESTRICT):
            raise XsError("EACCES", "only dom0 may")
        raise XsError("EINVAL", f"message type {kind}")

    # -- snapshots (snapshot/) -------------------------------------------------------
    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("xenstore-ring", 1)
    MAX_REPLIES = 1 << 20                   # reply and event bytes a snapshot may hold back

    def save_record(self) -> dict:
        """A request taken off the ring but not yet complete, replies waiting for ring space, and
        which watches were registered with relative paths (their events name relative paths)."""
        return make_record(*self.RECORD, {
            "in": bytes(self._in).hex(), "out": bytes(self._out).hex(),
            "relative_watches": sorted(list(w) for w in self.relative_watches),
            "broken": self.broken, "requests": self.requests})

    def check_record(self, record: dict):
        """A partial request is shorter than a header plus the largest payload (a longer one breaks
        the ring instead); watches are (path, token) strings."""
        st = open_record(record, *self.RECORD)
        buf_in = hexbytes(st, "in", most=HEADER.size + PAYLOAD_MAX - 1)
        buf_out = hexbytes(st, "out", most=self.MAX_REPLIES)
        rel = set()
        for item in listing(st, "relative_watches", 1 << 16):
            if not isinstance(item, list) or len(item) != 2 or not all(isinstance(x, str) for x in item):
                raise RecordError("relative watch is not [path, token]")
            rel.add((item[0], item[1]))
        return buf_in, buf_out, rel, flag(st, "broken"), uint(st, "requests")

    def apply_record(self, prepared) -> None:
        buf_in, buf_out, rel, self.broken, self.requests = prepared
        self._in, self._out = bytearray(buf_in), bytearray(buf_out)
        self.relative_watches = set(rel)
