"""Booting a guest: loading a kernel and the tables it reads, then entering it.

========================  ===================================================
module                    what
========================  ===================================================
:mod:`.loader`            PVH: an ELF with a XEN_ELFNOTE_PHYS32_ENTRY note (or
                          a flat binary), entered in 32-bit protected mode
                          with ``hvm_start_info`` (Xen's start_info.h)
:mod:`.linuxboot`         a bzImage through the Linux/x86 boot protocol: the
                          zero page, the command line, the 32-bit entry
:mod:`.multiboot`         a Multiboot v1 kernel (GRUB's and QEMU's ``-kernel``
                          contract): ELF or the a.out kludge, EAX 0x2BADB002,
                          EBX the multiboot information
:mod:`.acpi`              RSDP, XSDT, MADT, FADT, a DSDT with ``_PRT``
:mod:`.mptable`           the Intel MultiProcessor table, for older kernels
========================  ===================================================
"""
from __future__ import annotations

from ..devices.console import ConsoleSink
from ..machine.machine import Machine, MachineConfig

PROTOCOLS = ("pvh", "linux", "multiboot")


def choose_protocol(path: str, load_addr: int | None = None) -> str:
    """The protocol ``--boot auto`` picks for a kernel file, as Xen and QEMU would.

    A flat binary (``--load-addr``) and an ELF with a PVH note boot PVH
    (Xen's rule: the note wins); a bzImage boots through the Linux boot
    protocol (QEMU's ``-kernel`` habit: its PVH entry would leave out the
    8259 that the UART's IRQ needs); a kernel with a multiboot header
    boots multiboot; any other ELF is entered at its ELF entry like PVH.
    """
    from .loader import _pvh_entry_of_file
    from .multiboot import is_multiboot
    if load_addr is not None:
        return "pvh"
    try:
        with open(path, "rb") as f:
            head = f.read(0x206)
    except OSError:
        return "pvh"                      # the loader reports the file's problem
    if head[0x202:0x206] == b"HdrS":
        return "linux"
    if head[:4] == b"\x7fELF" and _pvh_entry_of_file(path) is not None:
        return "pvh"
    return "multiboot" if is_multiboot(path) else "pvh"


def boot(config: MachineConfig, kernel_path: str, *, initrd: str | None = None,
         load_addr: int | None = None, console: ConsoleSink | None = None,
         protocol: str = "pvh") -> "tuple[Machine, object]":
    """Build a machine, load a kernel and reset the vCPU to its entry.

    ``protocol`` "pvh": a PVH ELF (or the ELF inside a bzImage) or a flat
    binary, entered with hvm_start_info; "linux": a bzImage through the
    Linux/x86 boot protocol's 32-bit entry, with an MP table and an ACPI
    MADT (:mod:`.linuxboot`, :mod:`.mptable`, :mod:`.acpi`); "multiboot":
    :mod:`.multiboot`, with ``initrd`` a comma-separated list of modules;
    "auto": :func:`choose_protocol`.
    """
    from . import acpi
    from .loader import load_elf, load_flat, load_module, write_start_info
    if protocol == "auto":
        protocol = choose_protocol(kernel_path, load_addr)
    machine = Machine(config, console=console)
    machine.boot_protocol = protocol
    if protocol in ("multiboot", "linux"):
        machine.open_kernel_start_window()         # IA32_APIC_BASE is read early (Machine's docstring)
    if protocol == "multiboot":
        from . import mptable, multiboot
        mptable.write(machine)                     # a PC's firmware tables, as for an HVM Linux
        if config.acpi:
            acpi.write(machine, hw_reduced=False)  # found by the BIOS-area scan
        modules = [m for m in (initrd or "").split(",") if m]
        kernel = multiboot.load(machine.memory, kernel_path, config.cmdline, modules)
        machine.kernel = kernel
        _symbols(machine, kernel_path)
        machine.vcpu.reset_to_flat32(kernel.entry, ebx=kernel.start_info)
        machine.vcpu.set_reg("rax", multiboot.BOOTLOADER_MAGIC)
        return machine, kernel
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
        raise ValueError(f"boot protocol {protocol!r}: expected auto, pvh, linux or multiboot")
    if load_addr is not None:
        kernel = load_flat(machine.memory, kernel_path, load_addr)
    else:
        kernel = load_elf(machine.memory, kernel_path)
    if initrd:
        load_module(machine.memory, kernel, initrd)
    rsdp = acpi.write(machine) if config.acpi else 0
    start_info = write_start_info(machine.memory, kernel, config.cmdline, rsdp)
    machine.kernel = kernel
    if load_addr is None:
        _symbols(machine, kernel_path)
    machine.vcpu.reset_to_flat32(kernel.entry, ebx=start_info)
    return machine, kernel


def _symbols(machine, kernel_path: str) -> None:
    """Name code by the ELF's symbols in traces, the stepper and crash reports (read on first use)."""
    from ..debug.symbols import Symbols
    machine.symbols = Symbols(kernel_path)
    machine.tracer.symbolize = machine.symbols.annotate
