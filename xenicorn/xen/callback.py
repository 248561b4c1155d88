"""How an upcall reaches a vCPU: the callback the guest chose.

When a vCPU's ``evtchn_upcall_pending`` goes from 0 to 1 by Xen's hand
(:mod:`xenicorn.xen.evtchn`), Xen interrupts that vCPU. How, the guest says
with ``HVM_PARAM_CALLBACK_IRQ = type << 56 | value``
(xen/include/public/hvm/params.h) or, per vCPU, with
``HVMOP_set_evtchn_upcall_vector``; Xen's order of preference is the one
in ``hvm_assert_evtchn_irq`` (xen/arch/x86/hvm/irq.c):

1. **per-vCPU vector** (HVMOP_set_evtchn_upcall_vector): the vector is
   raised in that vCPU's local APIC like an IPI, edge-triggered; the
   handler must EOI the LAPIC.
2. **vector** (type 2, ``value`` = vector): injected straight into the vCPU
   as an external interrupt, past the local APIC: no IRR, no ISR, no EOI.
   Linux's "Xen HVM callback vector".
3. **GSI** (type 0, ``value`` = GSI, 0 meaning none) and **PCI INTx**
   (type 1, ``value`` = ``bus << 16 | devfn << 8 | pin``, pin 0 = INTA):
   a *level-triggered* interrupt line, and only for vCPU 0. The GSI drives
   IOAPIC pin n and, for n < 16, 8259 input n; INTx goes through the PCI
   swizzle to a PIRQ line (IOAPIC 16-19, or the 8259 input the PIIX3
   routes it to).

The level line is the subtle one (the seed patch of this project).
Xen asserts it when it sets vCPU0's ``upcall_pending`` -- never because the
guest set the flag itself -- and the line must drop once the guest clears
the flag again. Nothing tells the hypervisor when that happens: the flag is
a byte in guest RAM. Two designs, chosen with ``--callback-deassert``:

``poll`` (what Xen and QEMU do)
    While the line is asserted, look at the flag at every exit. Here the
    exit is the start of every translated block: Xen asks its host for a
    *block-start watch* while the line is high (``host.watch_block_starts``;
    the run loop installs it before the guest next runs, as an engine hook:
    Unicorn instruments only the blocks translated while it is armed, so
    arming flushes the translation cache and disarming costs nothing
    afterwards). The line drops at the first block after the guest's store.
``eoi`` (the resample the seed wished for)
    No polling at all. When the guest EOIs the callback's interrupt at the
    IOAPIC (EOI register or the LAPIC's broadcast) or at the 8259, look at
    the flag then: 0 drops the line; 1 keeps it, and the controller
    delivers the still-asserted level again, as it would for any device.
"""
from __future__ import annotations

from ..records import RecordError, counters, flag, integer, listing, make_record, open_record, uint

CALLBACK_TYPE_GSI, CALLBACK_TYPE_PCI_INTX, CALLBACK_TYPE_VECTOR = 0, 1, 2
DEASSERT_MODES = ("poll", "eoi")


