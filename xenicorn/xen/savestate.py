"""The Xen layer's part of a machine snapshot: what the hypervisor remembers.

Most of what a Xen guest shares with its hypervisor lives in *guest RAM*
(shared_info, vcpu_info, the grant table frames, the xenstore and console
rings) and travels with the RAM section. What lives only in the hypervisor,
and is saved here, is the bookkeeping that gives those pages meaning. Each
component saves and checks its own record (:mod:`xenicorn.records`):

=================  ======================  ====================================
record             component               why it must be saved
=================  ======================  ====================================
``xen``            :class:`DomainRecord`   where shared_info and each vcpu_info
                   (this module)           are (without them an event has
                                           nowhere to go), the hypercall page,
                                           HVM params (the callback via among
                                           them), grant frame placement, the
                                           reservation, watchdogs, and every
                                           armed vCPU timer, SCHEDOP_poll
                                           timeout and watchdog timer
``xen.evtchn``     ``EventChannels``       the port table: which port is a
                                           VIRQ, an IPI, a PIRQ, or the guest's
                                           end of a dom0 channel; with the FIFO
                                           ABI, the control block and event-
                                           array frames, each port's priority
                                           and last queue, each queue's tail,
                                           events held for a missing page
``xen.callback``   ``Callback``            the upcall via, the *level* of the
                                           callback line (high while vCPU0's
                                           upcall_pending is 1), a vector
                                           waiting for IF=1, the deassert poll
``xen.physdev``    ``Physdev``             GSI <-> PIRQ mappings and the last
                                           level of each GSI
``xen.gnttab``     ``GrantTable``          version, table size, v2 status frame
                                           gfns and dom0's live mappings
``xen.store``      ``Store``               the whole tree (values, permissions,
                                           generations), open transactions with
                                           their private trees, watches and
                                           events not yet delivered
``xen.xenstore``   ``XenstoreServer``      the ring server's half-read request
                                           and unsent reply bytes
``xen.pvconsole``  ``PvConsole``           input not yet fitted into the ring
``xen.console``    ``GuestConsoleLog``     the ``console_io`` line Xen holds until
                                           its newline
=================  ======================  ====================================

The domain record comes first among them and the others' ``apply_record``
need nothing from it; :meth:`DomainRecord.apply_record` re-arms the timers
with the callbacks their hypercalls would have armed.
"""
from __future__ import annotations

import re

from ..records import (RecordError, counters, field, flag, hexbytes, integer, listing, make_record, open_record,
                       optional, timer_refs, timers, uint)
from .hvm import HVM_NR_PARAMS
from .platform import VcpuState
from .sched import MAX_POLL_PORTS, poll_expired, watchdog_bite
from .shared_info import VCPU_INFO_SIZE

PAGE = 4096
_TIMER = re.compile(r"vcpu(\d+)-(singleshot|periodic|poll)|watchdog(\d+)")


def components(xen) -> list[tuple[str, object]]:
    """The Xen layer's records, in the order a load applies them."""
    return [("xen", DomainRecord(xen)), ("xen.evtchn", xen.evtchn), ("xen.callback", xen.callback),
            ("xen.physdev", xen.physdev), ("xen.gnttab", xen.gnttab), ("xen.store", xen.store),
            ("xen.xenstore", xen.xenstore), ("xen.pvconsole", xen.pvconsole), ("xen.console", xen.console_log)]


