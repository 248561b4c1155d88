"""The xenstore tree: nodes, permissions, quotas, transactions, watches.

Xenstore is a small hierarchical key-value database that dom0's xenstored
keeps for all domains; drivers use it to find each other ("where is my
console ring?") and the toolstack to talk to guests ("please shut down").
This is xenicorn's xenstored, in pure Python; :mod:`.server` puts it on the
guest's ring. Semantics follow docs/misc/xenstore.txt and the C xenstored:

* **Paths** are ``/``-separated; a path without the leading ``/`` is relative
  to the caller's home, ``/local/domain/<domid>``. Valid characters are
  ``A-Za-z0-9-/_@``; no empty component, no trailing ``/`` (but ``/``);
  absolute paths up to 3072 bytes, relative ones 2048. ``@`` starts the
  special watch paths (``@introduceDomain``, ``@releaseDomain``).
* **Permissions** of a node are a list: the first entry names the owner
  and what *everyone else* may do; later entries grant specific domains
  ``r``, ``w``, ``b`` (both) or ``n`` (none). The owner and dom0 may do
  anything. Writing a missing node creates its missing parents, which
  inherit the parent's permissions with the writer as owner.
* **Quotas** (C xenstored's defaults): 1000 nodes per domain, 2048-byte
  values, 128 watches, 10 open transactions.
* **Transactions** see a snapshot; at commit, if any node they read or
  wrote changed meanwhile, the commit fails with EAGAIN and the caller
  retries. A failed or aborted transaction changes nothing.
* **Watches** fire for a write, mkdir, rm or set-perms on the watched path
  or below it (an rm also tells watchers of the removed children), and
  once when they are registered.

Errors are raised as :class:`XsError` carrying xenstored's error name.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from ...records import RecordError, hexbytes, integer, listing, make_record, open_record, uint
from ...records import field as record_field         # dataclasses' field is the other one here

MAX_ABS_PATH, MAX_REL_PATH = 3072, 2048
QUOTA_NODES, QUOTA_VALUE, QUOTA_WATCHES, QUOTA_TRANSACTIONS = 1000, 2048, 128, 10
_VALID = re.compile(r"^[A-Za-z0-9\-/_@]+$")
DOM0 = 0


class XsError(Exception):
    """A request xenstored refuses; ``name`` is the error string on the wire (ENOENT...)."""

    def __init__(self, name: str, why: str = ""):
        super().__init__(f"{name}: {why}" if why else name)
        self.name = name


@dataclass
class Perm:
    """One permission entry as the wire writes it: ``r5`` is "domain 5 may read"."""

    domid: int
    access: str                      # n, r, w or b

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @staticmethod
    def parse(text: str) -> "Perm":
        if len(text) < 2 or text[0] not in "nrwb" or not text[1:].isdigit():
            raise XsError("EINVAL", f"permission {text!r}")
        return Perm(int(text[1:]), text[0])


@dataclass
class Node:
    """A node of the tree: its value, permissions and children."""

    value: bytes = b""
    perms: list[Perm] = field(default_factory=lambda: [Perm(DOM0, "n")])
    children: dict[str, "Node"] = field(default_factory=dict)
    gen: int = 0                      # store generation of its last change


@dataclass
class Transaction:
    """An open transaction: a private tree, what it touched, what to replay at commit."""

    domid: int
    root: Node                        # a private copy of the tree
    start_gen: int
    touched: set[str] = field(default_factory=set)     # paths read or written
    ops: list[tuple] = field(default_factory=list)      # changes, replayed at commit


def _can(perms: list[Perm], domid: int, want: str) -> bool:
    if domid == DOM0 or perms[0].domid == domid:
        return True
    access = perms[0].access
    for p in perms[1:]:
        if p.domid == domid:
            access = p.access
            break
    return access == "b" or access == want


class Store:
    """One xenstore: the tree, the open transactions, and the watch list."""

    def __init__(self):
        self.root = Node(perms=[Perm(DOM0, "n")])
        self.gen = 1
        self.transactions: dict[int, Transaction] = {}
        self._next_tx = 1
        self.watches: list[tuple[int, str, str]] = []      # (domid, path, token)
        self.fired: list[tuple[int, str, str]] = []        # watch events waiting for delivery
        self.nodes_by_owner: dict[int, int] = {}

    # -- paths ----------------------------------------------------------------------
    @staticmethod
    def canonical(domid: int, path: str) -> str:
        """Absolute form of ``path`` for ``domid``; EINVAL for a malformed one."""
        if not path:
            raise XsError("EINVAL", "empty path")
        if path.startswith("@"):
            if path not in ("@introduceDomain", "@releaseDomain"):
                raise XsError("EINVAL", f"special path {path!r}")
            return path
        limit = MAX_ABS_PATH if path.startswith("/") else MAX_REL_PATH
        if len(path) > limit:
            raise XsError("EINVAL", f"path of {len(path)} bytes")
        if not path.startswith("/"):
            path = f"/local/domain/{domid}/{path}"
        if not _VALID.match(path) or "//" in path or (path.endswith("/") and path != "/") or "@" in path:
            raise XsError("EINVAL", f"path {path!r}")
        return path

    @staticmethod
    def _parts(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def _root(self, tx: int) -> Node:
        if tx == 0:
            return self.root
        t = self.transactions.get(tx)
        if t is None:
            raise XsError("ENOENT", f"transaction {tx}")
        return t.root

    def _lookup(self, root: Node, path: str) -> Node | None:
        node = root
        for part in self._parts(path):
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def _log(self, tx: int, *op) -> None:
        if tx:
            self.transactions[tx].ops.append(op)

    def _touch(self, tx: int, path: str) -> None:
        if tx:
            self.transactions[tx].touched.add(path)

    # -- operations -------------------------------------------------------------------
    def _readable(self, domid: int, path: str, tx: int) -> Node:
        path = self.canonical(domid, path)
        node = self._lookup(self._root(tx), path)
        self._touch(tx, path)
        if node is None:
            raise XsError("ENOENT", path)
        if not _can(node.perms, domid, "r"):
            raise XsError("EACCES", path)
        return node

    def read(self, domid: int, path: str, tx: int = 0) -> bytes:
        return self._readable(domid, path, tx).value

    def directory(self, domid: int, path: str, tx: int = 0) -> list[str]:
        return list(self._readable(domid, path, tx).children)

    def generation(self, domid: int, path: str, tx: int = 0) -> int:
        node = self._lookup(self._root(tx), self.canonical(domid, path))
        return node.gen if node is not None else 0

    def get_perms(self, domid: int, path: str, tx: int = 0) -> list[Perm]:
        return list(self._readable(domid, path, tx).perms)

    def _create(self, root: Node, domid: int, path: str) -> tuple[Node, int]:
        """Find or create ``path`` (and missing parents); return it and how many were made."""
        node, made = root, 0
        parts = self._parts(path)
        for i, part in enumerate(parts):
            nxt = node.children.get(part)
            if nxt is None:
                if not _can(node.perms, domid, "w"):
                    raise XsError("EACCES", "/" + "/".join(parts[:i + 1]))
                # the parent's permissions; an unprivileged creator owns the new node
                owner = node.perms[0].domid if domid == DOM0 else domid
                inherit = [Perm(owner, node.perms[0].access)] + [copy.copy(p) for p in node.perms[1:]]
                nxt = Node(perms=inherit)
                node.children[part] = nxt
                made += 1
            node = nxt
        return node, made

    def _quota_nodes(self, domid: int, new: int) -> None:
        if domid != DOM0 and self.nodes_by_owner.get(domid, 0) + new > QUOTA_NODES:
            raise XsError("ENOSPC", f"domain {domid} would own more than {QUOTA_NODES} nodes")

    def _count(self) -> None:
        """Recount the nodes each domain owns (for the node quota)."""
        self.nodes_by_owner.clear()

        def walk(n: Node) -> None:
            owner = n.perms[0].domid
            self.nodes_by_owner[owner] = self.nodes_by_owner.get(owner, 0) + 1
            for c in n.children.values():
                walk(c)
        walk(self.root)

    def write(self, domid: int, path: str, value: bytes, tx: int = 0) -> None:
        path = self.canonical(domid, path)
        if path.startswith("@") or path == "/":
            raise XsError("EINVAL", path)
        if len(value) > QUOTA_VALUE and domid != DOM0:
            raise XsError("ENOSPC", f"value of {len(value)} bytes")
        self._change(domid, path, tx, lambda node: setattr(node, "value", value))
        self._log(tx, "write", path, value)

    def mkdir(self, domid: int, path: str, tx: int = 0) -> None:
        path = self.canonical(domid, path)
        if path.startswith("@"):
            raise XsError("EINVAL", path)
        if self._lookup(self._root(tx), path) is not None:
            return                                            # exists: mkdir succeeds, nothing fires
        self._change(domid, path, tx, lambda node: None)
        self._log(tx, "mkdir", path)

    def _change(self, domid: int, path: str, tx: int, apply) -> None:
        root = self._root(tx)
        # Every check first, on the deepest node that exists (the node
        # itself, or the parent its missing branch would hang from), so
        # that a refusal leaves the store as it was.
        parts = self._parts(path)
        node, depth = root, 0
        for part in parts:
            child = node.children.get(part)
            if child is None:
                break
            node, depth = child, depth + 1
        missing = len(parts) - depth
        if not missing and not _can(node.perms, domid, "w"):
            raise XsError("EACCES", path)
        self._quota_nodes(domid, missing)
        if missing and not _can(node.perms, domid, "w"):
            raise XsError("EACCES", path)
        node, made = self._create(root, domid, path)
        apply(node)
        self.gen += 1
        node.gen = self.gen
        self._touch(tx, path)
        if tx == 0:
            if made:
                self._count()
            self._fire(path)

    def rm(self, domid: int, path: str, tx: int = 0) -> None:
        path = self.canonical(domid, path)
        if path == "/" or path.startswith("@"):
            raise XsError("EINVAL", path)
        root = self._root(tx)
        parts = self._parts(path)
        parent = self._lookup(root, "/" + "/".join(parts[:-1]))
        node = parent.children.get(parts[-1]) if parent is not None else None
        if node is None:
            if parent is None:
                raise XsError("ENOENT", path)
            return                                            # xenstored: removing a missing leaf is OK
        if not _can(parent.perms, domid, "w") or not _can(node.perms, domid, "w"):
            raise XsError("EACCES", path)
        removed = self._paths_below(node, path)
        del parent.children[parts[-1]]
        self.gen += 1
        parent.gen = self.gen
        self._touch(tx, path)
        self._log(tx, "rm", path)
        if tx == 0:
            self._count()
            for p in removed:
                self._fire(p, exact_only=p != path)

    def _paths_below(self, node: Node, path: str) -> list[str]:
        out = [path]
        for name, child in node.children.items():
            out += self._paths_below(child, f"{path}/{name}")
        return out

    def set_perms(self, domid: int, path: str, perms: list[Perm], tx: int = 0) -> None:
        path = self.canonical(domid, path)
        if not perms:
            raise XsError("EINVAL", "no permissions")
        root = self._root(tx)
        node = self._lookup(root, path)
        if node is None:
            raise XsError("ENOENT", path)
        if domid != DOM0 and node.perms[0].domid != domid:
            raise XsError("EACCES", path)           # only the owner (or dom0) changes permissions
        if domid != DOM0 and perms[0].domid != node.perms[0].domid:
            raise XsError("EPERM", "only dom0 gives a node away")
        node.perms = list(perms)
        self.gen += 1
        node.gen = self.gen
        self._touch(tx, path)
        self._log(tx, "set_perms", path, list(perms))
        if tx == 0:
            self._count()
            self._fire(path)

    # -- transactions -------------------------------------------------------------------
    def transaction_start(self, domid: int) -> int:
        mine = sum(1 for t in self.transactions.values() if t.domid == domid)
        if domid != DOM0 and mine >= QUOTA_TRANSACTIONS:
            raise XsError("ENOSPC", f"{mine} transactions open")
        tx = self._next_tx
        self._next_tx += 1
        self.transactions[tx] = Transaction(domid, copy.deepcopy(self.root), self.gen)
        return tx

    def transaction_end(self, domid: int, tx: int, commit: bool) -> None:
        t = self.transactions.get(tx)
        if t is None or t.domid != domid:
            raise XsError("ENOENT", f"transaction {tx}")
        del self.transactions[tx]
        if not commit:
            return
        for path in t.touched:                        # changed by someone else meanwhile?
            for p in self._ancestors_and_self(path):
                node = self._lookup(self.root, p)
                if node is not None and node.gen > t.start_gen:
                    raise XsError("EAGAIN", f"{p} changed during the transaction")
        for op, *args in t.ops:                       # nothing did: apply the changes for real
            getattr(self, op)(t.domid, *args)

    def _ancestors_and_self(self, path: str) -> list[str]:
        parts = self._parts(path)
        return ["/" + "/".join(parts[:i]) for i in range(len(parts) + 1)]

    # -- watches ---------------------------------------------------------------------------
    def watch(self, domid: int, path: str, token: str) -> None:
        path = self.canonical(domid, path)
        mine = [w for w in self.watches if w[0] == domid]
        if any(w[1] == path and w[2] == token for w in mine):
            raise XsError("EEXIST", f"watch {path} {token}")
        if domid != DOM0 and len(mine) >= QUOTA_WATCHES:
            raise XsError("E2BIG", f"{len(mine)} watches")
        self.watches.append((domid, path, token))
        self.fired.append((domid, path, token))          # a new watch fires once at once

    def unwatch(self, domid: int, path: str, token: str) -> None:
        path = self.canonical(domid, path)
        try:
            self.watches.remove((domid, path, token))
        except ValueError:
            raise XsError("ENOENT", f"watch {path} {token}") from None

    def reset_watches(self, domid: int) -> None:
        self.watches = [w for w in self.watches if w[0] != domid]
        self.fired = [f for f in self.fired if f[0] != domid]

    def _fire(self, path: str, exact_only: bool = False) -> None:
        for domid, wpath, token in self.watches:
            hit = path == wpath if exact_only else (path == wpath or path.startswith(wpath.rstrip("/") + "/"))
            if hit and self._visible(domid, path):
                self.fired.append((domid, path, token))

    def _visible(self, domid: int, path: str) -> bool:
        node = self._lookup(self.root, path)
        return node is None or _can(node.perms, domid, "r")

    def take_events(self, domid: int) -> list[tuple[str, str]]:
        """Watch events waiting for ``domid``, oldest first."""
        out = [(p, t) for d, p, t in self.fired if d == domid]
        self.fired = [f for f in self.fired if f[0] != domid]
        return out

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("xenstore-tree", 1)

    def save_record(self) -> dict:
        """The tree (values, permissions, generations), open transactions with their private trees
        and pending changes, watches, and watch events not yet delivered."""
        return make_record(*self.RECORD, {
            "root": _node_out(self.root), "gen": self.gen, "next_tx": self._next_tx,
            "transactions": [[tx, {"domid": t.domid, "root": _node_out(t.root), "start_gen": t.start_gen,
                                   "touched": sorted(t.touched), "ops": [_op_out(o) for o in t.ops]}]
                             for tx, t in self.transactions.items()],
            "watches": [list(w) for w in self.watches], "fired": [list(f) for f in self.fired]})

    def check_record(self, record: dict):
        """Parse a saved store completely: node names and permissions as xenstored accepts them,
        generations not after the store's, transaction ids already handed out."""
        st = open_record(record, *self.RECORD)
        gen, next_tx = uint(st, "gen", 63), uint(st, "next_tx", 32)
        root = _node_in(record_field(st, "root"), gen)
        txs = {}
        for item in listing(st, "transactions", 1 << 12):
            if not isinstance(item, list) or len(item) != 2 or not 0 < integer(item[0], "transaction", 1) < next_tx:
                raise RecordError(f"transaction {item!r:.40}")
            t = item[1]
            txs[item[0]] = Transaction(uint(t, "domid", 16), _node_in(record_field(t, "root"), gen),
                                       integer(record_field(t, "start_gen"), "transaction start", 0, gen),
                                       {_path(p) for p in listing(t, "touched")},
                                       [_op_in(o) for o in listing(t, "ops")])
        return (root, gen, next_tx, txs, [_watch(w) for w in listing(st, "watches")],
                [_watch(f) for f in listing(st, "fired")])

    def apply_record(self, prepared) -> None:
        """Install a checked store (nodes per owner are recounted from the tree)."""
        root, gen, next_tx, txs, watches, fired = prepared
        self.root, self.gen, self._next_tx = copy.deepcopy(root), gen, next_tx
        self.transactions = copy.deepcopy(txs)
        self.watches, self.fired = list(watches), list(fired)
        self._count()


