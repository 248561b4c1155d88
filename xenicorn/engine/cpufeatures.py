"""The engine CPU of a CPU model: what TCG will execute follows what CPUID says.

QEMU's TCG decides per feature word (``env->features``) whether to
translate an instruction (STAC/CLAC need SMAP, RDTSCP its bit, CLWB,
CLFLUSHOPT, XSAVEOPT theirs), whether CR4.SMAP and CR4.PKE stick
(``cpu_x86_update_cr4`` drops them without the feature), and which XCR0
components XSETBV accepts (``helper_xsetbv`` asks the engine's own CPUID
leaf 0xD). Those words come from the CPU model the engine was created
with, less what TCG lacks (``x86_cpu_filter_features``).

For the ``default`` model nothing is touched: the engine is Unicorn's
default CPU (Haswell, filtered by TCG), as it always was. Any other model
(:mod:`xenicorn.x86.cpumodel`) gets:

1. Skylake-Server, chosen through Unicorn's public API
   (``uc_ctl`` ``UC_CTL_CPU_MODEL``, before the CPU exists): after TCG's
   filter it has every feature ``max`` offers (SMEP, SMAP, PKU, CLWB,
   CLFLUSHOPT, FSGSBASE, RDTSCP, XSAVE, XSAVEOPT, XGETBV1...);
2. its feature words then set to exactly the model's CPUID words
   (:class:`~xenicorn.engine.rawctx.FeatureWords`, a private field, checked
   by :func:`~xenicorn.engine.rawctx.feature_selftest`): a feature taken
   away with ``-feat`` is #UD, and XCR0 takes only the components CPUID
   lists. Without this, Skylake-Server's unfiltered component list would
   let XSETBV enable AVX and AVX-512 state that TCG does not have;
3. XCR0 = 1 and MXCSR = 0x1F80, their values after reset (SDM vol. 1
   §13.3, vol. 3 table 9-1; Xen's ``MXCSR_DEFAULT``): Unicorn starts XCR0
   with every component enabled and MXCSR at 0, all SIMD exceptions
   unmasked. (The ``default`` model keeps Unicorn's 0, as it always has.)

Each word is also masked with what TCG implements (QEMU 5.0's
``TCG_*_FEATURES``, target/i386/cpu.c), so no model can claim more.
"""
from __future__ import annotations

from unicorn import Uc, UC_ARCH_X86, UC_MODE_64
from unicorn import x86_const as X

from . import rawctx
from .startup import EngineUnsupported

# TCG_FEATURES, TCG_EXT_FEATURES, TCG_7_0_EBX_FEATURES, TCG_7_0_ECX_FEATURES,
# TCG_7_0_EDX_FEATURES, TCG_EXT2_FEATURES (the AMD aliases of leaf 1 EDX,
# NX, MMXEXT, RDTSCP, 3DNOW, 3DNOWEXT, PDPE1GB, SYSCALL, LM),
# TCG_EXT3_FEATURES, TCG_XSAVE_FEATURES of QEMU 5.0's target/i386/cpu.c.


def _bits(*bits: int) -> int:
    return sum(1 << b for b in bits)


_TCG_LEAF1_EDX = _bits(0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 22, 23, 24, 25, 26, 27)
TCG_MASKS = {
    "leaf1_edx": _TCG_LEAF1_EDX,
    "leaf1_ecx": _bits(0, 1, 3, 9, 13, 19, 20, 22, 23, 25, 26, 30, 31),
    "leaf7_ebx": _bits(0, 3, 7, 8, 9, 14, 19, 20, 22, 23, 24),
    "leaf7_ecx": _bits(3, 16),
    "leaf7_edx": 0,
    "ext1_edx": (_TCG_LEAF1_EDX & 0x0183F3FF) | _bits(11, 20, 22, 26, 27, 29, 30, 31),
    "ext1_ecx": _bits(0, 2, 4, 5, 6),
    "xsave_eax": _bits(0, 2),
}
WORD_INDEX = {
    "leaf1_edx": rawctx.FEAT_1_EDX, "leaf1_ecx": rawctx.FEAT_1_ECX, "leaf7_ebx": rawctx.FEAT_7_0_EBX,
    "leaf7_ecx": rawctx.FEAT_7_0_ECX, "leaf7_edx": rawctx.FEAT_7_0_EDX, "ext1_edx": rawctx.FEAT_8000_0001_EDX,
    "ext1_ecx": rawctx.FEAT_8000_0001_ECX, "xsave_eax": rawctx.FEAT_XSAVE,
}
BASE_MODEL = X.UC_CPU_X86_SKYLAKE_SERVER


def new_engine(words: dict[str, int] | None) -> Uc:
    """A Unicorn instance whose CPU executes the features in ``words``.

    ``words`` maps the CPUID words of :data:`WORD_INDEX` (and ``xcr0``, the
    supported XCR0 components) to the model's values; ``None`` is the
    ``default`` model, the engine as Unicorn makes it.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    if words is None:
        return uc
    try:
        rawctx.feature_selftest()
    except EngineUnsupported:
        raise
    except Exception as exc:                     # noqa: BLE001 - an unknown layout, said in one line
        raise rawctx.UnsupportedUnicornBuild(f"CPU feature words self-test failed: {exc}") from None
    uc.ctl_set_cpu_model(BASE_MODEL)             # before anything creates the CPU
    fw = rawctx.FeatureWords(uc)
    for name, index in WORD_INDEX.items():
        fw[index] = words[name] & TCG_MASKS[name]
    xcr0 = words["xcr0"]
    fw[rawctx.FEAT_XSAVE_COMP_LO], fw[rawctx.FEAT_XSAVE_COMP_HI] = xcr0 & 0xFFFFFFFF, xcr0 >> 32
    rawctx.LiveContext(uc).write(rawctx.OFF_XCR0, "<Q", 1)
    uc.reg_write(X.UC_X86_REG_MXCSR, 0x1F80)    # its reset value (Unicorn leaves 0: every exception unmasked)
    return uc


def engine_words(uc: Uc) -> dict[str, int]:
    """The engine's feature words now (for tests and ``--trace cpuid`` readers)."""
    fw = rawctx.FeatureWords(uc)
    out = {name: fw[index] for name, index in WORD_INDEX.items()}
    out["xcr0"] = fw[rawctx.FEAT_XSAVE_COMP_LO] | fw[rawctx.FEAT_XSAVE_COMP_HI] << 32
    return out
