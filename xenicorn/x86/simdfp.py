"""SIMD floating-point exceptions for an SSE instruction the emulator runs (FEP).

An SSE arithmetic instruction reports IEEE 754 conditions in MXCSR (SDM
vol. 1 §11.5.2): Invalid (IE, bit 0), Denormal operand (DE, 1), Zero
divide (ZE, 2), Overflow (OE, 3), Underflow (UE, 4), Precision (PE, 5). A
condition whose mask (bits 7-12) is clear raises #XM (vector 19), or #UD
when CR4.OSXMMEXCPT is clear, and the destination is left unchanged.
Xen's emulator runs such instructions on the host CPU and hands the
exception back to the guest (XSA-451, XSA-470 are about doing that
safely). The CPU engine here (QEMU's TCG of Unicorn 2) neither raises #XM
nor sets these MXCSR flags, so for an instruction forced through the
emulator, :func:`check` works them out exactly with rational arithmetic:
it sets the flags and returns the exception to deliver; with everything
masked, it sets the flags and the engine computes the (masked) result.

Covered: ADD, SUB, MUL, DIV, SQRT, MIN, MAX (SS/SD/PS/PD) and
(U)COMISS/SD. Round-to-nearest is assumed for PE/OE/UE (MXCSR.RC other
than 0 is not modelled); DAZ is honoured for DE.
"""
from __future__ import annotations

import math
import struct
from fractions import Fraction

IE, DE, ZE, OE, UE, PE = 1, 2, 4, 8, 16, 32
MASK_SHIFT = 7
DAZ = 1 << 6
XM, UD = 19, 6
CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 9, 1 << 10
CR0_EM, CR0_TS = 1 << 2, 1 << 3

# format: (total bits, exponent bits, fraction bits)
SINGLE, DOUBLE = (32, 8, 23), (64, 11, 52)
OPS = {"add", "sub", "mul", "div", "sqrt", "min", "max", "ucomi", "comi"}


def _parse(mnemonic: str):
    """('div', SINGLE, lanes) for divss/divps/..., or None."""
    for suffix, fmt, lanes in (("ss", SINGLE, 1), ("sd", DOUBLE, 1), ("ps", SINGLE, 4), ("pd", DOUBLE, 2)):
        if mnemonic.endswith(suffix) and mnemonic[:-2] in OPS:
            if mnemonic[:-2] in ("ucomi", "comi") and lanes != 1:
                return None
            return mnemonic[:-2], fmt, lanes
    return None


def _value(raw: int, fmt) -> tuple[str, Fraction | None, int]:
    """(kind, exact value, sign) of one IEEE number: kind is zero/denormal/normal/inf/qnan/snan."""
    total, ebits, fbits = fmt
    sign = raw >> (total - 1) & 1
    exp = raw >> fbits & ((1 << ebits) - 1)
    frac = raw & ((1 << fbits) - 1)
    bias = (1 << (ebits - 1)) - 1
    if exp == (1 << ebits) - 1:
        if frac == 0:
            return "inf", None, sign
        return ("qnan" if frac >> (fbits - 1) else "snan"), None, sign
    if exp == 0:
        if frac == 0:
            return "zero", Fraction(0), sign
        v = Fraction(frac, 1 << fbits) * Fraction(2) ** (1 - bias)
        return "denormal", -v if sign else v, sign
    v = (1 + Fraction(frac, 1 << fbits)) * Fraction(2) ** (exp - bias)
    return "normal", -v if sign else v, sign


def _round(exact: Fraction, fmt) -> Fraction | None:
    """``exact`` rounded to the format (to nearest); None if it overflows."""
    try:
        as_double = float(exact)                # correctly rounded to double
    except OverflowError:
        return None
    if fmt is SINGLE:
        try:
            as_double = struct.unpack("<f", struct.pack("<f", as_double))[0]
        except OverflowError:
            return None
    if math.isinf(as_double):
        return None
    return Fraction(as_double)


