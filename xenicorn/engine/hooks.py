"""Unicorn's hooks, each a thin adaptor from an engine report to an exit.

A hypervisor's vCPU thread runs the guest until the hardware reports an
event (a VM exit), decodes the report into something the platform
understands, and handles it. Unicorn reports events by calling Python
*hooks* from inside ``emu_start``; this module's adaptors build the typed
:mod:`exit <xenicorn.exits>` records and hand them to the machine
(``machine.handle_exit``), which answers in place (a port read's value, a
CPUID result) or asks the run to end (:meth:`VCpu.stop_with`). The table
of which report becomes which exit is in :mod:`xenicorn.engine.vcpu`.

Three rules every adaptor follows:

* **Guarded.** A Python exception escaping a hook reaches ctypes, which
  cannot convert it; the binding re-raises it only after ``emu_start``,
  with a return value that is garbage meanwhile. :func:`guarded` catches
  it, returns a sane value to Unicorn, stops the run, and ``run()`` turns
  the error into one internal-error exit.
* **Callbacks outlive their hooks.** The binding frees a hook's ctypes thunk
  at ``hook_del``; a translated block can still reach it (a crash inside
  ``emu_start``). :meth:`ExitHooks._keep_callbacks_alive` keeps them.
* **Block-start checks are a service.** Code outside the engine that needs
  "call me at every block start while armed" (the Xen callback's deassert
  poll) asks :meth:`ExitHooks.add_block_check`; it never adds a Unicorn hook
  itself.
"""
from __future__ import annotations

import collections
import functools

from unicorn import (Uc, UC_ARCH_X86, UC_MODE_64, UC_HOOK_BLOCK, UC_HOOK_INSN, UC_HOOK_INSN_INVALID,
                     UC_HOOK_INTR, UC_HOOK_MEM_UNMAPPED, UC_MEM_FETCH_UNMAPPED, UC_MEM_WRITE_UNMAPPED)
from unicorn import x86_const as X

from .. import exits as E
from . import icount, stopcheck
from .startup import EngineUnsupported
from .irqwindow import EXIT_VECTOR as IRQ_WINDOW_EXIT_VECTOR, NMI_EXIT_VECTOR
from .msr import CPUID_EXIT_VECTOR, EXIT_VECTOR as MSR_EXIT_VECTOR, RDTSC_EXIT_VECTOR
from .msr import CR_WRITE_EXIT_VECTORS, INTERCEPT_PF, OFF_INTERCEPT_EXCEPTIONS, PF_EXIT_VECTOR
from .msr import SHUTDOWN_EXIT_VECTOR, UMIP_EXIT_VECTORS
from .rawctx import HF2_NMI_MASK, HF_CS64, OFF_HFLAGS2

NO_RIP = (1 << 64) - 1           # a hook range no instruction is at (non-canonical)
TSC_AUX = 0xC0000103

# Vectors whose exceptions push an error code (SDM vol. 3 table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
IRET_FAULTS = frozenset({10, 11, 12, 13, 14, 17})      # #TS #NP #SS #GP #PF #AC: what an IRET can raise
LEGACY_PREFIXES = frozenset(b"\x66\x67\xf0\xf2\xf3\x26\x2e\x36\x3e\x64\x65")


def guarded(default):
    """Wrap a VCpu hook method: a Python exception becomes an internal-error exit.

    Unicorn's binding would re-raise it after ``emu_start``, but only after
    handing ctypes a ``None`` it cannot convert; catching it here keeps the
    engine's return value sane and the report to one line.
    """
    def wrap(fn):
        def hook(self, *args):
            try:
                return fn(self, *args)
            except Exception as exc:          # noqa: BLE001 - reported, not hidden
                return self._hook_failed(exc, default)
        hook.__name__ = fn.__name__
        hook.__doc__ = fn.__doc__
        return hook
    return wrap


