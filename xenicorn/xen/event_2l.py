"""The 2-level event-channel ABI: pending and mask bitmaps in shared_info.

This is the ABI every guest starts with (xen/common/event_2l.c). Each port
has a bit in ``shared_info.evtchn_pending`` and one in ``evtchn_mask``.
Raising an event walks three steps of increasing coarseness and stops at
the first bit that was already set:

1. ``evtchn_pending[port]``: this port has an event;
2. ``vcpu_info.evtchn_pending_sel`` bit ``port / BITS_PER_LONG``: look at
   that word of ``evtchn_pending``;
3. ``vcpu_info.evtchn_upcall_pending``: this vCPU has something to look at
   (:meth:`EventChannels.mark_events_pending
   <xenicorn.xen.evtchn.EventChannels.mark_events_pending>`, which makes
   the upcall).

A masked port stops after step 1; unmasking it redoes steps 2 and 3 if its
pending bit is set. With a 64-bit guest there are 64 x 64 = 4096 ports,
with a 32-bit one 32 x 32 = 1024.

:class:`TwoLevel` and :class:`~xenicorn.xen.event_fifo.Fifo` offer the same
small interface (Xen's ``struct evtchn_port_ops``), so the port table in
:mod:`xenicorn.xen.evtchn` works with either.
"""
from __future__ import annotations

from . import errno
from .guest import HypercallError


class TwoLevel:
    """The 2-level port operations, all on shared_info (guest RAM); no state of its own."""

    name = "2-level"

    def __init__(self, channels):
        self.channels = channels
        self.xen = channels.xen

    @property
    def nr_ports(self) -> int:
        """BITS_PER_EVTCHN_WORD squared (xen/common/event_channel.h, max_evtchns)."""
        return 1024 if (self.xen.state.width or 64) == 32 else 4096

    def set_pending(self, port: int, vcpu: int) -> bool:
        """evtchn_2l_set_pending; True if the upcall flag went 0 -> 1.

        Without a shared_info page there is nowhere to record the event,
        and Xen would not deliver it either.
        """
        si = self.xen.shared_info()
        if si is None or si.set_pending(port):
            return False                        # nowhere to put it, or already pending: events coalesce
        if si.masked(port):
            self.channels.trace(f"port {port} pending (masked)")
            return False
        return self._mark_word(si, port, vcpu)

    def _mark_word(self, si, port: int, vcpu: int) -> bool:
        info = self.xen.vcpu_info(vcpu)
        if info is None:
            return False
        word = 1 << (port // si.layout.bits)
        sel = info.pending_sel
        if sel & word:
            self.channels.trace(f"port {port} pending (word {port // si.layout.bits} already selected)")
            return False
        info.pending_sel = sel | word
        return self.channels.mark_events_pending(vcpu, f"port {port}")

    def unmask(self, port: int, vcpu: int) -> None:
        """evtchn_2l_unmask: clear the mask; an event that arrived meanwhile is delivered now."""
        si = self.xen.shared_info()
        if si is not None and si.set_masked(port, False) and si.pending(port):
            self._mark_word(si, port, vcpu)

    def clear_pending(self, port: int) -> None:
        si = self.xen.shared_info()
        if si is not None:
            si.set_pending(port, False)

    def is_pending(self, port: int) -> bool:
        si = self.xen.shared_info()
        return si is not None and 0 < port < self.nr_ports and si.pending(port)

    def is_masked(self, port: int) -> bool:
        si = self.xen.shared_info()
        return si is not None and 0 < port < self.nr_ports and si.masked(port)

    def is_busy(self, port: int) -> bool:
        return False                            # event_2l.c has no is_busy: a closed port is free at once

    def init_port(self, port: int) -> None:
        pass

    def set_priority(self, port: int, priority: int) -> None:
        # xen/common/event_channel.h, evtchn_port_set_priority: no set_priority op -> -ENOSYS
        raise HypercallError(errno.ENOSYS, "the 2-level ABI has no priorities")

    def describe(self, port: int) -> dict:
        return {}
