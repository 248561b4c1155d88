"""The Xen layer's part of a machine snapshot: what the hypervisor remembers.

Most of what a Xen guest shares with its hypervisor lives in *guest RAM*
(shared_info, vcpu_info, the grant table frames, the xenstore and console
rings) and travels with the RAM section. What lives only in the hypervisor,
and is saved here, is the bookkeeping that gives those pages meaning:

=================  ==========================================================
part               why it must be saved
=================  ==========================================================
``XenState``       where shared_info and each vcpu_info are (without them an
                   event has nowhere to go), the hypercall page, HVM params
                   (the callback via among them), grant frame placement,
                   the reservation, watchdog deadlines, per-vCPU timers
``evtchn``         the port table: which port is a VIRQ, an IPI, a PIRQ, or
                   the guest's end of a dom0 channel (xenstore, console)
``callback``       the upcall via, the *level* of the callback line (high
                   while vCPU0's upcall_pending is 1), a vector waiting for
                   IF=1, and whether the deassert poll is running
``physdev``        GSI <-> PIRQ mappings and the last level of each GSI
``gnttab``         table size and dom0's live mappings
``xenstore``       the whole tree (values, permissions, generations), open
                   transactions with their private trees, watches and
                   events not yet delivered, and the ring server's half-read
                   request and unsent reply bytes
``pvconsole``      input not yet fitted into the ring
``timers``         each armed single-shot/periodic vCPU timer, SCHEDOP_poll
                   timeout and watchdog, re-armed with its closure on load
=================  ==========================================================

Loading is two-phase (:func:`prepare`): every field is parsed and checked
first, and only the returned ``apply()`` touches the hypervisor, so a bad
snapshot never leaves the Xen layer half loaded.
"""
from __future__ import annotations

from ..platform.clock import timer_ref
from .evtchn import INTERDOMAIN, IPI, PIRQ, UNBOUND, VIRQ, BackendPort, Port
from .gnttab import GrantMapping
from .platform import VcpuState
from .sched import poll_expired, watchdog_bite
from .xenstore.store import Node, Perm, Transaction

PORT_TYPES = (UNBOUND, INTERDOMAIN, VIRQ, IPI, PIRQ)


# -- xenstore --------------------------------------------------------------------
def _node_out(node: Node) -> dict:
    return {"v": node.value.hex(), "p": [[p.domid, p.access] for p in node.perms], "g": node.gen,
            "c": [[name, _node_out(child)] for name, child in node.children.items()]}


def _node_in(data: dict) -> Node:
    perms = [Perm(int(d), str(a)) for d, a in data["p"]]
    if not perms or any(p.access not in ("n", "r", "w", "b") for p in perms):
        raise ValueError("xenstore node with invalid permissions")
    node = Node(bytes.fromhex(data["v"]), perms, {}, int(data["g"]))
    for name, child in data["c"]:
        node.children[str(name)] = _node_in(child)
    return node


def _op_out(op: tuple) -> list:
    kind, path, *rest = op
    if kind == "write":
        return [kind, path, rest[0].hex()]
    if kind == "set_perms":
        return [kind, path, [[p.domid, p.access] for p in rest[0]]]
    return [kind, path]


def _op_in(data: list) -> tuple:
    kind, path, *rest = data
    if kind == "write":
        return (kind, str(path), bytes.fromhex(rest[0]))
    if kind == "set_perms":
        return (kind, str(path), [Perm(int(d), str(a)) for d, a in rest[0]])
    if kind not in ("mkdir", "rm"):
        raise ValueError(f"xenstore transaction op {kind!r}")
    return (kind, str(path))


def save_store(store) -> dict:
    """The tree, generations, open transactions, watches and undelivered watch events."""
    return {"root": _node_out(store.root), "gen": store.gen, "next_tx": store._next_tx,
            "transactions": [[tx, {"domid": t.domid, "root": _node_out(t.root), "start_gen": t.start_gen,
                                   "touched": sorted(t.touched), "ops": [_op_out(o) for o in t.ops]}]
                             for tx, t in store.transactions.items()],
            "watches": [list(w) for w in store.watches], "fired": [list(f) for f in store.fired]}


def prepare_store(store, data: dict):
    root = _node_in(data["root"])
    txs = {int(tx): Transaction(int(t["domid"]), _node_in(t["root"]), int(t["start_gen"]),
                                {str(p) for p in t["touched"]}, [_op_in(o) for o in t["ops"]])
           for tx, t in data["transactions"]}
    watches = [(int(d), str(p), str(t)) for d, p, t in data["watches"]]
    fired = [(int(d), str(p), str(t)) for d, p, t in data["fired"]]
    gen, next_tx = int(data["gen"]), int(data["next_tx"])

    def apply() -> None:
        store.root, store.gen, store._next_tx = root, gen, next_tx
        store.transactions, store.watches, store.fired = txs, watches, fired
        store._count()                     # nodes per owner: derived from the tree
    return apply


