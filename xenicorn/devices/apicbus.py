"""The APIC bus: interrupt messages between the IOAPIC and every CPU's local APIC.

On an xAPIC system every interrupt is a *message*: the IOAPIC's
redirection entries and each local APIC's ICR (interrupt command register)
send ``(destination, destination mode, delivery mode, vector, trigger)``,
and every local APIC decides whether it is addressed (Intel SDM vol. 3
§10.6, §10.11). This module is the wire between them.

=================  ============================================================
destination        who accepts (``Lapic.matches``)
=================  ============================================================
physical n         the APIC whose ID is n; 0xFF: every APIC (broadcast)
logical, flat      every APIC with ``LDR[31:24] & dest`` (DFR model 0xF)
logical, cluster   cluster ``dest[7:4]`` = ``LDR[31:28]``, member bits ``dest[3:0]``
shorthand          01 self, 10 all including self, 11 all excluding self (ICR)
=================  ============================================================

=================  ============================================================
delivery mode      what the addressed CPU does
=================  ============================================================
fixed              IRR gets the vector
lowest priority    one of the addressed CPUs gets it: the one with the lowest
                   task priority (ties: the lowest APIC ID), as QEMU does
NMI                an NMI (vector 2, no IRR)
INIT               the CPU resets and waits for a start-up IPI ("wait for SIPI")
STARTUP (SIPI)     a CPU waiting for SIPI starts in real mode at
                   ``vector << 12`` (CS = ``vector << 8``, IP = 0); any other
                   CPU ignores it, as hardware does (SDM §8.4.4.1)
=================  ============================================================

A message that addresses no APIC is dropped (the hardware sets a send-
accept error on some models; the SDM leaves it model specific): it is
traced, never an error. INIT and SIPI reach the CPUs through the
``on_init(apic_id)`` and ``on_sipi(apic_id, vector)`` callables the machine
gives, since starting a CPU is the CPU's business, not the APIC's.
"""
from __future__ import annotations

from typing import Callable

DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_STARTUP, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = 0, 1, 2, 3
MODE_NAMES = {DM_FIXED: "fixed", DM_LOWEST: "lowest-priority", DM_SMI: "SMI", DM_NMI: "NMI",
              DM_INIT: "INIT", DM_STARTUP: "SIPI", DM_EXTINT: "ExtINT"}


class ApicBus:
    """Connects the local APICs (in CPU order) and the machine's CPU start-up logic."""

    def __init__(self, on_init: Callable[[int], None] | None = None,
                 on_sipi: Callable[[int, int], None] | None = None,
                 trace: Callable[[str], None] | None = None):
        self.lapics: list = []
        self.on_init = on_init or (lambda apic_id: None)
        self.on_sipi = on_sipi or (lambda apic_id, vector: None)
        self.trace = trace
        self.dropped = 0                     # messages that addressed no APIC

    def attach(self, lapic) -> None:
        self.lapics.append(lapic)
        lapic.bus = self

    # -- messages -------------------------------------------------------------------
    def deliver(self, dest: int, logical: bool, mode: int, vector: int, level: bool) -> None:
        """A message from the IOAPIC (its redirection entry's fields)."""
        self._send(self._addressed(dest, logical), mode, vector, level, "IOAPIC")

    def ipi(self, source, icr: int) -> None:
        """``source``'s ICR was written: send the IPI it describes."""
        low = icr & 0xFFFFFFFF
        mode, vector, shorthand = (low >> 8) & 7, low & 0xFF, (low >> 18) & 3
        level = bool(low & (1 << 15))
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            # an illegal vector is not sent: the sender's ESR gets "send
            # illegal vector" (SDM vol. 3 §11.5.3; Xen's vlapic_ipi)
            self._say(f"LAPIC {source.state.id}: {MODE_NAMES[mode]} IPI with illegal vector {vector:#x}")
            source.error(1 << 5)
            return
        if shorthand == SH_SELF:
            targets = [source]
        elif shorthand == SH_ALL:
            targets = list(self.lapics)
        elif shorthand == SH_OTHERS:
            targets = [lapic for lapic in self.lapics if lapic is not source]
        else:
            targets = self._addressed(icr >> 56, bool(low & (1 << 11)))
        if mode == DM_INIT and level and not low & (1 << 14):
            # INIT level de-assert (level-triggered, assert bit clear): a
            # synchronisation message on old APICs, no effect on any CPU
            # since the Pentium 4 (SDM §10.6.1)
            self._say(f"LAPIC {source.state.id}: INIT de-assert (no effect)")
            return
        self._send(targets, mode, vector, level, f"LAPIC {source.state.id}")

    def _addressed(self, dest: int, logical: bool) -> list:
        return [lapic for lapic in self.lapics if lapic.matches(dest, logical)]

    def _send(self, targets: list, mode: int, vector: int, level: bool, origin: str) -> None:
        name = MODE_NAMES.get(mode, f"mode {mode}")
        if not targets:
            self.dropped += 1
            self._say(f"{origin}: {name} IPI vector {vector:#x} addresses no APIC: dropped")
            return
        if mode == DM_LOWEST:
            targets = [min(targets, key=lambda lapic: (lapic.state.tpr, lapic.state.id))]
        for lapic in targets:
            if mode in (DM_FIXED, DM_LOWEST):
                lapic.accept(vector, level)
            elif mode == DM_NMI:
                lapic.raise_nmi()
            elif mode == DM_INIT:
                self._say(f"{origin}: INIT to APIC {lapic.state.id}")
                lapic.reset_for_init()
                self.on_init(lapic.state.id)
            elif mode == DM_STARTUP:
                self._say(f"{origin}: SIPI vector {vector:#x} to APIC {lapic.state.id}")
                self.on_sipi(lapic.state.id, vector)
            elif mode == DM_EXTINT:
                lapic.notify()
            else:
                self._say(f"{origin}: {name} IPI to APIC {lapic.state.id} ignored (no SMM)")

    def _say(self, text: str) -> None:
        if self.trace is not None:
            self.trace(text)
