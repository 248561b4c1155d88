"""What gdb is told the target is: the register layout, its XML description, the register file.

gdb learns the target's registers from a *target description*, an XML
document it reads with ``qXfer:features:read:target.xml`` (gdb manual,
"Target Descriptions" and "i386 Features"). The order of the ``<reg>``
elements (their ``regnum``) is the order of the ``g`` packet, and ``p``/``P``
name a register by that number.

Two layouts, chosen from the kernel's ELF class (or, without a kernel, the
CPU's mode when gdb asks) so that they match the ELF gdb loads:

==========  ==============================  =================================
feature     i386 (32)                       amd64 (64)
==========  ==============================  =================================
core        eax..edi, eip, eflags,          rax..r15, rip, eflags, selectors,
            selectors, st0-7, x87 control   st0-7, x87 control
sse         xmm0-7, mxcsr                   xmm0-15, mxcsr
segments    (none: gdb 13 asserts on it)    fs_base, gs_base
sys (ours)  cr0, cr2, cr3, cr4, efer        cr0, cr2, cr3, cr4, efer
==========  ==============================  =================================

A 64-bit layout with the CPU in 32-bit mode shows the general registers
zero-extended from 32 bits (as QEMU). Segment selectors and control
registers are read-only here (writes are accepted and ignored; QEMU's
system-mode stub does not load selectors either).
"""
from __future__ import annotations

from ...engine.debugging import RegisterAccess
from .protocol import BadArgument

# (gdb name, bits, gdb type, engine register name), in 'g' order
_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(f"r{i}" for i in range(8, 16))
_GPR32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
_FPU_CTRL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")


def layout(bits: int) -> list[tuple[str, int, str, str]]:
    """The register list of the i386 (32) or amd64 (64) description, in 'g' order."""
    regs: list[tuple[str, int, str, str]] = []
    if bits == 64:
        regs += [(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", n) for n in _GPR64]
        regs += [("rip", 64, "code_ptr", "rip"), ("eflags", 32, "i386_eflags", "eflags")]
    else:
        regs += [(n, 32, "data_ptr" if n in ("esp", "ebp") else "int32", "r" + n[1:]) for n in _GPR32]
        regs += [("eip", 32, "code_ptr", "rip"), ("eflags", 32, "i386_eflags", "eflags")]
    regs += [(s, 32, "int32", s) for s in _SEGS]
    regs += [(f"st{i}", 80, "i387_ext", f"st{i}") for i in range(8)]
    regs += [(n, 32, "int", n) for n in _FPU_CTRL]
    regs += [(f"xmm{i}", 128, "vec128", f"xmm{i}") for i in range(16 if bits == 64 else 8)]
    regs += [("mxcsr", 32, "i386_mxcsr", "mxcsr")]
    if bits == 64:
        # gdb 13 asserts (tdesc_use_registers) on an i386 description with this feature
        regs += [("fs_base", 64, "int", "fs_base"), ("gs_base", 64, "int", "gs_base")]
    regs += [(n, bits, "int", n) for n in ("cr0", "cr2", "cr3", "cr4")]
    regs += [("efer", 64, "int", "efer")]
    return regs


_FEATURE_OF = {"core": "org.gnu.gdb.i386.core", "sse": "org.gnu.gdb.i386.sse",
               "segments": "org.gnu.gdb.i386.segments", "sys": "org.xenicorn.x86.sys"}
_NARROW = frozenset(_GPR64[:8] + ("rip",))   # shown as 32-bit values outside 64-bit code


def _feature(name: str) -> str:
    if name.startswith("xmm") or name == "mxcsr":
        return "sse"
    if name in ("fs_base", "gs_base"):
        return "segments"
    if name.startswith("cr") or name == "efer":
        return "sys"
    return "core"


# EFLAGS bits (SDM vol. 1, 3.4.3) and MXCSR bits (SDM vol. 1, 10.2.3), as gdb's i386 features name them
_EFLAGS_FIELDS = (("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8),
                  ("IF", 9), ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17),
                  ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21))
_MXCSR_FIELDS = (("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6),
                 ("IM", 7), ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15))


def target_xml(bits: int) -> str:
    """The target description gdb reads with ``qXfer:features:read:target.xml``.

    gdb's manual ("Target Descriptions", "i386 Features") names the
    features and registers it expects; the ``regnum`` order is the order of
    the ``g`` packet.
    """
    arch = "i386:x86-64" if bits == 64 else "i386"
    types = {
        "core": ['<flags id="i386_eflags" size="4">']
        + [f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in _EFLAGS_FIELDS] + ["</flags>"],
        "sse": ['<vector id="v8bf16" type="bfloat16" count="8"/>',
                '<vector id="v4f" type="ieee_single" count="4"/>',
                '<vector id="v2d" type="ieee_double" count="2"/>',
                '<vector id="v16i8" type="int8" count="16"/>',
                '<vector id="v8i16" type="int16" count="8"/>',
                '<vector id="v4i32" type="int32" count="4"/>',
                '<vector id="v2i64" type="int64" count="2"/>',
                '<union id="vec128">', '<field name="v8_bfloat16" type="v8bf16"/>',
                '<field name="v4_float" type="v4f"/>', '<field name="v2_double" type="v2d"/>',
                '<field name="v16_int8" type="v16i8"/>', '<field name="v8_int16" type="v8i16"/>',
                '<field name="v4_int32" type="v4i32"/>', '<field name="v2_int64" type="v2i64"/>',
                '<field name="uint128" type="uint128"/>', "</union>",
                '<flags id="i386_mxcsr" size="4">']
        + [f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in _MXCSR_FIELDS] + ["</flags>"],
    }
    by_feature: dict[str, list[str]] = {k: list(types.get(k, [])) for k in _FEATURE_OF}
    for regnum, (name, size, typ, _) in enumerate(layout(bits)):
        group = ""
        if name.startswith("st") or name in _FPU_CTRL:
            group = ' group="float"'
        elif name.startswith("xmm"):
            group = ' group="vector"'
        by_feature[_feature(name)].append(
            f'<reg name="{name}" bitsize="{size}" type="{typ}" regnum="{regnum}"{group}/>')
    # an empty feature would be read as one lacking its required registers
    body = "".join(f'<feature name="{_FEATURE_OF[k]}">{"".join(v)}</feature>'
                   for k, v in by_feature.items() if any(x.startswith("<reg") for x in v))
    return ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
            f"<target><architecture>{arch}</architecture>{body}</target>")


