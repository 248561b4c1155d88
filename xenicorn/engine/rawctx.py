"""Raw access to the CPU state Unicorn keeps but does not expose.

Unicorn is QEMU's TCG with the machine removed. Its public API reads and
writes registers, but several pieces of CPU state that a *platform* needs are
only reachable inside the saved context (``uc.context_save()``), which is the
QEMU ``CPUX86State`` structure behind a small header:

================  ==========================================================
field             why xenicorn needs it
================  ==========================================================
``segs[6]``       segment *caches* (base, limit, attributes). In 64-bit
                  Unicorn mode ``reg_write(CS, sel)`` changes only the
                  selector, and from CPL3 it refuses kernel selectors, so
                  interrupt delivery and the PVH boot state load caches here.
``hflags``        QEMU's derived mode bits: CPL (bits 1:0), CS32, SS32,
                  ADDSEG, PE, LMA, CS64. They must agree with the caches.
``tr``            the task register cache: the TSS holds the kernel stacks
                  that a privilege change switches to.
``error_code``    the error code of the exception Unicorn just reported to
                  ``UC_HOOK_INTR`` (#GP, #PF, ...). The hook gets only the
                  vector.
``exception_is_int``  1 when the "exception" was a software ``INT n``/``INT3``
                  (EIP already past it, no error code, gate DPL checked).
``old_exception`` Unicorn never resets it after an exception that a hook
                  handled, so the *next* unrelated fault would be promoted to
                  #DF and then to a silent triple fault. Reset after each.
``xcr0``          XCR0, which XSETBV loads: a CPU resets it to 1 (only x87
                  state), Unicorn to every component it has. Set to 1 for
                  models other than ``default`` (:mod:`cpufeatures`).
``exception_is_int`` is not reset either, and SVM exits (our MSR and RDTSC
                  intercepts, :mod:`msr`) do not set it: after an ``INT3``
                  the next intercepted RDTSC/WRMSR had its RIP replaced by
                  the INT3's ``exception_next_eip`` (Unicorn does that for
                  "software interrupts" before calling the hook), and
                  resumed there. Found through Linux's int3 self-test.
                  Reset after each exception too (:meth:`consume_exception`).
================  ==========================================================

The offsets belong to the exact Unicorn build this package pins (2.1.4, the
PyPI wheel, x86-64 host). :func:`selftest` checks every one of them against
behaviour, and :func:`env_ptr_offset` finds the live state's address, when
:func:`xenicorn.engine.probe` runs (once per process, before a machine is
built); a build that differs is refused rather than left to corrupt guest
state.

The architecture code (:mod:`xenicorn.x86`) sees none of this: it gets a
context from ``VCpu.cpu_state()`` and uses the typed accessors
(:meth:`RawContext.segment`, :meth:`~RawContext.load_segments`,
:meth:`~RawContext.gprs`, :attr:`~RawContext.rip`, :meth:`~RawContext.cr`).
"""
from __future__ import annotations

import functools

import ctypes
import struct

from unicorn import Uc, UC_ARCH_X86, UC_MODE_64, UC_HOOK_INTR, UC_HOOK_INSN_INVALID
from unicorn import x86_const as X

from ..x86.segments import SegmentCache, DESC_B, DESC_L, flat_code32, flat_data
from .startup import EngineUnsupported

# Offsets inside bytes(context): a 40-byte uc_context header, then CPUX86State.
_HDR = 40
OFF_REGS = 0              # target_ulong regs[16]
OFF_EIP = 128
OFF_HFLAGS = 176
OFF_HFLAGS2 = 180         # uint32_t hflags2, right after hflags (checked by irqwindow.available)
OFF_SEGS = 184            # SegmentCache segs[6]: ES CS SS DS FS GS
OFF_LDT = 328
OFF_TR = 352
OFF_GDT = 376
OFF_IDT = 400
OFF_CR = 424              # target_ulong cr[5]
OFF_ERROR_CODE = 5384
OFF_EXCEPTION_IS_INT = 5388
OFF_EXCEPTION_NEXT_EIP = 5392
OFF_OLD_EXCEPTION = 5496
OFF_XCR0 = 4904           # uint64_t xcr0
SEG_SIZE = 24             # {u32 selector; u32 pad; u64 base; u32 limit; u32 flags}
_SEG = struct.Struct("<IIQII")
_GPRS = struct.Struct("<16Q")

