"""Event channels: Xen's interrupts for a guest, and the port table.

An event channel is a port number in the guest's domain. Something raises
an event on it (a timer, another domain, the guest itself, a physical IRQ)
and Xen records it where the guest looks, then, if the vCPU the port is
bound to had nothing pending yet, sets that vCPU's
``vcpu_info.evtchn_upcall_pending`` and makes the *upcall*: it interrupts
the vCPU by the method the guest chose (:mod:`xenicorn.xen.callback`). The
guest's handler clears ``upcall_pending`` and takes the events.

*Where* Xen records an event is the domain's ABI (Xen's
``evtchn_port_ops``), one of two:

* the **2-level ABI** (:mod:`.event_2l`, every domain starts with it):
  pending and mask bitmaps in shared_info, and a per-vCPU selector of
  bitmap words; 4096 ports for a 64-bit guest, 1024 for a 32-bit one;
* the **FIFO ABI** (:mod:`.event_fifo`), switched to by the guest's first
  ``EVTCHNOP_init_control`` and back by ``EVTCHNOP_reset``: a 32-bit event
  word per port in guest pages, and 16 priority queues per vCPU; 2^17 ports.

This module keeps what is the same for both: the table of open ports
(what each is bound to, which vCPU it notifies), the sub-ops that bind,
close, send and query, and the last step of every delivery
(:meth:`EventChannels.mark_events_pending`). Sending on a masked port
records the event; unmasking it (EVTCHNOP_unmask) delivers it then.

Port types and the sub-ops of ``event_channel_op`` (hypercall 32) follow
xen/include/public/event_channel.h; errors follow xen/common/event_channel.c
(and QEMU's hw/i386/kvm/xen_evtchn.c, which plays Xen under KVM):

====  ==================  ================================================
cmd   name                argument (all fields u32 unless said)
====  ==================  ================================================
0     bind_interdomain    { u16 remote_dom; remote_port; OUT local_port }
1     bind_virq           { virq; vcpu; OUT port }
2     bind_pirq           { pirq; flags; OUT port }
3     close               { port }
4     send                { port }
5     status              { u16 dom; port; OUT status, vcpu, union[8] }
6     alloc_unbound       { u16 dom; u16 remote_dom; OUT port }
7     bind_ipi            { vcpu; OUT port }
8     bind_vcpu           { port; vcpu }
9     unmask              { port }
10    reset               { u16 dom }
11    init_control        { u64 control_gfn; offset; vcpu; OUT u8
                          link_bits }: FIFO control block of one vCPU
12    expand_array        { u64 array_gfn }: one more FIFO event-array page
13    set_priority        { port; priority } 0 (first) - 15; FIFO only
====  ==================  ================================================

11-13 are -ENOSYS with ``--no-evtchn-fifo`` (as under QEMU, which offers
only the 2-level ABI).

xenicorn itself plays domain 0, the "backend" side: :class:`BackendPort`
is how Python code (xenstore, the PV console, tests) opens an interdomain
channel to the guest, notifies it and hears its notifications.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..records import RecordError, field, integer, listing, make_record, open_record, text, uint
from . import errno, event_fifo
from .event_2l import TwoLevel
from .event_fifo import NR_CHANNELS, Fifo
from .guest import HypercallError

EVTCHNOP_bind_interdomain, EVTCHNOP_bind_virq, EVTCHNOP_bind_pirq = 0, 1, 2
EVTCHNOP_close, EVTCHNOP_send, EVTCHNOP_status, EVTCHNOP_alloc_unbound = 3, 4, 5, 6
EVTCHNOP_bind_ipi, EVTCHNOP_bind_vcpu, EVTCHNOP_unmask, EVTCHNOP_reset = 7, 8, 9, 10
EVTCHNOP_init_control, EVTCHNOP_expand_array, EVTCHNOP_set_priority = 11, 12, 13
FIFO_OPS = (EVTCHNOP_init_control, EVTCHNOP_expand_array, EVTCHNOP_set_priority)

EVTCHNSTAT_closed, EVTCHNSTAT_unbound, EVTCHNSTAT_interdomain = 0, 1, 2
EVTCHNSTAT_pirq, EVTCHNSTAT_virq, EVTCHNSTAT_ipi = 3, 4, 5

# xen/include/public/xen.h
VIRQ_TIMER, VIRQ_DEBUG, VIRQ_CONSOLE, VIRQ_DOM_EXC = 0, 1, 2, 3
VIRQ_DEBUGGER, VIRQ_XENOPROF, VIRQ_XENPMU = 6, 7, 13
NR_VIRQS = 24
PER_VCPU_VIRQS = {VIRQ_TIMER, VIRQ_DEBUG, VIRQ_XENOPROF, VIRQ_XENPMU}   # the rest are global
VIRQ_NAMES = {0: "TIMER", 1: "DEBUG", 2: "CONSOLE", 3: "DOM_EXC", 4: "TBUF", 6: "DEBUGGER",
              7: "XENOPROF", 8: "CON_RING", 9: "PCPU_STATE", 10: "MEM_EVENT", 11: "ARGO",
              12: "ENOMEM", 13: "XENPMU"}
DOMID_SELF = 0x7FF0
BACKEND_DOMID = 0                      # xenicorn plays dom0
NR_PIRQS = 256
BIND_PIRQ__WILL_SHARE = 1

UNBOUND, INTERDOMAIN, VIRQ, IPI, PIRQ = "unbound", "interdomain", "virq", "ipi", "pirq"
STATUS = {UNBOUND: EVTCHNSTAT_unbound, INTERDOMAIN: EVTCHNSTAT_interdomain, VIRQ: EVTCHNSTAT_virq,
          IPI: EVTCHNSTAT_ipi, PIRQ: EVTCHNSTAT_pirq}


@dataclass
class Port:
    """One open port of the guest (a closed port is simply absent)."""

    type: str
    vcpu: int = 0                  # the vCPU notified
    remote_domid: int = 0          # unbound/interdomain: the other domain
    remote_port: int = 0           # interdomain: the peer (a guest port or a backend port)
    virq: int = 0
    pirq: int = 0


class BackendPort:
    """The emulator's end of an interdomain channel (xenicorn plays dom0).

    ``on_event()`` runs when the guest sends on its end; :meth:`notify`
    raises an event on the guest's end. Bind it to a port the guest
    allocated for domain 0 (``alloc_unbound``), or let the guest bind to it
    with ``bind_interdomain(remote_dom=0, remote_port=be.port)``.
    """

    def __init__(self, channels: "EventChannels", port: int, on_event: Callable[[], None] | None):
        self.channels, self.port, self.on_event = channels, port, on_event
        self.guest_port = 0                 # 0 while not connected
        self.received = 0                   # events the guest sent

    @property
    def connected(self) -> bool:
        return bool(self.guest_port)

    def bind(self, guest_port: int) -> None:
        """Connect to a guest port that is unbound for domain 0."""
        self.channels.backend_bind(self, guest_port)

    def notify(self) -> None:
        """Raise an event on the guest's end (nothing happens while unconnected)."""
        if self.connected:
            self.channels.set_pending(self.guest_port)

    def close(self) -> None:
        self.channels.backend_close(self)


