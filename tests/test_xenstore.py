"""Xenstore: the store in pure Python, then the wire protocol on a ring."""
import struct

import pytest

from xenicorn.xen.xenstore.store import Store, XsError, Perm, QUOTA_NODES, QUOTA_WATCHES, QUOTA_TRANSACTIONS
from xenicorn.xen.xenstore import server as S

GUEST = 1


@pytest.fixture
def store():
    st = Store()
    st.write(0, "/local/domain/1/name", b"guest")
    for path in ("/local/domain/1", "/local/domain/1/name"):
        st.set_perms(0, path, [Perm(0, "n"), Perm(GUEST, "r")])
    st.mkdir(0, "/local/domain/1/data")
    st.set_perms(0, "/local/domain/1/data", [Perm(GUEST, "n")])
    st.take_events(GUEST)
    return st


# -- the store ---------------------------------------------------------------------
def test_relative_paths_and_missing_parents(store):
    store.write(GUEST, "data/a/b/c", b"v")
    assert store.read(GUEST, "/local/domain/1/data/a/b/c") == b"v"
    assert store.directory(GUEST, "data/a") == ["b"]
    assert store.get_perms(GUEST, "data/a/b")[0].domid == GUEST          # created by the guest: its own
    assert store.read(GUEST, "data/a") == b""


def test_permissions_deny_and_allow(store):
    store.write(0, "/secret", b"x")
    with pytest.raises(XsError) as e:
        store.read(GUEST, "/secret")
    assert e.value.name == "EACCES"
    with pytest.raises(XsError) as e:
        store.write(GUEST, "/local/domain/1/name", b"evil")             # readable, not writable
    assert e.value.name == "EACCES"
    assert store.read(GUEST, "name") == b"guest"
    store.set_perms(0, "/secret", [Perm(0, "n"), Perm(GUEST, "r")])
    assert store.read(GUEST, "/secret") == b"x"
    with pytest.raises(XsError) as e:
        store.set_perms(GUEST, "data", [Perm(5, "b")])                  # giving a node away
    assert e.value.name == "EPERM"


@pytest.mark.parametrize("path", ["", "data//x", "data/", "da ta", "data/\u00e9", "/a/@b", "@nosuch",
                                  "x" * 2049, "/" + "x" * 3072])
def test_bad_paths_are_einval_and_change_nothing(store, path):
    before = store.gen
    with pytest.raises(XsError) as e:
        store.write(GUEST, path, b"v")
    assert e.value.name == "EINVAL" and store.gen == before


def test_quotas(store):
    with pytest.raises(XsError) as e:
        store.write(GUEST, "data/big", b"x" * 2049)
    assert e.value.name == "ENOSPC"
    for i in range(QUOTA_NODES - store.nodes_by_owner[GUEST]):
        store.write(GUEST, f"data/n{i}", b"")
    with pytest.raises(XsError) as e:
        store.write(GUEST, "data/one-too-many", b"")
    assert e.value.name == "ENOSPC"
    for i in range(QUOTA_WATCHES):
        store.watch(GUEST, "data", f"t{i}")
    with pytest.raises(XsError) as e:
        store.watch(GUEST, "data", "flood")
    assert e.value.name == "E2BIG"
    for _ in range(QUOTA_TRANSACTIONS):
        store.transaction_start(GUEST)
    with pytest.raises(XsError):
        store.transaction_start(GUEST)


def test_transactions_commit_abort_and_conflict(store):
    tx = store.transaction_start(GUEST)
    store.write(GUEST, "data/x", b"1", tx)
    with pytest.raises(XsError):
        store.read(GUEST, "data/x")                                      # not visible outside yet
    store.transaction_end(GUEST, tx, commit=True)
    assert store.read(GUEST, "data/x") == b"1"
    tx = store.transaction_start(GUEST)
    store.write(GUEST, "data/x", b"2", tx)
    store.transaction_end(GUEST, tx, commit=False)
    assert store.read(GUEST, "data/x") == b"1"
    tx = store.transaction_start(GUEST)
    assert store.read(GUEST, "data/x", tx) == b"1"
    store.write(GUEST, "data/y", b"mine", tx)
    store.write(0, "/local/domain/1/data/x", b"changed")                  # someone else
    store.write(0, "/local/domain/0/name", b"unrelated")
    with pytest.raises(XsError) as e:
        store.transaction_end(GUEST, tx, commit=True)
    assert e.value.name == "EAGAIN"
    assert store.read(0, "/local/domain/0/name") == b"unrelated"          # others' work survives
    with pytest.raises(XsError):
        store.read(GUEST, "data/y")                                       # the failed one left nothing