# Segment register numbers in QEMU's order (R_ES..R_GS).
ES, CS, SS, DS, FS, GS = range(6)
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")

# hflags bits (QEMU target/i386/cpu.h).
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3   # STI / MOV SS interrupt shadow
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_VM = 1 << 17


def code_bits(hflags: int) -> int:
    """16, 32 or 64: the size a CS executes at, from QEMU's hflags."""
    return 64 if hflags & HF_CS64 else 32 if hflags & HF_CS32 else 16
HF2_NMI_MASK = 1 << 2     # hflags2: NMIs blocked (an NMI handler runs; the next IRET clears it)

_STRUCTS: dict[str, struct.Struct] = {}


def _struct(fmt: str) -> struct.Struct:
    st = _STRUCTS.get(fmt)
    if st is None:
        st = _STRUCTS[fmt] = struct.Struct(fmt)
    return st


class RawContext:
    """A saved Unicorn context opened for field access.

    ``with RawContext(uc) as ctx:`` saves, lets the caller read and patch
    fields, and restores on exit (only if something was written).
    """

    def __init__(self, uc: Uc | None, saved=None):
        self.uc = uc
        self.ctx = uc.context_save() if saved is None else saved
        self._ptr = ctypes.cast(self.ctx.context, ctypes.c_void_p).value + _HDR
        # the saved CPUX86State, viewed in place (no copy per field)
        self._mem = memoryview((ctypes.c_char * (self.ctx.size - _HDR)).from_address(self._ptr)).cast("B")
        self.dirty = False

    # -- primitive access -------------------------------------------------
    def read(self, off: int, fmt: str):
        return _struct(fmt).unpack_from(self._mem, off)[0]

    def write(self, off: int, fmt: str, value) -> None:
        _struct(fmt).pack_into(self._mem, off, value)
        self.dirty = True

    def read_block(self, off: int, size: int) -> bytes:
        return bytes(self._mem[off:off + size])

    @classmethod
    def view(cls, saved) -> "RawContext":
        """Read a context saved earlier (a vCPU's while another is loaded); writes reach nothing."""
        return cls(None, saved)

    def commit(self) -> None:
        if self.dirty and self.uc is not None:
            self.uc.context_restore(self.ctx)
            self.dirty = False

    def __enter__(self) -> "RawContext":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.commit()

    # -- fields -----------------------------------------------------------
    def gprs(self) -> tuple[int, ...]:
        """The 16 general registers in encoding order: RAX RCX RDX RBX RSP RBP RSI RDI R8..R15."""
        return _GPRS.unpack_from(self._mem, OFF_REGS)

    @property
    def rip(self) -> int:
        return self.read(OFF_EIP, "<Q")

    def cr(self, n: int) -> int:
        """Control register ``n`` (0, 2, 3 or 4) as the CPU holds it."""
        return self.read(OFF_CR + 8 * n, "<Q")

    @property
    def hflags(self) -> int:
        return self.read(OFF_HFLAGS, "<I")

    @hflags.setter
    def hflags(self, value: int) -> None:
        self.write(OFF_HFLAGS, "<I", value)

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL_MASK

    @property
    def code_bits(self) -> int:
        """16, 32 or 64: the size the current CS executes at."""
        return code_bits(self.hflags)

    @property
    def has_descriptors(self) -> bool:
        """Protected mode outside virtual-8086 mode: segments come from descriptors."""
        hf = self.hflags
        return bool(hf & HF_PE) and not hf & HF_VM

    @property
    def error_code(self) -> int:
        return self.read(OFF_ERROR_CODE, "<I")

    @property
    def exception_is_int(self) -> bool:
        return self.read(OFF_EXCEPTION_IS_INT, "<i") != 0

    @property
    def exception_next_eip(self) -> int:
        return self.read(OFF_EXCEPTION_NEXT_EIP, "<Q")

    def consume_exception(self) -> None:
        """Forget the exception a hook just handled (see the table above).

        Both fields outlive the exception in Unicorn 2.1.4: ``old_exception``
        would turn the next fault into a #DF, and a stale ``exception_is_int``
        makes Unicorn move RIP to ``exception_next_eip`` at the next SVM exit.
        """
        self.write(OFF_OLD_EXCEPTION, "<i", -1)
        self.write(OFF_EXCEPTION_IS_INT, "<i", 0)

    def _seg_off(self, seg: int | str) -> int:
        if isinstance(seg, str):
            return {"ldt": OFF_LDT, "tr": OFF_TR, "gdt": OFF_GDT, "idt": OFF_IDT}.get(
                seg, None) or OFF_SEGS + SEG_NAMES.index(seg) * SEG_SIZE
        return OFF_SEGS + seg * SEG_SIZE

    def segment(self, seg: int | str) -> SegmentCache:
        """Read a segment cache: 0..5 (ES..GS) or 'ldt'/'tr'/'gdt'/'idt'."""
        sel, _, base, limit, flags = _SEG.unpack_from(self._mem, self._seg_off(seg))
        return SegmentCache(sel, base, limit, flags)

    def set_segment(self, seg: int | str, cache: SegmentCache) -> None:
        _SEG.pack_into(self._mem, self._seg_off(seg), cache.selector & 0xFFFF, 0, cache.base,
                       cache.limit & 0xFFFFFFFF, cache.flags)
        self.dirty = True

    def load_segments(self, **caches: SegmentCache) -> None:
        """Load segment caches and recompute the hflags that depend on them.

        This is what QEMU's ``cpu_x86_load_seg_cache`` does: CS sets the
        code size (CS32/CS64), SS sets the stack size and the CPL (the CPL
        *is* SS.DPL, SDM vol. 3 §5.5), and ADDSEG says whether any of
        DS/ES/SS has a non-zero base in legacy mode.
        """
        hf = self.hflags
        for name, cache in caches.items():
            seg = SEG_NAMES.index(name)
            self.set_segment(seg, cache)
            if seg == CS:
                if hf & HF_LMA and cache.flags & DESC_L:
                    hf |= HF_CS32 | HF_SS32 | HF_CS64
                else:
                    hf = (hf & ~(HF_CS32 | HF_CS64)) | (HF_CS32 if cache.flags & DESC_B else 0)
            elif seg == SS:
                hf = (hf & ~HF_CPL_MASK) | cache.dpl
                if not hf & HF_CS64:
                    hf = (hf & ~HF_SS32) | (HF_SS32 if cache.flags & DESC_B else 0)
        if not hf & HF_CS64:
            bases = [self.segment(s).base for s in (DS, ES, SS)]
            hf = (hf & ~HF_ADDSEG) | (HF_ADDSEG if any(bases) or not hf & HF_CS32 else 0)
        self.hflags = hf

    def set_cpl(self, cpl: int) -> None:
        self.hflags = (self.hflags & ~HF_CPL_MASK) | cpl


