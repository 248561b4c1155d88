"""Catching RDMSR/WRMSR, which Unicorn cannot hook.

Unicorn offers no hook for RDMSR/WRMSR: MSRs it does not know (among them
Xen's hypercall-page MSR 0x40000000) are silently dropped. The CPU inside
Unicorn is QEMU's, though, and QEMU emulates AMD SVM: when the CPU runs an
SVM *guest* whose VMCB asks for the MSR intercept, every RDMSR/WRMSR first
consults the VMCB's MSR permission map, and an intercepted one ends in
``cpu_vmexit``. Unicorn does not emulate the VM exit itself; it reports
exception number ``0x100 + SVM_EXIT_MSR`` (0x17C) to ``UC_HOOK_INTR`` with
the guest state intact: RIP at the instruction, ECX the MSR, the raw
context's ``error_code`` 1 for WRMSR and 0 for RDMSR.

The intercept check reads only three things: ``hflags & HF_GUEST``, the
``intercept`` word, and the VMCB (``vm_vmcb``) in physical memory. So instead
of executing VMRUN, xenicorn *opens an intercept window* by setting those
three fields in the raw context, and closes it by clearing HF_GUEST. With the
window closed the check is a single untaken branch: nothing is paid in steady
state. With it open, plain code runs about 9% slower (measured: a register
loop with the window open and closed, as ``benchmarks/compute.py`` runs it), so the window is open only while
someone needs it: the Xen layer from the guest's CPUID 0x40000002 query until
it writes the hypercall-page MSR, a kernel until its user mode starts,
CPUID faulting while it is on (then CPUID is intercepted too), or the
guest's CR4.UMIP while it is set (then SGDT, SIDT, SLDT, STR and SMSW are:
:meth:`MsrInterceptor.intercept_umip`).

The VMCB and its 8 KiB MSR permission map live in three pages mapped at
:data:`SHADOW_BASE`, above any RAM the guest is given. MSRs outside the map's
three ranges (0x0-0x1FFF, 0xC0000000-0xC0001FFF, 0xC0010000-0xC0011FFF),
such as 0x40000000, always exit; inside them, a set bit in the map
(two bits per MSR: read, write) asks for an exit.
"""
from __future__ import annotations

import functools

from typing import Callable

from .irqwindow import INTERCEPT_NMI, INTERCEPT_VINTR
from .rawctx import RawContext

SHADOW_BASE = 0xFD_0000_0000          # below the 40-bit physical limit CPUID reports
SHADOW_SIZE = 0x3000                  # per vCPU: its VMCB page, then its 8 KiB permission map
VMCB = SHADOW_BASE                    # vCPU 0's (vCPU n's are n * SHADOW_SIZE further)
MSRPM = SHADOW_BASE + 0x1000
VMCB_MSRPM_BASE_PA = 0x48             # vmcb.control.msrpm_base_pa
VMCB_INT_VECTOR = 0x64                # vmcb.control.int_vector: the virtual interrupt's vector
SVM_EXIT_MSR = 0x7C
EXIT_VECTOR = 0x100 + SVM_EXIT_MSR    # what UC_HOOK_INTR reports

