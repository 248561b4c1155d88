"""``physdev_op`` (hypercall 33): a GSI delivered as an event (PIRQ).

An HVM guest that sees XENFEAT_hvm_pirqs can ask Xen to deliver a legacy
interrupt line (a GSI) as an event channel instead of through the emulated
IOAPIC: it maps the GSI to a "PIRQ" number (PHYSDEVOP_map_pirq), binds a
port to the PIRQ (EVTCHNOP_bind_pirq), and from then on the line's rising
edge sets that port pending and the IOAPIC pin sees nothing
(``hvm_gsi_assert`` in xen/arch/x86/hvm/irq.c; QEMU's
``xen_evtchn_set_gsi``). A level-triggered source still asserted when the
guest acknowledges (PHYSDEVOP_eoi) raises the event again.

Sub-ops from xen/include/public/physdev.h (MSI mapping can wait):

====  =====================  ============================================
cmd   name                   argument
====  =====================  ============================================
5     irq_status_query       { u32 irq; OUT u32 flags }
12    eoi                    { u32 irq }
13    map_pirq               { u16 domid; int type; int index; int pirq;
                               int bus, devfn, entry_nr; u64 table_base }
14    unmap_pirq             { u16 domid; int pirq }
23    get_free_pirq          { int type; OUT u32 pirq }
====  =====================  ============================================
"""
from __future__ import annotations

from . import errno
from ..records import RecordError, boolean, integer, listing, make_record, open_record
from .evtchn import NR_PIRQS, DOMID_SELF
from .guest import HypercallError

PHYSDEVOP_irq_status_query, PHYSDEVOP_eoi, PHYSDEVOP_map_pirq, PHYSDEVOP_unmap_pirq = 5, 12, 13, 14
PHYSDEVOP_get_free_pirq = 23
MAP_PIRQ_TYPE_MSI, MAP_PIRQ_TYPE_GSI = 0, 1
XENIRQSTAT_needs_eoi = 1
NR_GSIS = 24