def cpu_state_address(uc: Uc) -> int:
    """Address of the engine's QEMU ``CPUState`` (``X86CPU``), from the exported ``qemu_get_cpu``.

    Unicorn's one CPU keeps the "unassigned" index, -1.
    """
    from unicorn.unicorn_py3.unicorn import uclib
    fn = uclib.qemu_get_cpu_x86_64
    fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]
    cpu = fn(ctypes.cast(uc._uch, ctypes.c_void_p).value, -1)
    if not cpu:
        raise UnsupportedUnicornBuild("qemu_get_cpu found no CPU in this Unicorn engine")
    return cpu


@functools.cache
def env_ptr_offset() -> int:
    """Where ``CPUState.env_ptr`` sits: the word that points at a CPUX86State holding our RAX.

    Found once per process on a probe engine: only words pointing into the
    X86CPU object itself (CPUState, then the CPUX86State it points at) are
    followed, so nothing outside that allocation is read.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    magic = 0x5845_4E49_434F_524E                        # "XENICORN"
    uc.reg_write(X.UC_X86_REG_RAX, magic)
    cpu = cpu_state_address(uc)
    size = uc.context_save().size - _HDR
    for off in range(0, 1024, 8):
        ptr = ctypes.c_uint64.from_address(cpu + off).value
        if cpu < ptr < cpu + 0x40000 and ctypes.c_uint64.from_address(ptr + OFF_REGS).value == magic:
            if bytes((ctypes.c_char * size).from_address(ptr)) == RawContext(uc).read_block(0, size):
                return off
    raise UnsupportedUnicornBuild("cannot find CPUState.env_ptr in this Unicorn build")


class LiveContext(RawContext):
    """The engine's CPU state itself, not a saved copy: every write takes effect at once.

    ``uc_context_save``/``uc_context_restore`` are a ``memcpy`` of the whole
    CPUX86State (about 25 KiB) each way; the hot paths that touch one or two
    fields (every exception a hook handles, the check before every run)
    read and write them in place instead.
    """

    def __init__(self, uc: Uc):
        self.uc = uc
        self.ctx = None
        size = uc.context_save().size - _HDR
        self._ptr = ctypes.c_uint64.from_address(cpu_state_address(uc) + env_ptr_offset()).value
        self._mem = memoryview((ctypes.c_char * size).from_address(self._ptr)).cast("B")
        self.dirty = False

    def commit(self) -> None:
        self.dirty = False


# QEMU's FeatureWord numbers (target/i386/cpu.h): env->features[] indices.
FEAT_1_EDX, FEAT_1_ECX, FEAT_7_0_EBX, FEAT_7_0_ECX, FEAT_7_0_EDX = 0, 1, 2, 3, 4
FEAT_8000_0001_EDX, FEAT_8000_0001_ECX = 6, 7
FEAT_XSAVE, FEAT_XSAVE_COMP_LO, FEAT_XSAVE_COMP_HI = 19, 21, 22


@functools.cache
def feature_words_offset() -> int:
    """Where ``env->features[]`` (QEMU's feature words, u64 each) sits in CPUX86State.

    It lies past the part a context saves (fields "preserved across CPU
    reset"), so it is shared by every vCPU of the one engine. Found on a
    probe engine as the words that CPUID's own answers come from: leaf 1
    EDX, leaf 1 ECX (less OSXSAVE, which CPUID adds from CR4), leaf 7 EBX.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    l1, l7 = _engine_cpuid(uc, 1), _engine_cpuid(uc, 7)
    want = (l1[3], l1[2] & ~(1 << 27), l7[1])
    live = LiveContext(uc)
    base = uc.context_save().size - _HDR
    for off in range(base, base + 512, 8):
        if struct.unpack_from("<3Q", (ctypes.c_char * 24).from_address(live._ptr + off)) == want:
            return off
    raise UnsupportedUnicornBuild("cannot find CPUX86State.features in this Unicorn build")


def _engine_cpuid(uc: Uc, leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
    """The engine's own CPUID answer (no hook installed on ``uc``)."""
    uc.mem_map(0x7000, 0x1000) if not any(b <= 0x7000 < e for b, e, _ in uc.mem_regions()) else None
    uc.mem_write(0x7000, b"\x0f\xa2")                       # cpuid
    uc.reg_write(X.UC_X86_REG_RAX, leaf)
    uc.reg_write(X.UC_X86_REG_RCX, sub)
    uc.emu_start(0x7000, 0x7002)
    return tuple(uc.reg_read(r) for r in (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX))


class FeatureWords:
    """The engine CPU's feature words, read and written in place.

    TCG consults them when it translates (an instruction of a feature the
    word lacks is #UD), when CR4 is written (SMAP, PKE), in XSETBV (the
    XCR0 components) and in its own CPUID. Write them before the first
    guest instruction is translated: a block translated earlier keeps
    what it saw.
    """

    def __init__(self, uc: Uc):
        self._ptr = LiveContext(uc)._ptr + feature_words_offset()

    def __getitem__(self, index: int) -> int:
        return ctypes.c_uint64.from_address(self._ptr + 8 * index).value

    def __setitem__(self, index: int, value: int) -> None:
        ctypes.c_uint64.from_address(self._ptr + 8 * index).value = value


@functools.cache
def feature_selftest() -> None:
    """Check :class:`FeatureWords` and :data:`OFF_XCR0` by behaviour, once per process.

    On a probe engine of the model ``max`` builds on (Skylake-Server, which
    has all three): take SMAP out of leaf 7 EBX, RDTSCP out of
    0x80000001 EDX, XSAVEOPT out of leaf 0xD.1 and leave XCR0 components
    x87 and SSE; the engine's CPUID must then say so, STAC and RDTSCP must
    be #UD, XSETBV of x87|SSE|AVX #GP, and XSETBV of x87|SSE must land in
    the ``xcr0`` field.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(X.UC_CPU_X86_SKYLAKE_SERVER)
    words = FeatureWords(uc)
    words[FEAT_7_0_EBX] &= ~(1 << 20)
    words[FEAT_8000_0001_EDX] &= ~(1 << 27)
    words[FEAT_XSAVE] &= ~1
    words[FEAT_XSAVE_COMP_LO], words[FEAT_XSAVE_COMP_HI] = 3, 0
    problems = []
    if _engine_cpuid(uc, 7)[1] >> 20 & 1 or _engine_cpuid(uc, 0x80000001)[3] >> 27 & 1:
        problems.append("leaf 7/0x80000001 words")
    if _engine_cpuid(uc, 0xD, 0)[0] != 3 or _engine_cpuid(uc, 0xD, 1)[0] & 1:
        problems.append("xsave words")
    uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | 1 << 18)      # OSXSAVE
    seen = []

    def hook(uc, intno, _):
        seen.append(intno)
        ctx = RawContext(uc)
        ctx.consume_exception()
        ctx.commit()
        uc.emu_stop()
    def invalid(uc, _):
        seen.append(6)                      # #UD reaches Unicorn's invalid-instruction hook
        uc.emu_stop()
        return True
    h = uc.hook_add(UC_HOOK_INTR, hook)
    h2 = uc.hook_add(UC_HOOK_INSN_INVALID, invalid)
    # stac | rdtscp | xor ecx,ecx; mov eax,7; xor edx,edx; xsetbv | ... mov eax,3; xsetbv
    for code in ("0f01cb", "0f01f9", "31c9b80700000031d20f01d1", "31c9b80300000031d20f01d1"):
        uc.mem_write(0x7000, bytes.fromhex(code))
        uc.emu_start(0x7000, 0x7000 + len(code) // 2)
    uc.hook_del(h)
    uc.hook_del(h2)
    if seen != [6, 6, 13]:
        problems.append(f"exceptions {seen}")
    if RawContext(uc).read(OFF_XCR0, "<Q") != 3:
        problems.append("xcr0")
    if problems:
        raise UnsupportedUnicornBuild("this Unicorn build's CPU feature words differ from unicorn 2.1.4's "
                                      f"(mismatched: {', '.join(problems)}); install unicorn==2.1.4")


class UnsupportedUnicornBuild(EngineUnsupported):
    """The Unicorn library differs from the build whose layout is known."""


@functools.cache
def selftest() -> None:
    """Check every offset above against real behaviour, once per process.

    A flat 32-bit CPU with GDTR, IDTR, TR and LDTR loaded through the public
    API runs ``mov ax, 0x1234; mov ds, ax`` (a #GP with error code 0x1234,
    a hardware exception) and ``int 0x0d`` (the same vector as software).
    Each field must hold what the public API or the instruction put there:
    the registers, EIP at each exception, the hflags the segment loads
    implied, the four table caches, the error code, ``exception_is_int``,
    ``exception_next_eip`` and ``old_exception``; and a segment cache
    loaded here must be the one the CPU executes with (a 16-bit CS would
    decode the ``mov`` with a 32-bit immediate and fault elsewhere).
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000)
    # Leave long mode (reset state of UC_MODE_64) for a flat 32-bit CPU.
    uc.reg_write(X.UC_X86_REG_CR0, 0x11)
    uc.msr_write(0xC0000080, 0)
    gdt = struct.pack("<QQQ", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
    uc.mem_write(0x1000, gdt)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x1000, 23, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, 0x3000, 0x7FF, 0))
    uc.reg_write(X.UC_X86_REG_TR, (0x20, 0x4000, 0x67, 0x8B00))
    uc.reg_write(X.UC_X86_REG_LDTR, (0x28, 0x5000, 0xFFF, 0x8200))
    magic = 0x5845_4E49_434F_524E                        # "XENICORN"
    uc.reg_write(X.UC_X86_REG_RBX, magic)
    with RawContext(uc) as ctx:
        ctx.load_segments(cs=flat_code32(8), ss=flat_data(16), ds=flat_data(16))
    # mov ax, 0x1234 ; mov ds, ax  (-> #GP(0x1234)) ; int 0x0d
    code = bytes.fromhex("66b83412" "8ed8" "cd0d" "f4")
    uc.mem_write(0x2000, code)
    seen = []

    def hook(uc, intno, _):
        ctx = RawContext(uc)
        seen.append((intno, ctx.error_code, ctx.exception_is_int, ctx.rip, ctx.read(OFF_OLD_EXCEPTION, "<i"),
                     ctx.exception_next_eip if ctx.exception_is_int else None))
        ctx.consume_exception()
        ctx.commit()
        if len(seen) == 1:
            uc.reg_write(X.UC_X86_REG_EIP, 0x2006)
        else:
            uc.emu_stop()

    h = uc.hook_add(UC_HOOK_INTR, hook)
    uc.emu_start(0x2000, 0x2009)
    uc.hook_del(h)
    expected = [(13, 0x1234, False, 0x2004, 13, None),        # #GP(sel), old_exception set by it
                (13, 0, True, 0x2008, -1, 0x2008)]            # INT 0x0d: already past, consumed before
    ctx = RawContext(uc)
    tables = {name: ctx.segment(name) for name in ("gdt", "idt", "tr", "ldt")}
    problems = []
    if seen != expected:
        problems.append(f"exceptions {seen}")
    gprs = ctx.gprs()
    if gprs[0] & 0xFFFF != 0x1234 or gprs[3] != magic:
        problems.append("regs")
    if ctx.cr(0) != uc.reg_read(X.UC_X86_REG_CR0) or ctx.cr(3) != uc.reg_read(X.UC_X86_REG_CR3):
        problems.append("cr")
    if ctx.hflags & (HF_PE | HF_CS32 | HF_SS32 | HF_CS64 | HF_CPL_MASK) != HF_PE | HF_CS32 | HF_SS32:
        problems.append(f"hflags {ctx.hflags:#x}")
    if (uc.reg_read(X.UC_X86_REG_CS), uc.reg_read(X.UC_X86_REG_SS)) != (8, 16) or \
            ctx.segment(CS).selector != 8 or ctx.segment("ss").base != 0:
        problems.append("segs")                  # the public API reads the selectors we loaded
    if (tables["gdt"].base, tables["gdt"].limit) != (0x1000, 23) or \
            (tables["idt"].base, tables["idt"].limit) != (0x3000, 0x7FF):
        problems.append("gdt/idt")
    if (tables["tr"].selector, tables["tr"].base, tables["tr"].limit) != (0x20, 0x4000, 0x67) or \
            (tables["ldt"].selector, tables["ldt"].base) != (0x28, 0x5000):
        problems.append("tr/ldt")
    if problems:
        raise UnsupportedUnicornBuild(
            "this Unicorn build's CPU state layout differs from unicorn 2.1.4's "
            f"(mismatched: {', '.join(problems)}); install unicorn==2.1.4")