# -- the whole layer ---------------------------------------------------------------
def _vcpu_out(vs: VcpuState) -> dict:
    return {"vcpu_info_gpa": vs.vcpu_info_gpa, "runstate_area": vs.runstate_area, "time_area": vs.time_area,
            "periodic_ns": vs.periodic_ns, "singleshot_ns": vs.singleshot_ns, "poll_done": vs.poll_done,
            "timer_events": vs.timer_events,
            "timers": {name: timer_ref(t) for name, t in vs.timers.items() if timer_ref(t) is not None}}


def save(xen) -> dict:
    """Everything the hypervisor keeps outside guest RAM (see the module table)."""
    st, ev, cb, xs, clock = xen.state, xen.evtchn, xen.callback, xen.xenstore, xen.machine.clock
    polls = [[t.name, [t.deadline_ns, t.seq]] for t in clock.pending() if t.name.endswith("-poll")]
    return {
        "state": {"hypercall_page": st.hypercall_page, "width": st.width, "features": sorted(st.features),
                  "shared_info_gpa": st.shared_info_gpa, "grant_frames": sorted(st.grant_frames.items()),
                  "params": sorted(st.params.items()), "upcall_vectors": sorted(st.upcall_vectors.items()),
                  "vcpus": [[i, _vcpu_out(vs)] for i, vs in st.vcpus.items()],
                  "ballooned": sorted(st.ballooned), "pages": st.pages,
                  "watchdogs": sorted(st.watchdogs.items())},
        "shutdown_code": xen.shutdown_code,
        "console_input": bytes(xen.console_input).hex(),
        "unimplemented_seen": sorted(xen.unimplemented_seen),
        "hypercall_counts": dict(xen.hypercall_counts),
        "watchdog_timers": [[wid, timer_ref(t)] for wid, t in xen.watchdog_timers.items()],
        "poll_timers": polls,
        "evtchn": {"ports": [[n, vars(p)] for n, p in ev.ports.items()],
                   "virqs": [[v, q, port] for (v, q), port in ev.virqs.items()],
                   "pirqs": sorted(ev.pirqs.items()),
                   "backends": [[n, b.guest_port, b.received] for n, b in ev.backends.items()],
                   "next_backend": ev._next_backend, "sends": ev.sends, "upcalls": ev.upcalls},
        "callback": {"via": cb.via, "kind": cb.kind, "gsi": cb.gsi, "intx": cb.intx, "vector": cb.vector,
                     "level": cb.level, "direct": sorted(cb.direct.items()),
                     "poll": cb.poll_wanted or cb.polling, "stats": dict(cb.stats)},
        "physdev": {"mapped": sorted(xen.physdev.mapped.items()), "levels": list(xen.physdev.levels)},
        "gnttab": {"nr_frames": xen.gnttab.nr_frames,
                   "mappings": [[m.ref, m.gpa, m.writable] for ms in xen.gnttab.mappings.values() for m in ms]},
        "store": save_store(xen.store),
        "xenstore": {"in": bytes(xs._in).hex(), "out": bytes(xs._out).hex(),
                     "relative_watches": sorted(list(w) for w in xs.relative_watches),
                     "broken": xs.broken, "requests": xs.requests},
        "pvconsole": {"received": xen.pvconsole.received, "broken": xen.pvconsole.broken,
                      "pending": bytes(xen.pvconsole.pending).hex()},
    }


def _pairs(items) -> dict[int, int]:
    return {int(k): int(v) for k, v in items}


