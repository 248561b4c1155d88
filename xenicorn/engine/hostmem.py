"""Host addresses of Python buffers, for mapping them into the engine.

Guest RAM is an anonymous ``mmap`` (:mod:`xenicorn.machine.memory`) that
Python reads through a ``memoryview`` and Unicorn executes against after
``mem_map_ptr(guest_address, size, perms, host_address)``. Python does not
give a buffer's address without ``ctypes``, which stays inside the engine:
this is the one place that asks for it.
"""
from __future__ import annotations

import ctypes


def buffer_address(buffer) -> int:
    """The host address of a writable buffer's first byte (an ``mmap``, a ``bytearray``).

    The buffer must outlive every engine that maps it: Unicorn keeps the
    raw pointer, and a freed buffer under a mapping is a crash, not an error.
    """
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