OFF_VM_VMCB = 5504                    # CPUX86State.vm_vmcb (unicorn 2.1.4)
OFF_INTERCEPT = 5520                  # CPUX86State.intercept
HF_GUEST = 1 << 21
INTERCEPT_MSR_PROT = 1 << 28          # SVM_EXIT_MSR - SVM_EXIT_INTR
INTERCEPT_RDTSC = 1 << 14             # SVM_EXIT_RDTSC (0x6E) - SVM_EXIT_INTR
RDTSC_EXIT_VECTOR = 0x100 + 0x6E      # what UC_HOOK_INTR reports for an intercepted RDTSC
INTERCEPT_CPUID = 1 << 18             # SVM_EXIT_CPUID (0x72) - SVM_EXIT_INTR
CPUID_EXIT_VECTOR = 0x100 + 0x72      # what UC_HOOK_INTR reports for an intercepted CPUID
OFF_INTERCEPT_CR_READ = 5528          # CPUX86State.intercept_cr_read (u16: bit n = CRn)
OFF_INTERCEPT_CR_WRITE = 5530         # CPUX86State.intercept_cr_write (u16: bit n = CRn)
SVM_EXIT_WRITE_CR0 = 0x10
CR_WRITE_EXIT_VECTORS = {0x100 + SVM_EXIT_WRITE_CR0 + n: n for n in (0, 4)}   # MOV CRn / LMSW / CLTS
# UMIP (:mod:`xenicorn.machine.umip`): SIDT, SGDT, SLDT, STR (SVM_EXIT_IDTR_READ 0x66 .. TR_READ 0x69,
# intercept bits 6..9) and SMSW, which QEMU checks as a CR0 read (SVM_EXIT_READ_CR0 0x00, as MOV from CR0 is)
INTERCEPT_UMIP = (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9)
UMIP_EXIT_VECTORS = {0x100: "cr0", 0x166: "sidt", 0x167: "sgdt", 0x168: "sldt", 0x169: "str"}
SHUTDOWN_EXIT_VECTOR = 0x100 + 0x7F   # SVM_EXIT_SHUTDOWN: a triple fault while HF_GUEST is set
# The #PF exception intercept, set at all times: QEMU's page walk then leaves
# CR2 alone and puts the faulting address in the VMCB's exit_info_2 (its
# handle_mmu_fault checks the bit without HF_GUEST), so the fault reaches
# UC_HOOK_INTR with the guest's CR2 intact and the delivery writes CR2
# (machine/dispatch.py). That lets a #PF become the segment fault the CPU
# would have raised first (x86/segcheck.py) without a stale CR2, and an
# engine-internal walk that faults (memmap.py) no longer touches CR2. While
# HF_GUEST is set (window open) the #PF is an SVM exit: PF_EXIT_VECTOR.
OFF_INTERCEPT_EXCEPTIONS = 5536       # CPUX86State.intercept_exceptions (u32: bit n = vector n)
INTERCEPT_PF = 1 << 14
PF_EXIT_VECTOR = 0x100 + 0x40 + 14    # SVM_EXIT_EXCP_BASE + 14, error code in env->error_code
VMCB_EXIT_INFO_2 = 0x80               # vmcb.control.exit_info_2: the #PF's linear address

_RANGES = ((0x0, 0x0000), (0xC0000000, 0x0800), (0xC0010000, 0x1000))   # (first MSR, byte offset)


def msrpm_position(msr: int) -> tuple[int, int] | None:
    """Byte offset and bit (read bit; write is the next) of ``msr`` in the map."""
    for first, base in _RANGES:
        if first <= msr < first + 0x2000:
            n = msr - first
            return base + n // 4, (n % 4) * 2
    return None


