"""External interrupts and the engine: the interrupt window, and delivery by QEMU itself.

x86 takes a maskable interrupt only between instructions, with RFLAGS.IF
set and outside the one-instruction shadow of STI or MOV SS (SDM vol. 3
§6.8.3). A hypervisor with an interrupt pending while the guest has them
off asks the CPU for an *interrupt-window exit*, and injects the interrupt
there. This module is that request for Unicorn, in two forms:

==========================  ================================================
mechanism                   how
==========================  ================================================
window exit (the fast path) QEMU's own window check turned into an SVM
                            VINTR exit (:mod:`irqwindow`): nothing runs
                            per block; Python injects at the exit
engine delivery             the same virtual-interrupt request without the
                            intercept: QEMU delivers the vector in the
                            VMCB through the IDT itself, no exit at all
block hook (the fallback)   where the Unicorn build lacks the exit
                            (``engine.probe()`` says so on stderr): a hook
                            at every block start checks IF, ~14x slower
                            while armed, and arming flushes the
                            translation cache
==========================  ================================================

The machine decides *which* interrupt and *when* to ask
(:mod:`xenicorn.machine.machine`); the architectural delivery Python does
is :mod:`xenicorn.x86.interrupts`.
"""
from __future__ import annotations

import struct

from unicorn import UC_HOOK_BLOCK
from unicorn import x86_const as X

from .hooks import guarded
from .msr import VMCB_INT_VECTOR
from .rawctx import OFF_HFLAGS, OFF_HFLAGS2, HF2_NMI_MASK, HF_LMA, HF_CPL_MASK, RawContext
from ..x86.segments import DESC_P

RFLAGS_IF = 1 << 9
RFLAGS_VM = 1 << 17