def test_unrelated_changes_do_not_conflict(store):
    store.write(GUEST, "data/a/x", b"1")
    tx = store.transaction_start(GUEST)
    store.write(GUEST, "data/a/x", b"2", tx)
    store.write(0, "/local/domain/0/other", b"z")
    store.transaction_end(GUEST, tx, commit=True)
    assert store.read(GUEST, "data/a/x") == b"2" and store.read(0, "/local/domain/0/other") == b"z"


def test_watches_fire_on_register_and_on_changes_below(store):
    store.watch(GUEST, "data", "tok")
    assert store.take_events(GUEST) == [("/local/domain/1/data", "tok")]
    store.write(GUEST, "data/a/b", b"1")
    store.write(0, "/elsewhere", b"1")
    assert store.take_events(GUEST) == [("/local/domain/1/data/a/b", "tok")]
    store.rm(GUEST, "data/a")
    assert store.take_events(GUEST) == [("/local/domain/1/data/a", "tok")]    # once, for the node removed
    with pytest.raises(XsError):
        store.watch(GUEST, "data", "tok")                                 # EEXIST
    store.unwatch(GUEST, "data", "tok")
    store.write(GUEST, "data/c", b"1")
    assert store.take_events(GUEST) == []


def test_rm_root_and_missing(store):
    with pytest.raises(XsError) as e:
        store.rm(0, "/")
    assert e.value.name == "EINVAL"
    store.rm(GUEST, "data/missing")                                       # a missing leaf: fine
    with pytest.raises(XsError) as e:
        store.rm(GUEST, "data/missing/deeper")
    assert e.value.name == "ENOENT"


# -- the ring ------------------------------------------------------------------------------
class Ring:
    """The guest's side of the xenstore page, driven from Python."""

    def __init__(self, machine, store, gpa=0x40000):
        self.mem, self.gpa = machine.memory, gpa
        self.notified = 0
        self.server = S.XenstoreServer(store, self.mem, gpa, GUEST, self._notify)
        self.server.reset_page()
        self.rsp_cons = 0

    def _notify(self):
        self.notified += 1

    def send_bytes(self, data: bytes) -> None:
        prod = self.mem.read_u32(self.gpa + S.REQ_PROD)
        for i, b in enumerate(data):
            self.mem.write_int(self.gpa + S.REQ + ((prod + i) & 1023), 1, b)
        self.mem.write_u32(self.gpa + S.REQ_PROD, (prod + len(data)) & 0xFFFFFFFF)
        self.server.kick()

    def message(self, kind, payload, req_id=7, tx=0) -> bytes:
        return struct.pack("<IIII", kind, req_id, tx, len(payload)) + payload

    def replies(self):
        prod = self.mem.read_u32(self.gpa + S.RSP_PROD)
        data = bytes(self.mem.read_u8(self.gpa + S.RSP + ((self.rsp_cons + i) & 1023))
                     for i in range((prod - self.rsp_cons) & 0xFFFFFFFF))
        self.rsp_cons = prod
        self.mem.write_u32(self.gpa + S.RSP_CONS, prod)
        out = []
        while data:
            kind, req, tx, n = struct.unpack_from("<IIII", data)
            out.append((kind, req, tx, data[16:16 + n]))
            data = data[16 + n:]
        return out

    def call(self, kind, payload, tx=0):
        self.send_bytes(self.message(kind, payload, tx=tx))
        return self.replies()


@pytest.fixture
def ring(machine, store):
    return Ring(machine, store)


def test_requests_split_at_every_offset_and_across_the_ring_edge(ring):
    msg = ring.message(S.XS_WRITE, b"data/key\0" + b"v" * 100)
    for cut in range(len(msg) + 1):
        ring.send_bytes(msg[:cut])
        ring.send_bytes(msg[cut:])
        assert ring.replies() == [(S.XS_WRITE, 7, 0, b"OK\0")], cut
    # 1 KiB ring: by now the indices have wrapped the ring many times
    assert ring.mem.read_u32(ring.gpa + S.REQ_PROD) > 1024 * 10
    assert ring.call(S.XS_READ, b"data/key\0") == [(S.XS_READ, 7, 0, b"v" * 100)]


