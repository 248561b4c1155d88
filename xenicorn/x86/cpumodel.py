"""CPU models: which features the virtual CPU reports, chosen with ``--cpu MODEL[,+feat,-feat...]``.

A guest learns what its CPU can do only from CPUID, and an honest CPUID
reports exactly what the CPU executes. The CPU engine is QEMU's TCG (the
one inside Unicorn 2.1.4, QEMU 5.0's ``target/i386``): the ``TCG_*_FEATURES``
masks in its ``cpu.c`` list what TCG implements, and the engine executes a
feature's instructions only when the engine CPU's own feature words
(``env->features``) contain it. So a model here is two things at once: the
CPUID words xenicorn answers (:mod:`.cpuid`) and, for every model but
``default``, the engine's feature words, set to the same values
(:mod:`xenicorn.engine.cpufeatures`), so that an offered feature works and
an unoffered one faults as on a CPU without it.

=========  =================================================================
model      what it is
=========  =================================================================
default    the model xenicorn always had (family 6 model 0x3a, SSE2-era
           features; :mod:`.cpuid` lists them). The engine is left exactly
           as Unicorn makes it: it executes some instructions CPUID does not
           report (RDTSCP, XSAVE, SSSE3...), as before.
max        ``default`` plus every feature in :data:`FEATURES`: all that TCG
           executes and xenicorn can stand behind, as QEMU's ``-cpu max``
           under TCG (PCOMMIT included: TCG runs it as a fence, as QEMU
           7.2's ``max`` offers it)
=========  =================================================================

Not offered, though TCG has them: VME (xenicorn delivers vm86 interrupts
itself, without VME: :mod:`.vm86`), MONITOR/MWAIT (xenicorn's idle loop
knows HLT), MPX (gone from the architecture; it would bring two XCR0
components and a bounds-config MSR to model), LA57
(xenicorn's page walker has no 5-level paging), SVM (nested
virtualisation), 3DNow!, SSE4A and the AMD MMX extensions (AMD-only),
XSAVEC/XSAVES (not in TCG). PKS, RDPID, PCID, INVPCID, AVX: not in this
TCG at all. UMIP is not in TCG either; xenicorn adds it itself, in every
model (:mod:`xenicorn.machine.umip`), so it is no ``+feat`` here.

``+feat``/``-feat`` use QEMU's feature names (``-cpu max,-pku``). Taking a
feature away takes what depends on it too, as QEMU's feature dependencies
do (``-xsave`` removes ``xsaveopt`` and ``xgetbv1``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# QEMU's feature name -> (CPUID word, bit) (SDM vol. 2A, CPUID; names from
# QEMU's feature_word_info; words named as crcheck.Features names them,
# xsave_eax is leaf 0xD.1 EAX). Each is in TCG's mask for its word.
FEATURES: dict[str, tuple[str, int]] = {
    "pclmulqdq": ("leaf1_ecx", 1), "ssse3": ("leaf1_ecx", 9), "sse4.1": ("leaf1_ecx", 19),
    "sse4.2": ("leaf1_ecx", 20), "movbe": ("leaf1_ecx", 22), "aes": ("leaf1_ecx", 25),
    "xsave": ("leaf1_ecx", 26), "rdrand": ("leaf1_ecx", 30),
    "fsgsbase": ("leaf7_ebx", 0), "bmi1": ("leaf7_ebx", 3), "smep": ("leaf7_ebx", 7),
    "bmi2": ("leaf7_ebx", 8), "erms": ("leaf7_ebx", 9), "adx": ("leaf7_ebx", 19), "smap": ("leaf7_ebx", 20),
    "pcommit": ("leaf7_ebx", 22), "clflushopt": ("leaf7_ebx", 23), "clwb": ("leaf7_ebx", 24),
    "pku": ("leaf7_ecx", 3),
    "abm": ("ext1_ecx", 5),
    "pdpe1gb": ("ext1_edx", 26), "rdtscp": ("ext1_edx", 27),
    "xsaveopt": ("xsave_eax", 0), "xgetbv1": ("xsave_eax", 2),
}
ALIASES = {"sse4_1": "sse4.1", "sse4_2": "sse4.2", "sse4-1": "sse4.1", "sse4-2": "sse4.2",
           "pclmuldq": "pclmulqdq", "lzcnt": "abm"}
# feature -> the features that need it (QEMU's feature_dependencies)
DEPENDENTS = {"xsave": ("xsaveopt", "xgetbv1")}

# XCR0 state components (SDM vol. 1 §13.1) and where TCG saves them (QEMU's
# x86_ext_save_areas: the standard, non-compacted XSAVE layout).
XCR0_X87, XCR0_SSE, XCR0_PKRU = 1 << 0, 1 << 1, 1 << 9
XSAVE_LEGACY_SIZE = 512 + 64            # legacy region + XSAVE header
PKRU_OFFSET, PKRU_SIZE = 0xA80, 8

# OS-enabled bits CPUID reports from CR4 (SDM vol. 2A, CPUID): OSXSAVE and OSPKE.
LEAF1_ECX_OSXSAVE, LEAF7_ECX_OSPKE = 1 << 27, 1 << 4
CR4_OSXSAVE, CR4_PKE = 1 << 18, 1 << 22

MODELS = ("default", "max")


@dataclass(frozen=True)
class CpuModel:
    """A chosen model: its CPUID feature words and the XCR0 components it supports."""

    spec: str = "default"                          # canonical: "max", "max,-pku", "default,+smap"
    extra: dict = field(default_factory=dict)      # word -> bits added to the default model's words

    @property
    def is_default(self) -> bool:
        """The unchanged model: nothing added, the engine untouched."""
        return not any(self.extra.values())

    @property
    def features(self) -> tuple[str, ...]:
        """The names of the features this model adds to ``default``, sorted."""
        return tuple(sorted(f for f in FEATURES if self.has(f)))

    def has(self, name: str) -> bool:
        word, bit = FEATURES[name]
        return bool(self.extra.get(word, 0) >> bit & 1)

    def word(self, name: str, base: int) -> int:
        """CPUID word ``name``: the default model's ``base`` plus what this model adds."""
        return base | self.extra.get(name, 0)

    @property
    def xcr0(self) -> int:
        """The XCR0 bits XSETBV accepts (CPUID.(EAX=0DH,ECX=0):EDX:EAX); 0 without XSAVE."""
        if not self.has("xsave"):
            return 0
        return XCR0_X87 | XCR0_SSE | (XCR0_PKRU if self.has("pku") else 0)

    def xsave_leaf(self, sub: int, xcr0: int) -> tuple[int, int, int, int]:
        """CPUID leaf 0xD (SDM vol. 1 §13.2): components, sizes and offsets, for the vCPU's XCR0."""
        sup = self.xcr0
        if not sup:
            return (0, 0, 0, 0)
        if sub == 0:
            return (sup & 0xFFFFFFFF, xsave_size(xcr0 & sup), xsave_size(sup), sup >> 32)
        if sub == 1:
            return (self.extra.get("xsave_eax", 0), 0, 0, 0)    # no XSAVES: EBX, ECX, EDX 0
        if sub == 9 and sup & XCR0_PKRU:
            return (PKRU_SIZE, PKRU_OFFSET, 0, 0)
        return (0, 0, 0, 0)


