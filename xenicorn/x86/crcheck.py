"""Which control-register values a write may load, and which fault it with #GP(0).

A CPU checks every write to CR0, CR4, EFER and XCR0 against the
architecture and against the features it reports: a bit for a feature
CPUID does not announce is *reserved*, and loading it is #GP(0) (SDM vol. 3
§2.5, the MOV to CR, WRMSR and XSETBV pages). QEMU's TCG, the CPU inside
Unicorn, skips most of these checks (it takes CR4.VMXE and CR4.UMIP from a
CPU that reports neither, drops CR0's upper half silently, accepts PG
without PE), so xenicorn intercepts the writes (:mod:`xenicorn.engine.msr`)
and decides here.

Everything in this module is a pure function from (old value, new value,
the rest of the CPU state it depends on, the features) to ``None`` (the
write is architecturally fine) or a short reason (the write is #GP(0)).
The feature set comes from the CPUID policy the guest sees
(:func:`features_from_cpuid`); the valid CR4 bits follow Xen's
``hvm_cr4_guest_valid_bits()`` (xen/arch/x86/hvm/hvm.c), which derives
them from the guest's CPUID policy the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

# CR0 (SDM vol. 3 §2.5)
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR0_WP, CR0_AM, CR0_NW, CR0_CD, CR0_PG = 1 << 16, 1 << 18, 1 << 29, 1 << 30, 1 << 31

# CR4
CR4_VME, CR4_PVI, CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR4_MCE, CR4_PGE, CR4_PCE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10
CR4_UMIP, CR4_LA57, CR4_VMXE, CR4_SMXE, CR4_FSGSBASE = 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 16
CR4_PCIDE, CR4_OSXSAVE, CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 17, 1 << 18, 1 << 20, 1 << 21, 1 << 22

# EFER (MSR 0xC0000080)
MSR_EFER = 0xC0000080
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE, EFER_SVME, EFER_FFXSR = 1 << 0, 1 << 8, 1 << 10, 1 << 11, 1 << 12, 1 << 14

# XCR0 (SDM vol. 1 §13.3)
XCR0_X87, XCR0_SSE, XCR0_AVX = 1 << 0, 1 << 1, 1 << 2


@dataclass(frozen=True)
class Features:
    """The CPUID words the checks depend on."""

    leaf1_ecx: int = 0
    leaf1_edx: int = 0
    leaf7_ebx: int = 0
    leaf7_ecx: int = 0
    ext1_ecx: int = 0
    ext1_edx: int = 0
    xcr0_supported: int = 0          # CPUID.(EAX=0DH,ECX=0):EDX:EAX

    def has(self, word: str, bit: int) -> bool:
        return bool(getattr(self, word) >> bit & 1)


def features_from_cpuid(query) -> Features:
    """The feature words from ``query(leaf, subleaf) -> (eax, ebx, ecx, edx)``."""
    l1, l7, e1 = query(1, 0), query(7, 0), query(0x80000001, 0)
    xsave = l1[2] >> 26 & 1
    xd = query(0xD, 0) if xsave else (0, 0, 0, 0)
    return Features(leaf1_ecx=l1[2], leaf1_edx=l1[3], leaf7_ebx=l7[1], leaf7_ecx=l7[2],
                    ext1_ecx=e1[2], ext1_edx=e1[3], xcr0_supported=xd[0] | xd[3] << 32)


def cr4_valid_bits(f: Features) -> int:
    """The CR4 bits this CPU lets a guest set (after Xen's hvm_cr4_guest_valid_bits)."""
    pairs = (
        (f.has("leaf1_edx", 1), CR4_VME | CR4_PVI),
        (f.has("leaf1_edx", 4), CR4_TSD),
        (f.has("leaf1_edx", 2), CR4_DE),
        (f.has("leaf1_edx", 3), CR4_PSE),
        (f.has("leaf1_edx", 6), CR4_PAE),
        (f.has("leaf1_edx", 7), CR4_MCE),
        (f.has("leaf1_edx", 13), CR4_PGE),
        (True, CR4_PCE),
        (f.has("leaf1_edx", 24), CR4_OSFXSR),
        (f.has("leaf1_edx", 25), CR4_OSXMMEXCPT),
        (f.has("leaf7_ecx", 2), CR4_UMIP),
        (f.has("leaf7_ecx", 16), CR4_LA57),
        (f.has("leaf1_ecx", 5), CR4_VMXE),
        (f.has("leaf1_ecx", 6), CR4_SMXE),
        (f.has("leaf7_ebx", 0), CR4_FSGSBASE),
        (f.has("leaf1_ecx", 17), CR4_PCIDE),
        (f.has("leaf1_ecx", 26), CR4_OSXSAVE),
        (f.has("leaf7_ebx", 7), CR4_SMEP),
        (f.has("leaf7_ebx", 20), CR4_SMAP),
        (f.has("leaf7_ecx", 3), CR4_PKE),
    )
    return sum(bits for ok, bits in pairs if ok)


def check_cr0(old: int, new: int, *, cr4: int, efer: int, code64: bool) -> str | None:
    """MOV to CR0 (SDM vol. 3 §2.5 and the MOV CR page; Xen's hvm_set_cr0)."""
    if new >> 32:
        return "CR0 bits 63:32 set"
    if new & CR0_PG and not new & CR0_PE:
        return "CR0.PG without PE"
    if new & CR0_NW and not new & CR0_CD:
        return "CR0.NW without CD"
    if new & CR0_PG and not old & CR0_PG and efer & EFER_LME and not cr4 & CR4_PAE:
        return "CR0.PG with EFER.LME but not CR4.PAE"
    if code64 and old & CR0_PG and not new & CR0_PG:
        return "CR0.PG cleared in 64-bit mode"
    if not new & CR0_PG and cr4 & CR4_PCIDE:
        return "CR0.PG cleared with CR4.PCIDE set"
    return None


def check_cr4(old: int, new: int, *, valid: int, efer: int, cr3: int) -> str | None:
    """MOV to CR4 (SDM vol. 3 §2.5 and the MOV CR page; Xen's hvm_set_cr4)."""
    if new & ~valid:
        return f"CR4 reserved or unreported bits {new & ~valid:#x}"
    if efer & EFER_LMA and not new & CR4_PAE:
        return "CR4.PAE cleared in IA-32e mode"
    if new & CR4_PCIDE and not old & CR4_PCIDE and (not efer & EFER_LMA or cr3 & 0xFFF):
        return "CR4.PCIDE set outside IA-32e mode or with CR3[11:0] non-zero"
    if (new ^ old) & CR4_LA57 and efer & EFER_LMA:
        return "CR4.LA57 changed in IA-32e mode"
    return None


def efer_valid_bits(f: Features) -> int:
    """The EFER bits a WRMSR may set (after Xen's hvm_efer_valid)."""
    bits = EFER_LMA                                  # checked separately below
    if f.has("ext1_edx", 11):
        bits |= EFER_SCE
    if f.has("ext1_edx", 29):
        bits |= EFER_LME
    if f.has("ext1_edx", 20):
        bits |= EFER_NXE
    if f.has("ext1_ecx", 2):
        bits |= EFER_SVME
    if f.has("ext1_edx", 25):
        bits |= EFER_FFXSR
    return bits


def check_efer(old: int, new: int, *, cr0: int, features: Features) -> str | None:
    """WRMSR to EFER (SDM vol. 4 table 2-2, vol. 3 §9.8.5; Xen's hvm_efer_valid/hvm_set_efer)."""
    if new & ~efer_valid_bits(features):
        return f"EFER reserved bits {new & ~efer_valid_bits(features):#x}"
    if cr0 & CR0_PG and (new ^ old) & EFER_LME:
        return "EFER.LME changed while paging is on"
    if (new ^ old) & EFER_LMA:
        return "EFER.LMA is not writable (it follows LME and CR0.PG)"
    return None


def check_xcr0(new: int, *, index: int, supported: int) -> str | None:
    """XSETBV's #GP(0) rules (SDM vol. 1 §13.3 and the XSETBV page); #UD is checked by the caller."""
    if index != 0:
        return "XCR index other than 0"
    if not new & XCR0_X87:
        return "XCR0.X87 clear"
    if new & XCR0_AVX and not new & XCR0_SSE:
        return "XCR0.AVX without SSE"
    if new & ~supported:
        return f"XCR0 unsupported bits {new & ~supported:#x}"
    return None
