"""Naming guest code by the kernel's ELF symbols.

A bare ``0x102179`` tells a reader nothing; ``0x102179 <upcall_cleared>``
says it is the instruction after the handler's store that clears
``upcall_pending``. The guest kernels of this project define such labels on
purpose, and a kernel's ``.symtab`` has one entry per function and label:
a name, a value (the virtual address) and the section it lives in.

:class:`Symbols` keeps the code symbols (those in executable sections)
sorted by address and answers "which symbol precedes this address" with a
binary search, so naming costs a few comparisons. An address is named
``<sym>`` at a symbol and ``<sym+0x4>`` past one; an address in a data
section is named only inside a sized object (the hypercall page the guest
calls into, a stack array); anything else (vectors, selectors) has no name, nor
has anything when the ELF has no symbols (a stripped kernel, a bzImage, a
flat binary): those print bare, as before. The table is read on first use:
a Linux ``vmlinux`` has a hundred thousand symbols, read only if something
is printed.
"""
from __future__ import annotations

import bisect
import re

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

SHF_EXECINSTR = 0x4
_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b(?! <)")
_KINDS = ("STT_FUNC", "STT_NOTYPE")          # functions and the labels inside them


class Symbols:
    """Address -> nearest preceding code symbol of one ELF file (loaded lazily)."""

    def __init__(self, path: str | None = None, entries: list[tuple[int, str, bool]] | None = None,
                 sections: list[tuple[int, int]] | None = None):
        """From an ELF ``path`` (read on first use), or ``entries`` (address, name, is a label)
        in executable ``sections`` ([start, end) ranges)."""
        self.path = path
        self._addrs: list[int] = []
        self._names: list[str] = []
        self._sections: list[tuple[int, int]] = []
        self._objects: list[tuple[int, int, str]] = []     # sized data objects: [start, end), name
        self._loaded = path is None
        if entries is not None:
            self._fill(entries, sections or [])

    def _fill(self, entries: list[tuple[int, str, bool]], sections: list[tuple[int, int]],
              objects: list[tuple[int, int, str]] = ()) -> None:
        # several names at one address: a label (NOTYPE) names a point more
        # exactly than the function it starts, so labels sort last and win
        by_addr = {addr: name for addr, name, _ in sorted(entries, key=lambda e: (e[0], e[2], e[1]))}
        self._addrs = sorted(by_addr)
        self._names = [by_addr[a] for a in self._addrs]
        self._sections = sorted(sections)
        self._objects = sorted(objects)

    def _load(self) -> None:
        self._loaded = True
        try:
            with open(self.path, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    return
                f.seek(0)
                elf = ELFFile(f)
                code = {i: (s["sh_addr"], s["sh_addr"] + s["sh_size"]) for i, s in enumerate(elf.iter_sections())
                        if s["sh_flags"] & SHF_EXECINSTR and s["sh_size"]}
                symtab = elf.get_section_by_name(".symtab")
                if symtab is None or not code:
                    return
                labels: list[tuple[int, str, bool]] = []
                objects: list[tuple[int, int, str]] = []
                for sym in symtab.iter_symbols():
                    kind, value = sym["st_info"]["type"], sym["st_value"]
                    if not sym.name:
                        continue
                    if kind in _KINDS and sym["st_shndx"] in code:
                        labels.append((value, sym.name, kind == "STT_NOTYPE"))
                    elif kind == "STT_OBJECT" and sym["st_size"]:
                        objects.append((value, value + sym["st_size"], sym.name))
        except (OSError, ELFError, ValueError):
            return                                   # no readable symbols: bare addresses
        self._fill(labels, list(code.values()), objects)

    def __bool__(self) -> bool:
        if not self._loaded:
            self._load()
        return bool(self._addrs or self._objects)

    def name(self, addr: int) -> str | None:
        """``sym`` or ``sym+0x4``: the code symbol at or before ``addr`` in its executable
        section, else the sized object holding it (code in a data object: the hypercall
        page); None elsewhere."""
        if not self:
            return None
        i = bisect.bisect_right(self._sections, (addr, float("inf"))) - 1
        if i >= 0 and self._sections[i][0] <= addr < self._sections[i][1]:
            j = bisect.bisect_right(self._addrs, addr) - 1
            if j >= 0 and self._addrs[j] >= self._sections[i][0]:
                return _plus(self._names[j], addr - self._addrs[j])
        k = bisect.bisect_right(self._objects, (addr, float("inf"), "")) - 1
        if k >= 0 and self._objects[k][0] <= addr < self._objects[k][1]:
            return _plus(self._objects[k][2], addr - self._objects[k][0])
        return None

    def describe(self, addr: int) -> str:
        """``0x102179 <upcall_cleared>``, or the bare address."""
        sym = self.name(addr)
        return f"{addr:#x} <{sym}>" if sym else f"{addr:#x}"

    def annotate(self, text: str) -> str:
        """Every hexadecimal number in ``text`` that is a code address gets its ``<symbol>``."""
        if not self:
            return text

        def one(m: re.Match) -> str:
            sym = self.name(int(m.group(0), 16))
            return f"{m.group(0)} <{sym}>" if sym else m.group(0)
        return _HEX.sub(one, text)


def _plus(name: str, off: int) -> str:
    return name if not off else f"{name}+{off:#x}"


def annotate(machine, text: str) -> str:
    """``text`` with the machine's kernel symbols (unchanged without any)."""
    syms = getattr(machine, "symbols", None)
    return syms.annotate(text) if syms is not None else text
