"""Copying hypercall arguments in and out of the guest.

A hypercall's pointer arguments are guest *linear* addresses, read through
the guest's page tables with the privileges of the kernel that made the
call (Xen's ``copy_from_guest``/``copy_to_guest``). A pointer that does not
translate is not the hypervisor's problem: the hypercall fails with
``-EFAULT``. :class:`GuestFault` carries that up to the dispatcher, which
turns it into the return value, so handlers can be written straight-line.
"""
from __future__ import annotations

import struct

from . import errno


class HypercallError(Exception):
    """End a hypercall early with ``-code`` in RAX."""

    def __init__(self, code: int, why: str = ""):
        super().__init__(why or errno.name(-code))
        self.code = code


class GuestFault(HypercallError):
    """A guest pointer did not translate (or was not RAM): -EFAULT."""

    def __init__(self, linear: int, size: int, why: str = ""):
        super().__init__(errno.EFAULT, f"bad guest pointer {linear:#x}+{size:#x} {why}".rstrip())
        self.linear = linear


MAX_COPY = 1 << 20          # no single hypercall copies more than this


class GuestAccess:
    """Linear-address copies for one vCPU, with Xen's failure semantics."""

    def __init__(self, vcpu):
        self.vcpu = vcpu

    def read(self, linear: int, size: int) -> bytes:
        if size < 0 or size > MAX_COPY:
            raise GuestFault(linear, size, "(size)")
        if size == 0:
            return b""
        data = self._read(linear, size)
        return data

    def _read(self, linear: int, size: int) -> bytes:
        from ..x86.paging import PageFault
        from ..machine.memory import GuestMemoryError
        try:
            data = self.vcpu.read_linear(linear & ((1 << 64) - 1), size)
        except GuestMemoryError as e:
            raise GuestFault(linear, size, f"({e})") from None
        if isinstance(data, PageFault):
            raise GuestFault(linear, size, f"({data.reason})")
        return data

    def write(self, linear: int, data: bytes) -> None:
        from ..x86.paging import PageFault
        from ..machine.memory import GuestMemoryError
        if len(data) > MAX_COPY:
            raise GuestFault(linear, len(data), "(size)")
        try:
            res = self.vcpu.write_linear(linear & ((1 << 64) - 1), data)
        except GuestMemoryError as e:
            raise GuestFault(linear, len(data), f"({e})") from None
        if isinstance(res, PageFault):
            raise GuestFault(linear, len(data), f"({res.reason})")

    def read_struct(self, linear: int, fmt: str) -> tuple:
        return struct.unpack(fmt, self.read(linear, struct.calcsize(fmt)))

    def write_struct(self, linear: int, fmt: str, *values) -> None:
        self.write(linear, struct.pack(fmt, *values))

    def read_u32(self, linear: int) -> int:
        return self.read_struct(linear, "<I")[0]

    def read_u64(self, linear: int) -> int:
        return self.read_struct(linear, "<Q")[0]
