"""Several vCPUs on one Unicorn instance: QEMU's single-threaded TCG, by context switch.

A multiprocessor guest needs its CPUs to agree on memory: a store by one is
seen by the others, a locked instruction is atomic, and **code one CPU
writes is what every other CPU executes next** (Linux patches its own text
with alternatives, static keys and ``text_poke`` while other CPUs run).
Unicorn has one CPU per instance and keeps its translated code per
instance: two instances sharing RAM would each keep translations of a
page the other rewrote, and nothing would tell them. So all vCPUs share
**one** instance, and one translation cache, and take turns on it, as QEMU's
round-robin TCG runs all vCPUs on one host thread:

===========================  =============================================
per vCPU (switched)          shared (one for the machine)
===========================  =============================================
the CPU state                translated code (self-modifying code is seen
(``CPUX86State``: registers, by every vCPU, since it is one cache),
segment caches, CRs, MSRs,   guest RAM, MMIO ranges, hooks, the stop
FPU, intercept fields)       machinery
its VMCB and MSR map pages   the TLB: flushed at every switch, since the
(at its own address)         entries belong to the CPU that filled them
the virtual-interrupt bit    (the jump cache goes with it)
of ``interrupt_request``
===========================  =============================================

Only one vCPU is *loaded* at a time; :meth:`EngineCore.load` saves the
current one's state into its context and restores the next one's (two
copies of ~25 KiB and a TLB flush, some microseconds per switch; the run
loop switches once per quantum). A vCPU that is not loaded keeps its
registers in its saved context, where :class:`~xenicorn.engine.vcpu.VCpu`
reads and writes them. Only the run loop switches, never from inside a
hook: a change one vCPU makes to another inside a run (an INIT or SIPI, a
``VCPUOP_initialise``) is posted and applied when that vCPU is loaded.

Hooks are installed once. With one vCPU they are the vCPU's own methods
(no indirection); with several, each forwards to the loaded vCPU.
"""
from __future__ import annotations

from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH


class EngineCore:
    """The one Unicorn instance of a machine, and which vCPU it is running."""

    def __init__(self, uc, vcpus_planned: int):
        self.uc = uc
        self.smp = vcpus_planned > 1
        self.vcpus: list = []
        self.current = None
        self.switches = 0

    def hook(self, owner, name: str):
        """The callable to install for hook method ``name``: the method, or a forwarder to the loaded vCPU."""
        if not self.smp:
            return getattr(owner, name)

        def forward(*args):
            return getattr(self.current, name)(*args)
        forward.__name__ = name
        return forward

    def adopt(self, vcpu) -> None:
        """A new vCPU: it starts from the loaded one's state and is loaded while it sets itself up."""
        self.vcpus.append(vcpu)
        if self.current is None:
            self.current = vcpu
            return
        self._save(self.current)
        self.current = vcpu

    def load(self, vcpu) -> None:
        """Make ``vcpu`` the one the engine runs (between runs only)."""
        cur = self.current
        if cur is vcpu:
            return
        self._save(cur)
        uc = self.uc
        uc.context_restore(vcpu._ctx)
        if vcpu._irq_request is not None:
            vcpu._irq_request.virq = vcpu._virq
            vcpu._irq_request.nmi = vcpu._nmi_request
        # TLB entries (and the jump cache, flushed with them) are the last
        # CPU's translations of its own page tables
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self.current = vcpu
        self.switches += 1
        vcpu._loaded()

    def _save(self, vcpu) -> None:
        uc = self.uc
        if vcpu._ctx is None:
            vcpu._ctx = uc.context_save()
        else:
            uc.context_update(vcpu._ctx)
        if vcpu._irq_request is not None:
            vcpu._virq = vcpu._irq_request.virq
            vcpu._nmi_request = vcpu._irq_request.nmi