class DomainRecord:
    """The domain's :class:`~xenicorn.xen.platform.XenState` and Xen's own timers."""

    RECORD = ("xen-domain", 2)       # 2: each vCPU says whether VCPUOP_initialise gave it a state

    def __init__(self, xen):
        self.xen = xen

    def save_record(self) -> dict:
        xen, st = self.xen, self.xen.state
        clock = xen.host.clock
        armed = {f"vcpu{i}-{name}": t for i, vs in st.vcpus.items() for name, t in vs.timers.items()}
        armed.update({f"watchdog{wid}": t for wid, t in xen.watchdog_timers.items()})
        # SCHEDOP_poll's timeout is armed on the clock by name only (sched.py)
        armed.update({t.name: t for t in clock.pending() if t.name.endswith("-poll")})
        return make_record(*self.RECORD, {
            "hypercall_page": st.hypercall_page, "width": st.width, "features": sorted(st.features),
            "shared_info_gpa": st.shared_info_gpa, "grant_frames": sorted(st.grant_frames.items()),
            "params": sorted(st.params.items()), "upcall_vectors": sorted(st.upcall_vectors.items()),
            "vcpus": [[i, _vcpu_out(vs)] for i, vs in st.vcpus.items()],
            "ballooned": sorted(st.ballooned), "pages": st.pages, "watchdogs": sorted(st.watchdogs.items()),
            "shutdown_code": xen.shutdown_code, "console_input": bytes(xen.console_input).hex(),
            "unimplemented_seen": sorted(xen.unimplemented_seen), "hypercall_counts": dict(xen.hypercall_counts),
            "timers": timer_refs(clock, armed)})

    def check_record(self, record: dict) -> dict:
        """What the hypercalls that set these fields accept, and timers that belong to them.

        shared_info and each vcpu_info are in RAM (XENMAPSPACE_shared_info,
        VCPUOP_register_vcpu_info), the hypercall page too; HVM params
        below HVM_NR_PARAMS; upcall vectors 0x10-0xFF; grant frames below
        ``gnttab_max_frames``; a vCPU timer only while its period or
        deadline is set, a watchdog timer only for a running watchdog.
        """
        xen = self.xen
        st = open_record(record, *self.RECORD)
        nvcpus = len(xen.host.vcpus)
        width = field(st, "width")
        if width not in (None, 32, 64):
            raise RecordError(f"guest width {width!r}")
        out = {"width": width, "hypercall_page": self._ram(st, "hypercall_page", PAGE),
               "shared_info_gpa": self._ram(st, "shared_info_gpa", PAGE),
               "features": {integer(f, "feature", 0, 31) for f in listing(st, "features", 32)},
               "grant_frames": _pairs(st, "grant_frames", xen.config.gnttab_max_frames - 1, (1 << 40) - 1),
               "params": _pairs(st, "params", HVM_NR_PARAMS - 1, (1 << 64) - 1),
               "upcall_vectors": _pairs(st, "upcall_vectors", nvcpus - 1, 0xFF),
               "ballooned": {integer(f, "ballooned frame", 0, (1 << 40) - 1) for f in listing(st, "ballooned")},
               "pages": integer(field(st, "pages"), "reservation", 0, xen.max_pages()),
               "watchdogs": _pairs(st, "watchdogs", 0xFFFFFFFF, (1 << 63) - 1),
               "shutdown_code": optional(st, "shutdown_code", 32),
               "console_input": hexbytes(st, "console_input", most=1 << 20),
               "unimplemented_seen": _names(listing(st, "unimplemented_seen", 4096)),
               "hypercall_counts": counters(st, "hypercall_counts")}
        if any(v < 0x10 for v in out["upcall_vectors"].values()):
            raise RecordError("upcall vector below 0x10")

        vcpus = {}
        for item in listing(st, "vcpus", nvcpus):
            if not isinstance(item, list) or len(item) != 2:
                raise RecordError("vCPU entry is not [index, state]")
            i = integer(item[0], "Xen vCPU", 0, nvcpus - 1)
            v = item[1]
            info = self._ram(v, "vcpu_info_gpa", VCPU_INFO_SIZE)
            if info is not None and info % PAGE > PAGE - VCPU_INFO_SIZE:
                raise RecordError(f"vCPU {i} vcpu_info at {info:#x} crosses a page")
            vcpus[i] = VcpuState(info, optional(v, "runstate_area"), optional(v, "time_area"),
                                 uint(v, "periodic_ns", 63), optional(v, "singleshot_ns", 63),
                                 flag(v, "poll_done"), uint(v, "timer_events"), flag(v, "initialised"),
                                 _ports(v))
        armed = timers(st, _TIMER.fullmatch)
        for name in armed:
            m = _TIMER.fullmatch(name)
            if m[3] is not None:
                ok = int(m[3]) in out["watchdogs"]
            else:
                vs = vcpus.get(int(m[1]))
                ok = vs is not None and {"singleshot": vs.singleshot_ns is not None,
                                         "periodic": vs.periodic_ns > 0, "poll": True}[m[2]]
            if not ok:
                raise RecordError(f"timer {name} armed for nothing Xen has")
        out["vcpus"], out["timers"] = vcpus, armed
        return out

    def _ram(self, st: dict, key: str, size: int) -> int | None:
        """Field ``key``: null or a guest-physical range of ``size`` bytes in RAM."""
        gpa = optional(st, key, 52)
        regions = self.xen.host.memory.ram_regions
        if gpa is not None and not any(base <= gpa and gpa + size <= base + n for base, n, _ in regions):
            raise RecordError(f"{key} {gpa:#x} is not in RAM")
        return gpa

    def apply_record(self, p: dict) -> None:
        """Install the domain's state and re-arm every Xen timer with its callback (after the clock)."""
        xen = self.xen
        st, clock = xen.state, xen.host.clock
        st.hypercall_page, st.width, st.shared_info_gpa = p["hypercall_page"], p["width"], p["shared_info_gpa"]
        st.features, st.ballooned = set(p["features"]), set(p["ballooned"])
        st.grant_frames, st.params = dict(p["grant_frames"]), dict(p["params"])
        st.upcall_vectors, st.watchdogs = dict(p["upcall_vectors"]), dict(p["watchdogs"])
        st.pages = p["pages"]
        st.vcpus = {i: VcpuState(vs.vcpu_info_gpa, vs.runstate_area, vs.time_area, vs.periodic_ns,
                                 vs.singleshot_ns, vs.poll_done, vs.timer_events, vs.initialised,
                                 vs.poll_ports)
                     for i, vs in p["vcpus"].items()}
        for t in xen.watchdog_timers.values():
            clock.cancel(t)
        xen.watchdog_timers = {}
        for name, ref in sorted(p["timers"].items()):
            m = _TIMER.fullmatch(name)
            if m[3] is not None:
                wid = int(m[3])
                xen.watchdog_timers[wid] = clock.rearm(ref, watchdog_bite(xen, wid), name)
            elif m[2] == "poll":
                vs = xen.vcpu_state(int(m[1]))
                vs.timers["poll"] = clock.rearm(ref, poll_expired(vs), name)
            else:
                index = int(m[1])
                xen.vcpu_state(index).timers[m[2]] = clock.rearm(ref, _vcpu_timer(xen, index, m[2]), name)
        xen.shutdown_code = p["shutdown_code"]
        xen.console_input = bytearray(p["console_input"])
        xen.unimplemented_seen = set(p["unimplemented_seen"])
        xen.hypercall_counts = dict(p["hypercall_counts"])
        xen.restart_time()


