"""One virtual CPU: a Unicorn instance, its hooks, and ``run()``.

This is xenicorn's ``KVM_RUN``. :meth:`VCpu.run` starts Unicorn at the
current instruction and returns a typed :mod:`exit <xenicorn.exits>`
when it stops. Unicorn reports events through hooks; each hook
(:mod:`~xenicorn.engine.hooks`) is a thin adaptor that builds the exit
record and passes it to the machine:

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

The rest of xenicorn sees the vCPU through a small typed interface:
registers by name (:meth:`~VCpu.reg`, :meth:`~VCpu.set_reg`), MSRs
(:meth:`~VCpu.msr_read`), the hidden CPU state (:meth:`~VCpu.cpu_state`:
segment caches, CPL), guest-linear memory, :meth:`~VCpu.run` and stops,
the interrupt window (:mod:`~xenicorn.engine.delivery`), the memory map
(:mod:`~xenicorn.engine.memmap`) and block-start checks
(:meth:`~VCpu.add_block_check`). Code outside the engine should not need
the Unicorn handle (``vcpu.uc``); ``tests/test_architecture.py`` lists the
modules that still do while they move behind this interface.

Every Unicorn instance is created in 64-bit mode: it can run real, protected
and long mode code, and a 32-bit PVH entry can switch itself to long mode.
Reset leaves the engine in long mode; :meth:`reset_to_flat32` puts it where
the PVH ABI starts a guest.
"""
from __future__ import annotations

import struct

from typing import TYPE_CHECKING

from unicorn import (UcError, UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT,
                     UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED)
from unicorn import x86_const as X

from .. import exits as E
from . import icount, irqwindow, stopcheck
from .delivery import InterruptDelivery
from .hooks import ExitHooks
from .memmap import MemoryMap, gaps_in
from .core import EngineCore
from .cpufeatures import new_engine
from .msr import HF_GUEST, MsrInterceptor, SHADOW_BASE, SHADOW_SIZE
from .rawctx import RawContext, LiveContext, HF_INHIBIT_IRQ, OFF_CR, OFF_OLD_EXCEPTION, OFF_XCR0
from .rawctx import code_bits as hflags_code_bits
from .startup import probe
from .stoptimer import StopTimer
from ..x86.segments import DESC_P, DESC_S, SegmentCache, flat_code32, flat_data

if TYPE_CHECKING:
    from ..machine.machine import Machine

UNTIL = (1 << 64) - 1            # emu_start's stop address: never reached
NO_LIMIT = 1 << 62               # an instruction "limit" that is never reached
EFER = 0xC0000080
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
PAGE = 4096