class EventChannels:
    """The guest domain's port table; delivery goes through ``abi``, the 2-level or the FIFO port operations."""

    def __init__(self, xen, fifo: bool = True):
        self.xen = xen
        self.ports: dict[int, Port] = {}
        self.virqs: dict[tuple[int, int], int] = {}        # (vcpu, virq) -> port
        self.pirqs: dict[int, int] = {}                    # pirq -> port
        self.backends: dict[int, BackendPort] = {}         # backend port -> end
        self._next_backend = 1
        self.sends = 0
        self.upcalls = 0
        self.fifo_offered = fifo                           # False: ops 11-13 are -ENOSYS, as under QEMU
        self.abi: TwoLevel | Fifo = TwoLevel(self)         # the port operations in use (evtchn_port_ops)

    # -- geometry and helpers ---------------------------------------------------
    @property
    def nr_ports(self) -> int:
        """max_evtchns: 1024 or 4096 with the 2-level ABI (by guest width), 2^17 with FIFO."""
        return self.abi.nr_ports

    @property
    def fifo(self) -> bool:
        return isinstance(self.abi, Fifo)

    def trace(self, text: str) -> None:
        tr = self.xen.host.tracer
        if tr.active or tr.listeners:
            tr.emit("evtchn", text)

    def valid_vcpu(self, vcpu: int) -> bool:
        return 0 <= vcpu < len(self.xen.host.vcpus)

    def _check_self(self, dom: int) -> None:
        if dom not in (DOMID_SELF, self.xen.config.domid):
            raise HypercallError(errno.ESRCH, f"domain {dom:#x}")

    def port(self, port: int) -> Port:
        """An open port, or -EINVAL (out of range, 0, or closed), as Xen."""
        p = self.ports.get(port) if 0 < port < self.nr_ports else None
        if p is None:
            raise HypercallError(errno.EINVAL, f"port {port} is not open")
        return p

    def _alloc(self, entry: Port) -> int:
        """get_free_port: the lowest port neither open nor still on a FIFO queue (is_busy)."""
        for port in range(1, self.nr_ports):
            if port not in self.ports and not self.abi.is_busy(port):
                self.ports[port] = entry
                self.abi.init_port(port)
                return port
        raise HypercallError(errno.ENOSPC, "no free port")

    # -- delivery ------------------------------------------------------------------
    def set_pending(self, port: int) -> bool:
        """Raise an event on an open ``port``; True if it made an upcall (upcall_pending 0 -> 1)."""
        p = self.ports.get(port)
        return p is not None and self.abi.set_pending(port, p.vcpu)

    def mark_events_pending(self, vcpu: int, what: str) -> bool:
        """vcpu_mark_events_pending, both ABIs' last step: set upcall_pending and, if it was 0, upcall."""
        info = self.xen.vcpu_info(vcpu)
        if info is None:
            return False
        if info.upcall_pending:
            self.trace(f"{what} pending (vCPU {vcpu} upcall already pending)")
            return False
        info.upcall_pending = 1
        self.upcalls += 1
        self.trace(f"{what} -> vCPU {vcpu}: upcall_pending 0 -> 1")
        self.xen.callback.upcall(vcpu)
        return True

    def unmask(self, port: int) -> None:
        """Clear the mask; an event that arrived meanwhile is delivered now."""
        self.abi.unmask(port, self.ports[port].vcpu)

    def is_pending(self, port: int) -> bool:
        return self.abi.is_pending(port)

    def is_masked(self, port: int) -> bool:
        return self.abi.is_masked(port)

    def send_virq(self, virq: int, vcpu: int = 0) -> bool:
        """Xen raises a VIRQ (e.g. VIRQ_TIMER); False if the guest bound no port to it."""
        port = self.virqs.get((vcpu if virq in PER_VCPU_VIRQS else 0, virq))
        if port is None:
            return False
        self.set_pending(port)
        return True

    # -- the hypercall ---------------------------------------------------------------
    def hypercall(self, call, cmd: int, arg: int, *_) -> int:
        op = self._OPS.get(cmd)
        if op is None or (cmd in FIFO_OPS and not self.fifo_offered):
            if cmd in FIFO_OPS:
                call.note("FIFO ABI not offered")
            else:
                self.xen.unimplemented(f"event_channel_op cmd {cmd}")
            raise HypercallError(errno.ENOSYS)
        self.xen.state.width = self.xen.state.width or call.bits
        return op(self, call, arg)

    def _op_alloc_unbound(self, call, arg: int) -> int:
        dom, remote = call.guest.read_struct(arg, "<HH")
        self._check_self(dom)
        remote = self.xen.config.domid if remote == DOMID_SELF else remote
        if remote not in (self.xen.config.domid, BACKEND_DOMID):
            raise HypercallError(errno.ESRCH, f"remote domain {remote:#x}")
        port = self._alloc(Port(UNBOUND, remote_domid=remote))
        call.guest.write_struct(arg + 4, "<I", port)
        call.note(f"port {port} unbound for domain {remote}")
        return 0

    def _op_bind_interdomain(self, call, arg: int) -> int:
        remote_dom, remote_port = call.guest.read_struct(arg, "<H2xI")
        me = self.xen.config.domid
        remote_dom = me if remote_dom == DOMID_SELF else remote_dom
        if remote_dom == me:                                # loopback within the guest
            peer = self.ports.get(remote_port) if 0 < remote_port < self.nr_ports else None
            if peer is None or peer.type != UNBOUND or peer.remote_domid != me:
                raise HypercallError(errno.EINVAL, f"port {remote_port} is not unbound for us")
            port = self._alloc(Port(INTERDOMAIN, remote_domid=me, remote_port=remote_port))
            peer.type, peer.remote_port = INTERDOMAIN, port
        elif remote_dom == BACKEND_DOMID:
            be = self.backends.get(remote_port)
            if be is None or be.connected:
                raise HypercallError(errno.EINVAL, f"backend port {remote_port} is not unbound")
            port = self._alloc(Port(INTERDOMAIN, remote_domid=BACKEND_DOMID, remote_port=remote_port))
            be.guest_port = port
        else:
            raise HypercallError(errno.ESRCH, f"domain {remote_dom:#x}")
        call.guest.write_struct(arg + 8, "<I", port)
        call.note(f"port {port} <-> domain {remote_dom} port {remote_port}")
        return 0

    def _op_bind_virq(self, call, arg: int) -> int:
        virq, vcpu = call.guest.read_struct(arg, "<II")
        if virq >= NR_VIRQS:
            raise HypercallError(errno.EINVAL, f"VIRQ {virq}")
        if virq not in PER_VCPU_VIRQS and vcpu != 0:
            raise HypercallError(errno.EINVAL, f"global VIRQ {virq} on vCPU {vcpu}")
        if not self.valid_vcpu(vcpu):
            raise HypercallError(errno.ENOENT, f"vCPU {vcpu}")
        if (vcpu, virq) in self.virqs:
            raise HypercallError(errno.EEXIST, f"VIRQ {virq} already bound on vCPU {vcpu}")
        port = self._alloc(Port(VIRQ, vcpu=vcpu, virq=virq))
        self.virqs[(vcpu, virq)] = port
        call.guest.write_struct(arg + 8, "<I", port)
        call.note(f"VIRQ_{VIRQ_NAMES.get(virq, virq)} -> port {port}")
        return 0

    def _op_bind_ipi(self, call, arg: int) -> int:
        (vcpu,) = call.guest.read_struct(arg, "<I")
        if not self.valid_vcpu(vcpu):
            raise HypercallError(errno.ENOENT, f"vCPU {vcpu}")
        port = self._alloc(Port(IPI, vcpu=vcpu))
        call.guest.write_struct(arg + 4, "<I", port)
        call.note(f"IPI to vCPU {vcpu} -> port {port}")
        return 0

    def _op_bind_pirq(self, call, arg: int) -> int:
        pirq, flags = call.guest.read_struct(arg, "<II")
        if pirq >= NR_PIRQS:
            raise HypercallError(errno.EINVAL, f"PIRQ {pirq}")
        if pirq not in self.xen.physdev.mapped:
            raise HypercallError(errno.ENOENT, f"PIRQ {pirq} is not mapped")
        if pirq in self.pirqs:
            raise HypercallError(errno.EBUSY, f"PIRQ {pirq} already bound")
        port = self._alloc(Port(PIRQ, pirq=pirq))
        self.pirqs[pirq] = port
        call.guest.write_struct(arg + 8, "<I", port)
        call.note(f"PIRQ {pirq} (GSI {self.xen.physdev.mapped[pirq]}) -> port {port}")
        self.xen.physdev.bound(pirq)
        return 0

    def _op_close(self, call, arg: int) -> int:
        (port,) = call.guest.read_struct(arg, "<I")
        self.port(port)
        self.close(port)
        call.note(f"port {port} closed")
        return 0

    def close(self, port: int) -> None:
        p = self.ports.pop(port)
        if p.type == VIRQ:
            self.virqs.pop((p.vcpu, p.virq), None)
        elif p.type == PIRQ:
            self.pirqs.pop(p.pirq, None)
            self.xen.physdev.unbound(p.pirq)
        elif p.type == INTERDOMAIN:
            if p.remote_domid == BACKEND_DOMID:
                be = self.backends.get(p.remote_port)
                if be is not None:
                    be.guest_port = 0
            else:                                           # the loopback peer goes back to unbound
                peer = self.ports.get(p.remote_port)
                if peer is not None:
                    peer.type, peer.remote_port = UNBOUND, 0
        self.abi.clear_pending(port)                        # a reused port starts clean

    def _op_send(self, call, arg: int) -> int:
        (port,) = call.guest.read_struct(arg, "<I")
        p = self.port(port)
        self.sends += 1
        if p.type == INTERDOMAIN:
            if p.remote_domid == BACKEND_DOMID:
                be = self.backends.get(p.remote_port)
                if be is not None:
                    be.received += 1
                    if be.on_event is not None:
                        be.on_event()
            else:
                self.set_pending(p.remote_port)
        elif p.type == IPI:
            self.set_pending(port)
        elif p.type == UNBOUND:
            pass                                            # Xen drops it silently
        else:
            raise HypercallError(errno.EINVAL, f"cannot send on a {p.type} port")
        return 0

    def _op_status(self, call, arg: int) -> int:
        dom, port = call.guest.read_struct(arg, "<H2xI")
        self._check_self(dom)
        if not 0 < port < self.nr_ports:
            raise HypercallError(errno.EINVAL, f"port {port}")
        p = self.ports.get(port)
        union = b"\0" * 8
        if p is None:
            status, vcpu = EVTCHNSTAT_closed, 0
        else:
            status, vcpu = STATUS[p.type], p.vcpu
            if p.type == UNBOUND:
                union = p.remote_domid.to_bytes(2, "little") + b"\0" * 6
            elif p.type == INTERDOMAIN:
                union = p.remote_domid.to_bytes(2, "little") + b"\0\0" + p.remote_port.to_bytes(4, "little")
            elif p.type == PIRQ:
                union = p.pirq.to_bytes(4, "little") + b"\0" * 4
            elif p.type == VIRQ:
                union = p.virq.to_bytes(4, "little") + b"\0" * 4
        call.guest.write(arg + 8, status.to_bytes(4, "little") + vcpu.to_bytes(4, "little") + union)
        return 0

    def _op_bind_vcpu(self, call, arg: int) -> int:
        port, vcpu = call.guest.read_struct(arg, "<II")
        p = self.port(port)
        if not self.valid_vcpu(vcpu):
            raise HypercallError(errno.ENOENT, f"vCPU {vcpu}")
        if p.type == VIRQ and p.virq in PER_VCPU_VIRQS:
            raise HypercallError(errno.EINVAL, f"VIRQ {p.virq} is per-vCPU")
        if p.type not in (UNBOUND, INTERDOMAIN, VIRQ, PIRQ):
            raise HypercallError(errno.EINVAL, f"cannot move a {p.type} port")
        p.vcpu = vcpu
        return 0

    def _op_unmask(self, call, arg: int) -> int:
        (port,) = call.guest.read_struct(arg, "<I")
        self.port(port)
        self.unmask(port)
        return 0

    def _op_reset(self, call, arg: int) -> int:
        (dom,) = call.guest.read_struct(arg, "<H")
        self._check_self(dom)
        self.reset()
        return 0

    def reset(self) -> None:
        """evtchn_reset (EVTCHNOP_reset, a kexec'ing guest): close every port, back to the 2-level ABI."""
        for port in list(self.ports):
            self.close(port)
        if self.fifo:
            self.abi = TwoLevel(self)                       # evtchn_fifo_destroy + evtchn_2l_init
            self.trace("back to the 2-level ABI")

    _OPS = {
        EVTCHNOP_bind_interdomain: _op_bind_interdomain, EVTCHNOP_bind_virq: _op_bind_virq,
        EVTCHNOP_bind_pirq: _op_bind_pirq, EVTCHNOP_close: _op_close, EVTCHNOP_send: _op_send,
        EVTCHNOP_status: _op_status, EVTCHNOP_alloc_unbound: _op_alloc_unbound,
        EVTCHNOP_bind_ipi: _op_bind_ipi, EVTCHNOP_bind_vcpu: _op_bind_vcpu,
        EVTCHNOP_unmask: _op_unmask, EVTCHNOP_reset: _op_reset,
        EVTCHNOP_init_control: event_fifo.init_control, EVTCHNOP_expand_array: event_fifo.expand_array,
        EVTCHNOP_set_priority: event_fifo.set_priority,
    }

    # -- the backend (dom0) side ---------------------------------------------------
    def backend_open(self, on_event: Callable[[], None] | None = None) -> BackendPort:
        """A new unbound backend port; the guest binds to it by its number."""
        be = BackendPort(self, self._next_backend, on_event)
        self.backends[be.port] = be
        self._next_backend += 1
        return be

    def backend_bind(self, be: BackendPort, guest_port: int) -> None:
        p = self.ports.get(guest_port)
        if p is None or p.type != UNBOUND or p.remote_domid != BACKEND_DOMID:
            raise ValueError(f"guest port {guest_port} is not unbound for domain 0")
        if be.connected:
            raise ValueError(f"backend port {be.port} is already connected")
        p.type, p.remote_port = INTERDOMAIN, be.port
        be.guest_port = guest_port

    def backend_close(self, be: BackendPort) -> None:
        if be.connected:
            p = self.ports.get(be.guest_port)
            if p is not None:
                p.type, p.remote_port = UNBOUND, 0
            be.guest_port = 0
        self.backends.pop(be.port, None)

    # -- monitor commands (named and shaped like QEMU's QMP) ---------------------------
    def event_list(self) -> list[dict]:
        """``xen-event-list``: every open port with its type, remote end and bits."""
        out = []
        for port in sorted(self.ports):
            p = self.ports[port]
            if p.type == VIRQ:
                remote, target = "", p.virq
            elif p.type == PIRQ:
                remote, target = "", p.pirq
            elif p.type == INTERDOMAIN:
                remote, target = str(p.remote_domid), p.remote_port
            elif p.type == UNBOUND:
                remote, target = str(p.remote_domid), 0
            else:
                remote, target = "", 0
            out.append({"port": port, "vcpu": p.vcpu, "type": p.type, "remote-domain": remote,
                        "target": target,
                        "pending": self.abi.is_pending(port), "masked": self.abi.is_masked(port),
                        **self.abi.describe(port)})
        return out

    def event_inject(self, port: int) -> None:
        """``xen-event-inject``: raise an event on an open port as if its source had."""
        if port not in self.ports:
            raise ValueError(f"port {port} is not open")
        self.set_pending(port)

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("xen-evtchn", 2)      # 2: "fifo", the FIFO ABI's state (None: 2-level)

    def save_record(self) -> dict:
        """The port table is hypervisor state: which port is a VIRQ, an IPI, a PIRQ, or the guest's
        end of a channel to dom0 (the pending and mask bits themselves live in shared_info, in RAM)."""
        return make_record(*self.RECORD, {
            "ports": [[n, vars(p)] for n, p in self.ports.items()],
            "virqs": [[v, q, port] for (v, q), port in self.virqs.items()],
            "pirqs": sorted(self.pirqs.items()),
            "backends": [[n, b.guest_port, b.received] for n, b in self.backends.items()],
            "next_backend": self._next_backend, "sends": self.sends, "upcalls": self.upcalls,
            "fifo": event_fifo.save_state(self.abi)})

    def check_record(self, record: dict):
        """A port table the hypercalls could have built (xen/common/event_channel.c's rules).

        Under the 2-level ABI ports 1-4095, under FIFO (its state checked
        by :func:`.event_fifo.check_state`) up to 2^17 - 1, of the five types; a port names a vCPU this domain
        has, a VIRQ below NR_VIRQS (a global one on vCPU 0), a PIRQ below
        NR_PIRQS, another end in this domain or dom0; both ends of a
        channel name each other; the VIRQ and PIRQ indexes list exactly
        the ports of those types.
        """
        st = open_record(record, *self.RECORD)
        me, nvcpus = self.xen.config.domid, len(self.xen.host.vcpus)
        fifo = event_fifo.check_state(field(st, "fifo"), self.xen)
        limit = 4096 if fifo is None else NR_CHANNELS      # max_evtchns (the guest's width is not known here)
        ports: dict[int, Port] = {}
        for item in listing(st, "ports", limit):
            n, p = _pair(item, "port")
            n = integer(n, "port", 1, limit - 1)
            port = Port(text(p, "type", 16), integer(field(p, "vcpu"), f"port {n} vCPU", 0, nvcpus - 1),
                        uint(p, "remote_domid", 16), uint(p, "remote_port", 32), uint(p, "virq", 32),
                        uint(p, "pirq", 32))
            if port.type not in STATUS or n in ports or (port.type == VIRQ and not (
                    port.virq < NR_VIRQS and (port.virq in PER_VCPU_VIRQS or port.vcpu == 0))) \
                    or (port.type == PIRQ and port.pirq >= NR_PIRQS) \
                    or (port.type in (UNBOUND, INTERDOMAIN) and port.remote_domid not in (me, BACKEND_DOMID)):
                raise RecordError(f"event channel port {n} ({port.type} {vars(port)}) is not one Xen makes")
            ports[n] = port
        virqs = {}
        for item in listing(st, "virqs", 4096):
            (vcpu, virq, port) = _triple(item, "VIRQ binding")
            if (vcpu, virq) in virqs or ports.get(port, Port("")).type != VIRQ \
                    or (ports[port].vcpu, ports[port].virq) != (vcpu, virq):
                raise RecordError(f"VIRQ {virq} of vCPU {vcpu} bound to port {port}, which is not that VIRQ's")
            virqs[(vcpu, virq)] = port
        pirqs = {}
        for item in listing(st, "pirqs", NR_PIRQS):
            pirq, port = (integer(x, "PIRQ binding", 0, limit - 1) for x in _pair(item, "PIRQ binding"))
            if pirq in pirqs or ports.get(port, Port("")).type != PIRQ or ports[port].pirq != pirq:
                raise RecordError(f"PIRQ {pirq!r} bound to port {port!r}, which is not that PIRQ's")
            pirqs[pirq] = port
        if len(virqs) != sum(p.type == VIRQ for p in ports.values()) \
                or len(pirqs) != sum(p.type == PIRQ for p in ports.values()):
            raise RecordError("a VIRQ or PIRQ port missing from its index")
        next_backend = uint(st, "next_backend", 32)
        backends = {}
        for item in listing(st, "backends", 4096):
            n, guest_port, received = _triple(item, "backend port")
            if not 0 < n < next_backend or n in backends:
                raise RecordError(f"backend port {n}")
            backends[n] = (guest_port, received)
        for n, p in ports.items():
            if p.type == INTERDOMAIN and p.remote_domid == me:
                ok = ports.get(p.remote_port, Port("")).type == INTERDOMAIN and ports[p.remote_port].remote_port == n
            elif p.type == INTERDOMAIN:
                ok = backends.get(p.remote_port, (0, 0))[0] == n
            else:
                ok = True
            if not ok:
                raise RecordError(f"interdomain port {n}: its other end does not name it")
        for n, (guest_port, _) in backends.items():
            p = ports.get(guest_port)
            if guest_port and (p is None or p.type != INTERDOMAIN or p.remote_domid != BACKEND_DOMID
                               or p.remote_port != n):
                raise RecordError(f"backend port {n} connected to guest port {guest_port}, which is not its end")
        return ports, virqs, pirqs, backends, (next_backend, uint(st, "sends"), uint(st, "upcalls")), fifo

    def apply_record(self, prepared) -> None:
        """Install the port table; dom0's ends the machine built keep their callbacks."""
        ports, virqs, pirqs, backends, counts, fifo = prepared
        self.abi = event_fifo.restore(self, fifo) or TwoLevel(self)
        self.ports = {n: Port(**vars(p)) for n, p in ports.items()}
        self.virqs, self.pirqs = dict(virqs), dict(pirqs)
        old, self.backends = self.backends, {}
        for n, (guest_port, received) in backends.items():
            be = old.get(n) or BackendPort(self, n, None)
            be.guest_port, be.received = guest_port, received
            self.backends[n] = be
        self._next_backend, self.sends, self.upcalls = counts


def _pair(item, what: str) -> tuple:
    if not isinstance(item, list) or len(item) != 2:
        raise RecordError(f"{what} is not a pair")
    return item[0], item[1]


def _triple(item, what: str) -> tuple[int, int, int]:
    if not isinstance(item, list) or len(item) != 3:
        raise RecordError(f"{what} is not three numbers")
    return tuple(integer(x, what, 0, (1 << 32) - 1) for x in item)