class MsrInterceptor:
    """Open and close the MSR intercept window of one vCPU; route the exits.

    Callers register interest by name (``open("xen-hypercall-page")``); the
    window stays open while any interest is held. ``handler(msr, write,
    value) -> value | None`` is called for each intercepted access; a read
    returns the value to give the guest.
    """

    def __init__(self, uc, base: int = SHADOW_BASE, vcpu=None):
        """The window of the CPU loaded in ``uc`` (of ``vcpu``, which may be switched out later).

        Its VMCB and permission map live at ``base`` (outside guest RAM,
        one pair per vCPU); while ``vcpu`` is not loaded, changes to the
        CPU's intercept fields wait until it is (:meth:`reassert_if_stale`).
        """
        self.uc = uc
        self.base = base
        self.vmcb, self.msrpm = base, base + 0x1000
        self.vcpu = vcpu
        self._stale = False
        uc.mem_map(base, SHADOW_SIZE)
        uc.mem_write(self.vmcb + VMCB_MSRPM_BASE_PA, self.msrpm.to_bytes(8, "little"))
        self.interests: set[str] = set()
        self.handler: Callable[[int, bool, int], int | None] | None = None
        self.exits = 0
        self.extra = 0                     # more intercepts while open (RDTSC)
        self.interrupt_window = False      # the VINTR intercept (:mod:`irqwindow`)
        self.nmi_window = False            # the NMI intercept (:mod:`irqwindow`, the NMI window)
        self.cr_writes = 0                 # CR write intercepts (bit n: CRn), see watch_cr_writes
        self._set(False)                   # points vm_vmcb at our VMCB

    @property
    def is_open(self) -> bool:
        return bool(self.interests)

    def watch(self, msr: int, read: bool = True, write: bool = True) -> None:
        """Ask for exits on an MSR inside the permission map's ranges."""
        pos = msrpm_position(msr)
        if pos is None:
            return                       # outside the map: always exits already
        off, bit = pos
        cur = self.uc.mem_read(self.msrpm + off, 1)[0]
        cur |= (1 << bit if read else 0) | (2 << bit if write else 0)
        self.uc.mem_write(self.msrpm + off, bytes([cur]))

    def open(self, interest: str) -> None:
        was = self.is_open
        self.interests.add(interest)
        if not was:
            self._set(True)

    def close(self, interest: str) -> None:
        if interest in self.interests:
            self.interests.discard(interest)
            if not self.interests:
                self._set(False)

    def watch_interrupt_window(self, on: bool) -> None:
        """Add or remove the VINTR intercept (the interrupt-window exit, :mod:`irqwindow`).

        Independent of the MSR interests: with only this one, MSRs are not
        intercepted (RDMSR/WRMSR behave as with the window closed).
        """
        if on != self.interrupt_window:
            self.interrupt_window = on
            self._set(self.is_open)

    def watch_nmi_window(self, on: bool) -> None:
        """Add or remove the NMI intercept (the NMI window, :mod:`irqwindow`); like the VINTR one."""
        if on != self.nmi_window:
            self.nmi_window = on
            self._set(self.is_open)

    def _set(self, on: bool) -> None:
        if self.vcpu is not None and not self.vcpu.loaded:
            self._stale = True                  # applied when the vCPU is next loaded
            return
        intercepts = (INTERCEPT_MSR_PROT | self.extra) if on else 0
        if self.interrupt_window:
            intercepts |= INTERCEPT_VINTR
        if self.nmi_window:
            intercepts |= INTERCEPT_NMI
        with RawContext(self.uc) as ctx:
            hf = ctx.hflags
            ctx.hflags = hf | HF_GUEST if intercepts else hf & ~HF_GUEST
            # always set: a virtual interrupt reads its vector from here, window open or not
            ctx.write(OFF_VM_VMCB, "<Q", self.vmcb)
            ctx.write(OFF_INTERCEPT, "<Q", intercepts)
            ctx.write(OFF_INTERCEPT_EXCEPTIONS, "<I", INTERCEPT_PF)
            # CR writes are checked exactly while the MSR window is open, never
            # with only the interrupt window: the checks then follow the guest's
            # own steps (its CPUID leaf-7 query, its first SYSCALL), not timing
            ctx.write(OFF_INTERCEPT_CR_WRITE, "<H", self.cr_writes if on else 0)
            ctx.write(OFF_INTERCEPT_CR_READ, "<H", 1 if on and self.extra & INTERCEPT_UMIP else 0)

    def watch_cr_writes(self, crs: int) -> None:
        """Intercept writes to the control registers in the bit mask ``crs`` (bit n: CRn).

        QEMU checks ``intercept_cr_write`` at run time in ``helper_write_crN``
        (MOV to CRn, and LMSW and CLTS for CR0), before the write, after
        putting EIP back at the instruction; the exit reaches UC_HOOK_INTR as
        ``0x110 + n``. The check itself is in the helper, not in translated
        code, but it needs HF_GUEST, and HF_GUEST makes the translator add
        an (untaken) intercept-check helper call to PUSHF/POPF, IRET, IN/OUT
        and a few system instructions: +40% on a PUSHF/POPF loop (measured in
        docs/unicorn-notes.md). So the checks ride on the MSR window: they are
        made while it is open (a kernel's start-up, from its CPUID leaf-7
        query or power-on until its first SYSCALL, and test kernels that
        never make one) and cost nothing after. While HF_GUEST is set QEMU
        reports a triple fault as an SVM shutdown exit
        (:data:`SHUTDOWN_EXIT_VECTOR`) instead of resetting the CPU.
        """
        self.cr_writes = crs
        self._set(self.is_open)

    def intercept_rdtsc(self) -> None:
        """Trap RDTSC too (deterministic time): it reaches UC_HOOK_INTR as 0x16E."""
        self.extra |= INTERCEPT_RDTSC
        self.open("rdtsc")
        self._set(True)

    def intercept_cpuid(self, on: bool) -> None:
        """Trap CPUID before Unicorn's CPUID hook (CPUID faulting): it reaches UC_HOOK_INTR as 0x172.

        The hook runs in the middle of a translated block, where an
        exception cannot be raised; the intercept ends the block first,
        with RIP at the CPUID, so a #GP can be delivered from there.
        """
        if on:
            self.extra |= INTERCEPT_CPUID
            self.open("cpuid-faulting")
        else:
            self.extra &= ~INTERCEPT_CPUID
            self.close("cpuid-faulting")
        self._set(self.is_open)

    def intercept_umip(self, on: bool) -> None:
        """Trap SGDT, SIDT, SLDT, STR and SMSW (and MOV from CR0) while the guest has CR4.UMIP set.

        QEMU's translator emits an intercept check before each of them only
        into blocks translated with HF_GUEST (the block's flags), and the
        check itself tests the intercept bits at run time: SIDT..STR reach
        UC_HOOK_INTR as 0x166..0x169, SMSW and MOV from CR0 both as 0x100
        (the CR0-read intercept, ``intercept_cr_read`` bit 0), with RIP at
        the instruction. The window stays open while UMIP is on, so CR
        writes are checked too and the write that clears UMIP is seen.
        """
        if on:
            self.extra |= INTERCEPT_UMIP
            self.open("umip")
        else:
            self.extra &= ~INTERCEPT_UMIP
            self.close("umip")
        self._set(self.is_open)

    def fault_address(self) -> int:
        """The linear address of the #PF just raised (exit_info_2, see :data:`INTERCEPT_PF`)."""
        return int.from_bytes(self.uc.mem_read(self.vmcb + VMCB_EXIT_INFO_2, 8), "little")

    def reassert(self) -> None:
        """Re-apply the window after something replaced the whole CPU state."""
        self._stale = False
        self._set(self.is_open)

    def reassert_if_stale(self) -> None:
        """The vCPU was loaded: apply what changed while it was not."""
        if self._stale:
            self.reassert()