def prepare(xen, data: dict):
    """Check a saved Xen layer completely; return ``apply()`` that installs it."""
    m = xen.machine
    s = data["state"]
    vcpus = {}
    for i, v in s["vcpus"]:
        vs = VcpuState(v["vcpu_info_gpa"], v["runstate_area"], v["time_area"], int(v["periodic_ns"]),
                       v["singleshot_ns"], bool(v["poll_done"]), int(v["timer_events"]))
        if any(name not in ("singleshot", "periodic") for name in v["timers"]):
            raise ValueError(f"vCPU {i} timers {sorted(v['timers'])}")
        vcpus[int(i)] = (vs, dict(v["timers"]))
    ports = {}
    for n, p in data["evtchn"]["ports"]:
        port = Port(**{k: (str(v) if k == "type" else int(v)) for k, v in p.items()})
        if port.type not in PORT_TYPES or not 0 < int(n) < 4096:
            raise ValueError(f"event channel port {n} of type {port.type!r}")
        ports[int(n)] = port
    ev = data["evtchn"]
    virqs = {(int(v), int(q)): int(port) for v, q, port in ev["virqs"]}
    pirqs = _pairs(ev["pirqs"])
    if any(p not in ports for p in list(virqs.values()) + list(pirqs.values())):
        raise ValueError("a VIRQ or PIRQ is bound to a closed port")
    backends = [(int(n), int(g), int(r)) for n, g, r in ev["backends"]]
    cb = data["callback"]
    if cb["kind"] not in ("none", "gsi", "intx", "vector") or (cb["kind"] == "gsi" and not 0 < cb["gsi"] < len(m.gsi)):
        raise ValueError(f"callback via {cb['kind']!r}")
    mapped = _pairs(data["physdev"]["mapped"])
    levels = [bool(x) for x in data["physdev"]["levels"]]
    if len(levels) != len(xen.physdev.levels):
        raise ValueError("physdev GSI levels")
    mappings = [GrantMapping(int(r), int(g), bool(w)) for r, g, w in data["gnttab"]["mappings"]]
    store_apply = prepare_store(xen.store, data["store"])
    xs, con = data["xenstore"], data["pvconsole"]
    xs_in, xs_out, con_pending = bytes.fromhex(xs["in"]), bytes.fromhex(xs["out"]), bytes.fromhex(con["pending"])
    rel = {(str(p), str(t)) for p, t in xs["relative_watches"]}
    dogs = _pairs(s["watchdogs"])
    dog_timers = [(int(w), ref) for w, ref in data["watchdog_timers"]]
    polls = [(str(name), ref) for name, ref in data["poll_timers"]]
    for name, _ in polls:
        if int(name[4:].split("-")[0]) not in vcpus:
            raise ValueError(f"timer {name} of a vCPU Xen does not know")
    console_input = bytes.fromhex(data["console_input"])

    def apply() -> None:
        st, clock = xen.state, m.clock
        st.hypercall_page, st.width = s["hypercall_page"], s["width"]
        st.features = {int(f) for f in s["features"]}
        st.shared_info_gpa = s["shared_info_gpa"]
        st.grant_frames = _pairs(s["grant_frames"])
        st.params = _pairs(s["params"])
        st.upcall_vectors = _pairs(s["upcall_vectors"])
        st.ballooned = {int(f) for f in s["ballooned"]}
        st.pages = int(s["pages"])
        st.watchdogs = dogs
        st.vcpus = {}
        for index, (vs, timers) in vcpus.items():
            st.vcpus[index] = vs
            for name, ref in timers.items():
                if ref is not None:
                    vs.timers[name] = clock.rearm(ref, _vcpu_timer(xen, index, name), f"vcpu{index}-{name}")
        for name, ref in polls:
            clock.rearm(ref, poll_expired(xen.vcpu_state(int(name[4:].split("-")[0]))), name)
        xen.watchdog_timers = {wid: clock.rearm(ref, watchdog_bite(xen, wid), f"watchdog{wid}")
                               for wid, ref in dog_timers if ref is not None}
        xen.shutdown_code = data["shutdown_code"]
        xen.console_input = bytearray(console_input)
        xen.unimplemented_seen = set(data["unimplemented_seen"])
        xen.hypercall_counts = dict(data["hypercall_counts"])
        # event channels; dom0's ends created by the machine keep their callbacks
        e = xen.evtchn
        e.ports, e.virqs, e.pirqs = ports, virqs, pirqs
        old = e.backends
        e.backends = {}
        for n, guest_port, received in backends:
            be = old.get(n) or BackendPort(e, n, None)
            be.guest_port, be.received = guest_port, received
            e.backends[n] = be
        e._next_backend, e.sends, e.upcalls = int(ev["next_backend"]), int(ev["sends"]), int(ev["upcalls"])
        # the callback: its via and line sources (levels are restored with the lines)
        c = xen.callback
        c.disarm_poll()
        c.via, c.kind, c.vector, c.level = int(cb["via"]), cb["kind"], int(cb["vector"]), bool(cb["level"])
        c.gsi = cb["gsi"]
        c.intx = tuple(cb["intx"]) if cb["intx"] is not None else None
        c._sources = []
        if c.kind == "gsi":
            c._sources = [m.gsi[c.gsi].source("xen-callback")]
            if c.gsi < 16:
                c._sources.append(m.pic_input(c.gsi, "xen-callback"))
        c.direct = _pairs(cb["direct"])
        c.poll_wanted = bool(cb["poll"])          # the run loop re-installs the block hook
        c.stats = dict(cb["stats"])
        xen.physdev.mapped = mapped
        xen.physdev.by_gsi = {gsi: pirq for pirq, gsi in mapped.items()}
        xen.physdev.levels = levels
        xen.gnttab.nr_frames = int(data["gnttab"]["nr_frames"])
        xen.gnttab.mappings = {}
        for mp in mappings:
            xen.gnttab.mappings.setdefault(mp.ref, []).append(mp)
        store_apply()
        server = xen.xenstore
        server._in, server._out = bytearray(xs_in), bytearray(xs_out)
        server.relative_watches, server.broken, server.requests = rel, bool(xs["broken"]), int(xs["requests"])
        xen.pvconsole.received, xen.pvconsole.broken = int(con["received"]), bool(con["broken"])
        xen.pvconsole.pending = bytearray(con_pending)
    return apply


def _vcpu_timer(xen, index: int, name: str):
    """The callback ``set_singleshot``/``set_periodic`` would have armed."""
    vs = xen.vcpu_state(index)
    if name == "singleshot":
        def fire():
            vs.timers.pop("singleshot", None)
            vs.singleshot_ns = None
            xen.timer_fired(index)
        return fire
    if name == "periodic":
        def tick():
            xen.timer_fired(index)
            xen._arm(index, "periodic", xen.machine.clock.now_ns() + vs.periodic_ns, tick)
        return tick
    raise ValueError(f"vCPU timer {name!r}")
