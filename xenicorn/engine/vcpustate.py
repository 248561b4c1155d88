"""The vCPU's snapshot record: what Python keeps about it, and Unicorn's CPU context.

A vCPU's state is in two places. Unicorn holds the CPU itself in QEMU's
``CPUX86State`` (registers, segment caches, hflags with CPL and mode, CRs,
EFER and the other MSRs, FPU/SSE, the MSR/RDTSC intercept fields, and in
hflags2 whether NMIs are blocked until the next IRET);
``uc.context_save()`` copies it out and ``context_restore`` back in, and
the bytes carry over to a fresh engine of the same Unicorn build
(docs/unicorn-notes.md; :func:`context_bytes`). Python keeps the rest:

===================  ======================================================
field                why it is state
===================  ======================================================
instructions         executed-instruction count: deterministic time is
                     made of it, and ``--savevm FILE@N`` counts it
halted, sleep_kind   HLT / SCHEDOP_block / SCHEDOP_poll: the run loop
                     sleeps instead of running the guest
mmio_pages           pages routed to the MMIO bus on demand (an access to
                     unassigned space maps one, reads float high there)
msr                  the MSR window's open interests, extra intercepts
                     (RDTSC in deterministic mode, CPUID faulting's, UMIP's
                     while the guest has CR4.UMIP set) and exit count
msr-shadow (blob)    the VMCB and MSR permission map pages of the window
cpuid_faulting       MISC_FEATURES_ENABLES bit 0 (machine/cpuidfault.py);
                     absent in older records: off
window_exits         interrupt-window exits taken (statistics)
===================  ======================================================

This module is engine code: it reads the vCPU's private fields and
Unicorn's context layout, so nothing outside ``engine/`` has to.
"""
from __future__ import annotations

import ctypes

import unicorn
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from ..records import (RecordError, blob, boolean, field, flag, integer, listing, make_record, open_record, optional,
                       text, uint)
from .msr import INTERCEPT_CPUID, INTERCEPT_RDTSC, INTERCEPT_UMIP, SHADOW_SIZE
from .rawctx import RawContext

UNICORN_VERSION = unicorn.__version__
CTX_HEADER = 40                    # uc_context's own header before CPUX86State (see rawctx.py)
PAGE = 4096
SLEEP_KINDS = ("", "HLT", "SCHEDOP_block", "SCHEDOP_poll", "wait-for-SIPI", "down")
# Host pointers inside CPUX86State (unicorn 2.1.4): cpu_breakpoint[4] (QEMU's
# objects for DR0-3 breakpoints) and retaddr (the TCG return address an SVM
# intercept helper unwinds with, left behind after each use). They mean
# nothing in another process, so a snapshot stores zeros there, and a file
# with anything else there is refused: the engine would follow them.
HOST_POINTERS = ((5464, 32), (5560, 8))


def context_bytes(uc) -> bytes:
    """CPUX86State as Unicorn saves it (without uc_context's own header), host pointers zeroed.

    Restoring these bytes into a fresh engine reproduces registers, segment
    caches, hflags, EFER and the other MSRs, FPU and SSE, and the MSR/RDTSC
    intercept fields (docs/unicorn-notes.md).
    """
    ctx = RawContext(uc)
    raw = bytearray(ctx.read_block(0, ctx.ctx.size - CTX_HEADER))
    for off, size in HOST_POINTERS:
        raw[off:off + size] = bytes(size)
    return bytes(raw)


def context_into(uc, data: bytes) -> None:
    """Load :func:`context_bytes` into an engine (of the same Unicorn build)."""
    ctx = uc.context_save()
    ptr = ctypes.cast(ctx.context, ctypes.c_void_p).value + CTX_HEADER
    ctypes.memmove(ptr, data, len(data))
    uc.context_restore(ctx)


def context_size(uc) -> int:
    return uc.context_save().size - CTX_HEADER


def in_guest(vcpu) -> bool:
    """Is this vCPU inside ``emu_start`` (a snapshot is taken and loaded only between runs)?"""
    return vcpu._in_emu


