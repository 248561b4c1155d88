"""#NM or #UD: which one an MMX/SSE instruction raises when CR0.TS is set.

The SDM (vol. 3 §2.5, §9.2 and table 12-1 / 13-x "Action taken for
combinations of EM, MP, TS") checks the *instruction's* enabling bits first:
with CR0.EM=1 every MMX and SSE instruction is #UD, and with CR4.OSFXSR=0
every SSE instruction is #UD, whatever CR0.TS says; only then does TS=1
give #NM ("device not available"). x87 instructions are #NM for EM or TS,
and WAIT/FWAIT for TS with MP.

QEMU's TCG tests TS first (``gen_sse`` in target/i386/translate.c) and
raises #NM for all of them. The test is made while translating, from flags
baked into the translated block, so it cannot be reordered from outside;
but every exception reaches xenicorn's hook before it is delivered, so the
#NM is corrected there: :func:`nm_or_ud` decodes the faulting instruction
and says which vector the SDM gives. It costs nothing unless a #NM happens.
"""
from __future__ import annotations

PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3}
CR0_EM = 1 << 2
CR4_OSFXSR = 1 << 9
# 0F-map opcodes that are SSE with or without a prefix (SSE1's packed-single forms)
_SSE_ALWAYS = set(range(0x10, 0x18)) | set(range(0x28, 0x30)) | set(range(0x50, 0x60)) | {0xC2, 0xC6, 0xAE}
# 0F-map opcodes that are MMX without a 66/F2/F3 prefix and SSE2 with one
_MMX_OR_SSE2 = set(range(0x60, 0x80)) | set(range(0xD0, 0x100)) | {0x38, 0x3A, 0xC4, 0xC5}


def classify(code: bytes, bits: int) -> str:
    """'sse', 'mmx' or 'other' for the instruction at the start of ``code``."""
    pos, sse_prefix = 0, False
    while pos < len(code) and code[pos] in PREFIXES:
        sse_prefix |= code[pos] in (0x66, 0xF2, 0xF3)
        pos += 1
    if bits == 64 and pos < len(code) and 0x40 <= code[pos] <= 0x4F:
        pos += 1
    if code[pos:pos + 1] != b"\x0f" or len(code) < pos + 2:
        return "other"
    op = code[pos + 1]
    if op in _SSE_ALWAYS:
        return "sse"
    if op in _MMX_OR_SSE2:
        return "sse" if sse_prefix else "mmx"
    return "other"


def nm_or_ud(code: bytes, bits: int, cr0: int, cr4: int) -> int:
    """The vector (7 or 6) the SDM gives an instruction that the engine faulted with #NM."""
    kind = classify(code, bits)
    if kind == "other":
        return 7
    if cr0 & CR0_EM or (kind == "sse" and not cr4 & CR4_OSFXSR):
        return 6
    return 7
