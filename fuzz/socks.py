"""Fuzz the client's local SOCKS4/4a/5 server machine (anytls_twisted/client/socks.py).

The first input byte picks the set-up (bit 0: RFC 1929 password required, for user ``u``
with password ``p``; bit 1: parse the rest as a SOCKS5 UDP datagram instead); the rest is what
a local application sends.

Contract:

* ``SocksServer.receive`` never raises and returns only the documented events; ``Failed``
  comes at most once, last, and closes the machine; nothing comes after it.
* Bounded: between calls it holds at most ``MAX_MESSAGE_SIZE`` bytes.
* Nothing is lost: the ``Data`` events are exactly the bytes after the request.
* Split invariance: the events (``Data`` joined) do not depend on the cuts.
* A request leaves the machine waiting for ``reply()``, whose reply is a well-formed SOCKS4 or
  SOCKS5 reply.
* UDP datagrams: :func:`parse_udp_datagram` returns one or raises :class:`SocksError`;
  encoding what it returns parses back the same.
"""

from __future__ import annotations

import sys

import _fuzzlib
from _fuzzlib import check, splits

with _fuzzlib.instrumented():
    from anytls_twisted.client import socks

REQUESTS = (socks.ConnectRequest, socks.UdpAssociateRequest)
EVENTS = (socks.Send, socks.Authenticated, socks.Data, socks.Failed) + REQUESTS


def users(user: str, password: str) -> bool:
    return (user, password) == ("u", "p")


def run(chunks: list, with_users: bool) -> tuple:
    server = socks.SocksServer(users if with_users else None)
    events: list = []
    fed = b""
    for chunk in chunks:
        closed = server.state is socks.State.CLOSED
        new = server.receive(chunk)
        check(not (closed and new), "events after the machine closed")
        fed += chunk
        for event in new:
            check(isinstance(event, EVENTS), f"unexpected event {event!r}")
            check(not events or not isinstance(events[-1], socks.Failed), "event after Failed")
            if isinstance(event, REQUESTS):
                check(not any(isinstance(e, REQUESTS) for e in events), "two requests")
            if isinstance(event, socks.Data) and events and isinstance(events[-1], socks.Data):
                events[-1] = socks.Data(events[-1].data + event.data)
            else:
                events.append(event)
        check(server.buffered <= socks.MAX_MESSAGE_SIZE, f"holds {server.buffered} bytes")
        if any(isinstance(e, socks.Failed) for e in new):
            check(server.state is socks.State.CLOSED and server.buffered == 0, "Failed, open")
    data = b"".join(e.data for e in events if isinstance(e, socks.Data))
    requests = [e for e in events if isinstance(e, REQUESTS)]
    if requests:
        check(server.state is socks.State.PENDING, "a request, not pending")
        check(fed.endswith(data), "Data is not the bytes after the request")
        check(
            all(isinstance(e, socks.Data) for e in events[events.index(requests[0]) + 1 :]),
            "events after the request other than Data",
        )
    else:
        check(not data, "Data before a request")
    return events, server


def reply(server: socks.SocksServer, code: int) -> None:
    out = server.reply(code)
    if server.version == 4:
        check(len(out) == 8 and out[0] == 0 and out[1] in (0x5A, 0x5B), "SOCKS4 reply")
    else:
        check(out[:3] == bytes([5, code, 0]), "SOCKS5 reply")
    check(server.state is (socks.State.OPEN if code == 0 else socks.State.CLOSED), "reply")


def datagram(data: bytes) -> None:
    try:
        parsed = socks.parse_udp_datagram(data)
    except socks.SocksError as e:
        _fuzzlib.one_line(e)
        return
    again = socks.encode_udp_datagram(parsed.destination, parsed.payload, parsed.frag)
    check(socks.parse_udp_datagram(again) == parsed, "datagram round trip")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 2:
        datagram(data[1:])
        return
    with_users = bool(data[0] & 1)
    stream = data[1:]
    whole, server = run([stream], with_users)
    cut, _ = run(splits(data[-16:], stream, 12), with_users)
    check(cut == whole, "events depend on how the bytes are cut")
    if server.state is socks.State.PENDING:
        reply(server, data[0] >> 4 & 1)


if __name__ == "__main__":
    _fuzzlib.main("socks", test_one_input, sys.argv)