def test_every_message_type(ring):
    assert ring.call(S.XS_MKDIR, b"data/d\0") == [(S.XS_MKDIR, 7, 0, b"OK\0")]
    assert ring.call(S.XS_WRITE, b"data/d/x\0hello")[0][3] == b"OK\0"
    assert ring.call(S.XS_DIRECTORY, b"data/d\0")[0][3] == b"x\0"
    gen, rest = ring.call(S.XS_DIRECTORY_PART, b"data/d\0" b"0\0")[0][3].split(b"\0", 1)
    assert gen.isdigit() and rest == b"x\0\0"
    assert ring.call(S.XS_GET_PERMS, b"data/d/x\0")[0][3] == b"n1\0"
    assert ring.call(S.XS_SET_PERMS, b"data/d/x\0n1\0r0\0")[0][3] == b"OK\0"
    assert ring.call(S.XS_GET_PERMS, b"data/d/x\0")[0][3] == b"n1\0r0\0"
    assert ring.call(S.XS_GET_DOMAIN_PATH, b"1\0")[0][3] == b"/local/domain/1\0"
    assert ring.call(S.XS_IS_DOMAIN_INTRODUCED, b"1\0")[0][3] == b"T\0"
    assert ring.call(S.XS_RM, b"data/d\0")[0][3] == b"OK\0"
    assert ring.call(S.XS_READ, b"data/d/x\0") == [(S.XS_ERROR, 7, 0, b"ENOENT\0")]
    assert ring.call(S.XS_INTRODUCE, b"5\0" b"1\0" b"2\0")[0][3] == b"EACCES\0"
    assert ring.call(S.XS_RELEASE, b"1\0")[0][3] == b"EACCES\0"
    assert ring.call(S.XS_RESET_WATCHES, b"")[0][3] == b"OK\0"


def test_transaction_over_the_ring_conflicts_with_eagain(ring, store):
    (reply,) = ring.call(S.XS_TRANSACTION_START, b"\0")
    tx = int(reply[3].rstrip(b"\0"))
    assert ring.call(S.XS_WRITE, b"data/t\0one", tx=tx)[0][3] == b"OK\0"
    store.write(0, "/local/domain/1/data/t", b"other")
    assert ring.call(S.XS_TRANSACTION_END, b"T\0", tx=tx) == [(S.XS_ERROR, 7, tx, b"EAGAIN\0")]
    assert ring.call(S.XS_READ, b"data/t\0", tx=tx) == [(S.XS_ERROR, 7, tx, b"ENOENT\0")]


def test_watch_events_arrive_as_messages_with_relative_paths(ring, store):
    assert ring.call(S.XS_WATCH, b"data\0mytoken\0") == [
        (S.XS_WATCH, 7, 0, b"OK\0"), (S.XS_WATCH_EVENT, 0, 0, b"data\0mytoken\0")]
    store.write(0, "/local/domain/1/data/from-dom0", b"1")
    ring.server.kick()
    assert ring.replies() == [(S.XS_WATCH_EVENT, 0, 0, b"data/from-dom0\0mytoken\0")]
    assert ring.call(S.XS_WATCH, b"/local/domain/1/data\0abs\0")[1][3] == b"/local/domain/1/data\0abs\0"


@pytest.mark.parametrize("payload,kind,error", [
    (b"data/x", S.XS_READ, b"EINVAL\0"),                 # path not NUL-terminated
    (b"da ta\0", S.XS_READ, b"EINVAL\0"),
    (b"\xff\xfe\0", S.XS_READ, b"EINVAL\0"),
    (b"data/x\0", 99, b"EINVAL\0"),                      # unknown type
    (b"data/x\0", S.XS_WATCH_EVENT, b"EINVAL\0"),        # a server-only type
    (b"data\0", S.XS_WATCH, b"EINVAL\0"),                # no token
    (b"data/x\0", S.XS_SET_PERMS, b"EINVAL\0"),          # no permissions
    (b"data/x\0q7\0", S.XS_SET_PERMS, b"EINVAL\0"),
    (b"X\0", S.XS_TRANSACTION_END, b"ENOENT\0"),         # no such transaction (tx 0)
])
def test_hostile_requests_get_xenstored_errors_and_change_nothing(ring, store, payload, kind, error):
    before = store.gen
    (reply,) = ring.call(kind, payload)
    assert reply[0] == S.XS_ERROR and reply[3] == error
    assert store.gen == before


def test_oversized_message_and_broken_indices(ring, store):
    header = struct.pack("<IIII", S.XS_WRITE, 9, 0, 5000)
    ring.send_bytes(header + b"x" * 100)
    assert ring.replies() == [(S.XS_ERROR, 9, 0, b"E2BIG\0")]
    assert ring.call(S.XS_READ, b"name\0")[0][3] == b"guest"              # still served
    ring.mem.write_u32(ring.gpa + S.REQ_PROD, ring.mem.read_u32(ring.gpa + S.REQ_CONS) + 5000)
    ring.server.kick()
    assert ring.server.broken and ring.mem.read_u32(ring.gpa + S.ERROR) == S.XENSTORE_ERROR_RINGIDX
