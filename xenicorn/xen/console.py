"""``console_io`` (hypercall 18): the hypervisor's own console.

Before a guest has any PV console ring, it can print straight to Xen's
console: ``HYPERVISOR_console_io(CONSOLEIO_write, count, buffer)``. xenicorn
sends those bytes to the emulator's console. ``CONSOLEIO_read`` takes bytes
typed at the hypervisor console; Xen allows it to the console domain, and
the one guest of a xenicorn machine is treated as that domain, so it reads
from the machine's console input queue (``XenPlatform.console_input``).

Errors as Xen's ``do_console_io``: a count above INT_MAX is ``-E2BIG``, a
buffer that does not translate ``-EFAULT``, an unknown cmd ``-ENOSYS``.
"""
from __future__ import annotations

from . import errno
from .guest import HypercallError

CONSOLEIO_write, CONSOLEIO_read = 0, 1
INT_MAX = 0x7FFFFFFF
CHUNK = 4096


def console_io(call, cmd: int, count: int, buffer: int, *_) -> int:
    """Write ``count`` bytes from ``buffer`` to the console, or read up to ``count``."""
    xen = call.xen
    count &= 0xFFFFFFFF                      # unsigned int in the ABI
    if cmd == CONSOLEIO_write:
        call.note(f"write {count} bytes")
        if count > INT_MAX:
            raise HypercallError(errno.E2BIG)
        done = 0
        while done < count:                  # copy in chunks, as Xen does
            n = min(CHUNK, count - done)
            xen.host.console.write(call.guest.read(buffer + done, n))
            done += n
        return 0
    if cmd == CONSOLEIO_read:
        if count > INT_MAX:
            raise HypercallError(errno.E2BIG)
        data = bytes(xen.console_input[:count])
        if data:
            call.guest.write(buffer, data)
            del xen.console_input[:len(data)]
        call.note(f"read {len(data)} of {count} bytes")
        return len(data)
    xen.unimplemented(f"console_io cmd {cmd}")
    raise HypercallError(errno.ENOSYS)
