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

Each component saves and parses its own part, next to its state
(``EventChannels.save_state``/``prepare_state``, and so on for the
callback, physdev, grant table, xenstore store and ring server, PV
console); this module adds the domain's :class:`XenState` and the timers.
Loading is two-phase (:func:`prepare`): every field is parsed and checked
first, and only the returned ``apply()`` touches the hypervisor, so a bad
snapshot never leaves the Xen layer half loaded.
"""
from __future__ import annotations

from ..machine.clock import timer_ref
from .platform import VcpuState
from .sched import poll_expired, watchdog_bite


def _vcpu_out(vs: VcpuState) -> dict:
    return {"vcpu_info_gpa": vs.vcpu_info_gpa, "runstate_area": vs.runstate_area, "time_area": vs.time_area,
            "periodic_ns": vs.periodic_ns, "singleshot_ns": vs.singleshot_ns, "poll_done": vs.poll_done,
            "timer_events": vs.timer_events,
            "timers": {name: timer_ref(t) for name, t in vs.timers.items() if timer_ref(t) is not None}}


def save(xen) -> dict:
    """Everything the hypervisor keeps outside guest RAM (see the module table)."""
    st, clock = xen.state, xen.machine.clock
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
        "evtchn": xen.evtchn.save_state(),
        "callback": xen.callback.save_state(),
        "physdev": xen.physdev.save_state(),
        "gnttab": xen.gnttab.save_state(),
        "store": xen.store.save_state(),
        "xenstore": xen.xenstore.save_state(),
        "pvconsole": xen.pvconsole.save_state(),
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
    components = [xen.evtchn.prepare_state(data["evtchn"]), xen.callback.prepare_state(data["callback"]),
                  xen.physdev.prepare_state(data["physdev"]), xen.gnttab.prepare_state(data["gnttab"]),
                  xen.store.prepare_state(data["store"]), xen.xenstore.prepare_state(data["xenstore"]),
                  xen.pvconsole.prepare_state(data["pvconsole"])]
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
        for apply_component in components:
            apply_component()
        xen.restart_time()
    return apply


def _vcpu_timer(xen, index: int, name: str):
    """The callback ``set_singleshot``/``set_periodic`` would have armed."""
    vs = xen.vcpu_state(index)
    if name == "singleshot":
        return xen.singleshot_expiry(index)
    if name == "periodic":
        def tick():
            xen.timer_fired(index)
            xen._arm(index, "periodic", xen.machine.clock.now_ns() + vs.periodic_ns, tick)
        return tick
    raise ValueError(f"vCPU timer {name!r}")
