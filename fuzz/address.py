"""Fuzz the address parsers (anytls_twisted/protocol/address.py).

Contract, for both wire encodings (SOCKS-style and UoT AddrParser-style):

* The parser returns ``None`` (more bytes needed), ``(destination, end)``, or raises
  :class:`AddressError`; nothing else. ``bytes`` and ``bytearray`` give the same answer.
* Bounded: an address is at most 259 bytes; ``end`` lies within the input.
* Prefixes: every strict prefix of a parsed address gives ``None``; the address alone parses the
  same.
* Round trip: encoding the destination and parsing it again gives the same destination (but
  for a scoped IPv6 literal's ``%scope``, which the packed encoding drops).

And for ``HOST:PORT`` text (:func:`parse_host_port`, CONNECT targets and URIs): only
:class:`AddressError`; a port from 1 to 65535 (or the default); ``str(destination)`` parses
back to the same destination.
"""

from __future__ import annotations

import sys

import _fuzzlib
import atheris
import attr
from _fuzzlib import check

with _fuzzlib.instrumented():
    from anytls_twisted.protocol.address import (
        MAX_ADDRESS_SIZE,
        AddressError,
        encode_socks_address,
        encode_uot_address,
        parse_host_port,
        parse_ip,
        parse_socks_address,
        parse_uot_address,
    )

PARSERS = [
    (parse_socks_address, encode_socks_address),
    (parse_uot_address, encode_uot_address),
]


def attempt(parse, data, offset):  # type: ignore[no-untyped-def]
    try:
        return parse(data, offset)
    except AddressError:
        return AddressError


def binary(data: bytes) -> None:
    offset = data[0] % 4 if data else 0
    for parse, encode in PARSERS:
        result = attempt(parse, data, offset)
        check(attempt(parse, bytearray(data), offset) == result, "bytearray differs")
        if result is None or result is AddressError:
            continue
        destination, end = result
        check(offset < end <= len(data) and end - offset <= MAX_ADDRESS_SIZE, f"end {end}")
        check(0 <= destination.port <= 0xFFFF and destination.host, "bad destination")
        for stop in range(offset, end):
            check(attempt(parse, data[:stop], offset) is None, f"prefix {stop} is not None")
        check(attempt(parse, data[:end], offset) == result, "the address alone differs")
        encoded = encode(destination)
        again = parse(encoded, 0)
        ip = destination.ip
        if ip is not None and ip.version == 6 and ip.scope_id:  # sent as a name: the scope names
            # an interface of the sender, meaningless to the peer, and the packed form drops it
            destination = attr.evolve(destination, host=destination.host.partition("%")[0])
        check(again == (destination, len(encoded)), f"{destination} round trip")


def text(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    default = fdp.PickValueInList([None, 80, 443])
    value = fdp.ConsumeUnicode(fdp.remaining_bytes())
    parse_ip(value)
    try:
        destination = parse_host_port(value, default)
    except AddressError:
        return
    check(1 <= destination.port <= 0xFFFF or destination.port == default, "bad port")
    check(parse_host_port(str(destination)) == destination, f"{destination} round trip")


def test_one_input(data: bytes) -> None:
    if data and data[0] & 0x80:
        text(data[1:])
    else:
        binary(data)


if __name__ == "__main__":
    _fuzzlib.main("address", test_one_input, sys.argv)
