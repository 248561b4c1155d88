"""Exact guest instruction counts from Unicorn's own counter.

``uc.emu_start(count=N)`` makes Unicorn count instructions in C (a hidden
code hook, about a third of full speed) and stop after N. It keeps the count
in ``uc_struct.emu_counter`` but has no API to read it back, so a run that
stops early (HLT, a stop request) would not know how far it got. This module
finds the counter's offset once per process by running a few known
instruction counts and looking for them, then reads it with ctypes.

Two Unicorn rules shape how xenicorn uses it (measured; see
docs/unicorn-notes.md, "Exact instruction counts"): blocks translated *without* counting ignore
``count=``, so a machine that counts must count from its first instruction;
and switching back to ``count=0`` flushes the translation cache.
"""
from __future__ import annotations

import ctypes
import functools
import struct

from unicorn import Uc, UC_ARCH_X86, UC_MODE_32

from .startup import EngineUnsupported



class CounterNotFound(EngineUnsupported):
    """This Unicorn build keeps its instruction counter somewhere unexpected."""


def _find_offset() -> int:
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x4000)
    uc.mem_write(0x1000, b"\x90" * 0x1000)        # a NOP sled: one insn per byte
    handle = ctypes.cast(uc._uch, ctypes.c_void_p).value
    span = 0x2000
    snaps = []
    for n in (5, 9, 17):
        uc.emu_start(0x1000, 0x1F00, count=n)
        snaps.append(ctypes.string_at(handle, span))
    for off in range(0, span - 8, 8):
        vals = [struct.unpack_from("<Q", s, off)[0] for s in snaps]
        # the counter is one past the limit when the limit stopped the run
        if vals == [6, 10, 18]:
            return off
    raise CounterNotFound("cannot locate Unicorn's instruction counter; install unicorn==2.1.4")


@functools.cache
def counter_offset() -> int:
    """Where ``uc_struct.emu_counter`` is (found on the first call; checked by ``engine.probe()``)."""
    return _find_offset()


forget_offset = counter_offset.cache_clear    # look again on the next call (``engine.reset_probe()``)


def field_address(uc: Uc, delta: int = 0) -> int:
    """Host address of the ``uc_struct`` field ``delta`` bytes after the instruction counter."""
    return ctypes.cast(uc._uch, ctypes.c_void_p).value + counter_offset() + delta


def stop_before_next_instruction(uc: Uc) -> None:
    """Make the counting hook end the run before the next instruction executes.

    Unicorn's hook counts an instruction, then stops the run once the count
    passes ``uc_struct.emu_count`` (right after ``emu_counter``), and checks
    for that stop *before* the instruction runs. Lowering the limit to the
    count so far is therefore a stop request that lands exactly between two
    instructions, where ``uc_emu_stop()`` from inside an MMIO callback is
    noticed right after the access and puts RIP back to that instruction,
    which then runs again (docs/unicorn-notes.md). Safe from any thread.
    """
    ctypes.c_uint64.from_address(field_address(uc, 8)).value = read_counter(uc)


def read_limit(uc: Uc) -> int:
    """The limit of the current/last run (``count=``, or lower after a stop request)."""
    return ctypes.c_uint64.from_address(field_address(uc, 8)).value


def read_counter(uc: Uc) -> int:
    """Instructions Unicorn counted in the current/last ``emu_start(count>0)``."""
    return ctypes.c_uint64.from_address(field_address(uc)).value
