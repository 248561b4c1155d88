"""What a debugger needs from the CPU engine: breakpoints, watchpoints, exact stops, registers.

A debugger (the gdb stub in :mod:`xenicorn.debug.gdb`) asks four things of
the CPU. This module answers them with Unicorn, so the debugger itself never
imports Unicorn and a new Unicorn release changes only ``engine/``.

Breakpoints
    :func:`add_breakpoint` puts a Unicorn code hook on exactly one address
    (``begin == end``), so it costs nothing anywhere else and never changes
    guest memory: it is a hardware breakpoint in all but name. The hook
    runs *before* the instruction at that address executes; its callback
    may end the run there with :meth:`VCpu.stop_with`. Unicorn's code hooks
    see the *linear* address of the instruction (RIP plus CS base, which is
    zero in protected and long mode).

Watchpoints
    :func:`add_watchpoint` puts Unicorn memory hooks on a *physical* range:
    Unicorn's memory hooks see the guest-physical address of an access
    (measured: a hook on the linear range of a paged guest never fires), so
    a debugger translates the linear range it was asked for first. A hook
    range matches the *start* of an access, so the hook starts
    :data:`WIDEST_ACCESS` - 1 bytes below the watched bytes and the callback
    runs only for accesses that overlap them. The callback runs in the
    middle of the access: it must not stop the run (in counting mode
    ``emu_stop()`` there rewinds to the instruction, which then repeats its
    access; ``docs/unicorn-notes.md``). It records the hit; an
    :func:`add_instruction_hook` callback ends the run before the next
    instruction, which is where a data breakpoint traps on hardware (SDM
    vol. 3, "Data Memory and I/O Breakpoint Exception Conditions": a trap,
    reported after the instruction that made the access).

Exact stops and single steps
    A debugger needs the machine to count instructions (``emu_start`` with
    ``count``): Unicorn then checks for a stop before every instruction, and
    a run of :data:`SINGLE_STEP` instructions executes exactly one, an OUT
    or a VMCALL finished in Python included. A code hook that stops the run
    leaves Unicorn's counter one too high (it counted the instruction it
    stopped in front of): :func:`uncount_stopped_instruction` puts the
    vCPU's count right.

Translations
    Unicorn decides which hooks a block calls when it translates the block,
    so code translated before a hook existed never calls it. Every change
    here flushes the translation cache (``ctl_flush_tb``); removal too, so
    no stale block keeps calling a deleted hook. Deleting goes through the
    vCPU's ``hook_del``, which keeps the deleted hook's ctypes thunk alive
    (see ``VCpu._keep_callbacks_alive``). Every callback is wrapped with
    :meth:`VCpu.guarded_hook`: an exception in it ends the run as an
    internal error instead of disappearing inside Unicorn.

Registers
    :class:`RegisterAccess` reads and writes a register by its gdb name
    (``rax``... ``r15``, ``rip``, ``eflags``, the segment selectors, ``st0``
    to ``st7``, the x87 control words ``fctrl``... ``fop``, ``xmm0`` to
    ``xmm15``, ``mxcsr``, ``fs_base``, ``gs_base``, ``cr0``... ``cr4``,
    ``efer``) as a plain integer.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE
from unicorn import x86_const as X

from . import icount

SINGLE_STEP = 1                  # the run count that executes exactly one instruction
WIDEST_ACCESS = 64               # an access may start this far below a watched range and reach into it
EFER_MSR = 0xC0000080            # IA32_EFER (SDM vol. 4, the architectural MSRs)

# Watchpoint kinds: what gdb's Z2 (write), Z3 (read) and Z4 (access) ask for
WATCH_WRITE, WATCH_READ, WATCH_ACCESS = "write", "read", "access"
_WATCH_HOOKS = {WATCH_WRITE: UC_HOOK_MEM_WRITE, WATCH_READ: UC_HOOK_MEM_READ,
                WATCH_ACCESS: UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE}


@dataclasses.dataclass(frozen=True, eq=False)
class DebugHook:
    """A breakpoint, watchpoint or instruction hook in place; :func:`remove` takes it out."""

    vcpu: object
    handles: tuple[int, ...]     # Unicorn hook handles, private to this module


def _flush(vcpu) -> None:
    # Hooks are compiled into translated blocks (docs/unicorn-notes.md)
    vcpu.uc.ctl_flush_tb()


def add_breakpoint(vcpu, addr: int, fn: Callable[[int], None]) -> DebugHook:
    """Call ``fn(addr)`` before the instruction at linear address ``addr`` executes.

    ``fn`` may end the run there with ``vcpu.stop_with(...)``: the
    instruction has not executed and RIP points at it.
    """
    hook = vcpu.guarded_hook(lambda uc, address, size, _: fn(address))
    handle = vcpu.uc.hook_add(UC_HOOK_CODE, hook, None, addr, addr)
    _flush(vcpu)                 # already-translated code was built without the hook
    return DebugHook(vcpu, (handle,))


def add_instruction_hook(vcpu, fn: Callable[[int], None]) -> DebugHook:
    """Call ``fn(pc)`` before every instruction (slow: only while a debugger needs it).

    The place to end a run just after something a memory hook saw, since a
    memory hook itself must not stop a counting run.
    """
    hook = vcpu.guarded_hook(lambda uc, address, size, _: fn(address))
    handle = vcpu.uc.hook_add(UC_HOOK_CODE, hook, None, 1, 0)   # begin > end: every address
    _flush(vcpu)
    return DebugHook(vcpu, (handle,))


def add_watchpoint(vcpu, phys: int, size: int, kind: str, fn: Callable[..., None],
                   values: bool = False) -> DebugHook:
    """Call ``fn(address, size)`` for each access of ``kind`` that touches RAM ``[phys, phys + size)``.

    ``address`` and ``size`` are those of the whole access (physical), which
    may start below ``phys``. ``fn`` runs during the access: it records,
    and an :func:`add_instruction_hook` callback stops the run. With
    ``values``, ``fn(address, size, value)`` also gets the value a write
    stores; it runs *before* the store, so memory still holds the old bytes.
    """
    if kind not in _WATCH_HOOKS:
        raise ValueError(f"watchpoint kind {kind!r}: expected one of {sorted(_WATCH_HOOKS)}")
    if size <= 0:
        raise ValueError(f"watchpoint size {size}: must be positive")
    end = phys + size

    def on_access(uc, access, address, length, value, _):
        if address + length > phys and address < end:
            if values:
                fn(address, length, value)
            else:
                fn(address, length)
    handle = vcpu.uc.hook_add(_WATCH_HOOKS[kind], vcpu.guarded_hook(on_access), None,
                              max(0, phys - WIDEST_ACCESS + 1), end - 1)
    _flush(vcpu)
    return DebugHook(vcpu, (handle,))


def remove(*hooks: DebugHook) -> None:
    """Take out breakpoints, watchpoints or instruction hooks (one flush for all of them)."""
    flushed = set()
    for hook in hooks:
        for handle in hook.handles:
            hook.vcpu.uc.hook_del(handle)        # VCpu's hook_del keeps the thunk alive
    for hook in hooks:
        if id(hook.vcpu) not in flushed:
            flushed.add(id(hook.vcpu))
            _flush(hook.vcpu)


def uncount_stopped_instruction(vcpu, run_count: int) -> None:
    """A code hook ended the last run before an instruction: correct ``vcpu.instructions``.

    Unicorn counted the instruction its hook stopped in front of
    (docs/unicorn-notes.md), so after a run of ``run_count`` instructions
    (0: unbounded) the vCPU added ``min(counter, limit)``: one too many
    when the limit did not end the run.
    """
    n = icount.read_counter(vcpu.uc)
    limit = run_count or n
    vcpu.instructions -= min(n, limit) - (n - 1)


# ----------------------------------------------------------------------
# registers by name
# ----------------------------------------------------------------------
_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(f"r{i}" for i in range(8, 16))
_SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
_CONTROL = ("cr0", "cr2", "cr3", "cr4")
# gdb's names for the x87 control registers -> Unicorn's (SDM vol. 1, 8.1: FPU control,
# status and tag words, last instruction and operand pointers, last opcode)
_FPU_CONTROL = {"fctrl": "FPCW", "fstat": "FPSW", "ftag": "FPTAG", "fiseg": "FCS",
                "fioff": "FIP", "foseg": "FDS", "fooff": "FDP", "fop": "FOP"}
_UC = {"rip": X.UC_X86_REG_RIP, "eflags": X.UC_X86_REG_EFLAGS, "mxcsr": X.UC_X86_REG_MXCSR,
       "fs_base": X.UC_X86_REG_FS_BASE, "gs_base": X.UC_X86_REG_GS_BASE,
       **{n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in _GPR64 + _SELECTORS + _CONTROL},
       **{f"xmm{i}": getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16)},
       **{gdb: getattr(X, f"UC_X86_REG_{uc}") for gdb, uc in _FPU_CONTROL.items()}}
_ST = tuple(f"st{i}" for i in range(8))


class ReadOnlyRegister(ValueError):
    """A register this accessor will not write (see :meth:`RegisterAccess.write`)."""


class RegisterAccess:
    """One vCPU's registers by gdb name, as integers (``st0``-``st7``: the 80-bit value).

    Between runs only: a vCPU that is not loaded in the shared engine
    (another one ran last) is loaded first (:mod:`xenicorn.engine.core`).
    """

    NAMES = frozenset(_UC) | frozenset(_ST) | {"efer"}
    # A selector write would need the descriptor load that goes with it, and a
    # control register or EFER write changes the paging mode behind the engine's back
    READ_ONLY = frozenset(_SELECTORS + _CONTROL + ("efer",))

    def __init__(self, vcpu):
        self.vcpu = vcpu

    def _uc(self):
        # the engine holds one vCPU at a time: load this one (between runs only)
        return self.vcpu._required()

    def _st(self, uc, name: str) -> int:
        # ST(i) is physical register TOP+i; TOP is FPSW bits 13:11 (SDM vol. 1, 8.1.2 and 8.1.3)
        top = (uc.reg_read(X.UC_X86_REG_FPSW) >> 11) & 7
        return X.UC_X86_REG_FP0 + ((top + int(name[2:])) & 7)

    def read(self, name: str) -> int:
        """The register's value; KeyError for a name this accessor does not know."""
        uc = self._uc()
        if name in _ST:
            mantissa, exponent = uc.reg_read(self._st(uc, name))
            return mantissa | (exponent & 0xFFFF) << 64
        if name == "efer":
            return uc.msr_read(EFER_MSR)
        return uc.reg_read(_UC[name])

    def write(self, name: str, value: int) -> None:
        """Set a register as given (no masking); :class:`ReadOnlyRegister` for :attr:`READ_ONLY`."""
        if name in self.READ_ONLY:
            raise ReadOnlyRegister(name)
        uc = self._uc()
        if name in _ST:
            uc.reg_write(self._st(uc, name), (value & ((1 << 64) - 1), (value >> 64) & 0xFFFF))
            return
        uc.reg_write(_UC[name], value)
