"""Tracing: one readable line per platform event, by category.

``--trace exits,io,int`` turns categories on. Every line names the category
first so it can be filtered with grep. Exits carry the guest instruction
that caused them, disassembled with capstone, so a reader sees *what the guest
did* next to *what the platform did about it*.

Categories: ``exits`` (every vCPU exit), ``io`` (unclaimed port/MMIO
accesses, reported once per address), ``int`` (interrupt and exception
delivery), ``cpuid``, ``mem`` (unassigned physical memory), ``hypercalls``,
``irq`` (interrupt line edges), ``evtchn``, ``xenstore``, ``all``. Code addresses in the
printed lines are named by the kernel's symbols (``0x102179 <upcall_cleared>``,
:mod:`~xenicorn.debug.symbols`).

Tools that want the events without the text on stderr (the interrupt
stepper, ``--trace-json``, run records) *observe* categories: the call
sites emit as if the category were on, and observers get each line with
its structured payload (a :class:`~xenicorn.x86.interrupts.Delivery`
for ``int``), but nothing is printed.
"""
from __future__ import annotations

import sys
from typing import TextIO

import capstone

CATEGORIES = ("exits", "io", "int", "cpuid", "mem", "hypercalls", "irq", "evtchn", "xenstore")

_CS = {
    16: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_16),
    32: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32),
    64: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64),
}


def disassemble(code: bytes, addr: int, bits: int, count: int = 1) -> list[str]:
    """Disassemble ``count`` instructions as ``addr: mnemonic operands``."""
    out = []
    for insn in _CS[bits].disasm(code, addr):
        out.append(f"{insn.address:#x}: {insn.mnemonic} {insn.op_str}".rstrip())
        if len(out) == count:
            break
    return out or [f"{addr:#x}: (undecodable {code[:8].hex()})"]


class Tracer:
    """Routes trace lines for the enabled categories to a stream."""

    def __init__(self, categories: set[str] | None = None, stream: TextIO | None = None,
                 observed: set[str] | None = None):
        cats = _categories(categories)
        self.categories = cats
        self.observed = _categories(observed)
        self.stream = stream or sys.stderr
        self.active = bool(cats or self.observed)
        self.listeners: list = []        # callables(category, text): tests
        self.cpu = None                  # with several vCPUs: callable() -> the index of the one acting
        self.observers: list = []        # callables(category, text, data): steppers, records
        self.symbolize = None            # callable(text) -> text naming code addresses (the kernel's symbols)

    def on(self, category: str) -> bool:
        return category in self.categories or category in self.observed

    def emit(self, category: str, text: str, data=None) -> None:
        if category in self.categories:
            cpu = f"cpu{self.cpu()} " if self.cpu is not None else ""
            shown = self.symbolize(text) if self.symbolize is not None else text
            self.stream.write(f"[{category}] {cpu}{shown}\n")
        for listener in self.listeners:
            listener(category, text)
        if category in self.observed:
            for observer in self.observers:
                observer(category, text, data)


def _categories(names) -> set[str]:
    cats = set(names or ())
    if "all" in cats:
        cats = set(CATEGORIES)
    unknown = cats - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown trace categories: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(CATEGORIES)}, all)")
    return cats
