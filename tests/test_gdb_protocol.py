"""gdb's wire format without a machine: framing, escapes, run lengths, and the reader an untrusted peer feeds."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenicorn.debug.gdb.protocol import (
    MAX_INPUT,
    BadArgument,
    PacketReader,
    addr_len,
    checksum,
    decode_payload,
    escape_binary,
    frame,
    parse_hex,
    thread_ok,
    unhex,
)


def feed_all(reader: PacketReader, *chunks: bytes) -> list[tuple[str, bytes]]:
    out = []
    for chunk in chunks:
        out += list(reader.feed(chunk))
    return out


def test_frame_and_checksum():
    assert checksum(b"qC") == 0xB4 and frame(b"qC") == b"$qC#b4"
    assert frame(b"") == b"$#00"


def test_a_packet_split_anywhere_is_acked_once_and_delivered_whole():
    wire = frame(b"m100000,40")
    for cut in range(1, len(wire)):
        r = PacketReader()
        assert feed_all(r, wire[:cut], wire[cut:]) == [("send", b"+"), ("packet", b"m100000,40")]


def test_bad_checksums_are_naked_and_noise_between_packets_is_skipped():
    r = PacketReader()
    assert feed_all(r, b"junk+++$?#00") == [("send", b"-")]
    assert feed_all(r, b"$?#zz") == [("send", b"-")]                 # not even hex
    assert feed_all(r, b"++" + frame(b"?")) == [("send", b"+"), ("packet", b"?")]


def test_ctrl_c_and_a_nak_outside_packets():
    r = PacketReader()
    assert feed_all(r, b"\x03-" + frame(b"g")) == [("interrupt", b""), ("resend", b""),
                                                   ("send", b"+"), ("packet", b"g")]


def test_escapes_and_run_lengths_are_undone():
    r = PacketReader()
    # X data with "#" escaped, then 'f*"' (f and 5 more)
    body = b"X10,2:}" + bytes((ord("#") ^ 0x20,)) + b'f*"'
    assert feed_all(r, frame(body)) == [("send", b"+"), ("packet", b"X10,2:#ffffff")]


def test_an_unterminated_flood_is_dropped_and_naked_and_the_reader_recovers():
    r = PacketReader()
    assert feed_all(r, b"$" + b"a" * (MAX_INPUT - 1)) == []          # at the limit: still waiting
    assert feed_all(r, b"aa") == [("send", b"-")]
    assert r.buf == b""
    assert feed_all(r, b"#00" + frame(b"?")) == [("send", b"+"), ("packet", b"?")]


def test_a_run_length_bomb_is_refused():
    payload = b"a" + b"*~" * (MAX_INPUT // 90 + 2)                   # each "*~" adds 97 bytes
    assert decode_payload(payload) is None
    assert feed_all(PacketReader(), frame(payload)) == [("send", b"-")]


@given(st.binary(max_size=200))
def test_escaped_binary_decodes_back(data):
    assert decode_payload(escape_binary(data)) == data


def test_argument_parsers():
    assert parse_hex("fF") == 255 and addr_len("10,4") == (16, 4) and unhex("00ff") == b"\x00\xff"
    for bad in ("", "x", "1" * 17):
        with pytest.raises(BadArgument):
            parse_hex(bad)
    for bad in ("0", "zz"):
        with pytest.raises(BadArgument):
            unhex(bad)
    with pytest.raises(BadArgument):
        addr_len("10")
    assert thread_ok("1") and thread_ok("-1") and thread_ok("0") and thread_ok("p1.1") and thread_ok("p1")
    assert not thread_ok("2") and not thread_ok("p1.2") and not thread_ok("")
