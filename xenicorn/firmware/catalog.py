"""What each bundled guest kernel shows, and where its source is: the one copy of that text.

``xenicorn firmware`` prints it (one line a kernel), and the README's
"Bundled guest kernels" table is this table in Markdown
(:func:`markdown_table`; ``python -m xenicorn.firmware.catalog`` prints it,
and tests/test_firmware_catalog.py fails when the README's copy differs or
an image in ``images/`` has no row).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    """A row: the images built from one source folder, and what they show."""

    names: tuple[str, ...]
    sources: tuple[str, ...]         # folders under xenicorn/firmware/src/
    text: str                        # what the guest checks and prints (Markdown: `code` spans)


KERNELS: tuple[Kernel, ...] = (
    Kernel(('hello32', 'hello64'), ('hello',),
           'PVH boot, `hvm_start_info` (command line, memory map), 32-bit and long mode'),
    Kernel(('exceptions32', 'exceptions64'), ('exceptions',),
           '#DE #UD #BP #GP #PF, `INT n`, IST, #DF, and faults from CPL3: the guest checks every frame against '
           'the SDM'),
    Kernel(('vm86_32',), ('vm86',),
           'virtual-8086 mode entered by IRET: a LAPIC timer interrupt, `INT n` at IOPL 0 (#GP) and 3, #UD, #DE '
           'and bad gates, SMSW/SGDT with CR4.UMIP (#GP(0)); the guest checks each nine-dword frame on the '
           "ring-0 stack and the null data segments. Passes under QEMU's `-kernel` too"),
    Kernel(('taskgate32', 'taskgate64'), ('taskgate',),
           'hardware task switches through IDT task gates: an NMI self-IPI, `INT n`, #UD, #GP and #DF (with '
           'their error codes on the new stack) and a LAPIC timer interrupt, from CPL0 and CPL3; each task '
           'checks TR, the back-link, NT, CR0.TS, its own CR3, the busy bits and the state saved in the old TSS,'
           ' and IRET returns; busy, absent or too-small TSSes fault at the INT. In 64-bit mode a type-5 IDT '
           "entry is #GP. Passes under QEMU's `-kernel` too"),
    Kernel(('syscall64',), ('syscall64',),
           'SYSCALL/SYSRET round trips between CPL3 and CPL0'),
    Kernel(('xencore32', 'xencore64'), ('xencore',),
           'finds Xen (CPUID), installs the hypercall page, and exercises xen_version, console_io, memory_op '
           '(populate_physmap of a hole, within max_pages), hvm_op, vcpu_op and sched_op with good and bad '
           'arguments, the PV clock, and a hypercall from CPL3 (-EPERM)'),
    Kernel(('irq32', 'irq64'), ('irq',),
           'PCI enumeration of the xen-platform device, a LAPIC self-IPI, LAPIC one-shot and periodic timers '
           "waking HLT, the UART's IRQ 4 through the IOAPIC and through the 8259 (virtual wire)"),
    Kernel(('hcbench32', 'hcbench64'), ('hcbench',),
           'a loop of cheap hypercalls, for `benchmarks/hypercalls.py`'),
    Kernel(('fifo32', 'fifo64'), ('fifo',),
           'the FIFO event-channel ABI through `--append via=vector|lapic|gsi|intx`: init_control and '
           'expand_array, an event kept across the switch from 2-level, priorities ordering delivery, FIFO order'
           " within a queue, masking and unmask, reset back to 2-level, Xen's error codes for each hostile "
           'argument'),
    Kernel(('evtchn32', 'evtchn64'), ('evtchn',),
           'event channels through the callback chosen by `--append via=vector|lapic|gsi|pic|intx|intxpic`: IPI '
           "and loopback ports, masking and coalescing, VIRQ_TIMER, the UART's GSI as a PIRQ event, switching "
           'the callback at run time, hostile arguments'),
    Kernel(('xenstore32', 'xenstore64'), ('xenstore',),
           'the dom0 side: text on the PV console, xenstore over its ring (read, write, directory, an ERROR '
           'reply, a denied write, a watch, a transaction that conflicts and is retried), a page granted to dom0'
           ' from a grant frame in the xen-platform BAR; `--append echo` echoes a line of `--console-input '
           'stdin`'),
    Kernel(('gnttab32', 'gnttab64'), ('gnttab',),
           'grant tables v2: set_version rules, status frames mapped and listed, a full-page and a sub-page '
           'grant read and written by dom0 (the test plays dom0 when the guest prints `gnttab: dom0 map`), '
           'GTF_reading in the status frame, -EBUSY while mapped, GNTTABOP_copy with every GNTST_* status, back '
           'to v1'),
    Kernel(('xenabi32', 'xenabi64'), ('xenabi',),
           "an XTF-style guest: every line through `console_io` (Xen's log, `(d1) `-prefixed) and the PV console"
           " (stdout), `console_io`'s line buffering and stripping, and every hypercall a domU may not use with "
           "Xen's answer and order of checks ([docs/xen-abi.md](docs/xen-abi.md))"),
    Kernel(('tickbench32', 'tickbench64'), ('tickbench',),
           'calibrates the LAPIC timer against PIT channel 2, then computes with and without it ticking at 1 kHz'
           ' (`--append "n=N hz=RATE"`), for `benchmarks/timer.py`'),
    Kernel(('hpet32', 'hpet64'), ('hpet',),
           "the HPET found through the ACPI `HPET` table: Xen's capability and timer-capability values, the main"
           ' counter (halted, running, its high half carrying), a one-shot edge timer on IOAPIC pin 20 (never '
           "early), a periodic timer set with VAL_SET, a level timer's status bit holding pin 21 until written "
           '1, legacy replacement on IRQ 0 (IOAPIC pin 2 and the 8259) and IRQ 8 with the PIT cut; `Test result:'
           ' SKIP` with `--no-hpet`'),
    Kernel(('cpuidfault32', 'cpuidfault64'), ('cpuidfault',),
           'CPUID faulting as Xen offers it to HVM guests: `PLATFORM_INFO` (MSR 0xCE) bit 31, read-only; '
           '`MISC_FEATURES_ENABLES` (MSR 0x140) bit 0, the others reserved (#GP); a CPUID at CPL3 is #GP(0) at '
           "the CPUID while it is on, the kernel's CPUID answers"),
    Kernel(('umip32', 'umip64'), ('umip',),
           'UMIP (CR4 bit 11, reported in CPUID 7.ECX bit 2): SGDT, SIDT, SLDT, STR and SMSW, every destination '
           'form, store the right values at CPL 0 with UMIP off and on, are #GP(0) at the instruction from CPL 3'
           ' with it on (nothing stored), and work at CPL 3 again once it is cleared. Passes under QEMU TCG with'
           ' `-cpu qemu64,+umip`'),
    Kernel(('smp32', 'smp64'), ('smp',),
           'several CPUs from the ACPI MADT: APs started by INIT-SIPI-SIPI through a real-mode trampoline, IPI '
           'ping-pong (physical, all-but-self, flat logical), a spinlock and a `lock add` counter on every CPU '
           'at once, code patched by one CPU and run by another; under Xen, an event for vCPU 1 raises no '
           'callback GSI, its per-vCPU upcall vector does reach it, and `VCPUOP_initialise` + `VCPUOP_up` start '
           'a vCPU. The plain part passes under QEMU TCG `-smp 2`/`-smp 4`'),
    Kernel(('mboot32',), ('multiboot',),
           "a Multiboot v1 kernel (no PVH note): checks the loader's contract from inside (EAX magic, CPU state,"
           ' mem_lower/mem_upper against the memory map, command line, page-aligned modules and their strings, '
           "loader name) and reads RAM size and CPU count from QEMU's fw_cfg; `--append mbtest --initrd 'one.bin"
           " arg=1,two.bin'`. Passes under QEMU's `-kernel` too"),
    Kernel(('fep32', 'fep64'), ('fep',),
           "Xen's forced emulation prefix (`--hvm-fep`): probed as XTF does (a plain #UD at the prefix without "
           "the option), a register op, a store and a load through it, a fault's frame at the instruction after "
           'the prefix, `FEP; ud2`, SSE 0/0 raising #XM with MXCSR.IE, from CPL3; 32-bit: a read past a 4 KiB '
           'segment limit and through a null selector, #GP(0) through FEP where the engine reads natively; '
           '64-bit: a non-canonical `(%rbp)` is #SS(0), limits do not apply'),
    Kernel(('nmi32', 'nmi64'), ('nmi',),
           'NMI blocking (SDM vol. 3 §6.7.1), with self-NMIs through the LAPIC: one sent inside the NMI handler '
           "waits and is taken right after the handler's IRET, or after an IRET to the next instruction inside "
           'it, or (an IRET that faults) before the #GP handler runs; several while blocked are one. Under QEMU '
           'TCG all but the faulting-IRET check pass (QEMU unblocks only on a successful IRET)'),
    Kernel(('apicoff32', 'apicoff64'), ('apicoff',),
           "the LAPIC's global disable through IA32_APIC_BASE bit 11: CPUID.1:EDX.APIC clears, the page reads "
           'all ones, an ICR write sends nothing; enabled again, the APIC is in its power-up state. QEMU 7.2 TCG'
           ' keeps answering at the page and cannot re-enable it'),
    Kernel(('cpufeat32', 'cpufeat64'), ('cpufeat',),
           "the CPU model's features from inside (`--cpu max`, or with `-feat`): SMEP (a supervisor fetch from a"
           ' user page is #PF 0x11), SMAP (a supervisor read/write of a user page with AC=0 is #PF 0x1/0x3, STAC'
           ' lets it through, CLAC closes it), PKU (64-bit: OSPKE follows CR4.PKE, an access-disabled key is #PF'
           ' with PK), RDTSCP (ECX = TSC_AUX), XSAVE (OSXSAVE follows CR4, XCR0 starts at 1, XSETBV refuses '
           'unlisted components, x87 clear and XCR1, leaf 0xD sizes follow XCR0), CLFLUSHOPT, CLWB, FSGSBASE; a '
           'feature not offered is a #GP(0) CR4 write and #UD instructions. Passes under QEMU TCG `-cpu max` too'),
    Kernel(('memseg32', 'memseg64'), ('memseg',),
           'segment faults before page faults, from CPL3: 32-bit accesses past a 2 GiB limit (DS, FS, SS via '
           'EBP/ESP/PUSH), through a null GS and an expand-down ES are #GP(0)/#SS(0), not the #PF the page '
           'tables would give, with CR2 untouched; 64-bit non-canonical `(%rbp)`, `(%rsp)`, PUSH are #SS(0), '
           '`(%rax)` and an FS base overflowing past the canonical top #GP(0) (QEMU 7.2 TCG fails the same '
           'checks the CPU engine does; xenicorn corrects them at the exception, `--trace int`)'),
    Kernel(('crcheck32', 'crcheck64'), ('crcheck',),
           'control-register writes the CPU must refuse: a MOV to CR0/CR4 setting a reserved bit, a feature '
           'CPUID does not report (VMX, SMEP, SMAP, PKE, PCID, XSAVE, FSGSBASE) or an inconsistent combination '
           '(PG without PE, NW without CD, leaving long mode from 64-bit code) is #GP(0) at the MOV with the '
           'register unchanged; allowed writes, LMSW and CLTS take effect'),
    Kernel(('wild32', 'triple32', 'spin32'), ('misbehave',),
           'a jump into unmapped memory, a triple fault, an endless loop (exit statuses 1, 1, 124)'),
)


def describe(name: str) -> Kernel | None:
    """The row that lists image ``name``, None for an image the catalog does not know."""
    return next((k for k in KERNELS if name in k.names), None)


def summary(text: str, width: int = 100) -> str:
    """The description on one line of ``width`` characters at most, without Markdown backquotes."""
    plain = text.replace("`", "")
    if len(plain) <= width:
        return plain
    return plain[:width - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def markdown_table() -> str:
    """The README's table of bundled kernels."""
    lines = ["| kernel | what it shows |", "|---|---|"]
    for k in KERNELS:
        names = ", ".join(f"`{n}`" for n in k.names)
        lines.append(f"| {names} | {k.text.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
