"""What the architecture code asks of a vCPU: the engine's side of the contract.

:mod:`interrupts` and :mod:`syscall` are the microcode of event delivery
and of the fast system-call entries. They read and change CPU state that
Unicorn's public API partly hides (the segment caches, the CPL), so the
engine hands them a typed view instead of its handle, and this package
never imports the engine: ``VCpu`` (:mod:`xenicorn.engine.vcpu`) satisfies
these protocols, and a test double could too.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from .segments import SegmentCache


class CpuState(Protocol):
    """A copy of the CPU's hidden state, written back when its ``with`` block ends.

    Segment names: ``"es" "cs" "ss" "ds" "fs" "gs"`` and the system
    registers ``"gdt" "idt" "ldt" "tr"`` (base and limit of the tables,
    the cached LDT and TSS descriptors).
    """

    def segment(self, name: str) -> SegmentCache:
        """The hidden part of a segment or system register."""

    def load_segments(self, **caches: SegmentCache) -> None:
        """Load segment caches as a segment load does: CS sets the code size, SS the CPL."""

    def set_segment(self, name: str, cache: SegmentCache) -> None:
        """Store one cache as it is (``"tr"``, ``"ldt"``: a task switch loads them)."""

    @property
    def cpl(self) -> int:
        """The current privilege level (SS.DPL; CS.RPL outside real mode)."""

    def set_cpl(self, cpl: int) -> None:
        """Force the CPL (reset states; delivery gets it from SS)."""

    def gprs(self) -> tuple[int, ...]:
        """RAX RCX RDX RBX RSP RBP RSI RDI R8..R15, in encoding order."""

    @property
    def rip(self) -> int:
        """The instruction pointer."""

    def cr(self, n: int) -> int:
        """Control register ``n`` (0, 2, 3, 4)."""


class Vcpu(Protocol):
    """The vCPU operations :mod:`interrupts` and :mod:`syscall` use."""

    machine: object                           # memory, tracer and config (the guest's vendor)

    def reg(self, name: str) -> int:
        """A register by lower-case name (``rsp``, ``rflags``, ``cr0``...)."""

    def set_reg(self, name: str, value: int) -> None:
        """Write a register by name."""

    def msr_read(self, msr: int) -> int:
        """A model-specific register's value."""

    def cpu_state(self) -> AbstractContextManager[CpuState]:
        """The hidden state; changes are committed when the ``with`` block ends."""

    def code_bits(self) -> int:
        """16, 32 or 64: the size the current CS executes at."""
