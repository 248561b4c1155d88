"""xenicorn: an x86 PC with a Xen HVM platform, emulated in Python on Unicorn.

Packages: :mod:`xenicorn.platform` (machine, vCPU run loop, memory, paging,
interrupt delivery, loader), :mod:`xenicorn.devices` (buses and device
models), :mod:`xenicorn.xen` (what the Xen hypervisor does for a guest),
:mod:`xenicorn.firmware` (guest kernels and their sources).
"""
__version__ = "0.1.0"