# A snapshot's JSON form of nodes and transaction changes. Values: a guest's are
# at most QUOTA_VALUE, dom0 (the host side) writes through Python unchecked.
MAX_VALUE = 1 << 20

def _node_out(node: Node) -> dict:
    return {"v": node.value.hex(), "p": [[p.domid, p.access] for p in node.perms], "g": node.gen,
            "c": [[name, _node_out(child)] for name, child in node.children.items()]}


def _path(value) -> str:
    if not isinstance(value, str) or len(value) > MAX_ABS_PATH:
        raise RecordError("xenstore path is not a string of at most 3072 characters")
    return value


def _perms(data) -> list[Perm]:
    if not isinstance(data, list) or not data or len(data) > 256:
        raise RecordError("xenstore permissions are not a list of 1-256 entries")
    perms = []
    for item in data:
        if not isinstance(item, list) or len(item) != 2 or item[1] not in ("n", "r", "w", "b"):
            raise RecordError("xenstore node with invalid permissions")
        perms.append(Perm(integer(item[0], "xenstore permission domain", 0, 0xFFFF), item[1]))
    return perms


def _node_in(data, gen: int) -> Node:
    node = Node(hexbytes(data, "v", most=MAX_VALUE), _perms(record_field(data, "p")), {},
                integer(record_field(data, "g"), "xenstore node generation", 0, gen))
    for item in listing(data, "c", 1 << 16):
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str) \
                or not _VALID.match(item[0]) or "/" in item[0] or item[0] in node.children:
            raise RecordError(f"xenstore node name {item!r:.60}")
        node.children[item[0]] = _node_in(item[1], gen)
    return node


def _watch(data) -> tuple[int, str, str]:
    if not isinstance(data, list) or len(data) != 3 or not isinstance(data[2], str) or len(data[2]) > 4096:
        raise RecordError("xenstore watch is not [domid, path, token]")
    return integer(data[0], "watch domain", 0, 0xFFFF), _path(data[1]), data[2]


def _op_out(op: tuple) -> list:
    kind, path, *rest = op
    if kind == "write":
        return [kind, path, rest[0].hex()]
    if kind == "set_perms":
        return [kind, path, [[p.domid, p.access] for p in rest[0]]]
    return [kind, path]


def _op_in(data) -> tuple:
    if not isinstance(data, list) or len(data) not in (2, 3) or data[0] not in ("write", "set_perms", "mkdir", "rm") \
            or (len(data) == 3) != (data[0] in ("write", "set_perms")):
        raise RecordError(f"xenstore transaction op {data!r:.60}")
    kind, path = data[0], _path(data[1])
    if kind == "write":
        return (kind, path, hexbytes({"value": data[2]}, "value", most=MAX_VALUE))
    if kind == "set_perms":
        return (kind, path, _perms(data[2]))
    return (kind, path)