_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
REG = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in _GPR64}
REG.update({n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in
            ("cr0", "cr2", "cr3", "cr4", "cs", "ds", "es", "fs", "gs", "ss",
             "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "eflags")})
# The descriptor-table registers: (selector, base, limit, flags) tuples in Unicorn.
TABLE_REG = {"gdtr": X.UC_X86_REG_GDTR, "idtr": X.UC_X86_REG_IDTR}

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
        return hflags_code_bits(self.hflags)

    def paging_regs(self):
        from ..x86.paging import PagingRegs
        return PagingRegs(cr0=self.cr0, cr3=self.cr3, cr4=self.cr4, efer=self.efer)


class VCpu(ExitHooks, InterruptDelivery, MemoryMap):
    """A vCPU: owns a Unicorn engine and turns its reports into exits.

    The hook adaptors, the interrupt window and the memory map are written
    in their own modules as mixins of this one class, so a hot path pays
    no extra indirection.
    """

    def __init__(self, machine: "Machine", index: int = 0, count_instructions: bool = False,
                 core: EngineCore | None = None, vcpus: int = 1):
        """vCPU ``index``; the first of a machine makes the engine (``vcpus`` planned), the others share ``core``."""
        engine = probe()                         # cached: the layout checks ran before the machine was built
        self.machine = machine
        self.index = index
        owner = core is None
        if owner:
            policy = getattr(machine, "cpuid", None)           # the CPU model: its features, executed
            core = EngineCore(new_engine(policy.feature_words() if policy is not None else None), vcpus)
        self.core = core
        self.uc = core.uc
        self._ctx = None                         # the saved CPU state while another vCPU is loaded
        self._virq = False                       # its virtual-interrupt request, while not loaded
        self._nmi_request = False                # its NMI-window request, while not loaded
        core.adopt(self)
        if owner:
            self._keep_callbacks_alive(self.uc)
            self._map_ram(machine.memory)
        else:
            self._mmio_pages = core.vcpus[0]._mmio_pages      # one memory map for all
        self.count_instructions = count_instructions
        self.instructions = 0            # exact only when counting
        self._stop_reasons: list[str] = []
        self._pending_exit: E.Exit | None = None
        self._internal: Exception | None = None
        self._in_emu = False
        self.halted = False
        self.sleep_kind = ""                 # HLT, SCHEDOP_block, SCHEDOP_poll, wait-for-SIPI while halted
        self.wait_for_sipi = False           # after INIT (an AP from power-on): only a SIPI starts it
        self.pending_sipi: int | None = None # a SIPI's vector, applied when the run loop next loads it
        self.pending_state = None            # callable(vcpu): a register state posted for it (VCPUOP_initialise)
        self.down = False                    # taken out of the schedule (VCPUOP_down)
        self.cpuid_faulting = False          # MISC_FEATURES_ENABLES bit 0 (machine/cpuidfault.py)
        self._window_hook = None
        # The exact, hook-free interrupt window when this Unicorn build allows it
        self._irq_request = irqwindow.InterruptRequest(self.uc) if engine.interrupt_window_exits else None
        self._engine_vector: int | None = None   # handed to the CPU engine, not yet delivered
        self.engine_deliveries = 0
        self.live = LiveContext(self.uc)         # CPU fields read and written in place
        self.window_exits = 0
        self.stale_exception_states = 0          # see _drop_stale_exception_state
        uc = self.uc
        self.msr = MsrInterceptor(uc, base=SHADOW_BASE + index * SHADOW_SIZE, vcpu=self)
        self.precise_stops = not count_instructions
        if not owner:
            self.stop_timer = core.vcpus[0].stop_timer
            return
        self._install_hooks(gaps_in(machine.memory.ram_regions))
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
        if self.precise_stops:
            stopcheck.stop_between_blocks(uc)
            # and stop without a stop_request the rest of the block would see
            self.stop_timer = StopTimer(uc, stop=lambda: stopcheck.soft_stop(uc))
        else:
            self.stop_timer = StopTimer(uc, stop=lambda: stopcheck.emu_stop(uc))

    # ------------------------------------------------------------------
    # register access
    # ------------------------------------------------------------------
    def _engine(self):
        """The engine with this vCPU loaded; None inside another vCPU's run (use the saved context).

        Between runs a vCPU that is not loaded is loaded on first use
        (:meth:`EngineCore.load`): reading another CPU's registers is rare
        (a debugger, a snapshot, a monitor query), and always between runs.
        """
        core = self.core
        if core.current is self:
            return self.uc
        if core.current._in_emu:
            return None
        core.load(self)
        return self.uc

    @property
    def loaded(self) -> bool:
        """Is this the vCPU the engine holds now?"""
        return self.core.current is self

    def _loaded(self) -> None:
        """Just loaded: state changed for it while it was out reaches the CPU now."""
        self.msr.reassert_if_stale()

    def reg(self, name: str) -> int:
        """A register by its lower-case name: ``rax`` .. ``r15``, ``rip``, ``rflags``, ``cr0``-``cr4``...

        Read from the engine, or from the saved context of a vCPU that is
        not loaded (no switch needed).
        """
        if self.core.current is self:
            return self.uc.reg_read(REG[name])
        return self._ctx.reg_read(REG[name])

    def set_reg(self, name: str, value: int) -> None:
        """Write a register by name (see :meth:`reg`)."""
        if self.core.current is self:
            self.uc.reg_write(REG[name], value)
        else:
            self._ctx.reg_write(REG[name], value)

    def msr_read(self, msr: int) -> int:
        """Read a model-specific register as the CPU holds it (EFER, STAR, LSTAR, SYSENTER_*...)."""
        return self._unintercepted(self._required().msr_read, msr)

    def msr_write(self, msr: int, value: int) -> None:
        """Write a model-specific register into the CPU (no intercept is consulted)."""
        self._unintercepted(self._required().msr_write, msr, value)

    def _unintercepted(self, fn, *args):
        # Unicorn's MSR access runs QEMU's RDMSR/WRMSR helper, intercept check
        # included: an intercepted MSR would "VM exit" out of the API call
        # (a longjmp into the CPU loop). Intercepts off for the call.
        live = self.live
        hf = live.hflags
        if not hf & HF_GUEST:
            return fn(*args)
        live.hflags = hf & ~HF_GUEST
        try:
            return fn(*args)
        finally:
            live.hflags = live.hflags | HF_GUEST

    def set_descriptor_table(self, name: str, base: int, limit: int) -> None:
        """Load GDTR or IDTR (``name`` is ``"gdtr"`` or ``"idtr"``), as LGDT/LIDT would."""
        self._required().reg_write(TABLE_REG[name], (0, base, limit, 0))

    def _required(self):
        uc = self._engine()
        if uc is None:
            raise RuntimeError(f"vCPU {self.index}'s hidden state is not reachable while vCPU "
                               f"{self.core.current.index} runs: post the change instead")
        return uc

    def cpu_state(self) -> RawContext:
        """The CPU's hidden state, opened for field access: use as ``with vcpu.cpu_state() as s:``.

        A saved copy of the whole CPU state (about 3 µs): read segment
        caches (``s.segment("cs")``, ``"gdt"``, ``"tr"``...), the CPL, the
        general registers (``s.gprs()``), RIP, control registers
        (``s.cr(3)``); load segment caches (``s.load_segments(cs=...,
        ss=...)`` keeps the CPU's derived mode bits in step, as a real
        segment load does) or set the CPL. Changes reach the CPU when the
        ``with`` block ends, and only if something was written. Register
        writes through :meth:`set_reg` inside the block would be undone by
        that commit: make them after it.
        """
        return RawContext(self._required())

    @property
    def pc(self) -> int:
        return self.reg("rip")

    @pc.setter
    def pc(self, value: int) -> None:
        self.set_reg("rip", value)

    def efer(self) -> int:
        return self._required().msr_read(EFER)

    def xcr0(self) -> int:
        """XCR0, the state components XSETBV enabled (CPUID leaf 0xD's sizes depend on it)."""
        self._required()
        return self.live.read(OFF_XCR0, "<Q")

    def long_mode(self) -> bool:
        return bool(self.efer() & EFER_LMA)

    def instructions_now(self) -> int:
        """Executed instructions, including the current emu_start (counting mode)."""
        if self._in_emu and self.count_instructions:
            return self.instructions + icount.read_counter(self.uc)
        return self.instructions

    def cpl(self) -> int:
        return RawContext(self._required()).cpl

    def code_bits(self) -> int:
        """16, 32 or 64: the size the current CS executes at."""
        cs = RawContext(self._required()).segment("cs")
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
        ctx = RawContext(self._required())
        cr = struct.unpack("<5Q", ctx.read_block(OFF_CR, 40))
        return CpuSnapshot(ctx.gprs(), ctx.rip, ctx.hflags, cr[0], cr[3], cr[4], self.efer())

    def interrupt_shadow(self) -> bool:
        """True right after STI or MOV SS: interrupts wait one instruction."""
        return bool(RawContext(self._required()).hflags & HF_INHIBIT_IRQ)

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
        self._leave_long_mode(0x11)                         # PE + ET, paging off
        with self.cpu_state() as ctx:
            data = flat_data(0x18)
            ctx.load_segments(cs=flat_code32(0x10), ss=data, ds=data, es=data,
                              fs=flat_data(0), gs=flat_data(0))
            ctx.set_segment("tr", SegmentCache(0x20, 0, 0x67, (1 << 15) | (0xB << 8)))
            ctx.set_segment("ldt", SegmentCache(0, 0, 0xFFFF, (1 << 15) | (0x2 << 8)))
            ctx.set_cpl(0)
        self.set_nmi_blocked(False)                  # INIT ends NMI blocking (QEMU's x86_cpu_reset too)
        self.set_descriptor_table("gdtr", 0, 0xFFFF)
        self.set_descriptor_table("idtr", 0, 0xFFFF)
        for r in ("rax", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
                  "r12", "r13", "r14", "r15"):
            self.set_reg(r, 0)
        self.set_reg("rbx", ebx)
        self.set_reg("rsp", esp)
        self.set_reg("rflags", 0x2)
        self.set_reg("rip", entry)

    def wake(self) -> None:
        """Runnable again: no longer halted, asleep in a hypercall, or waiting for a SIPI."""
        self.halted = self.wait_for_sipi = False
        self.sleep_kind = ""

    def _leave_long_mode(self, cr0: int) -> None:
        """CR0 = ``cr0`` (paging off), EFER = CR3 = CR4 = 0, whatever mode the engine was in."""
        uc = self._required()
        # EFER.LMA is read-only to WRMSR; only turning paging off leaves long
        # mode (QEMU's CR0 update clears LMA then), so turn it on, then off.
        uc.reg_write(X.UC_X86_REG_CR4, 0x20)
        uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
        uc.reg_write(X.UC_X86_REG_CR0, cr0)
        self.msr_write(EFER, 0)
        uc.reg_write(X.UC_X86_REG_CR4, 0)
        uc.reg_write(X.UC_X86_REG_CR3, 0)

    def load_initial_state(self, *, gprs: dict, cr0: int, cr3: int, cr4: int, efer: int, segments: dict) -> None:
        """A first state given from outside (Xen's VCPUOP_initialise): control registers, segments, registers.

        The control registers go in the order a CPU enters the mode in:
        CR4 (PAE), EFER (LME), CR3, then CR0, whose PG with LME sets LMA.
        """
        self._leave_long_mode(0x11)
        uc = self._required()
        uc.reg_write(X.UC_X86_REG_CR4, cr4)
        self.msr_write(EFER, efer & ~EFER_LMA)
        uc.reg_write(X.UC_X86_REG_CR3, cr3)
        uc.reg_write(X.UC_X86_REG_CR0, cr0)
        with self.cpu_state() as ctx:
            ctx.load_segments(**{n: c for n, c in segments.items() if n != "tr"})
            if "tr" in segments:
                ctx.set_segment("tr", segments["tr"])
        for name, value in gprs.items():
            self.set_reg(name, value)

    def reset_to_real_mode(self, vector: int) -> None:
        """A start-up IPI's state: real mode at ``vector << 12`` (SDM vol. 3 §8.4.4, §9.1.1).

        The processor state after INIT (table 9-1): CR0 = 0x60000010 (CD,
        NW, ET; PE and PG clear), CR3 = CR4 = EFER = 0, EFLAGS = 2, every
        segment a 64 KiB read/write data segment at base 0 but CS, which the
        SIPI sets to selector ``vector << 8``, base ``vector << 12``, IP 0;
        GDTR and IDTR at base 0 limit 0xFFFF, general registers 0.
        """
        self._leave_long_mode(0x60000010)
        data = SegmentCache(0, 0, 0xFFFF, DESC_P | DESC_S | (0x3 << 8))          # read/write, accessed
        code = SegmentCache(vector << 8, vector << 12, 0xFFFF, DESC_P | DESC_S | (0xB << 8))
        with self.cpu_state() as ctx:
            ctx.load_segments(cs=code, ss=data, ds=data, es=data, fs=data, gs=data)
            ctx.set_segment("tr", SegmentCache(0, 0, 0xFFFF, DESC_P | (0xB << 8)))
            ctx.set_segment("ldt", SegmentCache(0, 0, 0xFFFF, DESC_P | (0x2 << 8)))
            ctx.set_cpl(0)
        self.set_nmi_blocked(False)                  # INIT ends NMI blocking (QEMU's x86_cpu_reset too)
        self.set_descriptor_table("gdtr", 0, 0xFFFF)
        self.set_descriptor_table("idtr", 0, 0xFFFF)
        for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                  "r12", "r13", "r14", "r15"):
            self.set_reg(r, 0)
        self.set_reg("rflags", 0x2)
        self.set_reg("rip", 0)

    # ------------------------------------------------------------------
    # the run loop primitive
    # ------------------------------------------------------------------
    def run(self, timeout_us: int = 0, count: int = 0) -> E.Exit:
        """Run the guest until something needs the platform; return why."""
        self._pending_exit = None
        self._internal = None
        self._stop_reasons = []
        self._required()                # this vCPU's state in the engine (a switch, with several)
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

    def instruction_bytes(self, pc: int, bits: int) -> bytes | None:
        """The instruction at CS:``pc`` (CS's base counts outside 64-bit mode): 15 bytes, fewer where
        its page ends and the next one cannot be read; None if even that fails."""
        linear = pc + (self.live.segment("cs").base if bits != 64 else 0)
        code = self.read_linear(linear, 15, fetch=True)
        if not isinstance(code, bytes):              # the instruction ends on its page
            code = self.read_linear(linear, PAGE - (linear & (PAGE - 1)), fetch=True)
        return code if isinstance(code, bytes) else None

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

    def close(self) -> None:
        if self.core.vcpus[0] is self:
            self.stop_timer.close()
        if self._engine() is not None:
            self.disarm_interrupt_window()