def _lane(op: str, a, b, fmt, daz: bool) -> int:
    """The MXCSR flags one lane's operation raises (a = destination operand, b = source)."""
    operands = [b] if op == "sqrt" else [a, b]
    kinds = [k for k, _, _ in operands]
    if "snan" in kinds:
        return IE
    if any(k == "qnan" for k in kinds):
        return IE if op in ("comi", "min", "max") else 0
    flags = DE if not daz and "denormal" in kinds else 0
    if daz:                                      # denormal operands are zeros of the same sign
        a, b = [("zero", Fraction(0), sign) if kind == "denormal" else (kind, v, sign) for kind, v, sign in (a, b)]
    (ka, va, sa), (kb, vb, sb) = a, b
    if op in ("add", "sub") and ka == kb == "inf" and (sa != sb) == (op == "add"):
        return IE
    if op == "mul" and {ka, kb} == {"inf", "zero"}:
        return IE
    if op == "div" and (ka == kb == "inf" or ka == kb == "zero"):
        return IE
    if op == "sqrt" and sb and kb != "zero":
        return IE
    if op == "div" and kb == "zero" and ka != "inf":
        return flags | ZE
    if op in ("min", "max", "comi", "ucomi") or "inf" in kinds:
        return flags
    exact = {"add": lambda: va + vb, "sub": lambda: va - vb, "mul": lambda: va * vb,
             "div": lambda: va / vb, "sqrt": lambda: None}[op]()
    if op == "sqrt":
        root = Fraction(math.sqrt(vb)) if vb else Fraction(0)
        rounded = _round(root, fmt)
        return flags | (PE if rounded is None or rounded * rounded != vb else 0)
    if exact == 0:
        return flags
    rounded = _round(exact, fmt)
    if rounded is None:
        return flags | OE | PE
    total, ebits, fbits = fmt
    tiny = abs(exact) < Fraction(2) ** (2 - (1 << (ebits - 1)))
    inexact = rounded != exact
    return flags | (PE if inexact else 0) | (UE if tiny and inexact else 0) | (UE << 16 if tiny else 0)


def check(insn, regs, read_source) -> tuple[int, None] | None:
    """MXCSR flags for an SSE instruction; the exception to deliver if one is unmasked.

    ``regs`` reads/writes ``xmmN``, ``mxcsr``, ``cr0``, ``cr4`` (a
    :class:`~xenicorn.engine.debugging.RegisterAccess`); ``read_source(size)``
    reads the memory operand (None if it faults: the engine then raises it).
    """
    parsed = _parse(insn.mnemonic)
    if parsed is None or len(insn.operands) != 2:
        return None
    op, fmt, lanes = parsed
    cr0, cr4 = regs.read("cr0"), regs.read("cr4")
    if cr0 & (CR0_EM | CR0_TS) or not cr4 & CR4_OSFXSR:
        return None                              # #UD/#NM first: the engine raises them
    from capstone import x86_const as CX
    dst, src = insn.operands
    if dst.type != CX.X86_OP_REG:
        return None
    width = fmt[0] // 8
    a_raw = regs.read(insn.reg_name(dst.reg))
    if src.type == CX.X86_OP_REG:
        b_raw = regs.read(insn.reg_name(src.reg))
    else:
        b_raw = read_source(width * lanes)
        if b_raw is None:
            return None
    mxcsr = regs.read("mxcsr")
    masks = (mxcsr >> MASK_SHIFT) & 0x3F
    flags = 0
    lane_mask = (1 << fmt[0]) - 1
    for i in range(lanes):
        a, b = (_value(raw >> (i * fmt[0]) & lane_mask, fmt) for raw in (a_raw, b_raw))
        flags |= _lane(op, a, b, fmt, bool(mxcsr & DAZ))
    tiny, flags = flags >> 16, flags & 0x3F
    if tiny & UE and not masks & UE:
        flags |= UE                              # unmasked underflow: tininess alone (SDM §4.9.1.5)
    regs.write("mxcsr", mxcsr | flags)
    if flags & ~masks:
        return (XM if cr4 & CR4_OSXMMEXCPT else UD, None)
    return None
