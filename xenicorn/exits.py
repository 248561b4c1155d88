"""The vCPU exits: why the CPU engine handed control back to the platform.

Under KVM, ``KVM_RUN`` returns with ``exit_reason`` set (``KVM_EXIT_IO``,
``KVM_EXIT_MMIO``, ``KVM_EXIT_HLT``, ``KVM_EXIT_XEN`` for a hypercall...) and
user space handles it. xenicorn's vCPU produces the same kind of typed record
for every event Unicorn reports. Exits that can be finished without changing
the guest's control flow (port I/O, MMIO, CPUID) are handled from inside the
Unicorn hook, the way KVM finishes some exits in the kernel; the others leave
``uc.emu_start`` and reach :meth:`Machine.run`. All of them pass through the
same :meth:`Machine.handle_exit`, so ``--trace exits`` sees every one.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Action(enum.Enum):
    """What the run loop does after an exit was handled."""

    CONTINUE = "continue"       # resume the guest
    STOP = "stop"               # leave Machine.run() (shutdown, limit, error)


@dataclass
class Exit:
    """Base of every exit: where the vCPU was."""

    pc: int

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass
class PortIO(Exit):
    """IN or OUT to an I/O port (KVM_EXIT_IO); a read returns its answer in ``value``."""

    port: int
    size: int
    write: bool
    value: int = 0              # value written, or value returned to the guest


@dataclass
class Mmio(Exit):
    """A load or store to a device's physical page (KVM_EXIT_MMIO); a read answers in ``value``."""

    addr: int
    size: int
    write: bool
    value: int = 0


@dataclass
class Cpuid(Exit):
    """CPUID for ``leaf``/``subleaf``; the handler fills ``result`` with EAX, EBX, ECX, EDX.

    ``result`` None: the instruction faulted instead (an exception was delivered).
    """

    leaf: int
    subleaf: int
    result: tuple[int, int, int, int] | None = (0, 0, 0, 0)


@dataclass
class Msr(Exit):
    """RDMSR/WRMSR caught by the MSR intercept window (see engine/msr.py)."""

    msr: int
    write: bool
    value: int = 0              # value written, or value returned to the guest


@dataclass
class CrWrite(Exit):
    """MOV to CR0/CR4, LMSW or CLTS caught before it ran (engine/msr.py, x86/crcheck.py)."""

    cr: int
    value: int                  # what the instruction would load
    length: int                 # of the instruction, to step over it once the write is done


@dataclass
class SystemRead(Exit):
    """SGDT, SIDT, SLDT, STR, SMSW or MOV from CR0 caught before it ran, while CR4.UMIP is on (machine/umip.py)."""

    what: str                   # "sgdt", "sidt", "sldt", "str", or "cr0" (SMSW or MOV from CR0)


@dataclass
class Hlt(Exit):
    """HLT executed; ``pc`` is the instruction after it (where an interrupt returns)."""


@dataclass
class InvalidInstruction(Exit):
    """#UD as Unicorn reports it; vmcall/vmmcall arrive here too (hypercalls)."""

    insn: bytes = b""


@dataclass
class Hypercall(Exit):
    """A call into Xen from the hypercall page (VMCALL/VMMCALL): number, arguments, and the value for EAX/RAX."""

    number: int
    args: tuple[int, ...] = ()
    result: int | None = None
    snapshot: object = field(default=None, repr=False)    # CPU state read once at the exit


@dataclass
class Exception_(Exit):
    """A CPU exception or software interrupt Unicorn stopped at (UC_HOOK_INTR)."""

    vector: int
    error_code: int | None = None
    software: bool = False      # INT n / INT3: pc is already past the instruction
    cr2: int | None = None


@dataclass
class Syscall(Exit):
    """SYSCALL or SYSENTER (Unicorn only reports them; we give them effect)."""

    insn: str = "syscall"


@dataclass
class UnmappedAccess(Exit):
    """The guest touched physical memory nothing backs (executing it is fatal)."""

    addr: int
    size: int
    access: str


@dataclass
class Shutdown(Exit):
    """The machine asked to stop: poweroff, reboot, crash, debug-exit..."""

    reason: str
    status: int = 0
    message: str = ""


@dataclass
class Limit(Exit):
    """--max-insns or --timeout reached."""

    what: str = "timeout"


@dataclass
class Debug(Exit):
    """A debugger's breakpoint: the run ended *before* the instruction at ``pc`` (gdbstub.py)."""

    what: str = "breakpoint"


@dataclass
class Request(Exit):
    """emu_stop() for the platform's own reasons (interrupt to inject, monitor)."""

    reasons: list[str] = field(default_factory=list)
