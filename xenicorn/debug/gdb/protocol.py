"""gdb's Remote Serial Protocol on the wire: framing, checksums, escapes, and a hardened reader.

gdb talks to a *remote stub* with its Remote Serial Protocol (RSP; gdb
manual, appendix "Remote Protocol"). This module is the byte level of it,
with no machine behind it: it frames what the stub sends, and turns what
arrives from an untrusted peer into packets, acknowledgements and Ctrl-C.

Everything is ASCII. A packet is ``$payload#cc``: ``cc`` is the sum of the
payload bytes modulo 256 in two hex digits. The receiver answers ``+``
(good) or ``-`` (bad checksum: send it again). Inside a payload, ``}`` escapes
the next byte (that byte XOR 0x20), so binary data (``X`` writes, the
``qXfer`` replies) can carry ``$``, ``#`` and ``}``; ``x*N`` is a run
length (``x`` repeated ``ord(N) - 29`` more times). One byte travels outside
packets: 0x03, which gdb sends when the user presses Ctrl-C while the target
runs. Numbers are hex; memory and register values are hex bytes in target
(little-endian) order.

Replies: ``OK``; ``E`` and two hex digits for an error (this stub uses E22,
EINVAL, for malformed arguments, E14, EFAULT, for memory it cannot reach,
as QEMU does); an *empty* reply for a packet the stub does not know, which
gdb reads as "not supported". Stop replies ``T05thread:01;`` say why the
target stopped (a signal number: 5 SIGTRAP for breakpoints and steps, 2
SIGINT after Ctrl-C) and which thread; ``W00`` says the program exited.

The peer is not trusted: :class:`PacketReader` bounds what it buffers
(:data:`MAX_INPUT`, also after run-length expansion), skips noise between
packets in one cut so a flood costs linear time, and NAKs what it drops.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

PACKET_SIZE = 0x4000             # the largest packet we accept and advertise (qSupported)
MAX_INPUT = PACKET_SIZE * 2 + 64  # an unterminated packet longer than this is dropped

SIGINT, SIGTRAP = 2, 5

# error replies carry an errno, as QEMU's: EINVAL for bad arguments, EFAULT for memory
EINVAL, EFAULT = "E22", "E14"

_SIGNIFICANT = re.compile(rb"[$\x03-]")  # the bytes that mean something between packets


def checksum(payload: bytes) -> int:
    """The RSP checksum: the sum of the payload bytes modulo 256."""
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cc``."""
    return b"$" + payload + b"#%02x" % checksum(payload)


def escape_binary(data: bytes) -> bytes:
    """Binary reply data: ``#``, ``$``, ``}`` and ``*`` go as ``}`` + byte ^ 0x20."""
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def decode_payload(data: bytes, limit: int = MAX_INPUT) -> bytes | None:
    """Undo the framing of a received payload: ``}`` escapes and ``*`` run lengths.

    ``x*N`` repeats ``x`` ``ord(N) - 29`` more times (gdb manual, "Overview"
    of the protocol). None when the expansion would exceed ``limit``.
    """
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b == 0x7D and i + 1 < len(data):
            out.append(data[i + 1] ^ 0x20)
            i += 2
            continue
        if b == 0x2A and i + 1 < len(data) and out and 32 <= data[i + 1] <= 126:
            out += out[-1:] * (data[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
        if len(out) > limit:
            return None
    return bytes(out)


class PacketReader:
    """Bytes from gdb in, what they mean out, in order.

    :meth:`feed` yields ``(kind, data)``:

    - ``("send", b"+")`` / ``("send", b"-")``: the ack or NAK to send back now;
    - ``("resend", b"")``: gdb NAKed our last packet, send it again;
    - ``("interrupt", b"")``: Ctrl-C (0x03 outside a packet);
    - ``("packet", payload)``: a good packet, escapes and run lengths undone.

    A packet may arrive in pieces: what is not complete waits for the next
    call. Bytes between packets that mean nothing (``+`` acks, noise) are
    dropped.
    """

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[str, bytes]]:
        """Take received bytes; yield what they complete, in the order it arrived."""
        buf = self.buf
        buf += data
        while buf:
            c = buf[0]
            if c == 0x03:                           # Ctrl-C, outside any packet
                del buf[0]
                yield "interrupt", b""
            elif c == ord("-"):                     # our last packet arrived damaged
                del buf[0]
                yield "resend", b""
            elif c != ord("$"):                     # "+" acks and noise between packets
                m = _SIGNIFICANT.search(buf, 1)
                del buf[:m.start() if m else len(buf)]   # in one cut: a flood must not cost n^2
            else:
                end = buf.find(b"#")
                if end < 0 or len(buf) < end + 3:
                    if len(buf) > MAX_INPUT:        # never terminated: drop it, ask again
                        buf.clear()
                        yield "send", b"-"
                    return
                payload, cc = bytes(buf[1:end]), bytes(buf[end + 1:end + 3])
                del buf[:end + 3]
                try:
                    good = int(cc, 16) == checksum(payload)
                except ValueError:
                    good = False
                if not good:
                    yield "send", b"-"
                    continue
                decoded = decode_payload(payload)
                if decoded is None:
                    yield "send", b"-"
                    continue
                yield "send", b"+"
                yield "packet", decoded


# ----------------------------------------------------------------------
# arguments inside packets
# ----------------------------------------------------------------------
class BadArgument(Exception):
    """A packet's arguments do not parse: the reply is E22."""


def parse_hex(text: str) -> int:
    """A hex number of at most 64 bits; :class:`BadArgument` otherwise."""
    if not text or any(c not in "0123456789abcdefABCDEF" for c in text) or len(text) > 16:
        raise BadArgument(text)
    return int(text, 16)


def unhex(text: str) -> bytes:
    """Hex-encoded bytes; :class:`BadArgument` for an odd length or a non-hex digit."""
    if len(text) % 2:
        raise BadArgument(text)
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise BadArgument(text) from None


def addr_len(text: str) -> tuple[int, int]:
    """``ADDR,LENGTH`` (both hex), as in ``m``, ``M``, ``X`` and ``qXfer``."""
    addr, comma, length = text.partition(",")
    if not comma:
        raise BadArgument(text)
    return parse_hex(addr), parse_hex(length)


def parse_thread(text: str) -> int:
    """A thread id: a thread (> 0), 0 (any thread) or -1 (all threads); :class:`BadArgument` otherwise.

    The multiprocess form ``p<pid>.<tid>`` gives its ``<tid>``, and
    ``p<pid>`` alone means every thread of the process (-1): there is one
    process, the machine, so the pid is checked for syntax only.
    """
    if text.startswith("p"):
        pid, dot, text = text[1:].partition(".")
        if pid != "-1":
            parse_hex(pid)
        if not dot:
            return -1
    return -1 if text == "-1" else parse_hex(text)


def thread_ok(text: str, threads: int = 1) -> bool:
    """Thread ids gdb may name on a target with ``threads`` threads (1..threads), 0 (any) and -1 (all)."""
    try:
        tid = parse_thread(text)
    except BadArgument:
        return False
    return tid in (-1, 0) or 1 <= tid <= threads
