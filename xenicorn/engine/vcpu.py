"""One virtual CPU: a Unicorn instance, its hooks, and ``run()``.

This is xenicorn's ``KVM_RUN``. :meth:`VCpu.run` starts Unicorn at the
current instruction and returns a typed :mod:`exit <xenicorn.exits>`
when it stops. Unicorn reports events through hooks; each hook here is a thin
adaptor that builds the exit record and passes it to the machine:

=====================  ==========================  =========================
Unicorn report         exit                        handled
=====================  ==========================  =========================
UC_HOOK_INSN IN/OUT    :class:`PortIO`             in the hook (device call)
mmio_map callbacks     :class:`Mmio`               in the hook
UC_HOOK_INSN CPUID     :class:`Cpuid`              in the hook
UC_HOOK_INSN SYSCALL,  :class:`Syscall`            in the hook (we give them
SYSENTER                                           their architectural effect)
UC_HOOK_INSN_INVALID   :class:`InvalidInstruction` hypercall or #UD delivery
                       / :class:`Hypercall`
UC_HOOK_INTR           :class:`Exception_`         delivered through the IDT
UC_HOOK_INTR 0x17C     :class:`Msr`                in the hook (only while the
                                                   MSR window is open)
UC_HOOK_MEM_UNMAPPED   :class:`UnmappedAccess`     floats high / fatal fetch
emu_start returns      :class:`Hlt`, :class:`Limit`, :class:`Request`
=====================  ==========================  =========================

Every Unicorn instance is created in 64-bit mode: it can run real, protected
and long mode code, and a 32-bit PVH entry can switch itself to long mode.
Reset leaves the engine in long mode; :meth:`reset_to_flat32` puts it where
the PVH ABI starts a guest.
"""
from __future__ import annotations

import collections
import contextlib
import struct

from typing import TYPE_CHECKING

from unicorn import (Uc, UcError, UC_ARCH_X86, UC_MODE_64, UC_HOOK_INSN, UC_HOOK_INTR,
                     UC_HOOK_INSN_INVALID, UC_HOOK_MEM_UNMAPPED, UC_HOOK_BLOCK,
                     UC_MEM_FETCH_UNMAPPED, UC_MEM_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT,
                     UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED)
from unicorn import x86_const as X

from .. import exits as E
from . import icount, irqwindow, stopcheck
from .stoptimer import StopTimer
from .msr import MsrInterceptor, EXIT_VECTOR as MSR_EXIT_VECTOR, RDTSC_EXIT_VECTOR, VMCB, VMCB_INT_VECTOR
from .irqwindow import EXIT_VECTOR as IRQ_WINDOW_EXIT_VECTOR
from .rawctx import (RawContext, LiveContext, flat_code32, flat_data, SegmentCache, HF_INHIBIT_IRQ, HF_CS32, HF_CS64,
                     OFF_CR, OFF_EIP, OFF_OLD_EXCEPTION, OFF_HFLAGS, HF_LMA, HF_CPL_MASK, DESC_P)

if TYPE_CHECKING:
    from ..machine.machine import Machine

UNTIL = (1 << 64) - 1            # emu_start's stop address: never reached
NO_RIP = (1 << 64) - 1           # a hook range no instruction is at (non-canonical)
NO_LIMIT = 1 << 62               # an instruction "limit" that is never reached
EFER = 0xC0000080
TSC_AUX = 0xC0000103
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
CR0_PG = 1 << 31
RFLAGS_IF = 1 << 9
PAGE = 4096

