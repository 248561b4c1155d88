"""The x86 architecture, engine-free: what the SDM says a CPU does.

Interrupt and exception delivery through the IDT (:mod:`.interrupts`),
SYSCALL/SYSENTER (:mod:`.syscall`), the page-table walker
(:mod:`.paging`), segment descriptors (:mod:`.segments`), the CPUID
policy (:mod:`.cpuid`), and the vCPU protocol they are written against
(:mod:`.cpu`).
"""