@functools.cache
def selftest() -> None:
    """Check, once per process, that an open window really traps what xenicorn intercepts.

    This is the probe of :data:`OFF_VM_VMCB`, :data:`OFF_INTERCEPT`,
    :data:`HF_GUEST`, :data:`OFF_INTERCEPT_CR_READ` and
    :data:`OFF_INTERCEPT_CR_WRITE`: WRMSR 0x40000000, SGDT, SMSW (a CR0
    read) and MOV to CR4 must each exit, with RIP at the instruction; with
    any field wrong an instruction is not intercepted (or faults), and the
    exits seen differ. With the UMIP intercepts off again, SGDT runs.
    """
    from unicorn import Uc, UC_ARCH_X86, UC_MODE_64, UC_HOOK_INTR
    from unicorn import x86_const as X
    from .rawctx import UnsupportedUnicornBuild
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000)
    # mov ecx, 0x40000000 ; mov eax, 0x1000 ; xor edx, edx ; wrmsr ; sgdt [0x3000] ; smsw eax ;
    # mov cr4, rax ; hlt
    code = bytes.fromhex("b900000040" "b800100000" "31d2" "0f30" "0f01042500300000" "0f01e0" "0f22e0" "f4")
    lengths = {0x100C: 2, 0x100E: 8, 0x1016: 3, 0x1019: 3}
    uc.mem_write(0x1000, code)
    icpt = MsrInterceptor(uc)
    icpt.open("selftest")
    icpt.intercept_umip(True)
    icpt.watch_cr_writes(1 << 4)
    seen = []

    def hook(uc, intno, _):
        ctx = RawContext(uc)
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        seen.append((intno, ctx.error_code, rip))
        ctx.consume_exception()
        ctx.commit()
        uc.reg_write(X.UC_X86_REG_RIP, rip + lengths.get(rip, 1))

    uc.hook_add(UC_HOOK_INTR, hook)
    uc.emu_start(0x1000, 0x1000 + len(code))
    icpt.intercept_umip(False)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x12345678, 0x1F, 0))
    uc.mem_write(0x2000, code[14:22] + b"\xf4")
    uc.emu_start(0x2000, 0x2009)                     # SGDT again, not intercepted now
    stored = bytes(uc.mem_read(0x3000, 10))
    expected = [(EXIT_VECTOR, 1, 0x100C), (0x167, 0, 0x100E), (0x100, 0, 0x1016), (0x114, 0, 0x1019)]
    if seen != expected or stored != bytes.fromhex("1f00" "7856341200000000"):
        raise UnsupportedUnicornBuild(f"MSR intercept window does not work on this Unicorn build (exits seen: "
                                      f"{seen}, SGDT stored {stored.hex()}); install unicorn==2.1.4")
    _selftest_pf()