class VcpuRecord:
    """Saves and restores one :class:`~xenicorn.engine.vcpu.VCpu` (see the module table)."""

    RECORD = ("vcpu", 2)          # 2: the start-up state of several vCPUs (wait-for-SIPI, a SIPI posted, down)

    def __init__(self, vcpu):
        self.vcpu = vcpu

    def save_record(self) -> dict:
        v = self.vcpu
        uc = v._required()                 # loaded: its state is the engine's
        return make_record(*self.RECORD, {
            "index": v.index, "instructions": v.instructions, "halted": v.halted, "sleep_kind": v.sleep_kind,
            "mmio_pages": sorted(v._mmio_pages),
            "msr": {"interests": sorted(v.msr.interests), "extra": v.msr.extra, "exits": v.msr.exits},
            "window_exits": v.window_exits,
            "wait_for_sipi": v.wait_for_sipi, "pending_sipi": v.pending_sipi, "down": v.down,
            "cpuid_faulting": v.cpuid_faulting},
            {"context": context_bytes(uc), "msr-shadow": bytes(uc.mem_read(v.msr.base, SHADOW_SIZE))})

    def check_record(self, record: dict) -> dict:
        v = self.vcpu
        st = open_record(record, *self.RECORD)
        if field(st, "index") != v.index:
            raise RecordError(f"the record of vCPU {st['index']!r} for vCPU {v.index}")
        sleep_kind = text(st, "sleep_kind", 16)
        if sleep_kind not in SLEEP_KINDS:
            raise RecordError(f"vCPU sleep kind {sleep_kind!r}")
        pages = {integer(p, "MMIO page", 0, (1 << 52) - PAGE) for p in listing(st, "mmio_pages")}
        if any(p % PAGE for p in pages):
            raise RecordError("MMIO page not page aligned")
        msr = field(st, "msr")
        interests = listing(msr, "interests", 64)
        if not all(isinstance(i, str) and len(i) <= 64 for i in interests):
            raise RecordError("MSR window interests are not names")
        extra = uint(msr, "extra", 64, reserved=~(INTERCEPT_RDTSC | INTERCEPT_CPUID | INTERCEPT_UMIP))
        cpuid_faulting = boolean(st.get("cpuid_faulting", False), "cpuid_faulting")
        if cpuid_faulting != bool(extra & INTERCEPT_CPUID):
            raise RecordError("CPUID faulting and the CPUID intercept disagree")
        if extra & INTERCEPT_UMIP not in (0, INTERCEPT_UMIP) or bool(extra & INTERCEPT_UMIP) != ("umip" in interests):
            raise RecordError("the UMIP intercepts and the window's UMIP interest disagree")
        context = blob(record, "context", context_size(v.uc))
        if any(context[off:off + size] != bytes(size) for off, size in HOST_POINTERS):
            raise RecordError("vCPU context holds host pointers")
        return {"instructions": uint(st, "instructions", 63), "halted": flag(st, "halted"),
                "sleep_kind": sleep_kind, "mmio_pages": sorted(pages), "interests": set(interests),
                "extra": extra, "exits": uint(msr, "exits"), "cpuid_faulting": cpuid_faulting,
                "window_exits": uint(st, "window_exits"), "context": context,
                "wait_for_sipi": flag(st, "wait_for_sipi"), "pending_sipi": optional(st, "pending_sipi", 8),
                "down": flag(st, "down"),
                "shadow": blob(record, "msr-shadow", SHADOW_SIZE)}

    def apply_record(self, p: dict) -> None:
        """After the RAM and the PCI BARs: maps missing MMIO pages, loads the CPU, flushes the engine."""
        v = self.vcpu
        missing = [page for page in p["mmio_pages"] if page not in v._mmio_pages]
        start = prev = None
        for page in missing + [None]:         # one mapping per run of pages, as the machine made them
            if page is not None and prev is not None and page == prev + PAGE:
                prev = page
                continue
            if start is not None:
                v.map_mmio(start, prev + PAGE - start)
            start = prev = page
        v._required()                 # loaded: the context goes into the engine
        v.disarm_interrupt_window()
        v.disarm_nmi_window()         # the run loop arms it again if an NMI still waits behind the mask
        context_into(v.uc, p["context"])
        v.uc.mem_write(v.msr.base, p["shadow"])
        v.instructions = p["instructions"]
        v.halted, v.sleep_kind = p["halted"], p["sleep_kind"]
        v.msr.interests = set(p["interests"])
        v.msr.extra, v.msr.exits = p["extra"], p["exits"]
        v.window_exits = p["window_exits"]
        v.wait_for_sipi, v.pending_sipi, v.down = p["wait_for_sipi"], p["pending_sipi"], p["down"]
        v.cpuid_faulting = p["cpuid_faulting"]
        v.msr.reassert()              # the saved context may hold an armed window's intercept
        # Python wrote RAM and the whole CPU state: drop translated code and TLB entries
        v.uc.ctl_flush_tb()
        v.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