def _vcpu_out(vs: VcpuState) -> dict:
    return {"vcpu_info_gpa": vs.vcpu_info_gpa, "runstate_area": vs.runstate_area, "time_area": vs.time_area,
            "periodic_ns": vs.periodic_ns, "singleshot_ns": vs.singleshot_ns, "poll_done": vs.poll_done,
            "timer_events": vs.timer_events, "initialised": vs.initialised, "poll_ports": list(vs.poll_ports)}


def _ports(v: dict) -> tuple[int, ...]:
    """A vCPU's ``poll_ports``: at most 128 ports of the 2-level ABI (absent in older records: none)."""
    ports = v.get("poll_ports", [])
    if not isinstance(ports, list) or len(ports) > MAX_POLL_PORTS or \
            not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 4096 for p in ports):
        raise RecordError("poll_ports is not a list of at most 128 event-channel ports")
    return tuple(ports)


def _names(items: list) -> set[str]:
    if not all(isinstance(s, str) and len(s) <= 256 for s in items):
        raise RecordError("unimplemented_seen is not a list of names")
    return set(items)


def _pairs(st: dict, key: str, most_key: int, most_value: int) -> dict[int, int]:
    """Field ``key``: ``[[k, v], ...]`` with distinct ``0 <= k <= most_key``, ``0 <= v <= most_value``."""
    out = {}
    for item in listing(st, key, 1 << 16):
        if not isinstance(item, list) or len(item) != 2:
            raise RecordError(f"{key} entry is not a pair")
        k = integer(item[0], f"{key} key", 0, most_key)
        if k in out:
            raise RecordError(f"{key} {k} twice")
        out[k] = integer(item[1], f"{key}[{k}]", 0, most_value)
    return out


def _vcpu_timer(xen, index: int, name: str):
    """The callback ``set_singleshot``/``set_periodic`` would have armed."""
    vs = xen.vcpu_state(index)
    if name == "singleshot":
        return xen.singleshot_expiry(index)

    def tick():
        xen.timer_fired(index)
        xen._arm(index, "periodic", xen.host.clock.now_ns() + vs.periodic_ns, tick)
    return tick