# Vectors whose exceptions push an error code (SDM vol. 3 table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
REG = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in _GPR64}
REG.update({n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in
            ("cr0", "cr2", "cr3", "cr4", "cs", "ds", "es", "fs", "gs", "ss",
             "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "eflags")})


def _guarded(default):
    """Wrap a Unicorn hook: a Python exception becomes an internal-error exit.

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


def _paging_off(method):
    """Run a VCpu method that changes Unicorn's memory map inside ``physical_view``."""
    def wrapped(self, *args):
        with self.physical_view():
            return method(self, *args)
    wrapped.__name__ = method.__name__
    wrapped.__doc__ = method.__doc__
    return wrapped


GPR_INDEX = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7,
             **{f"r{i}": i for i in range(8, 16)}}


class CpuSnapshot:
    """A read-only copy of the state hot exit handlers need."""

    __slots__ = ("gprs", "rip", "hflags", "cr0", "cr3", "cr4", "efer")

    def __init__(self, gprs, rip, hflags, cr0, cr3, cr4, efer):
        self.gprs, self.rip, self.hflags = gprs, rip, hflags
        self.cr0, self.cr3, self.cr4, self.efer = cr0, cr3, cr4, efer

    def reg(self, name: str) -> int:
        return self.gprs[GPR_INDEX[name]]

    @property
    def cpl(self) -> int:
        return self.hflags & 3

    @property
    def code_bits(self) -> int:
        if self.hflags & HF_CS64:
            return 64
        return 32 if self.hflags & HF_CS32 else 16

    def paging_regs(self):
        from ..x86.paging import PagingRegs
        return PagingRegs(cr0=self.cr0, cr3=self.cr3, cr4=self.cr4, efer=self.efer)


class VCpu:
    """A vCPU: owns a Unicorn engine and turns its reports into exits."""

    def __init__(self, machine: "Machine", index: int = 0, count_instructions: bool = False):
        self.machine = machine
        self.index = index
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._keep_callbacks_alive(self.uc)
        machine.memory.map_into(self.uc)
        self.count_instructions = count_instructions
        self.instructions = 0            # exact only when counting
        self._stop_reasons: list[str] = []
        self._pending_exit: E.Exit | None = None
        self._internal: Exception | None = None
        self._in_emu = False
        self.halted = False
        self.sleep_kind = ""                 # HLT, SCHEDOP_block, SCHEDOP_poll while halted
        self._window_hook = None
        # The exact, hook-free interrupt window when this Unicorn build allows it
        self._irq_request = irqwindow.InterruptRequest(self.uc) if irqwindow.available() else None
        self._engine_vector: int | None = None   # handed to the CPU engine, not yet delivered
        self.engine_deliveries = 0
        self.live = LiveContext(self.uc)         # CPU fields read and written in place
        self.window_exits = 0
        self.stale_exception_states = 0          # see _drop_stale_exception_state
        self._mmio_pages: set[int] = set()
        uc = self.uc
        # Order and ranges matter (docs/unicorn-notes.md, "A pending stop makes
        # Unicorn skip..."): once a stop is pending, Unicorn's CPUID/SYSCALL/
        # SYSENTER dispatch gives up after the first instruction hook whose
        # range covers RIP. CPUID comes first; IN and OUT, whose dispatch
        # ignores ranges, get one no instruction has, so they never end it.
        # SYSCALL and SYSENTER stay exposed until stops stop setting
        # stop_request mid-block (the open fix).
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, self._on_sysenter, None, 1, 0, X.UC_X86_INS_SYSENTER)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, NO_RIP, NO_RIP, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, NO_RIP, NO_RIP, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        # Only where there is no RAM: Unicorn never lets a store clear a
        # page's "not dirty" TLB flag if any memory hook, even an unmapped
        # one, covers that page, so a hook over all of memory sent every
        # guest store down the slow path (docs/unicorn-notes.md).
        for begin, end in self._gaps_in(machine.memory.ram_regions):
            uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped, None, begin, end)
        self.msr = MsrInterceptor(uc)
        # No "until" address. At the end of every emu_start Unicorn flushes
        # the block at until-1, translating that address as an instruction
        # fetch: in a paged guest that is a page fault nobody sees, which
        # still writes CR2 and Unicorn's double-fault bookkeeping (measured:
        # three run ends in a row became a silent triple fault). An empty
        # exit list turns the address and the flush off.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        # Stops land between blocks, so a stop never replays a memory access
        # (docs/unicorn-notes.md). Unicorn's counting needs the per-access
        # checks, so a counting vCPU keeps them and avoids stopping in MMIO.
        self.precise_stops = not count_instructions
        if self.precise_stops:
            stopcheck.stop_between_blocks(uc)
            # and stop without a stop_request the rest of the block would see
            self.stop_timer = StopTimer(uc, stop=lambda: stopcheck.soft_stop(uc))
        else:
            self.stop_timer = StopTimer(uc, stop=lambda: stopcheck.emu_stop(uc))

    # ------------------------------------------------------------------
    # register access
    # ------------------------------------------------------------------
    def reg(self, name: str) -> int:
        return self.uc.reg_read(REG[name])

    def set_reg(self, name: str, value: int) -> None:
        self.uc.reg_write(REG[name], value)

    @property
    def pc(self) -> int:
        return self.uc.reg_read(X.UC_X86_REG_RIP)

    @pc.setter
    def pc(self, value: int) -> None:
        self.uc.reg_write(X.UC_X86_REG_RIP, value)

    def efer(self) -> int:
        return self.uc.msr_read(EFER)

    def long_mode(self) -> bool:
        return bool(self.efer() & EFER_LMA)

    def instructions_now(self) -> int:
        """Executed instructions, including the current emu_start (counting mode)."""
        if self._in_emu and self.count_instructions:
            return self.instructions + icount.read_counter(self.uc)
        return self.instructions

    def cpl(self) -> int:
        return RawContext(self.uc).cpl

    def code_bits(self) -> int:
        """16, 32 or 64: the size the current CS executes at."""
        cs = RawContext(self.uc).segment("cs")
        if self.long_mode() and cs.flags & (1 << 21):
            return 64
        if not self.reg("cr0") & 1:
            return 16
        return 32 if cs.flags & (1 << 22) else 16

    def snapshot(self) -> "CpuSnapshot":
        """Registers, mode and paging state from one context save (~3 µs).

        Cheaper than a reg_read per register (~2 µs each) on hot exits such
        as hypercalls.
        """
        ctx = RawContext(self.uc)
        raw = ctx.read_block(0, 128)
        gprs = struct.unpack("<16Q", raw)
        cr = struct.unpack("<5Q", ctx.read_block(OFF_CR, 40))
        return CpuSnapshot(gprs, ctx.read(OFF_EIP, "<Q"), ctx.hflags, cr[0], cr[3], cr[4], self.efer())

    def interrupt_shadow(self) -> bool:
        """True right after STI or MOV SS: interrupts wait one instruction."""
        return bool(RawContext(self.uc).hflags & HF_INHIBIT_IRQ)

    # ------------------------------------------------------------------
    # linear (virtual) memory, through the guest's page tables
    # ------------------------------------------------------------------
    def paging_regs(self):
        from ..x86.paging import PagingRegs
        return PagingRegs(cr0=self.reg("cr0"), cr3=self.reg("cr3"), cr4=self.reg("cr4"), efer=self.efer())

    def translate(self, linear: int, *, write: bool = False, user: bool = False, fetch: bool = False,
                  regs=None):
        """Linear → physical; returns a Translation or a PageFault (never raises for the guest's sake)."""
        from ..x86.paging import translate
        mem = self.machine.memory
        return translate(regs or self.paging_regs(), linear, mem.read_int, write=write, user=user,
                         fetch=fetch, write_phys=mem.write_int)

    def read_linear(self, linear: int, size: int, *, user: bool = False, fetch: bool = False, regs=None):
        """Read guest-linear bytes; returns bytes or a PageFault."""
        from ..x86.paging import PageFault
        regs = regs or self.paging_regs()
        out = bytearray()
        while size:
            chunk = min(size, PAGE - (linear & (PAGE - 1)))
            t = self.translate(linear, user=user, fetch=fetch, regs=regs)
            if isinstance(t, PageFault):
                return t
            out += self.read_phys(t.phys, chunk)
            linear += chunk
            size -= chunk
        return bytes(out)

    def write_linear(self, linear: int, data: bytes, *, user: bool = False):
        """Write guest-linear bytes; returns None or a PageFault (nothing written then)."""
        from ..x86.paging import PageFault
        regs = self.paging_regs()
        pieces = []
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, PAGE - ((linear + pos) & (PAGE - 1)))
            t = self.translate(linear + pos, write=True, user=user, regs=regs)
            if isinstance(t, PageFault):
                return t
            pieces.append((t.phys, data[pos:pos + chunk]))
            pos += chunk
        for phys, piece in pieces:
            self.write_phys(phys, piece)
        return None

    def read_phys(self, addr: int, size: int) -> bytes:
        """Read guest RAM; anything else (MMIO, holes) raises GuestMemoryError."""
        return self.machine.memory.read(addr, size)

    def write_phys(self, addr: int, data: bytes) -> None:
        """Write guest RAM; anything else (MMIO, holes) raises GuestMemoryError."""
        self.machine.memory.write(addr, data)

    # ------------------------------------------------------------------
    # reset state
    # ------------------------------------------------------------------
    def reset_to_flat32(self, entry: int, ebx: int = 0, esp: int = 0) -> None:
        """The PVH entry state (xen/include/public/arch-x86/hvm/start_info.h).

        32-bit protected mode, paging off, flat 4 GiB CS (execute/read) and
        DS/ES/SS (read/write), TR a 32-bit busy TSS at base 0 limit 0x67,
        CR4 = EFER = 0, EFLAGS with IF=0, EBX = start_info's physical
        address. Unicorn's 64-bit engine starts in long mode; turning CR0.PG
        off and clearing EFER leaves it.
        """
        uc = self.uc
        # EFER.LMA is read-only to WRMSR; only turning paging off leaves long
        # mode (QEMU's CR0 update clears LMA then), so turn it on, then off.
        uc.reg_write(X.UC_X86_REG_CR4, 0x20)
        uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
        uc.reg_write(X.UC_X86_REG_CR0, 0x11)                # PE + ET, paging off
        uc.msr_write(EFER, 0)
        uc.reg_write(X.UC_X86_REG_CR4, 0)
        uc.reg_write(X.UC_X86_REG_CR3, 0)
        with RawContext(uc) as ctx:
            data = flat_data(0x18)
            ctx.load_segments(cs=flat_code32(0x10), ss=data, ds=data, es=data,
                              fs=flat_data(0), gs=flat_data(0))
            ctx.set_segment("tr", SegmentCache(0x20, 0, 0x67, (1 << 15) | (0xB << 8)))
            ctx.set_segment("ldt", SegmentCache(0, 0, 0xFFFF, (1 << 15) | (0x2 << 8)))
            ctx.set_cpl(0)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0, 0xFFFF, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0xFFFF, 0))
        for r in ("rax", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
                  "r12", "r13", "r14", "r15"):
            self.set_reg(r, 0)
        self.set_reg("rbx", ebx)
        self.set_reg("rsp", esp)
        self.set_reg("rflags", 0x2)
        self.set_reg("rip", entry)

    # ------------------------------------------------------------------
    # the run loop primitive
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

    @staticmethod
    def _gaps_in(ram_regions) -> list[tuple[int, int]]:
        """Inclusive physical ranges not covered by RAM, up to 2^64 - 1."""
        gaps, cur = [], 0
        for base, length, _ in sorted(ram_regions):
            if base > cur:
                gaps.append((cur, base - 1))
            cur = max(cur, base + length)
        gaps.append((cur, (1 << 64) - 1))
        return gaps

    def _keep_callbacks_alive(self, uc: Uc) -> None:
        """Hold the ctypes thunks of deleted hooks and unmapped MMIO ranges.

        Unicorn's Python binding frees a hook's thunk at ``hook_del`` and an
        MMIO range's at ``mem_unmap``; a later call that still reaches a freed
        thunk is a segfault inside ``emu_start`` (Linux boots: libffi calling
        ``_CallPythonObject`` with a NULL callable, about one boot in four).
        Releasing them when the next ``emu_start`` returns was not enough
        (measured: still 2 in 6), keeping them was (0 in 6), so they are kept:
        the last 65,536 deleted hooks (the callback poll hook and the
        fallback interrupt-window hook come and go; a few hundred bytes each) and every unmapped MMIO range (only
        overlays move those). docs/unicorn-notes.md.
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

    def stop_with(self, exit_: E.Exit) -> None:
        """From inside a hook: end emu_start and make run() return ``exit_``."""
        self._pending_exit = exit_
        stopcheck.emu_stop(self.uc)

    def run(self, timeout_us: int = 0, count: int = 0) -> E.Exit:
        """Run the guest until something needs the platform; return why."""
        self._pending_exit = None
        self._internal = None
        self._stop_reasons = []
        start = self.pc
        if not self.count_instructions:
            count = 0
        elif count == 0:
            count = NO_LIMIT            # Unicorn counts only when given a limit
        err = None
        self._drop_stale_exception_state()     # no exception is ever half-delivered between runs
        self._in_emu = True
        internal = None
        if timeout_us:
            self.stop_timer.arm(timeout_us / 1e6)
        try:
            self.uc.emu_start(start, UNTIL, count=count)
        except UcError as e:
            if e.errno != stopcheck.SOFT_STOP:   # a soft stop is how our stops end a run
                err = e
        except Exception as e:          # a bug of ours, raised inside a hook
            internal = e
        finally:
            self._in_emu = False
            timed_out = self.stop_timer.disarm() if timeout_us else False
            self._engine_delivery_done()
        internal = internal or self._internal
        if self.count_instructions:
            # a stop request lowers the limit: the instruction it was
            # counted for did not run
            n = icount.read_counter(self.uc)
            self.instructions += min(n, icount.read_limit(self.uc))
        pc = self.pc
        if internal is not None:
            return self._internal_error(internal, pc)
        if self._pending_exit is not None:
            return self._pending_exit
        if err is not None:
            return self._error_exit(err, pc)
        if self._stop_reasons:
            return E.Request(pc, list(self._stop_reasons))
        if count and count != NO_LIMIT and icount.read_counter(self.uc) > count:
            return E.Limit(pc, "max-insns")
        # Nothing asked for this stop: only HLT ends a run by itself. A run
        # the deadline ended is not read as a HLT even if one coincided (the
        # guest then resumes after it as if the deadline's timer woke it),
        # which saves a page walk per timer tick.
        if timed_out:
            return E.Limit(pc, "timeout")
        if self._just_halted(pc):
            return E.Hlt(pc)
        return E.Limit(pc, "stopped")

    def _drop_stale_exception_state(self) -> None:
        """Clear a stale ``old_exception`` (checked before every run).

        Unicorn's nested-exception bookkeeping promotes the next fault: with
        14 (#PF) left there a real #PF becomes a #DF (Linux: "double fault"
        for a user-mode stack fault); with 8 the next exception is a *triple
        fault*, which QEMU's ``check_exception`` turns into EXCP_HLT, so a
        VMCALL (a #UD to Unicorn) ended every run at once, RIP unchanged, no
        hook called: Linux hung at a hypercall. Between runs no exception is
        ever half-delivered (xenicorn delivers them itself), so the field is
        always stale here. Read in place (:class:`LiveContext`): no copy.
        """
        if self.live.read(OFF_OLD_EXCEPTION, "<i") != -1:
            self.live.consume_exception()
            self.stale_exception_states += 1

    def _internal_error(self, exc: Exception, pc: int) -> E.Exit:
        """An emulator bug must not look like a guest bug, nor print a traceback."""
        import os
        import traceback
        if os.environ.get("XENICORN_DEBUG"):
            traceback.print_exception(exc)
        return E.Shutdown(pc, "internal-error", 1,
                          f"xenicorn internal error at guest pc {pc:#x}: {type(exc).__name__}: {exc} "
                          "(XENICORN_DEBUG=1 shows the traceback)")

    def _just_halted(self, pc: int) -> bool:
        return pc > 0 and self.fetch_bytes(pc - 1, 1) == b"\xf4"

    def fetch_bytes(self, linear: int, size: int, regs=None) -> bytes:
        """Instruction bytes at a linear address, or b"" when they cannot be read."""
        from ..machine.memory import GuestMemoryError
        try:
            data = self.read_linear(linear, size, fetch=True, regs=regs)
        except GuestMemoryError:
            return b""
        return data if isinstance(data, bytes) else b""

    def _error_exit(self, err: UcError, pc: int) -> E.Exit:
        code = err.errno
        if code in (UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT):
            # FETCH_PROT: executing device (MMIO) memory, which Unicorn cannot do either
            return E.UnmappedAccess(pc, pc, 1, "fetch")
        if code in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED):
            return E.UnmappedAccess(pc, pc, 1, "read" if code == UC_ERR_READ_UNMAPPED else "write")
        return E.Shutdown(pc, "emulator-error", 1, f"CPU engine error at {pc:#x}: {err}")

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

    def _hook_failed(self, exc: Exception, default):
        """A hook raised: keep the first error, end the run, give Unicorn a sane value."""
        if self._internal is None:
            self._internal = exc
        stopcheck.emu_stop(self.uc)
        return default

    def guarded_hook(self, fn, default=None):
        """Wrap another module's Unicorn hook like ours (see ``_guarded``)."""
        def hook(*args):
            try:
                return fn(*args)
            except Exception as exc:          # noqa: BLE001 - reported, not hidden
                return self._hook_failed(exc, default)
        return hook

    def disarm_interrupt_window(self) -> None:
        if self._irq_request is not None:
            if self.msr.interrupt_window:
                if self._engine_vector is None:
                    self._irq_request.virq = False
                self.msr.watch_interrupt_window(False)
            return
        if self._window_hook is not None:
            self.uc.hook_del(self._window_hook)
            self._window_hook = None

    # ------------------------------------------------------------------
    # external interrupts delivered by the CPU engine itself
    # ------------------------------------------------------------------
    @property
    def engine_delivery_pending(self) -> bool:
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
        """
        m = self.machine
        return (self._irq_request is not None and not self.count_instructions and not m.tracer.on("int")
                and not m.tracer.listeners and not m.agents
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
        self.uc.mem_write(VMCB + VMCB_INT_VECTOR, struct.pack("<I", vector))
        self._engine_vector = vector
        self._irq_request.virq = True

    def _engine_delivery_done(self) -> None:
        """After a run: the engine clears the request once it has delivered the vector."""
        if self._engine_vector is not None and not self._irq_request.virq:
            self._engine_vector = None
            self.engine_deliveries += 1

    @_guarded(None)
    def _on_window_block(self, uc, address, size, _):
        # A block that starts in the STI/MOV SS shadow must run its first
        # instruction first (``sti; hlt`` halts, then takes the interrupt):
        # stopping here would only come back to the same place.
        if uc.reg_read(X.UC_X86_REG_RFLAGS) & RFLAGS_IF and not self.interrupt_shadow():
            self.request_stop("interrupt-window")

    # ------------------------------------------------------------------
    # hooks: each builds an exit and hands it to the machine
    # ------------------------------------------------------------------
    def _trace_pc(self) -> int:
        return self.uc.reg_read(X.UC_X86_REG_RIP) if self.machine.tracer.active else -1

    @_guarded(0)
    def _on_in(self, uc, port, size, _):
        ex = E.PortIO(self._trace_pc(), port, size, False)
        self.machine.handle_exit(self, ex)
        return ex.value

    @_guarded(None)
    def _on_out(self, uc, port, size, value, _):
        self.machine.handle_exit(self, E.PortIO(self._trace_pc(), port, size, True, value))

    @_guarded(1)
    def _on_cpuid(self, uc, _):
        leaf = uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF
        sub = uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF
        ex = E.Cpuid(self._trace_pc(), leaf, sub)
        self.machine.handle_exit(self, ex)
        a, b, c, d = ex.result
        uc.reg_write(X.UC_X86_REG_RAX, a)
        uc.reg_write(X.UC_X86_REG_RBX, b)
        uc.reg_write(X.UC_X86_REG_RCX, c)
        uc.reg_write(X.UC_X86_REG_RDX, d)
        return 1                                   # skip Unicorn's own CPUID

    @_guarded(None)
    def _on_syscall(self, uc, _):
        self.machine.handle_exit(self, E.Syscall(self.pc, "syscall"))

    @_guarded(None)
    def _on_sysenter(self, uc, _):
        self.machine.handle_exit(self, E.Syscall(self.pc, "sysenter"))

    @_guarded(False)
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

    @_guarded(None)
    def _on_intr(self, uc, intno, _):
        if intno == IRQ_WINDOW_EXIT_VECTOR:
            # The request must go before the hook returns: Unicorn checks it
            # again before it looks at the stop, and would exit again forever.
            self._irq_request.virq = False
            self.window_exits += 1
            self.request_stop("interrupt-window")
            return
        ctx = self.live
        if intno == MSR_EXIT_VECTOR:
            write = ctx.error_code == 1
            ctx.consume_exception()
            self._on_msr(write)
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
        software = ctx.exception_is_int
        err = ctx.error_code if (intno in ERROR_CODE_VECTORS and not software) else None
        ctx.consume_exception()
        cr2 = uc.reg_read(X.UC_X86_REG_CR2) if intno == 14 and not software else None
        self.machine.handle_exit(self, E.Exception_(self.pc, intno, err, software, cr2))

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

    @_guarded(False)
    def _on_unmapped(self, uc, access, address, size, value, _) -> bool:
        kind = {UC_MEM_FETCH_UNMAPPED: "fetch", UC_MEM_WRITE_UNMAPPED: "write"}.get(access, "read")
        ex = E.UnmappedAccess(self.pc, address, size, kind)
        self.machine.handle_exit(self, ex)
        return self._pending_exit is None

    @contextlib.contextmanager
    def physical_view(self):
        """Paging off in the engine while Unicorn changes its memory map.

        Unicorn treats the *physical* addresses of ``mem_unmap`` and
        ``ctl_remove_cache`` as *virtual* ones: it walks the guest's page
        tables for them (to find the translated code to drop) and flushes
        the TLB entries of those virtual addresses. With the guest's paging
        on, that walk can fault: the fault is swallowed, but it leaves CR2
        overwritten and Unicorn's double-fault bookkeeping set, so the
        guest's next real page fault arrives as a #DF (measured: Linux's
        first user-mode fault after it mapped its grant frames); and the
        TLB entries of the virtual addresses that really map the page stay
        stale. With paging off for the change, virtual is physical; writing
        CR0 flushes the whole TLB; the saved context then comes back whole.
        """
        uc = self.uc
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        if not cr0 & CR0_PG:
            yield
            return
        saved = uc.context_save()
        uc.reg_write(X.UC_X86_REG_CR0, cr0 & ~CR0_PG)
        try:
            yield
        finally:
            uc.context_restore(saved)

    @_paging_off
    def map_overlay(self, gpa: int, host: int) -> None:
        """Put one host page at guest-physical ``gpa``, over RAM or a device range.

        Unicorn can unmap part of a region, but the MMIO callbacks of a split
        region then get offsets from the new start while keeping our old
        base, so an MMIO region is unmapped whole and its two sides mapped
        again on their own.
        """
        uc = self.uc
        if gpa in self._mmio_pages:
            for begin, end, _ in list(uc.mem_regions()):
                if begin <= gpa <= end:
                    uc.mem_unmap(begin, end + 1 - begin)
                    self._mmio_pages -= set(range(begin, end + 1, PAGE))
                    for lo, hi in ((begin, gpa), (gpa + PAGE, end + 1)):
                        if hi > lo:
                            self.map_mmio(lo, hi - lo)
                    break
        elif any(begin <= gpa <= end for begin, end, _ in uc.mem_regions()):
            uc.mem_unmap(gpa, PAGE)                 # a RAM page: Unicorn splits the region
        uc.mem_map_ptr(gpa, PAGE, 7, host)
        self.machine.memory.code_written(gpa, PAGE)

    @_paging_off
    def unmap_overlay(self, gpa: int) -> None:
        """Take an overlay page away: RAM under it shows again; elsewhere it floats."""
        self.uc.mem_unmap(gpa, PAGE)
        mem = self.machine.memory
        for base, length, off in mem.ram_regions:
            if base <= gpa < base + length:
                self.uc.mem_map_ptr(gpa, PAGE, 7, mem.host_addr + off + gpa - base)

    @_paging_off
    def map_mmio(self, base: int, size: int) -> None:
        """Route physical ``[base, base+size)`` to the machine's MMIO bus.

        Each guest load or store there becomes an :class:`Mmio` exit handled
        inside Unicorn's callback (about 0.5 us on top of a RAM access).
        Unicorn maps whole pages, so the range is widened to 4 KiB bounds.
        """
        start = base & ~(PAGE - 1)
        end = (base + size + PAGE - 1) & ~(PAGE - 1)
        pages = range(start, end, PAGE)
        if all(p in self._mmio_pages for p in pages):
            return
        new = [p for p in pages if p not in self._mmio_pages]
        # map maximal runs of new pages
        run_start = prev = new[0]
        for p in new[1:] + [None]:
            if p != prev + PAGE:
                self.uc.mmio_map(run_start, prev + PAGE - run_start, self._on_mmio_read, run_start,
                                 self._on_mmio_write, run_start)
                if p is not None:
                    run_start = p
            prev = p if p is not None else prev
        self._mmio_pages.update(new)

    @_guarded(0)
    def _on_mmio_read(self, uc, offset, size, base):
        ex = E.Mmio(self._trace_pc(), base + offset, size, False)
        self.machine.handle_exit(self, ex)
        return ex.value

    @_guarded(None)
    def _on_mmio_write(self, uc, offset, size, value, base):
        self.machine.handle_exit(self, E.Mmio(self._trace_pc(), base + offset, size, True, value))

    def close(self) -> None:
        self.stop_timer.close()
        self.disarm_interrupt_window()
