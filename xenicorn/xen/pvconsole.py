"""The PV console: a byte ring pair on a page, like a serial line without a UART.

The toolstack gives the guest ``HVM_PARAM_CONSOLE_PFN`` and
``HVM_PARAM_CONSOLE_EVTCHN``. The page is ``struct xencons_interface``
(xen/include/public/io/console.h)::

    0x000 in[1024]    to the guest          0xC00 in_cons, 0xC04 in_prod
    0x400 out[2048]   from the guest        0xC08 out_cons, 0xC0C out_prod

The guest writes output at ``out_prod & 2047``, advances ``out_prod`` and
notifies the port; xenicorn (xenconsoled's part) copies the bytes to the
machine's console and advances ``out_cons``. Input goes the other way.
"""
from __future__ import annotations

from ..records import flag, hexbytes, make_record, open_record, uint

IN, OUT, IN_SIZE, OUT_SIZE = 0x000, 0x400, 1024, 2048
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 0xC00, 0xC04, 0xC08, 0xC0C


class PvConsole:
    """xenconsoled's end of one guest's console page: drains ``out``, fills ``in``, notifies the port."""

    def __init__(self, memory, gpa: int, output, notify):
        self.mem, self.gpa, self.output, self.notify = memory, gpa, output, notify
        self.received = 0
        self.broken = False
        self.pending = bytearray()            # input waiting for room in the ring

    def _u32(self, off: int) -> int:
        return self.mem.read_u32(self.gpa + off)

    def kick(self) -> None:
        """The guest notified: drain its output ring."""
        if self.broken:
            return
        cons, prod = self._u32(OUT_CONS), self._u32(OUT_PROD)
        n = (prod - cons) & 0xFFFFFFFF
        if n > OUT_SIZE:                     # impossible indices: stop trusting the ring
            self.broken = True
            return
        data = bytes(self.mem.read_u8(self.gpa + OUT + ((cons + i) & (OUT_SIZE - 1))) for i in range(n))
        self.mem.write_u32(self.gpa + OUT_CONS, prod)
        if data:
            self.received += len(data)
            self.output(data)
        if self.pending:
            self.feed(b"")
        self.notify()

    def feed(self, data: bytes) -> int:
        """Input for the guest: what fits goes in the ring now, the rest when the guest drains it."""
        self.pending += data
        cons, prod = self._u32(IN_CONS), self._u32(IN_PROD)
        room = IN_SIZE - ((prod - cons) & 0xFFFFFFFF)
        n = max(0, min(room, len(self.pending)))
        for i in range(n):
            self.mem.write_int(self.gpa + IN + ((prod + i) & (IN_SIZE - 1)), 1, self.pending[i])
        del self.pending[:n]
        self.mem.write_u32(self.gpa + IN_PROD, (prod + n) & 0xFFFFFFFF)
        if n:
            self.notify()
        return n

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("xen-pvconsole", 1)
    MAX_PENDING = 16 << 20                  # host input a snapshot may carry

    def save_record(self) -> dict:
        """Input still waiting for room in the ring (the ring itself is in RAM)."""
        return make_record(*self.RECORD, {"received": self.received, "broken": self.broken,
                                          "pending": bytes(self.pending).hex()})

    def check_record(self, record: dict):
        st = open_record(record, *self.RECORD)
        return uint(st, "received"), flag(st, "broken"), hexbytes(st, "pending", most=self.MAX_PENDING)

    def apply_record(self, prepared) -> None:
        self.received, self.broken, pending = prepared
        self.pending = bytearray(pending)