class Physdev:
    """The domain's PIRQ table: which GSI each mapped PIRQ stands for."""

    def __init__(self, xen):
        self.xen = xen
        self.mapped: dict[int, int] = {}          # pirq -> gsi
        self.by_gsi: dict[int, int] = {}          # gsi -> pirq
        self.levels = [False] * NR_GSIS           # what each GSI's sources drive

    def _check_self(self, dom: int) -> None:
        if dom not in (DOMID_SELF, self.xen.config.domid):
            raise HypercallError(errno.EPERM, f"domain {dom:#x}")

    def hypercall(self, call, cmd: int, arg: int, *_) -> int:
        g = call.guest
        if cmd == PHYSDEVOP_map_pirq:
            dom, kind, index, pirq = g.read_struct(arg, "<H2xiii")
            self._check_self(dom)
            if kind != MAP_PIRQ_TYPE_GSI:
                self.xen.unimplemented(f"map_pirq type {kind}")
                raise HypercallError(errno.ENOSYS if kind == MAP_PIRQ_TYPE_MSI else errno.EINVAL, f"type {kind}")
            if not 0 <= index < NR_GSIS:
                raise HypercallError(errno.EINVAL, f"GSI {index}")
            if index in self.by_gsi:
                pirq = self.by_gsi[index]                  # mapping it again gives the same PIRQ
            elif pirq < 0:
                pirq = self._free()
            elif pirq >= NR_PIRQS or pirq in self.mapped:
                raise HypercallError(errno.EINVAL if pirq >= NR_PIRQS else errno.EEXIST, f"PIRQ {pirq}")
            self.mapped[pirq], self.by_gsi[index] = index, pirq
            g.write_struct(arg + 12, "<i", pirq)
            call.note(f"GSI {index} -> PIRQ {pirq}")
            return 0
        if cmd == PHYSDEVOP_unmap_pirq:
            dom, pirq = g.read_struct(arg, "<H2xi")
            self._check_self(dom)
            if pirq not in self.mapped:
                raise HypercallError(errno.EINVAL, f"PIRQ {pirq} is not mapped")
            if pirq in self.xen.evtchn.pirqs:
                raise HypercallError(errno.EBUSY, f"PIRQ {pirq} is bound to a port")
            self.by_gsi.pop(self.mapped.pop(pirq), None)
            return 0
        if cmd == PHYSDEVOP_get_free_pirq:
            (kind,) = g.read_struct(arg, "<i")
            g.write_struct(arg + 4, "<I", self._free())
            return 0
        if cmd == PHYSDEVOP_eoi:
            (pirq,) = g.read_struct(arg, "<I")
            gsi = self.mapped.get(pirq)
            if gsi is None:
                raise HypercallError(errno.EINVAL, f"PIRQ {pirq}")
            if self.levels[gsi]:                           # still asserted: the event again
                self._event(pirq)
            return 0
        if cmd == PHYSDEVOP_irq_status_query:
            (pirq,) = g.read_struct(arg, "<I")
            if pirq >= NR_PIRQS:
                raise HypercallError(errno.EINVAL, f"PIRQ {pirq}")
            g.write_struct(arg + 4, "<I", XENIRQSTAT_needs_eoi if pirq in self.mapped else 0)
            return 0
        self.xen.unimplemented(f"physdev_op cmd {cmd}")
        raise HypercallError(errno.ENOSYS)

    def _free(self) -> int:
        # PIRQs below 16 stay identity-mapped to the ISA IRQs, as Xen allocates
        for pirq in range(16, NR_PIRQS):
            if pirq not in self.mapped:
                return pirq
        raise HypercallError(errno.ENOSPC, "no free PIRQ")

    def _event(self, pirq: int) -> None:
        port = self.xen.evtchn.pirqs.get(pirq)
        if port is not None:
            self.xen.evtchn.set_pending(port)

    def gsi_changed(self, gsi: int, level: bool) -> bool:
        """A GSI line moved; True if an event channel took it (the IOAPIC sees nothing)."""
        rising = level and not self.levels[gsi]
        self.levels[gsi] = level
        pirq = self.by_gsi.get(gsi)
        if pirq is None or pirq not in self.xen.evtchn.pirqs:
            return False
        if rising:
            self._event(pirq)
        return True

    def bound(self, pirq: int) -> None:
        """A port was just bound: the IOAPIC lets go; a line already high is an event now."""
        self.xen.host.ioapic_input(self.mapped[pirq], False)
        if self.levels[self.mapped[pirq]]:
            self._event(pirq)

    def unbound(self, pirq: int) -> None:
        gsi = self.mapped.get(pirq)
        if gsi is not None:                                # hand the line back to the IOAPIC
            self.xen.host.ioapic_input(gsi, self.levels[gsi])


    # -- snapshots (snapshot/) -------------------------------------------------------
    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("xen-physdev", 1)

    def save_record(self) -> dict:
        """PIRQ <-> GSI mappings, and each GSI's last level (a rising edge is what raises the event)."""
        return make_record(*self.RECORD, {"mapped": sorted(self.mapped.items()), "levels": list(self.levels)})

    def check_record(self, record: dict):
        """PIRQs below NR_PIRQS, each mapped to a distinct GSI below NR_GSIS (PHYSDEVOP_map_pirq's rules)."""
        st = open_record(record, *self.RECORD)
        mapped = {}
        for item in listing(st, "mapped", NR_PIRQS):
            if not isinstance(item, list) or len(item) != 2:
                raise RecordError("PIRQ mapping is not [pirq, gsi]")
            pirq, gsi = integer(item[0], "PIRQ", 0, NR_PIRQS - 1), integer(item[1], "GSI", 0, NR_GSIS - 1)
            if pirq in mapped or gsi in mapped.values():
                raise RecordError(f"PIRQ {pirq} or GSI {gsi} mapped twice")
            mapped[pirq] = gsi
        levels = listing(st, "levels", NR_GSIS)
        if len(levels) != NR_GSIS:
            raise RecordError(f"{len(levels)} GSI levels, this machine has {NR_GSIS} GSIs")
        return mapped, [boolean(x, "GSI level") for x in levels]

    def apply_record(self, prepared) -> None:
        mapped, levels = prepared
        self.mapped, self.levels = dict(mapped), list(levels)
        self.by_gsi = {gsi: pirq for pirq, gsi in mapped.items()}
