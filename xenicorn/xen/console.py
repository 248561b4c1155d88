"""``console_io`` (hypercall 18): the hypervisor's own console, i.e. Xen's log.

A Xen guest has two ways to print, and they go to different places:

* its **PV console** (:mod:`xenicorn.xen.pvconsole`): a ring the toolstack's
  xenconsoled drains; this is the guest's console, what ``xl console``
  shows and what xenicorn writes to stdout;
* ``HYPERVISOR_console_io(CONSOLEIO_write, count, buffer)``: text for the
  *hypervisor's* console, which Xen keeps in its log ring (``xl dmesg``)
  and prints on its serial line. Guests use it before their PV console is
  up, and XTF's tests print every line through both.

Xen prints a domU's ``console_io`` text one line at a time, each line
prefixed with the domain's ID, ``(d1) `` for xenicorn's guest (xen/drivers/
char/console.c: ``guest_console_write`` buffers up to a newline,
``guest_printk`` prints ``"(d%d) "`` before the line). It also strips what
Xen's ``is_console_printable`` refuses (xen/include/xen/console.h: its
``isprint``, newline and tab; xen/lib/ctype.c makes 0x20-0x7E and
0xA0-0xFF printable). A partial line waits in the domain's 256-byte
buffer (``struct domain_console`` in xen/include/xen/sched.h), so it is
part of a snapshot (``xen.console``); a round of text that would not fit
there is printed at once, with the buffer, as one line.
xenicorn writes the finished lines to the host's ``xen_log`` (stderr,
``--xen-log``).

Whether a domU may use ``console_io`` at all is XSM's choice
(xen/include/xsm/dummy.h ``xsm_console_io``): writes are allowed with
``CONFIG_VERBOSE_DEBUG`` (on in debug builds, the builds XTF is run on), and
xenicorn models that build. ``CONSOLEIO_read`` takes bytes typed at the
hypervisor console; Xen allows it to the console domain, and the one guest
of a xenicorn machine is treated as that domain, so it reads from the
machine's console input queue (``XenPlatform.console_input``).

Errors as Xen's ``do_console_io``: a count above INT_MAX is ``-E2BIG``, a
buffer that does not translate ``-EFAULT``, an unknown cmd ``-ENOSYS``.
"""
from __future__ import annotations

from ..records import RecordError, hexbytes, make_record, open_record
from . import errno
from .guest import HypercallError

CONSOLEIO_write, CONSOLEIO_read = 0, 1
INT_MAX = 0x7FFFFFFF
KBUF = 128                  # guest_console_write's on-stack copy: 127 bytes and a NUL per round
LINE_BUF = 256              # struct domain_console's buf[]: at most 255 bytes wait for a newline

# is_console_printable: Xen's isprint (xen/lib/ctype.c), plus newline and tab
PRINTABLE = frozenset(range(0x20, 0x7F)) | frozenset(range(0xA0, 0x100)) | {0x0A, 0x09}
DROPPED = bytes(b for b in range(256) if b not in PRINTABLE or b == 0x0A)   # what a logged line loses


class GuestConsoleLog:
    """Xen's per-domain line buffer for ``console_io`` text, and where whole lines go.

    ``write(data)`` does what one round of ``guest_console_write`` does with
    the bytes it copied; ``out(line)`` receives each finished log line,
    prefix and newline included.
    """

    RECORD = ("xen-console-log", 1)

    def __init__(self, domid: int, out):
        self.prefix = f"(d{domid}) ".encode()
        self.out = out
        self.buf = bytearray()

    def round(self, chunk: bytes) -> int:
        """One copied chunk: keep printable bytes up to the first newline; returns bytes consumed.

        As Xen, a chunk is consumed only up to and including its first
        newline; the rest is copied again in the next round.
        """
        end = chunk.find(b"\n")
        used = len(chunk) if end < 0 else end + 1
        kept = chunk[:used].translate(None, DROPPED)
        if end < 0 and len(self.buf) + len(kept) < LINE_BUF - 1:
            self.buf += kept                  # no newline yet: wait for the rest of the line
        else:
            self.out(self.prefix + bytes(self.buf) + kept + b"\n")
            self.buf.clear()
        return used

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    def save_record(self) -> dict:
        """The partial line Xen holds for the domain."""
        return make_record(*self.RECORD, {"pending": bytes(self.buf).hex()})

    def check_record(self, record: dict) -> bytes:
        st = open_record(record, *self.RECORD)
        pending = hexbytes(st, "pending", most=LINE_BUF - 2)
        if pending.translate(None, DROPPED) != pending:
            raise RecordError("pending holds a byte Xen strips")
        return pending

    def apply_record(self, prepared: bytes) -> None:
        self.buf = bytearray(prepared)


def console_io(call, cmd: int, count: int, buffer: int, *_) -> int:
    """Log ``count`` bytes from ``buffer`` (Xen's log), or read up to ``count`` bytes of input."""
    xen = call.xen
    count &= 0xFFFFFFFF                      # unsigned int in the ABI
    if cmd == CONSOLEIO_write:
        call.note(f"write {count} bytes")
        # guest_console_write: rounds of at most 127 bytes, each consumed up
        # to its first newline; a fault ends the call with what came before
        # already logged. (Xen may preempt between rounds and continue the
        # call later; xenicorn finishes it at once: the guest sees the same.)
        done = 0
        while done < count:
            n = min(KBUF - 1, count - done)
            done += xen.console_log.round(call.guest.read(buffer + done, n))
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