def xsave_size(xcr0: int) -> int:
    """Bytes XSAVE writes for the components in ``xcr0`` (the standard format)."""
    return PKRU_OFFSET + PKRU_SIZE if xcr0 & XCR0_PKRU else XSAVE_LEGACY_SIZE


class CpuModelError(ValueError):
    """A bad ``--cpu`` value; the message is one line for the user."""


def parse(spec: str) -> CpuModel:
    """``MODEL[,+feat,-feat,...]`` -> :class:`CpuModel` (QEMU's ``-cpu`` syntax; also ``feat=on|off``)."""
    parts = [p.strip() for p in spec.split(",")]
    name = parts[0]
    if name not in MODELS:
        raise CpuModelError(f"--cpu {spec}: unknown CPU model {name!r} (models: {', '.join(MODELS)})")
    on = set(FEATURES) if name == "max" else set()
    for part in parts[1:]:
        if part.startswith(("+", "-")):
            feat, add = part[1:], part[0] == "+"
        elif part.endswith(("=on", "=off")):
            feat, _, val = part.partition("=")
            add = val == "on"
        else:
            raise CpuModelError(f"--cpu {spec}: expected +FEATURE or -FEATURE, got {part!r}")
        feat = ALIASES.get(feat, feat)
        if feat not in FEATURES:
            raise CpuModelError(f"--cpu {spec}: unknown or unsupported feature {feat!r} "
                                f"(features: {', '.join(sorted(FEATURES))})")
        if add:
            on.add(feat)
        else:
            on.difference_update((feat, *DEPENDENTS.get(feat, ())))
    for feat, deps in DEPENDENTS.items():           # +xsaveopt without xsave: QEMU drops it
        if feat not in on:
            on.difference_update(deps)
    extra: dict[str, int] = {}
    for feat in on:
        word, bit = FEATURES[feat]
        extra[word] = extra.get(word, 0) | 1 << bit
    base = set(FEATURES) if name == "max" else set()
    canon = [name] + [f"+{f}" for f in sorted(on - base)] + [f"-{f}" for f in sorted(base - on)]
    return CpuModel(spec=",".join(canon), extra=extra)


DEFAULT = CpuModel()
