"""UMIP on the machine: arming the intercepts, and the exit where SGDT & co. are judged.

Unicorn's CPU (QEMU 5's TCG) knows nothing of CR4.UMIP: it keeps the bit
but lets SGDT, SIDT, SLDT, STR and SMSW run at any CPL. QEMU does emulate
AMD SVM, whose intercepts cover exactly these five (the descriptor-table
reads and, for SMSW, the CR0 read), so while the guest has CR4.UMIP set
xenicorn keeps its intercept window open with those intercepts on
(:meth:`~xenicorn.engine.msr.MsrInterceptor.intercept_umip`). Each one then
ends in :func:`system_read`, with RIP at the instruction:

* CR4.UMIP set and CPL > 0 (or virtual-8086 mode, which runs at CPL 3):
  #GP(0), RIP at the instruction (SDM vol. 3 §2.5);
* otherwise the instruction is performed here, as the engine would have
  (:mod:`xenicorn.x86.umip` decodes it and says what it stores), and RIP
  moves past it. A memory destination gets the segment checks and the page
  walk of a supervisor write: a fault there is delivered instead.

When the intercepts are armed: CR4 writes are seen while the intercept
window is open (:mod:`xenicorn.machine.crwrites`), which is the case from
power-on (or a kernel's CPUID leaf-7 query) until its first SYSCALL, and
for as long as UMIP stays on. A write that sets UMIP arms the intercepts,
one that clears it disarms them; a snapshot keeps them (the window's
interests and intercept bits are in the vCPU record). The first SYSCALL,
which closes the start-up window, looks at CR4 once more. A kernel that
sets UMIP later, with the window closed, is not seen: its user code keeps
reading the tables, as on a CPU without UMIP.

Cost (measured in docs/unicorn-notes.md): with UMIP on, the window's
HF_GUEST adds a helper call to PUSHF/POPF and a few system instructions (a
PUSHF/POPF loop +20%, a register loop +1%), and each kernel SGDT/SIDT/SLDT/
STR/SMSW/``MOV r, CR0`` and CR0/CR4 write becomes an exit; a Debian boot,
which turns UMIP on, showed no difference above the noise. With UMIP off
nothing changes.
"""
from __future__ import annotations

from .. import exits as E
from ..engine.msr import INTERCEPT_UMIP
from ..x86 import umip
from ..x86.fep import check_long, check_protected
from ..x86.interrupts import EventType
from ..x86.paging import PageFault
from .memory import GuestMemoryError

RFLAGS_VM = 1 << 17
GP, PF = 13, 14


def sync(vcpu, cr4: int) -> None:
    """Arm or disarm the vCPU's UMIP intercepts to match ``cr4``."""
    on = bool(cr4 & umip.CR4_UMIP)
    if on != bool(vcpu.msr.extra & INTERCEPT_UMIP):
        vcpu.msr.intercept_umip(on)


def system_read(dispatcher, vcpu, ex: E.SystemRead) -> E.Action:
    """An intercepted SGDT/SIDT/SLDT/STR/SMSW (or MOV from CR0): #GP(0), or performed here."""
    machine = dispatcher.machine
    cr4 = vcpu.reg("cr4")
    user = vcpu.cpl() > 0 or bool(vcpu.reg("rflags") & RFLAGS_VM)
    # (a MOV from CR0 never gets here at CPL > 0: the engine raises its #GP before the intercept)
    if cr4 & umip.CR4_UMIP and user:
        if machine.tracer.on("io"):
            machine.tracer.emit("io", f"#GP(0): {ex.what} at CPL {vcpu.cpl()} with CR4.UMIP")
        return dispatcher.deliver(vcpu, GP, EventType.HARDWARE_EXCEPTION, 0)
    sync(vcpu, cr4)                    # UMIP cleared behind our back: stop intercepting
    return _perform(dispatcher, vcpu, ex)


def _perform(dispatcher, vcpu, ex: E.SystemRead) -> E.Action:
    ctx = vcpu.live
    bits = vcpu.code_bits()
    segs = [ctx.segment(i) for i in range(6)]
    code = vcpu.instruction_bytes(ex.pc, bits)

    def read_reg(name: str) -> int:
        try:
            return vcpu.reg(name)
        except KeyError:                             # capstone's eiz/riz: no index
            return 0
    st = umip.decode(code, bits, ex.pc, read_reg) if code is not None else None
    if st is None:
        dispatcher.machine.shutdown("emulator-error", 1, f"{ex.what} intercept at an instruction not understood")
        return E.Action.STOP
    gdt, idt = ctx.segment("gdt"), ctx.segment("idt")
    value = umip.stored(st, bits=bits, old=vcpu.reg(st.reg) if st.reg else 0,
                        gdtr=(gdt.base, gdt.limit), idtr=(idt.base, idt.limit),
                        ldtr=ctx.segment("ldt").selector, tr=ctx.segment("tr").selector, cr0=vcpu.reg("cr0"))
    if st.reg is not None:
        vcpu.set_reg(st.reg, value)
    else:
        seg, offset = st.mem
        fault = None
        if bits == 64:
            fault = check_long(seg, offset, st.width, seg == "ss", segs)
        elif vcpu.reg("cr0") & 1:
            fault = check_protected(seg, offset, st.width, True, segs)
        if fault is not None:
            return dispatcher.deliver(vcpu, fault[0], EventType.HARDWARE_EXCEPTION, fault[1])
        base = segs[("es", "cs", "ss", "ds", "fs", "gs").index(seg)].base
        addr = offset if bits == 64 and seg not in ("fs", "gs") else base + offset
        addr &= (1 << 64) - 1 if bits == 64 else 0xFFFFFFFF
        try:
            pf = vcpu.write_linear(addr, value.to_bytes(st.width, "little"))
        except GuestMemoryError:
            dispatcher.machine.shutdown("emulator-error", 1, f"{st.name} to device memory is not modelled")
            return E.Action.STOP
        if isinstance(pf, PageFault):
            vcpu.set_reg("cr2", pf.linear)
            return dispatcher.deliver(vcpu, PF, EventType.HARDWARE_EXCEPTION, pf.error_code)
    vcpu.pc = ex.pc + st.length
    return E.Action.CONTINUE
