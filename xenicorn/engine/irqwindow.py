"""The interrupt window without a block hook: QEMU's own check, made to exit.

A maskable interrupt can be taken only between instructions, with RFLAGS.IF
set and outside the one-instruction shadow of STI or MOV SS (SDM vol. 3
§6.8.3). When one is pending while the guest has interrupts off, a
hypervisor asks the CPU for an *interrupt-window exit*: VMX's "interrupt-
window exiting" control, SVM's virtual interrupt with the VINTR intercept.
KVM user space sets ``request_interrupt_window`` for the same thing.

Unicorn has no such exit, and a Python hook on every block that checks IF
costs about 14x while it exists; worse, Unicorn only instruments blocks
translated while a hook is present, so arming one means flushing the whole
translation cache. Linux spends much of its time with interrupts off (every
interrupt handler, every spinlock with ``irqsave``), so a booting kernel
armed it thousands of times: profiles showed 800,000 hook calls in one boot,
each followed by re-translating the guest's hot code.

QEMU's TCG already watches the window, for its own interrupt controller: a
pending request sits in ``CPUState.interrupt_request``, and every
instruction that can set IF (STI, POPF, IRET, RSM) ends its translated block
and returns to the execution loop, which checks the request before the next
block; STI's shadow is honoured by translating the following instruction
alone. Unicorn keeps that loop. Its hardware-interrupt request delivers
vector 0 (it has no PIC), but the *SVM virtual interrupt* request
(``CPU_INTERRUPT_VIRQ``) first checks the VINTR intercept, and with our SVM
intercept window open (:mod:`msr`: ``HF_GUEST`` and the intercept word in
CPU state, no VMRUN) that intercept is a VM exit. Unicorn reports VM exits to
``UC_HOOK_INTR`` as ``0x100 + exit code``: 0x164 for VINTR.

So arming the window is: set the VIRQ bit and the VINTR intercept. The guest
then runs at full speed (no hook, no flush) until the exact instruction
boundary where x86 would take an interrupt; the hook clears the request and
stops the run there; Python injects the interrupt. Disarming clears both.

``CPUState`` is not part of the saved context; the library exports
``qemu_get_cpu`` (Unicorn's one CPU has index -1, "unassigned"), and
``interrupt_request`` is a ``uint32_t`` at a fixed offset of this pinned build
(after eight bytes of counts, a thread pointer and seven bools).
:func:`available` checks all of it against behaviour: ``cli; nop; sti; nop;
nop`` must exit exactly after the ``nop`` in STI's shadow, and a loop with
IF=0 must not exit at all. A build where that fails keeps the block hook.

The NMI window
--------------
After delivering an NMI the CPU blocks further NMIs until the next IRET
(SDM vol. 3 §6.7.1); one that arrives meanwhile is held and taken right
after that IRET. QEMU models the blocking with ``HF2_NMI_MASK`` in
``hflags2``, which its IRET helpers (real, vm86 and protected mode) clear,
and its NMI request (``CPU_INTERRUPT_NMI``) waits while the mask is set;
when it is clear, the SVM NMI intercept turns the request into an exit
(``0x161``) before QEMU would deliver it itself. So xenicorn sets the mask
when Python delivers an NMI, and when another NMI is pending while the mask
is set it arms the *NMI window*: the request bit and the NMI intercept. The
guest runs on untouched until its IRET clears the mask, ends the translated
block, and the CPU loop exits at the instruction after the IRET, where
Python delivers the held NMI. Nothing is checked per block or per
instruction; the intercept exists only while an NMI waits behind the mask.
:func:`available` checks it too: ``push flags/cs/ip; iret`` in real mode
with the mask set must exit once, at the IRET's target, and with the mask
clear at once.
"""
from __future__ import annotations

import ctypes
import functools
import sys

from unicorn import Uc, UC_ARCH_X86, UC_MODE_16, UC_MODE_64, UC_HOOK_INTR
from unicorn import x86_const as X

CPU_INTERRUPT_VIRQ = 0x100                     # CPU_INTERRUPT_TGT_INT_0 (qemu/include/exec/cpu-all.h)
CPU_INTERRUPT_NMI = 0x200                      # CPU_INTERRUPT_TGT_EXT_3
SVM_EXIT_NMI = 0x61
INTERCEPT_NMI = 1 << (SVM_EXIT_NMI - 0x60)
NMI_EXIT_VECTOR = 0x100 + SVM_EXIT_NMI
SVM_EXIT_VINTR = 0x64
INTERCEPT_VINTR = 1 << (SVM_EXIT_VINTR - 0x60)  # intercept word bits start at SVM_EXIT_INTR
EXIT_VECTOR = 0x100 + SVM_EXIT_VINTR           # what UC_HOOK_INTR reports
# CPUState.interrupt_request: nr_cores, nr_threads, thread*, [Windows: HANDLE], 7 bools, cflags_next_tb
OFF_INTERRUPT_REQUEST = 36 if sys.platform == "win32" else 28