class Callback:
    """One domain's upcall delivery: the via, the level line and its deassert."""

    def __init__(self, xen, deassert: str = "poll"):
        if deassert not in DEASSERT_MODES:
            raise ValueError(f"callback deassert mode {deassert!r}: expected poll or eoi")
        self.xen = xen
        self.host = xen.host
        self.deassert_mode = deassert
        self.via = 0                         # HVM_PARAM_CALLBACK_IRQ as set
        self.kind: str = "none"              # none | gsi | intx | vector
        self.gsi: int | None = None          # gsi: the GSI; intx: the PIRQ's GSI (16 + n)
        self.intx: tuple[int, int] | None = None     # (devfn, pin 1-4)
        self.vector = 0
        self.level = False                   # the GSI/INTx line as we drive it
        self.direct: dict[int, int] = {}     # vCPU -> callback vector waiting for IF=1
        self._sources: list = []             # the IrqLine sources the level drives
        self._poll = None                    # the host's block-start watch, while the line is high (poll mode)
        self.stats = {"asserts": 0, "deasserts": 0, "polls": 0, "eoi_checks": 0, "vectors": 0}
        self.host.on_eoi(self._ioapic_eoi, self._pic_eoi)

    def _trace(self, text: str) -> None:
        tr = self.host.tracer
        if tr.active or tr.listeners:
            tr.emit("evtchn", text)

    # -- choosing the via ---------------------------------------------------------
    def set_via(self, value: int) -> None:
        """HVM_PARAM_CALLBACK_IRQ was written: tear down the old via, set the new.

        As ``hvm_set_callback_via``: an asserted old line is lowered, an
        unknown type or GSI 0 means "none", and if vCPU 0 still has an
        upcall pending it is delivered again through the new via.
        """
        self._lower("via changed")
        self._drop_sources()
        self.via = value
        self.kind, self.gsi, self.intx, vector = self.decode_via(value)
        self.vector = vector if vector is not None else self.vector
        self._make_sources()
        self._trace(f"callback via {value:#x}: {self.describe()}")
        info = self.xen.vcpu_info(0)
        if info is not None and info.upcall_pending:
            self.upcall(0)

    def decode_via(self, value: int) -> tuple[str, int | None, tuple[int, int] | None, int | None]:
        """HVM_PARAM_CALLBACK_IRQ -> (kind, GSI, (devfn, pin), vector); an unknown type or GSI 0 is none."""
        kind, arg = value >> 56, value & ((1 << 56) - 1)
        if kind == CALLBACK_TYPE_GSI and 0 < arg < self.host.gsi_count:
            return "gsi", arg, None, None
        if kind == CALLBACK_TYPE_PCI_INTX:
            devfn, pin = (arg >> 8) & 0xFF, (arg & 3) + 1
            return "intx", 16 + self.host.pci_pirq(devfn, pin), (devfn, pin), None
        if kind == CALLBACK_TYPE_VECTOR and arg & 0xFF >= 0x10:
            return "vector", None, None, arg & 0xFF
        return "none", None, None, None

    def _make_sources(self) -> None:
        """The GSI via drives IOAPIC pin n and, for n < 16, 8259 input n: one sub-line each."""
        self._sources = []
        if self.kind == "gsi":
            self._sources = [self.host.gsi_source(self.gsi, "xen-callback")]
            if self.gsi < 16:
                self._sources.append(self.host.pic_source(self.gsi, "xen-callback"))

    def describe(self) -> str:
        if self.kind == "gsi":
            return f"GSI {self.gsi}"
        if self.kind == "intx":
            devfn, pin = self.intx
            return f"PCI INTx 00:{devfn >> 3:02x}.{devfn & 7} INT{'ABCD'[pin - 1]} (GSI {self.gsi})"
        if self.kind == "vector":
            return f"vector {self.vector:#x}"
        return "none"

    # -- an upcall ------------------------------------------------------------------
    def upcall(self, vcpu: int) -> None:
        """vCPU ``vcpu``'s upcall_pending just went 0 -> 1 by Xen's hand."""
        per_vcpu = self.xen.state.upcall_vectors.get(vcpu)
        if per_vcpu:
            self.stats["vectors"] += 1
            self._trace(f"upcall vCPU {vcpu}: LAPIC vector {per_vcpu:#x}")
            self.host.lapic_accept(vcpu, per_vcpu)
        elif self.kind == "vector":
            self.stats["vectors"] += 1
            self._trace(f"upcall vCPU {vcpu}: vector {self.vector:#x} (direct)")
            self.direct[vcpu] = self.vector
            self.host.kick("xen callback vector", force=True)
        elif self.kind in ("gsi", "intx") and vcpu == 0:
            self._raise()

    def direct_pending(self, vcpu: int) -> int | None:
        return self.direct.get(vcpu)

    def direct_taken(self, vcpu: int) -> None:
        self.direct.pop(vcpu, None)

    # -- the level line ---------------------------------------------------------------
    def _set_line(self, level: bool) -> None:
        if self.kind == "intx":
            devfn, pin = self.intx
            self.host.set_pci_intx(devfn, pin, level)
        else:
            for src in self._sources:
                src.set_level(level)

    def _raise(self) -> None:
        if self.level:
            return
        self.level = True
        self.stats["asserts"] += 1
        self._trace(f"callback {self.describe()} asserted")
        self._set_line(True)
        if self.deassert_mode == "poll":
            self.arm_poll()
            self.host.kick("callback poll", force=True)

    def _lower(self, why: str) -> None:
        if not self.level:
            return
        self.level = False
        self.stats["deasserts"] += 1
        self._trace(f"callback {self.describe()} deasserted ({why})")
        self._set_line(False)
        self.disarm_poll()

    def _drop_sources(self) -> None:
        if self.kind == "intx" and self.intx is not None:
            self.host.set_pci_intx(*self.intx, False)
        self._sources = []

    def _pending0(self) -> bool:
        info = self.xen.vcpu_info(0)
        return info is not None and bool(info.upcall_pending)

    # -- deassert by polling at block starts -------------------------------------------
    def arm_poll(self) -> None:
        """Ask the host for a check of vCPU 0's ``upcall_pending`` at every block start.

        The host installs it before the guest next runs (a hook cannot be
        added from inside another); it stays until the line drops.
        """
        if self._poll is not None or not self.level:
            return
        mem, tracer = self.host.memory, self.host.tracer
        each = tracer.on("evtchn")
        where: list[int] = []            # vcpu_info's address, looked up at the first check (after a load too)

        def on_block(address: int) -> None:
            if not where:
                info = self.xen.vcpu_info(0)
                if info is None:
                    return
                where.append(info.gpa)
            self.stats["polls"] += 1
            if not mem.read_u8(where[0]):
                self._lower(f"upcall_pending read 0 at block {address:#x}")
            elif each:
                tracer.emit("evtchn", f"poll at block {address:#x}: upcall_pending 1, line stays asserted")
        self._poll = self.host.watch_block_starts(0, on_block)
        self._trace("poll hook armed")

    def disarm_poll(self) -> None:
        if self._poll is not None:
            self.host.unwatch_block_starts(self._poll)
            self._poll = None
            self._trace("poll hook removed")

    @property
    def poll_wanted(self) -> bool:
        """The poll is asked for but not yet installed (the guest has not run since)."""
        return self._poll is not None and not self._poll.installed

    @property
    def polling(self) -> bool:
        """The poll runs at every block start."""
        return self._poll is not None and self._poll.installed

    # -- deassert by resampling at EOI ----------------------------------------------------
    def _resample(self, where: str) -> None:
        self.stats["eoi_checks"] += 1
        if self._pending0():
            self._trace(f"EOI at {where}: upcall_pending still 1, line stays asserted")
        else:
            self._lower(f"EOI at {where}, upcall_pending 0")

    def _ioapic_eoi(self, pin: int) -> None:
        if self.level and self.deassert_mode == "eoi" and pin == self.gsi:
            self._resample(f"IOAPIC pin {pin}")

    def _pic_eoi(self, irq: int) -> None:
        if not (self.level and self.deassert_mode == "eoi"):
            return
        if self.kind == "gsi" and irq == self.gsi:
            self._resample(f"8259 IRQ {irq}")
        elif self.kind == "intx" and irq == self.host.pirq_route(self.gsi - 16):
            self._resample(f"8259 IRQ {irq}")

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("xen-callback", 1)

    def save_record(self) -> dict:
        """The via, the line's level and its sub-lines, a vector waiting for IF=1, and whether the
        deassert poll is wanted or running (the run loop installs it again after a load)."""
        return make_record(*self.RECORD, {
            "via": self.via, "vector": self.vector, "level": self.level, "direct": sorted(self.direct.items()),
            "poll": self.poll_wanted or self.polling, "stats": dict(self.stats),
            "lines": [[src.name, src.level, src.edges] for src in self._sources]})

    def check_record(self, record: dict):
        """The via decodes as HVMOP_set_param would; the line is high only for a GSI or INTx via, its
        sub-lines with it; the poll runs only while the line is high, and only in poll mode."""
        st = open_record(record, *self.RECORD)
        via = uint(st, "via")
        kind, gsi, intx, _ = self.decode_via(via)
        vector, level, poll = uint(st, "vector", 8), flag(st, "level"), flag(st, "poll")
        if 0 < vector < 0x10 or (level and kind not in ("gsi", "intx")) or (poll and not level) \
                or (poll and self.deassert_mode != "poll"):
            raise RecordError(f"callback via {via:#x} with vector {vector:#x}, level {level}, poll {poll}")
        nvcpus = len(self.host.vcpus)
        direct = {}
        for item in listing(st, "direct", nvcpus):
            if not isinstance(item, list) or len(item) != 2:
                raise RecordError("callback vector entry is not [vCPU, vector]")
            direct[integer(item[0], "callback vCPU", 0, nvcpus - 1)] = integer(item[1], "callback vector", 0x10, 0xFF)
        stats = counters(st, "stats")
        if set(stats) != set(self.stats):
            raise RecordError(f"callback statistics {sorted(stats)}")
        names = [f"GSI{gsi}<-xen-callback"] + ([f"PIC{gsi}<-xen-callback"] if gsi < 16 else []) \
            if kind == "gsi" else []
        lines = listing(st, "lines", 2)
        if [item[0] if isinstance(item, list) and len(item) == 3 else None for item in lines] != names \
                or any(item[1] is not level for item in lines):
            raise RecordError(f"callback sub-lines {lines}, the via drives {names} at level {level}")
        edges = [integer(item[2], "callback line edges") for item in lines]
        return (via, kind, gsi, intx, vector, level, direct, poll, stats, edges)

    def apply_record(self, prepared) -> None:
        """Install the via and its sub-lines at their levels (the machine's wiring record then sets its
        shared lines' sources, after this)."""
        via, kind, gsi, intx, vector, level, direct, poll, stats, edges = prepared
        self.disarm_poll()
        self.via, self.kind, self.gsi, self.intx, self.vector, self.level = via, kind, gsi, intx, vector, level
        self._make_sources()
        for src, n in zip(self._sources, edges, strict=True):   # checked: one edge count per sub-line
            src.level, src.edges = level, n
        self.direct, self.stats = dict(direct), dict(stats)
        if poll:
            self.arm_poll()               # the host installs the block check before the next run