@functools.cache
def binding_selftest() -> None:
    """Check, once per process, that the binding keeps thunks where ``_keep_callbacks_alive`` looks.

    The binding's ``Uc._callbacks`` (hook handle -> ctypes thunk) and
    ``Uc._mmio_callbacks`` (range -> callbacks) are private; a binding that
    renamed them would let the crash come back silently.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    handle = uc.hook_add(UC_HOOK_BLOCK, lambda *args: None)
    uc.mmio_map(0x1000, 0x1000, lambda *args: 0, None, lambda *args: None, None)
    callbacks, mmio = getattr(uc, "_callbacks", None), getattr(uc, "_mmio_callbacks", None)
    if not (isinstance(callbacks, dict) and callbacks.get(handle) is not None and isinstance(mmio, dict) and mmio):
        raise EngineUnsupported("the unicorn binding no longer keeps hook callbacks in Uc._callbacks and "
                                "Uc._mmio_callbacks; install unicorn==2.1.4")


class ExitHooks:
    """The hook half of :class:`~xenicorn.engine.vcpu.VCpu` (a mixin: same object, no indirection)."""

    def _install_hooks(self, gaps: list[tuple[int, int]]) -> None:
        """Add the permanent hooks; ``gaps`` are the physical ranges without RAM."""
        uc = self.uc
        hook = lambda name: self.core.hook(self, name)         # noqa: E731 - the method, or a forwarder
        # Order and ranges matter (docs/unicorn-notes.md, "A pending stop makes
        # Unicorn skip..."): once a stop is pending, Unicorn's CPUID/SYSCALL/
        # SYSENTER dispatch gives up after the first instruction hook whose
        # range covers RIP. CPUID comes first; IN and OUT, whose dispatch
        # ignores ranges, get one no instruction has, so they never end it.
        # SYSCALL and SYSENTER stay exposed until stops stop setting
        # stop_request mid-block (the open fix).
        uc.hook_add(UC_HOOK_INSN, hook("_on_cpuid"), None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INSN, hook("_on_syscall"), None, 1, 0, X.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, hook("_on_sysenter"), None, 1, 0, X.UC_X86_INS_SYSENTER)
        uc.hook_add(UC_HOOK_INSN, hook("_on_in"), None, NO_RIP, NO_RIP, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, hook("_on_out"), None, NO_RIP, NO_RIP, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN_INVALID, hook("_on_invalid"))
        uc.hook_add(UC_HOOK_INTR, hook("_on_intr"))
        # Only where there is no RAM: Unicorn never lets a store clear a
        # page's "not dirty" TLB flag if any memory hook, even an unmapped
        # one, covers that page, so a hook over all of memory sent every
        # guest store down the slow path (docs/unicorn-notes.md).
        for begin, end in gaps:
            uc.hook_add(UC_HOOK_MEM_UNMAPPED, hook("_on_unmapped"), None, begin, end)

    def _keep_callbacks_alive(self, uc) -> None:
        """Hold the ctypes thunks of deleted hooks and unmapped MMIO ranges.

        Unicorn's Python binding frees a hook's thunk at ``hook_del`` and an
        MMIO range's at ``mem_unmap``; a later call that still reaches a freed
        thunk is a segfault inside ``emu_start`` (Linux boots: libffi calling
        ``_CallPythonObject`` with a NULL callable, about one boot in four).
        Releasing them when the next ``emu_start`` returns was not enough
        (measured: still 2 in 6), keeping them was (0 in 6), so they are kept:
        the last 65,536 deleted hooks (block checks and the fallback
        interrupt-window hook come and go; a few hundred bytes each) and
        every unmapped MMIO range (only overlays move those).
        docs/unicorn-notes.md.
        """
        self._retired_callbacks: collections.deque = collections.deque(maxlen=1 << 16)
        hook_del, mem_unmap = uc.hook_del, uc.mem_unmap

        def keeping_hook_del(handle):
            self._retired_callbacks.append(getattr(uc, "_callbacks", {}).get(handle))
            hook_del(handle)

        def keeping_mem_unmap(address, size):
            self._retired_callbacks.append(dict(getattr(uc, "_mmio_callbacks", {})))
            mem_unmap(address, size)
        uc.hook_del, uc.mem_unmap = keeping_hook_del, keeping_mem_unmap

    def _hook_failed(self, exc: Exception, default):
        """A hook raised: keep the first error, end the run, give Unicorn a sane value."""
        if self._internal is None:
            self._internal = exc
        self.end_run()
        return default

    def guarded_hook(self, fn, default=None):
        """Wrap another module's Unicorn hook like ours (see :func:`guarded`).

        The engine's hooks serve every vCPU: a failure ends the run of the
        vCPU that is loaded, whichever installed the hook.
        """
        core = self.core

        def hook(*args):
            try:
                return fn(*args)
            except Exception as exc:          # noqa: BLE001 - reported, not hidden
                return core.current._hook_failed(exc, default)
        return hook

    # ------------------------------------------------------------------
    # block-start checks: an engine service for code outside the engine
    # ------------------------------------------------------------------
    def add_block_check(self, fn) -> object:
        """Call ``fn(address)`` at the start of every guest block until removed; return a handle.

        What a hypervisor gets from an exit on every guest instruction
        boundary it cares about, at block granularity: the Xen callback's
        deassert poll looks at ``upcall_pending`` here while its line is
        asserted. It costs a Python call per block while armed and nothing
        once removed. Unicorn instruments only blocks translated while a
        hook exists, so adding one flushes the translation cache; ``fn``
        may raise (an internal-error exit, like any hook) and may call
        :meth:`request_stop`. Call it from the run loop, not inside a hook.
        """
        def check(uc, address, size, _):
            try:
                fn(address)
            except Exception as exc:          # noqa: BLE001 - reported, not hidden
                self._hook_failed(exc, None)
        handle = self.uc.hook_add(UC_HOOK_BLOCK, check)
        self.uc.ctl_flush_tb()
        return handle

    def remove_block_check(self, handle) -> None:
        """Stop calling the check :meth:`add_block_check` returned ``handle`` for."""
        self.uc.hook_del(handle)                # its thunk is kept (_keep_callbacks_alive)

    # ------------------------------------------------------------------
    # hooks: each builds an exit and hands it to the machine
    # ------------------------------------------------------------------
    def _trace_pc(self) -> int:
        return self.uc.reg_read(X.UC_X86_REG_RIP) if self.machine.tracer.active else -1

    @guarded(0)
    def _on_in(self, uc, port, size, _):
        ex = E.PortIO(self._trace_pc(), port, size, False)
        self.machine.handle_exit(self, ex)
        return ex.value

    @guarded(None)
    def _on_out(self, uc, port, size, value, _):
        self.machine.handle_exit(self, E.PortIO(self._trace_pc(), port, size, True, value))

    @guarded(1)
    def _on_cpuid(self, uc, _):
        self._cpuid()
        return 1                                   # skip Unicorn's own CPUID

    def _cpuid(self) -> bool:
        """Answer a CPUID from the exit's result; False if it faulted instead (registers untouched)."""
        uc = self.uc
        leaf = uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF
        sub = uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF
        ex = E.Cpuid(self._trace_pc(), leaf, sub)
        self.machine.handle_exit(self, ex)
        if ex.result is None or self._pending_exit is not None:
            return False
        a, b, c, d = ex.result
        uc.reg_write(X.UC_X86_REG_RAX, a)
        uc.reg_write(X.UC_X86_REG_RBX, b)
        uc.reg_write(X.UC_X86_REG_RCX, c)
        uc.reg_write(X.UC_X86_REG_RDX, d)
        return True

    @guarded(None)
    def _on_syscall(self, uc, _):
        self.machine.handle_exit(self, E.Syscall(self.pc, "syscall"))

    @guarded(None)
    def _on_sysenter(self, uc, _):
        self.machine.handle_exit(self, E.Syscall(self.pc, "sysenter"))

    @guarded(False)
    def _on_invalid(self, uc, _) -> bool:
        snap = self.snapshot()
        pc = snap.rip
        insn = self.fetch_bytes(pc, 3, regs=snap.paging_regs())
        if insn in (b"\x0f\x01\xc1", b"\x0f\x01\xd9"):         # vmcall, vmmcall
            ex: E.Exit = E.Hypercall(pc, -1)
            ex.snapshot = snap
        else:
            ex = E.InvalidInstruction(pc, insn)
        self.machine.handle_exit(self, ex)
        return self._pending_exit is None             # True: handled, keep running

    @guarded(None)
    def _on_intr(self, uc, intno, _):
        if intno == IRQ_WINDOW_EXIT_VECTOR:
            # The request must go before the hook returns: Unicorn checks it
            # again before it looks at the stop, and would exit again forever.
            self._irq_request.virq = False
            self.window_exits += 1
            self.request_stop("interrupt-window")
            return
        if intno == NMI_EXIT_VECTOR:
            # the IRET that ends NMI blocking ran: the held NMI is delivered here (runloop)
            self._irq_request.nmi = False        # the intercept goes in the run loop (disarm_nmi_window)
            self.request_stop("nmi-window")
            return
        ctx = self.live
        if intno == MSR_EXIT_VECTOR:
            write = ctx.error_code == 1
            ctx.consume_exception()
            self._on_msr(write)
            return
        if intno in CR_WRITE_EXIT_VECTORS:
            ctx.consume_exception()
            self._on_cr_write(CR_WRITE_EXIT_VECTORS[intno])
            return
        if intno in UMIP_EXIT_VECTORS:                 # CR4.UMIP is on (msr.intercept_umip)
            ctx.consume_exception()
            self.machine.handle_exit(self, E.SystemRead(self.pc, UMIP_EXIT_VECTORS[intno]))
            return
        if intno == SHUTDOWN_EXIT_VECTOR:
            ctx.consume_exception()
            self.machine.handle_exit(self, E.Shutdown(self.pc, "triple-fault", 1, "triple fault (SVM shutdown exit)"))
            return
        if intno == RDTSC_EXIT_VECTOR:
            ctx.consume_exception()
            tsc = self.machine.guest_tsc()
            uc.reg_write(X.UC_X86_REG_RAX, tsc & 0xFFFFFFFF)
            uc.reg_write(X.UC_X86_REG_RDX, (tsc >> 32) & 0xFFFFFFFF)
            rip = uc.reg_read(X.UC_X86_REG_RIP)
            length = 2
            # QEMU checks the RDTSC intercept for RDTSCP too (0F 01 F9), which also loads TSC_AUX.
            if self.read_linear(rip, 3, fetch=True) == b"\x0f\x01\xf9":
                uc.reg_write(X.UC_X86_REG_RCX, uc.msr_read(TSC_AUX) & 0xFFFFFFFF)
                length = 3
            uc.reg_write(X.UC_X86_REG_RIP, rip + length)
            return
        if intno == CPUID_EXIT_VECTOR:                 # CPUID faulting is on (msr.intercept_cpuid)
            ctx.consume_exception()
            rip = uc.reg_read(X.UC_X86_REG_RIP)
            code = self.fetch_bytes(ctx.segment(1).base + rip, 15)   # CS (ES, CS, SS, ...) base
            length = code.find(b"\x0f\xa2") + 2        # 0F A2 after any prefixes
            if self._cpuid() and length >= 2:
                uc.reg_write(X.UC_X86_REG_RIP, rip + length)
            return
        if intno == PF_EXIT_VECTOR:                    # a #PF while the window is open (engine/msr.py)
            intno = 14
            software = False
        else:
            software = ctx.exception_is_int
        if intno in IRET_FAULTS and not software and ctx.read(OFF_HFLAGS2, "<I") & HF2_NMI_MASK:
            self._iret_fault_unblocks_nmis(ctx)
        err = ctx.error_code if (intno in ERROR_CODE_VECTORS and not software) else None
        ctx.consume_exception()
        cr2 = None
        if intno == 14 and not software:
            # CR2 is still the guest's: the page walk put the address in the VMCB (msr.INTERCEPT_PF)
            pf_intercepted = ctx.read(OFF_INTERCEPT_EXCEPTIONS, "<I") & INTERCEPT_PF
            cr2 = self.msr.fault_address() if pf_intercepted else uc.reg_read(X.UC_X86_REG_CR2)
        self.machine.handle_exit(self, E.Exception_(self.pc, intno, err, software, cr2))

    def _iret_fault_unblocks_nmis(self, ctx) -> None:
        """An IRET that faults still ends NMI blocking (SDM vol. 3 §6.7.1); QEMU's only clears it on success."""
        code = self.fetch_bytes(ctx.segment(1).base + ctx.rip, 15)      # CS (ES, CS, SS, ...) base
        i = 0
        while i < len(code) and (code[i] in LEGACY_PREFIXES or
                                 (ctx.hflags & HF_CS64 and 0x40 <= code[i] <= 0x4F)):
            i += 1
        if code[i:i + 1] == b"\xcf":
            ctx.write(OFF_HFLAGS2, "<I", ctx.read(OFF_HFLAGS2, "<I") & ~HF2_NMI_MASK)

    def _on_msr(self, write: bool) -> None:
        uc = self.uc
        msr = uc.reg_read(X.UC_X86_REG_RCX) & 0xFFFFFFFF
        value = ((uc.reg_read(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32) | (uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF)
        pc = uc.reg_read(X.UC_X86_REG_RIP)
        ex = E.Msr(pc, msr, write, value if write else 0)
        self.machine.handle_exit(self, ex)
        if self._pending_exit is not None:
            return
        if not write:
            uc.reg_write(X.UC_X86_REG_RAX, ex.value & 0xFFFFFFFF)
            uc.reg_write(X.UC_X86_REG_RDX, ex.value >> 32)
        if uc.reg_read(X.UC_X86_REG_RIP) == pc:       # a handler may have injected #GP instead
            uc.reg_write(X.UC_X86_REG_RIP, pc + 2)

    def _on_cr_write(self, cr: int) -> None:
        """A write to CR0/CR4, stopped before it ran: decode it and let the machine judge it."""
        from ..x86.crdecode import decode, SEG_INDEX
        pc = self.uc.reg_read(X.UC_X86_REG_RIP)
        bits = self.code_bits()
        code = self.instruction_bytes(pc, bits)      # CS's base counts: an AP's real-mode start-up
        gprs = self.live.gprs()
        insn = decode(code, bits, gprs, pc) if code is not None else None
        if insn is None or insn.cr != cr:
            self.machine.handle_exit(self, E.Shutdown(pc, "emulator-error", 1,
                                                      f"CR{cr} write exit at an instruction not understood"))
            return
        operand = None
        if insn.mem is not None:
            seg, off = insn.mem
            base = self.live.segment(SEG_INDEX[seg]).base if bits != 64 or seg in ("fs", "gs") else 0
            data = self.read_linear(base + off, 2)
            if not isinstance(data, bytes):
                self.machine.handle_exit(self, E.Shutdown(pc, "emulator-error", 1,
                                                          "LMSW from an unmapped operand is not modelled"))
                return
            operand = int.from_bytes(data, "little")
        cr0 = self.uc.reg_read(X.UC_X86_REG_CR0)
        self.machine.handle_exit(self, E.CrWrite(pc, cr, insn.value(cr0, operand), insn.length))

    @guarded(False)
    def _on_unmapped(self, uc, access, address, size, value, _) -> bool:
        kind = {UC_MEM_FETCH_UNMAPPED: "fetch", UC_MEM_WRITE_UNMAPPED: "write"}.get(access, "read")
        ex = E.UnmappedAccess(self.pc, address, size, kind)
        self.machine.handle_exit(self, ex)
        return self._pending_exit is None

    # ------------------------------------------------------------------
    # ending a run from inside it
    # ------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Make run() return a Request exit soon (safe from hooks and other threads).

        Normally the stop lands at the start of the next block
        (:mod:`stopcheck`). A counting vCPU keeps Unicorn's per-access stop
        checks, where ``emu_stop()`` from inside an MMIO callback is noticed
        right after the access and puts RIP back to the instruction, which
        then runs, and writes the device, again (measured: a self-IPI written
        to the ICR repeated forever). It lowers the counting hook's limit
        instead, which stops the run exactly before the next instruction
        (:func:`icount.stop_before_next_instruction`), so an interrupt an
        MMIO write raises is taken at once instead of at the end of the
        run quantum.
        """
        self._stop_reasons.append(reason)
        if self.count_instructions:
            stopcheck.sync_pc_on_exit(self.uc)
            icount.stop_before_next_instruction(self.uc)
        else:
            stopcheck.soft_stop(self.uc)

    def stop_with(self, exit_: E.Exit) -> None:
        """From inside a hook: end emu_start and make run() return ``exit_``."""
        self._pending_exit = exit_
        self.end_run()

    def end_run(self) -> None:
        """End emu_start at the next block start (from a hook or another thread).

        Between blocks (the default), a soft stop: the rest of the block
        still gets its CPUID and SYSCALL hooks (:mod:`stopcheck`). A
        counting vCPU keeps Unicorn's own stop.
        """
        if self.precise_stops:
            stopcheck.soft_stop(self.uc)
        else:
            stopcheck.emu_stop(self.uc)
