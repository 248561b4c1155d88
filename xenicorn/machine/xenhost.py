"""The machine's side of :class:`xenicorn.xen.host.XenHost`: what it offers the Xen layer.

Each method maps one thing Xen needs onto the part of the PC that has it
(the wiring, the PCI bus, the dispatcher, the run loop). Xen plugs itself in
through the ``add_*``/``set_*`` calls; the run loop then asks those
registrations, never ``machine.xen``, when it injects, sleeps or runs.
"""
from __future__ import annotations

from typing import Callable


class BlockWatch:
    """"Call ``check(address)`` at every block start of vCPU ``vcpu``" (see ``watch_block_starts``)."""

    __slots__ = ("vcpu", "check", "handle")

    def __init__(self, vcpu: int, check: Callable[[int], None]):
        self.vcpu = vcpu
        self.check = check
        self.handle = None               # the engine's hook, once installed

    @property
    def installed(self) -> bool:
        return self.handle is not None


class XenHostServices:
    """Mixed into :class:`~xenicorn.machine.machine.Machine`; see :mod:`xenicorn.xen.host`."""

    def _init_host_services(self) -> None:
        self.direct_sources: list = []             # callback vectors, injected past the LAPIC
        self.wake_sources: list[Callable] = []     # what ends a sleep in a hypercall (not HLT)
        self.block_watches: list[BlockWatch] = []  # asked for, installed before the next run
        self._console_feed: Callable[[bytes], None] | None = None

    # -- facts ---------------------------------------------------------------------------
    @property
    def vendor(self) -> str:
        return self.config.vendor

    @property
    def gsi_count(self) -> int:
        return len(self.gsi)

    # -- interrupt lines -------------------------------------------------------------------
    def gsi_source(self, gsi: int, name: str):
        """A sub-line of GSI ``gsi`` (wired-OR with the GSI's other sources)."""
        return self.gsi[gsi].source(name)

    def pic_source(self, irq: int, name: str):
        """A sub-line of 8259 input ``irq``."""
        return self.wiring.pic_input(irq, name)

    def set_pci_intx(self, devfn: int, pin: int, level: bool) -> None:
        """Drive PCI INTx ``pin`` (1-4) of ``devfn`` from outside the device (Xen's callback via INTx)."""
        self.pci.set_extra_intx(devfn, pin, level)

    def pci_pirq(self, devfn: int, pin: int) -> int:
        """The PIRQ (0-3) INTx ``pin`` of ``devfn`` is swizzled to."""
        return self.pci.pirq_of(devfn, pin)

    def pirq_route(self, pirq: int) -> int | None:
        """The ISA IRQ the PIIX3 routes ``pirq`` to, if enabled."""
        return self.piix3.pirq_route(pirq)

    def ioapic_input(self, gsi: int, level: bool) -> None:
        """Set IOAPIC pin ``gsi`` directly (a GSI handed back from a PIRQ event)."""
        self.ioapic.set_irq(gsi, level)

    def lapic_accept(self, vcpu: int, vector: int) -> None:
        """A fixed interrupt at vCPU ``vcpu``'s local APIC (its per-vCPU upcall vector)."""
        self.lapics[vcpu].accept(vector)

    def on_eoi(self, ioapic: Callable[[int], None], pic: Callable[[int], None]) -> None:
        """Be told of each EOI: ``ioapic(pin)`` at the IOAPIC, ``pic(isa_irq)`` at the 8259 pair."""
        self.ioapic.on_eoi.append(ioapic)
        self.pic.on_eoi.append(pic)

    # -- vCPUs up and down ----------------------------------------------------------------
    def device_page(self, gpa: int) -> bool:
        """Something other than RAM answers in the 4 KiB page at ``gpa``: device registers,
        or the pages the CPU engine keeps for itself (engine/msr.py's VMCBs)."""
        from ..engine.msr import SHADOW_BASE, SHADOW_SIZE
        from .machine import MAX_VCPUS
        page = gpa & ~0xFFF
        if SHADOW_BASE - 0x1000 < page < SHADOW_BASE + MAX_VCPUS * SHADOW_SIZE:
            return True
        return bool(self.mmio.tree.overlap(page, page + 0x1000))

    def post_vcpu_state(self, vcpu: int, apply: Callable[[object], None]) -> None:
        """Give vCPU ``vcpu`` a new register state: ``apply(vcpu)`` runs when the run loop next loads it.

        Posted, not applied: the request comes from a hypercall, inside
        another vCPU's run, when only the running vCPU's state is reachable.
        """
        self.vcpus[vcpu].pending_state = apply
        self.kick("vCPU state posted", force=True)

    def set_vcpu_running(self, vcpu: int, running: bool) -> None:
        """VCPUOP_up / VCPUOP_down: let a vCPU run, or take it out of the schedule."""
        v = self.vcpus[vcpu]
        v.down = not running
        if running:
            v.wake()
            self.kick("vCPU up", force=True)
        else:
            v.halted = True
            v.sleep_kind = "down"
            if v._in_emu:
                v.request_stop("vCPU down")

    def vcpu_running(self, vcpu: int) -> bool:
        """Not down, and started (by a SIPI or VCPUOP_up)."""
        v = self.vcpus[vcpu]
        return not v.down and not v.wait_for_sipi

    # -- registrations ------------------------------------------------------------------------
    def add_gsi_filter(self, taken: Callable[[int, bool], bool]) -> None:
        """``taken(gsi, level)`` sees every GSI change first; True keeps it from the IOAPIC."""
        self.wiring.gsi_filters.append(taken)

    def add_interrupt_source(self, source) -> None:
        """Vectors injected into a vCPU past its LAPIC (``direct_pending``/``direct_taken``)."""
        self.direct_sources.append(source)

    def add_wake_source(self, wakes: Callable) -> None:
        """``wakes(vcpu)``: does a vCPU asleep in a hypercall (SCHEDOP_block/poll) have cause to run?"""
        self.wake_sources.append(wakes)

    def add_cpuid_provider(self, provider: Callable) -> None:
        self.cpuid.providers.append(provider)

    def add_msr_handler(self, msr: int, handler: Callable) -> None:
        self.dispatch.msr_handlers[msr] = handler

    def set_hypercall_handler(self, handler: Callable) -> None:
        """``handler(vcpu, Hypercall exit)``: VMCALL/VMMCALL are no longer #UD."""
        self.dispatch.hypercall_handler = handler

    def set_console_input(self, feed: Callable[[bytes], None]) -> None:
        """Where console input posted from the host goes (Xen's PV console)."""
        self._console_feed = feed

    def watch_block_starts(self, vcpu: int, check: Callable[[int], None]) -> BlockWatch:
        """Call ``check(address)`` at every block start of ``vcpu`` until unwatched.

        Installed by the run loop before the guest next runs: a hook cannot
        be added from inside another one, where such a request is often
        made. The engine's translation cache is flushed to install it
        (Unicorn instruments only blocks translated while a hook exists).
        """
        watch = BlockWatch(vcpu, check)
        self.block_watches.append(watch)
        return watch

    def unwatch_block_starts(self, watch: BlockWatch) -> None:
        if watch in self.block_watches:
            self.block_watches.remove(watch)
        elif watch.handle is not None:
            self.vcpus[watch.vcpu].remove_block_check(watch.handle)
            watch.handle = None

    def install_block_watches(self) -> None:
        """From the run loop, between runs: install the watches asked for since the last run."""
        while self.block_watches:
            watch = self.block_watches.pop(0)
            check, vcpu, stopped = watch.check, self.vcpus[watch.vcpu], self.dispatch.stop_listeners
            if stopped:                      # a check is a stop: what the guest did before it is the guest's

                def check(address: int, check=check, vcpu=vcpu, stopped=stopped) -> None:
                    for listener in stopped:
                        listener(vcpu)
                    check(address)
            watch.handle = vcpu.add_block_check(check)
