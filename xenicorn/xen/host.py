"""What Xen needs from the machine it runs on: the one interface xen/ reaches it through.

Real Xen sits *under* the guest and owns the hardware; in xenicorn the Xen
layer is a guest of the machine's run loop, like QEMU's Xen emulation
(``target/i386/kvm/xen-emu.c``) is a guest of KVM's. It needs a small set of
things, and :class:`XenHost` lists every one of them. The machine
(:class:`xenicorn.machine.Machine`) implements it; xen/ never touches the
machine's other parts, nor the CPU engine (``tests/test_xen_host.py``
checks every ``host.`` use in xen/ against this list).

===========================  ==================================================
the host gives               Xen uses it for
===========================  ==================================================
memory, vcpus                guest memory (shared_info, rings, frames); a vCPU's
                             registers, its page tables, its MSR window
clock, tsc                   Xen's system time and timers, the PV clock
tracer, console, xen_log     ``--trace`` lines; the PV console's output (the
                             guest's console); Xen's log (``console_io`` lines)
gsi_source, pic_source,      the callback's level line: a GSI, an 8259 input
set_pci_intx, ...            or a PCI INTx pin (``hvm_set_callback_via``)
ioapic_input                 a GSI that no longer is a PIRQ event
add_gsi_filter               a GSI mapped to a PIRQ becomes an event
add_interrupt_source         the callback vector, injected past the LAPIC
add_wake_source              SCHEDOP_block/poll: what ends the sleep
watch_block_starts           the seed's deassert poll: a check of vCPU 0's
                             ``evtchn_upcall_pending`` at every block start
on_eoi                       the other deassert: resample at the EOI
add_cpuid_provider,          CPUID leaves 0x40000000+, the hypercall-page MSR,
add_msr_handler,             VMCALL/VMMCALL
set_hypercall_handler
kick, idle, shutdown         wake the run loop, sleep a vCPU, end the domain
post_vcpu_state,             VCPUOP_initialise (registers set when that vCPU is
set_vcpu_running             next loaded), VCPUOP_up/down
deliver_exception            #GP for a bad WRMSR
device_page                  populate_physmap: no RAM over a device's page
===========================  ==================================================
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

from .. import exits as E


class BlockWatch(Protocol):
    """A "check at every block start" request; the machine installs it before the next run."""

    @property
    def installed(self) -> bool: ...


class InterruptSource(Protocol):
    """Vectors injected straight into a vCPU, past its LAPIC (Xen's callback vector)."""

    def direct_pending(self, vcpu: int) -> int | None: ...

    def direct_taken(self, vcpu: int) -> None: ...


class XenHost(Protocol):
    """The machine as the Xen layer sees it (see the module table)."""

    memory: object                 # xenicorn.machine.memory.GuestMemory
    vcpus: Sequence                # xenicorn.engine.vcpu.VCpu: index, registers, read/write_linear, msr
    clock: object                  # xenicorn.machine.clock.VirtualClock
    tsc: object                    # read(), hz(): the TSC the guest reads
    tracer: object                 # xenicorn.machine.trace.Tracer
    console: object                # write(bytes): the guest's console (the PV console ring's output)
    xen_log: object                # write(bytes): Xen's log, ``xl dmesg`` (whole "(d1) ..." lines)
    status: int | None             # set once the machine has stopped
    vendor: str                    # "intel" (VMCALL) or "amd" (VMMCALL)
    gsi_count: int                 # GSIs 0 .. gsi_count-1 exist

    # -- interrupt lines ----------------------------------------------------------------
    def gsi_source(self, gsi: int, name: str): ...

    def pic_source(self, irq: int, name: str): ...

    def set_pci_intx(self, devfn: int, pin: int, level: bool) -> None: ...

    def pci_pirq(self, devfn: int, pin: int) -> int: ...

    def pirq_route(self, pirq: int) -> int | None: ...

    def ioapic_input(self, gsi: int, level: bool) -> None: ...

    def lapic_accept(self, vcpu: int, vector: int) -> None: ...

    def on_eoi(self, ioapic: Callable[[int], None], pic: Callable[[int], None]) -> None: ...

    # -- what Xen plugs into the machine --------------------------------------------------
    def add_gsi_filter(self, taken: Callable[[int, bool], bool]) -> None: ...

    def add_interrupt_source(self, source: InterruptSource) -> None: ...

    def add_wake_source(self, wakes: Callable[[object], bool]) -> None: ...

    def add_cpuid_provider(self, provider: Callable) -> None: ...

    def add_msr_handler(self, msr: int, handler: Callable) -> None: ...

    def set_hypercall_handler(self, handler: Callable) -> None: ...

    def set_console_input(self, feed: Callable[[bytes], None]) -> None: ...

    def watch_block_starts(self, vcpu: int, check: Callable[[int], None]) -> BlockWatch: ...

    def unwatch_block_starts(self, watch: BlockWatch) -> None: ...

    # -- the run loop and the domain ----------------------------------------------------------
    def kick(self, why: str, force: bool = False) -> None: ...

    def idle(self, vcpu, why: str) -> None: ...

    def shutdown(self, reason: str, status: int, message: str = "") -> None: ...

    def device_page(self, gpa: int) -> bool: ...

    def deliver_exception(self, vcpu, vector: int, error_code: int | None = None) -> E.Action: ...

    # -- bringing vCPUs up and down (VCPUOP_initialise/up/down) ------------------------------
    def post_vcpu_state(self, vcpu: int, apply: Callable[[object], None]) -> None: ...

    def set_vcpu_running(self, vcpu: int, running: bool) -> None: ...

    def vcpu_running(self, vcpu: int) -> bool: ...
