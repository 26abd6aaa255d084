"""Fuzz UDP over TCP (anytls_twisted/protocol/uot.py): the v2 request header and packets.

The first input byte picks the version (even: 2, odd: 1); the rest is the stream's bytes.

Contract:

* :meth:`UoTReader.next_item` returns items or ``None``, or raises :class:`AddressError`;
  nothing else, and ``feed`` never raises.
* Split invariance: the items (and whether it fails) do not depend on the cuts.
* Bounded: when ``next_item`` returns ``None`` the reader holds less than one item: under 260
  bytes before the v2 header, under 65796 after it. Payloads are at most 65535 bytes.
* Round trip: the items, encoded again (``encode_request``, ``encode_packet``,
  ``encode_connect_packet``), parse to the same items.
"""

from __future__ import annotations

import sys

import _fuzzlib
from _fuzzlib import check, splits

with _fuzzlib.instrumented():
    from anytls_twisted.protocol.uot import (
        MAX_HEADER_SIZE,
        MAX_PACKET_SIZE,
        MAX_PAYLOAD,
        AddressError,
        UoTPacket,
        UoTReader,
        UoTRequest,
        encode_connect_packet,
        encode_packet,
        encode_request,
    )


def read(version: int, chunks: list) -> tuple:
    reader = UoTReader(version)
    items: list = []
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            try:
                item = reader.next_item()
            except AddressError:
                return items, True
            if item is None:
                break
            check(isinstance(item, (UoTRequest, UoTPacket)), f"unexpected item {item!r}")
            if isinstance(item, UoTRequest):
                check(version == 2 and not items, "a request header out of place")
            else:
                check(type(item.payload) is bytes and len(item.payload) <= MAX_PAYLOAD, "payload")
            items.append(item)
        bound = MAX_HEADER_SIZE if reader._need_header else MAX_PACKET_SIZE
        check(reader.pending < bound, f"holds {reader.pending} bytes")
    return items, False


def encode(items: list) -> bytes:
    out = []
    connect = False
    for item in items:
        if isinstance(item, UoTRequest):
            connect = item.connect
            out.append(encode_request(item.connect, item.destination))
        elif connect:
            out.append(encode_connect_packet(item.payload))
        else:
            out.append(encode_packet(item.destination, item.payload))
    return b"".join(out)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    version = 1 if data[0] & 1 else 2
    stream = data[1:]
    whole, failed = read(version, [stream])
    cut, cut_failed = read(version, splits(data[-16:], stream, 12))
    check(cut == whole and cut_failed == failed, "items depend on how the bytes are cut")
    again, again_failed = read(version, [encode(whole)])
    check(again == whole and not again_failed, "items do not round-trip")


if __name__ == "__main__":
    _fuzzlib.main("uot", test_one_input, sys.argv)
