"""Booting a guest: loading a kernel and the tables it reads, then entering it.

========================  ===================================================
module                    what
========================  ===================================================
:mod:`.loader`            PVH: an ELF with a XEN_ELFNOTE_PHYS32_ENTRY note (or
                          a flat binary), entered in 32-bit protected mode
                          with ``hvm_start_info`` (Xen's start_info.h)
:mod:`.linuxboot`         a bzImage through the Linux/x86 boot protocol: the
                          zero page, the command line, the 32-bit entry
:mod:`.acpi`              RSDP, XSDT, MADT, FADT, a DSDT with ``_PRT``
:mod:`.mptable`           the Intel MultiProcessor table, for older kernels
========================  ===================================================
"""
from __future__ import annotations

from ..devices.console import ConsoleSink
from ..machine.machine import Machine, MachineConfig


def boot(config: MachineConfig, kernel_path: str, *, initrd: str | None = None,
         load_addr: int | None = None, console: ConsoleSink | None = None,
         protocol: str = "pvh") -> "tuple[Machine, object]":
    """Build a machine, load a kernel and reset the vCPU to its entry.

    ``protocol`` "pvh": a PVH ELF (or the ELF inside a bzImage) or a flat
    binary, entered with hvm_start_info; "linux": a bzImage through the
    Linux/x86 boot protocol's 32-bit entry, with an MP table and an ACPI
    MADT (:mod:`.linuxboot`, :mod:`.mptable`, :mod:`.acpi`).
    """
    from . import acpi
    from .loader import load_elf, load_flat, load_module, write_start_info
    machine = Machine(config, console=console)
    if protocol == "linux":
        from . import linuxboot, mptable
        mptable.write(machine)
        rsdp = acpi.write(machine, hw_reduced=False) if config.acpi else 0
        kernel, machine.linux_boot = linuxboot.load_bzimage(machine.memory, kernel_path, config.cmdline, initrd,
                                                            rsdp=rsdp)
        machine.kernel = kernel
        linuxboot.enter_32bit(machine.vcpu, machine.linux_boot)
        return machine, kernel
    if protocol != "pvh":
        raise ValueError(f"boot protocol {protocol!r}: expected pvh or linux")
    if load_addr is not None:
        kernel = load_flat(machine.memory, kernel_path, load_addr)
    else:
        kernel = load_elf(machine.memory, kernel_path)
    if initrd:
        load_module(machine.memory, kernel, initrd)
    rsdp = acpi.write(machine) if config.acpi else 0
    start_info = write_start_info(machine.memory, kernel, config.cmdline, rsdp)
    machine.kernel = kernel
    machine.vcpu.reset_to_flat32(kernel.entry, ebx=start_info)
    return machine, kernel