_READ_ONLY = set(_SEGS) | {"cr0", "cr2", "cr3", "cr4", "efer"}
# EFLAGS bits software may write (SDM vol. 1, 3.4.3): the rest are reserved;
# bit 1 always reads as 1, bits 3, 5, 15 and 22-31 as 0
_EFLAGS_WRITABLE, _EFLAGS_FIXED = 0x3F7FD5, 0x2


class RegisterFile:
    """Read and write gdb's register numbers on one vCPU, as target-order bytes."""

    def __init__(self, vcpu, bits: int):
        self.vcpu = vcpu
        self.bits = bits
        self.layout = layout(bits)
        self.access = RegisterAccess(vcpu)

    def _narrow(self) -> bool:
        """Show general registers as 32-bit values (CPU not executing 64-bit code)?"""
        return self.bits == 32 or self.vcpu.code_bits() != 64

    def read(self, n: int) -> bytes:
        """Register ``n`` as gdb's bytes (little-endian, the layout's width)."""
        _, size, _, how = self.layout[n]
        value = self.access.read(how)
        if how in _NARROW and self._narrow():
            value &= 0xFFFFFFFF
        return (value & ((1 << size) - 1)).to_bytes(size // 8, "little")

    def write(self, n: int, data: bytes) -> None:
        """Set register ``n`` from gdb's bytes; read-only registers ignore it, a wrong size is E22."""
        name, size, _, how = self.layout[n]
        if len(data) != size // 8:
            raise BadArgument(name)
        value = int.from_bytes(data, "little")
        if how in _READ_ONLY:
            return
        if how in _NARROW and self._narrow():
            value &= 0xFFFFFFFF
        if how == "eflags":
            value = (value & _EFLAGS_WRITABLE) | _EFLAGS_FIXED   # reserved bits as the CPU keeps them
        self.access.write(how, value)

    def size(self, n: int) -> int:
        """Register ``n``'s width in bytes."""
        return self.layout[n][1] // 8
