"""CPUID policy: what the virtual CPU says it is.

The guest learns the CPU's identity and features only through CPUID, so
the policy must describe what Unicorn really executes (and, under Xen, what
the hypervisor provides at 0x40000000). Unicorn's own CPUID describes the
QEMU host model; xenicorn answers every leaf itself from the CPUID hook.

Feature bits advertised (SDM vol. 2A, CPUID):

=============  ===============================================================
leaf 1 EDX     FPU DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV
               PAT PSE36 CLFSH MMX FXSR SSE SSE2
leaf 1 ECX     SSE3, CX16, POPCNT, and bit 31 "hypervisor present"
leaf 7 ECX     UMIP: SGDT/SIDT/SLDT/STR/SMSW #GP at CPL > 0 with CR4.UMIP
               (the engine lacks it; xenicorn adds it, machine/umip.py)
leaf 7 EDX     ARCH_CAPABILITIES: the MSR (0x10A) that says which speculative-
               execution flaws the CPU does not have (:data:`ARCH_CAPABILITIES`)
0x80000001     EDX: SYSCALL, NX, LM; ECX: LAHF/SAHF
=============  ===============================================================

VME (leaf 1 EDX bit 1, virtual-8086 mode extensions: CR4.VME's interrupt
redirection bitmap and virtual IF) is not offered: the CPU engine ignores
CR4.VME, so ``INT n``, CLI and STI in vm86 with IOPL < 3 always raise #GP,
as on a CPU without VME (:mod:`.vm86`).

An emulated CPU does not speculate, so it reports itself immune where x86
has a bit to say so: without that, Linux takes a family 6 model 0x3A CPU
for vulnerable to Meltdown and friends and turns on page-table isolation
(a CR3 switch, so a full TLB flush in Unicorn, on every kernel entry and
exit), buffer clearing on every return to user mode and more: a quarter of
a Linux boot here. Spectre v1/v2 have no such bit and keep their
mitigations.

That is the ``default`` CPU model. ``--cpu max`` (and ``+feat``/``-feat``)
adds the features :mod:`.cpumodel` lists to leaves 1, 7 and 0x80000001 and
describes XSAVE in leaf 0xD; two bits then follow the vCPU's CR4, as on
hardware: OSXSAVE (leaf 1 ECX bit 27) and OSPKE (leaf 7 ECX bit 4).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from . import cpumodel
from .cpumodel import CpuModel


def _regs(text: str) -> tuple[int, int, int]:
    """A 12-byte vendor string as the EBX, EDX, ECX words of leaf 0."""
    b, d, c = struct.unpack("<III", text.encode())
    return b, d, c


VENDORS = {"intel": "GenuineIntel", "amd": "AuthenticAMD"}

LEAF1_EDX = ((1 << 0) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) |
             (1 << 8) | (1 << 9) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15) |
             (1 << 16) | (1 << 17) | (1 << 19) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26))
LEAF1_ECX = (1 << 0) | (1 << 13) | (1 << 23) | (1 << 31)
EXT1_EDX = (1 << 11) | (1 << 20) | (1 << 29)
EXT1_ECX = 1 << 0
LEAF7_EDX_ARCH_CAPABILITIES = 1 << 29
LEAF7_ECX_UMIP = 1 << 2               # x86/umip.py, machine/umip.py
LEAF7_ECX = LEAF7_ECX_UMIP
MSR_ARCH_CAPABILITIES = 0x10A
# IA32_ARCH_CAPABILITIES (SDM vol. 4, table 2-2; Linux's msr-index.h names):
# RDCL_NO 0 (no Meltdown), SSB_NO 4, MDS_NO 5, PSCHANGE_MC_NO 6, TAA_NO 8,
# SBDR_SSDP_NO 13, FBSDP_NO 14, PSDP_NO 15 (no MMIO stale data), BHI_NO 20,
# PBRSB_NO 24, GDS_NO 26, RFDS_NO 27, ITS_NO 62.
ARCH_CAPABILITIES = sum(1 << b for b in (0, 4, 5, 6, 8, 13, 14, 15, 20, 24, 26, 27, 62))
MAX_BASIC_LEAF = 0x15
CRYSTAL_HZ = 1_000_000_000            # = the LAPIC timer's bus clock (devices/lapic.py)


@dataclass
class CpuidPolicy:
    """The answers to CPUID, plus extra leaf providers (the Xen leaves)."""

    vendor: str = "intel"
    providers: list = field(default_factory=list)   # callables(leaf, sub, vcpu_index) -> tuple|None
    brand: str = "xenicorn virtual CPU"
    tsc_hz: Callable[[], float] | None = None      # the guest's TSC rate, for leaf 0x15
    model: CpuModel = cpumodel.DEFAULT

    def feature_words(self) -> dict[str, int] | None:
        """The model's feature words, for the CPU engine to execute exactly those (None: ``default``,
        the engine left as it always was; :mod:`xenicorn.engine.cpufeatures`)."""
        m = self.model
        if m.is_default:
            return None
        return {"leaf1_edx": m.word("leaf1_edx", LEAF1_EDX), "leaf1_ecx": m.word("leaf1_ecx", LEAF1_ECX),
                "leaf7_ebx": m.word("leaf7_ebx", 0), "leaf7_ecx": m.word("leaf7_ecx", LEAF7_ECX),
                "leaf7_edx": m.word("leaf7_edx", LEAF7_EDX_ARCH_CAPABILITIES),
                "ext1_edx": m.word("ext1_edx", EXT1_EDX), "ext1_ecx": m.word("ext1_ecx", EXT1_ECX),
                "xsave_eax": m.word("xsave_eax", 0), "xcr0": m.xcr0}

    def query(self, leaf: int, sub: int, vcpu_index: int = 0, cr4: int = 0,
              xcr0: int = 1) -> tuple[int, int, int, int]:
        """The answer for ``leaf``/``sub`` on vCPU ``vcpu_index``, whose CR4 and XCR0 are given
        (they matter only for models with XSAVE or PKU)."""
        for provider in self.providers:
            res = provider(leaf, sub, vcpu_index)
            if res is not None:
                return res
        v = _regs(VENDORS[self.vendor])
        if leaf == 0:
            return (MAX_BASIC_LEAF, v[0], v[2], v[1])
        if leaf == 1:
            # family 6 model 0x3a stepping 9; APIC id in EBX[31:24], CLFLUSH size 8*8
            ebx = (vcpu_index << 24) | (1 << 16) | (8 << 8)
            ecx = self.model.word("leaf1_ecx", LEAF1_ECX)
            if ecx & 1 << 26 and cr4 & cpumodel.CR4_OSXSAVE:
                ecx |= cpumodel.LEAF1_ECX_OSXSAVE
            return (0x000306A9, ebx, ecx, self.model.word("leaf1_edx", LEAF1_EDX))
        if leaf == 0x15 and self.tsc_hz is not None:
            # TSC / core crystal clock: TSC = crystal * EBX / EAX. The crystal
            # is the LAPIC timer's 1 GHz bus clock; Linux then knows both rates
            # without calibrating against the PIT (which exit-timing jitter fails).
            # Linux multiplies crystal kHz by EBX in 32 bits: keep EBX small
            # (the TSC in MHz over 1000; halved again for TSCs of 4.29 GHz and up).
            mhz, den = round(self.tsc_hz() / 1e6), 1000
            while mhz * (CRYSTAL_HZ // 1000) >= 1 << 32:
                mhz, den = (mhz + 1) // 2, den // 2
            return (den, mhz, CRYSTAL_HZ, 0)
        if leaf == 7:
            if sub != 0:
                return (0, 0, 0, 0)
            m = self.model
            ecx = m.word("leaf7_ecx", LEAF7_ECX)
            if ecx & 1 << 3 and cr4 & cpumodel.CR4_PKE:
                ecx |= cpumodel.LEAF7_ECX_OSPKE
            return (0, m.word("leaf7_ebx", 0), ecx, m.word("leaf7_edx", LEAF7_EDX_ARCH_CAPABILITIES))
        if leaf == 0xD:
            return self.model.xsave_leaf(sub, xcr0)
        if 2 <= leaf <= MAX_BASIC_LEAF:
            return (0, 0, 0, 0)            # caches, topology, xsave: none described
        if leaf == 0x80000000:
            return (0x80000008, *((v[0], v[2], v[1]) if self.vendor == "amd" else (0, 0, 0)))
        if leaf == 0x80000001:
            return (0, 0, self.model.word("ext1_ecx", EXT1_ECX), self.model.word("ext1_edx", EXT1_EDX))
        if 0x80000002 <= leaf <= 0x80000004:
            raw = self.brand.encode().ljust(48, b"\0")[:47] + b"\0"
            chunk = raw[(leaf - 0x80000002) * 16:][:16]
            return struct.unpack("<IIII", chunk)
        if leaf == 0x80000008:
            return (0x3028, 0, 0, 0)        # 40-bit physical, 48-bit linear
        if 0x80000000 < leaf:
            return (0, 0, 0, 0)
        # Above the highest basic leaf, Intel CPUs answer with the highest
        # basic leaf's data; zero is what guests treat as "nothing there".
        return (0, 0, 0, 0)