class InterruptDelivery:
    """The interrupt half of :class:`~xenicorn.engine.vcpu.VCpu` (a mixin: same object, no indirection)."""

    # ------------------------------------------------------------------
    # interrupt window: an exit armed only while an interrupt waits
    # ------------------------------------------------------------------
    def arm_interrupt_window(self) -> None:
        """Ask for an exit when the guest opens the interrupt window (IF=1, no shadow).

        Armed only while an interrupt is pending with IF=0. The exit is
        QEMU's own window check turned into an SVM VINTR exit
        (:mod:`irqwindow`): nothing runs per block. Where that is not
        available, a block hook checks IF instead; Unicorn instruments only
        blocks translated while a hook exists, so arming it flushes the
        translation cache, and it is removed as soon as the window opens.
        """
        if self._irq_request is not None:
            if self._engine_vector is None and not self._irq_request.virq:
                self.msr.watch_interrupt_window(True)
                self._irq_request.virq = True
            return
        if self._window_hook is not None:
            return
        self._window_hook = self.uc.hook_add(UC_HOOK_BLOCK, self._on_window_block)
        self.uc.ctl_flush_tb()

    def disarm_interrupt_window(self) -> None:
        """Withdraw the request (the interrupt was taken, or is no longer pending)."""
        if self._irq_request is not None:
            if self.msr.interrupt_window:
                if self._engine_vector is None:
                    self._irq_request.virq = False
                self.msr.watch_interrupt_window(False)
            return
        if self._window_hook is not None:
            self.uc.hook_del(self._window_hook)
            self._window_hook = None

    @guarded(None)
    def _on_window_block(self, uc, address, size, _):
        # A block that starts in the STI/MOV SS shadow must run its first
        # instruction first (``sti; hlt`` halts, then takes the interrupt):
        # stopping here would only come back to the same place.
        if uc.reg_read(X.UC_X86_REG_RFLAGS) & RFLAGS_IF and not self.interrupt_shadow():
            self.request_stop("interrupt-window")

    # ------------------------------------------------------------------
    # NMI blocking: from an NMI's delivery to the next IRET
    # ------------------------------------------------------------------
    def nmi_blocked(self) -> bool:
        """Are NMIs blocked (an NMI was delivered and no IRET has run since)? SDM vol. 3 §6.7.1.

        The state is QEMU's ``HF2_NMI_MASK``, which QEMU's IRET clears; it is
        part of the CPU context, so snapshots carry it. Without the exact
        window exits (:func:`irqwindow.available`) it is never set.
        """
        if self._irq_request is None:
            return False
        ctx = self.live if self.loaded else RawContext(self._required())
        return bool(ctx.read(OFF_HFLAGS2, "<I") & HF2_NMI_MASK)

    def set_nmi_blocked(self, on: bool) -> None:
        """Block NMIs (an NMI is being delivered) or unblock them (an IRET that faulted)."""
        if self._irq_request is None:
            return
        with self.cpu_state() as ctx:
            value = ctx.read(OFF_HFLAGS2, "<I")
            ctx.write(OFF_HFLAGS2, "<I", value | HF2_NMI_MASK if on else value & ~HF2_NMI_MASK)

    def arm_nmi_window(self) -> bool:
        """An NMI waits while NMIs are blocked: ask for an exit right after the IRET that unblocks them.

        False where this engine cannot (the NMI is then delivered at once, unblocked, as before).
        """
        if self._irq_request is None:
            return False
        self.msr.watch_nmi_window(True)
        self._irq_request.nmi = True
        return True

    def disarm_nmi_window(self) -> None:
        if self._irq_request is not None and self.msr.nmi_window:
            self._irq_request.nmi = False
            self.msr.watch_nmi_window(False)

    # ------------------------------------------------------------------
    # external interrupts delivered by the CPU engine itself
    # ------------------------------------------------------------------
    @property
    def engine_delivery_pending(self) -> bool:
        """A vector handed to the engine that the guest has not taken yet."""
        return self._engine_vector is not None

    def engine_delivers(self) -> bool:
        """May the next external interrupt be delivered by Unicorn instead of Python?

        The same SVM virtual-interrupt request as the window exit, without
        the VINTR intercept, makes QEMU deliver the vector in the VMCB's
        ``int_vector`` through the IDT itself, at the first instruction
        boundary where x86 would (engine/irqwindow.py): no exit, no
        Python page walks. Python delivers instead whenever someone watches
        deliveries (``--trace int``, the stepper, gdb) or time is counted in
        instructions, and when a snapshot could be taken between the
        request and the run (the request is not part of the CPU context).
        Python also delivers from virtual-8086 mode: QEMU sends a vm86
        interrupt whose handler segment has DPL 1 or 2 to that ring where
        x86 raises #GP, and leaves EXT out of that #GP's error code
        (:mod:`xenicorn.x86.vm86`). A task gate is left to the engine: its
        ``switch_tss`` does the switch :mod:`xenicorn.x86.taskswitch` does
        (docs/unicorn-notes.md says where the two differ: error codes for a
        faulty TSS only).
        """
        m = self.machine
        return (self._irq_request is not None and not self.count_instructions and not m.tracer.on("int")
                and not m.tracer.listeners and not m.agents
                and not self.uc.reg_read(X.UC_X86_REG_EFLAGS) & RFLAGS_VM
                and self._engine_can_read_the_tss())

    def _engine_can_read_the_tss(self) -> bool:
        """Would QEMU's delivery accept the TSS, if it needs one?

        QEMU *aborts the process* (``cpu_abort("invalid tss")``) where a CPU
        would raise #TS: when a stack switch finds TR not present or, in
        32-bit mode, its cached type not an *available* TSS. QEMU's own LTR
        and task switches cache the available type; xenicorn's PVH start
        state caches the busy type, as hardware does. Any doubt: Python
        delivers.
        """
        flags = self.live.segment("tr").flags
        if not flags & DESC_P:
            return False
        hflags = self.live.read(OFF_HFLAGS, "<I")
        return bool(hflags & HF_LMA) or ((flags >> 8) & 7) == 1 or not hflags & HF_CPL_MASK

    def engine_deliver(self, vector: int) -> None:
        """Hand ``vector`` to the CPU engine; it is delivered when the next run starts."""
        self.uc.mem_write(self.msr.vmcb + VMCB_INT_VECTOR, struct.pack("<I", vector))
        self._engine_vector = vector
        self._irq_request.virq = True

    def _engine_delivery_done(self) -> None:
        """After a run: the engine clears the request once it has delivered the vector."""
        if self._engine_vector is not None and not self._irq_request.virq:
            self._engine_vector = None
            self.engine_deliveries += 1