def _selftest_pf() -> None:
    """A #PF with the window closed must leave CR2 and report its address in exit_info_2.

    32-bit paging with one 4 MiB page at 0: ``mov eax, [0x400000]`` faults
    (not present, read, supervisor: error code 0) at its own EIP.
    """
    from unicorn import Uc, UC_ARCH_X86, UC_MODE_32, UC_HOOK_INTR
    from unicorn import x86_const as X
    from .rawctx import UnsupportedUnicornBuild
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x2000, (0x83).to_bytes(4, "little"))      # PDE 0: present, writable, 4 MiB
    code = bytes.fromhex("a100004000" "f4")                   # mov eax, [0x400000] ; hlt
    uc.mem_write(0x1000, code)
    uc.reg_write(X.UC_X86_REG_CR3, 0x2000)
    uc.reg_write(X.UC_X86_REG_CR4, 0x10)                      # PSE
    uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | 0x80000001)
    uc.reg_write(X.UC_X86_REG_CR2, 0x1234)
    icpt = MsrInterceptor(uc)
    seen = []

    def hook(uc, intno, _):
        info2 = int.from_bytes(uc.mem_read(icpt.vmcb + VMCB_EXIT_INFO_2, 8), "little")
        seen.append((intno, RawContext(uc).error_code, uc.reg_read(X.UC_X86_REG_CR2), info2,
                     uc.reg_read(X.UC_X86_REG_EIP)))
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, hook)
    uc.emu_start(0x1000, 0x1000 + len(code))
    if seen != [(14, 0, 0x1234, 0x400000, 0x1000)]:
        raise UnsupportedUnicornBuild(f"the #PF intercept (CR2 left alone) does not work on this Unicorn build "
                                      f"(exits seen: {seen}); install unicorn==2.1.4")
