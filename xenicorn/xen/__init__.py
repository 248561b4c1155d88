"""What Xen does for an HVM guest, in Python.

:mod:`platform` (CPUID leaves, the hypercall page, hypercall dispatch),
:mod:`hypercall` (calling conventions and the dispatcher), :mod:`guest`
(copying arguments through the guest's page tables, -EFAULT semantics), and
one module per hypercall: :mod:`version`, :mod:`console`, :mod:`sched`.
These modules never import Unicorn: they reach the guest through the vCPU's
register and linear-memory accessors, so they test without running a guest.
"""