class InterruptRequest:
    """The ``interrupt_request`` word of one engine's CPU."""

    def __init__(self, uc: Uc):
        from .rawctx import cpu_state_address
        self._word = ctypes.c_uint32.from_address(cpu_state_address(uc) + OFF_INTERRUPT_REQUEST)
        self._uc = uc                              # the word lives as long as the engine

    @property
    def virq(self) -> bool:
        return bool(self._word.value & CPU_INTERRUPT_VIRQ)

    @virq.setter
    def virq(self, on: bool) -> None:
        value = self._word.value
        self._word.value = value | CPU_INTERRUPT_VIRQ if on else value & ~CPU_INTERRUPT_VIRQ

    @property
    def nmi(self) -> bool:
        return bool(self._word.value & CPU_INTERRUPT_NMI)

    @nmi.setter
    def nmi(self, on: bool) -> None:
        value = self._word.value
        self._word.value = value | CPU_INTERRUPT_NMI if on else value & ~CPU_INTERRUPT_NMI


def _exits(code: bytes) -> list[tuple[int, int]]:
    """Run ``code`` at 0x1000 with the window armed; the (vector, RIP) of each exit."""
    from .msr import MsrInterceptor
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, code)
    uc.reg_write(X.UC_X86_REG_RSP, 0x8000)
    request = InterruptRequest(uc)
    svm = MsrInterceptor(uc)
    svm.watch_interrupt_window(True)
    return _run_to_exit(uc, code, request, "virq", X.UC_X86_REG_RIP)


def _run_to_exit(uc, code: bytes, request, line: str, ip_reg: int) -> list[tuple[int, int]]:
    """Raise ``request.<line>``, run ``code`` at 0x1000, drop the line at the first exit; (vector, IP) seen."""
    seen = []

    def hook(uc, intno, _):
        seen.append((intno, uc.reg_read(ip_reg)))
        setattr(request, line, False)
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, hook)
    setattr(request, line, True)
    uc.emu_start(0x1000, 0x1000 + len(code))
    return seen


def _nmi_exits(masked: bool) -> list[tuple[int, int]]:
    """Real mode, an NMI requested with the NMI window armed: (vector, IP) of each exit."""
    from .msr import MsrInterceptor
    from .rawctx import RawContext, OFF_HFLAGS2, HF2_NMI_MASK
    uc = Uc(UC_ARCH_X86, UC_MODE_16)
    uc.mem_map(0, 0x10000)
    # push 0 (FLAGS); push 0 (CS); push 0x1009 (IP); iret; nop; nop; hlt
    code = bytes.fromhex("6a00" "6a00" "680910" "cf" "90" "90" "f4")
    uc.mem_write(0x1000, code)
    uc.reg_write(X.UC_X86_REG_SP, 0x8000)
    request = InterruptRequest(uc)
    svm = MsrInterceptor(uc)
    svm.watch_nmi_window(True)
    if masked:
        with RawContext(uc) as ctx:
            ctx.write(OFF_HFLAGS2, "<I", ctx.read(OFF_HFLAGS2, "<I") | HF2_NMI_MASK)
    seen = _run_to_exit(uc, code, request, "nmi", X.UC_X86_REG_IP)
    if RawContext(uc).read(OFF_HFLAGS2, "<I") & HF2_NMI_MASK:
        seen.append((-1, -1))                      # the IRET did not clear the mask
    return seen


@functools.cache
def available() -> bool:
    """Does this Unicorn build give exact interrupt-window exits? (checked once per process)"""
    try:
        # cli; nop; sti; nop; nop; hlt: the window opens after the nop in STI's shadow
        opened = _exits(bytes.fromhex("fa90fb9090f4"))
        # cli; mov ecx, 1000; l: dec ecx; jnz l; hlt: never opens
        closed = _exits(bytes.fromhex("fab9e8030000ffc975fcf4"))
        # the NMI window: held until the IRET, then an exit at its target; at once when not blocked
        nmi_after_iret = _nmi_exits(masked=True)
        nmi_at_once = _nmi_exits(masked=False)
    except Exception:                              # noqa: BLE001 - any failure: keep the block hook
        return False
    return (opened == [(EXIT_VECTOR, 0x1004)] and closed == []
            and nmi_after_iret == [(NMI_EXIT_VECTOR, 0x1009)] and nmi_at_once == [(NMI_EXIT_VECTOR, 0x1000)])
