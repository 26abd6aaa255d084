"""Fuzz the client's HTTP proxy parsers (anytls_twisted/client/httpproxy.py).

The first input byte picks the parser (bit 0: :class:`ResponseCloser`, else
:class:`RequestParser`; bit 1: proxy authentication for user ``u``, password ``p``) and, in its
high bits, the head limit (small limits reach the 431 paths).

Contract, :class:`RequestParser`:

* ``feed`` returns ``None`` until the head is complete, then a :class:`Connect`,
  :class:`Forward` or :class:`Refusal`; it never raises before that, and raises
  ``RuntimeError`` after.
* Bounded: after a ``None`` it holds less than ``max_head`` bytes.
* Split invariance: the result does not depend on the cuts.
* Results are well formed: ``rest`` is the input's tail; a Forward's head is one request line,
  ``Host`` first and ``Connection`` last (once each), with CRLF line ends and no control
  characters; a Refusal's response is bytes.

Contract, :class:`ResponseCloser`:

* ``feed``/``end`` never raise; after a ``feed`` it holds less than ``max_head`` bytes.
* Split invariance: the output does not depend on the cuts.
* A head it rewrites ends ``Connection: close`` (else the output is the input unchanged).
* Idempotent: its output, fed to a fresh closer, comes out unchanged (the rewritten head says
  ``Connection: close`` to the client that reads it, whatever the origin's line ends were).
"""

from __future__ import annotations

import re
import sys

import _fuzzlib
import attr
from _fuzzlib import check, splits

with _fuzzlib.instrumented():
    from anytls_twisted.client import httpproxy

CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def users(user: str, password: str) -> bool:
    return (user, password) == ("u", "p")


def request(chunks: list, with_users: bool, max_head: int) -> object:
    parser = httpproxy.RequestParser(users if with_users else None, max_head, max_headers=8)
    result = None
    for index, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if result is not None:
            # What comes after the head's read is the shell's to pass on: count it as rest.
            later = b"".join(chunks[index + 1 :])
            if later and isinstance(result, (httpproxy.Connect, httpproxy.Forward)):
                result = attr.evolve(result, rest=result.rest + later)
            break
        check(len(parser._buffer) < max_head, f"holds {len(parser._buffer)} bytes")
    if result is not None:
        try:
            parser.feed(b"x")
        except RuntimeError:
            pass
        else:
            raise _fuzzlib.Violation("feed after the result did not raise")
    return result


def check_request(result: object, stream: bytes, with_users: bool) -> None:
    if isinstance(result, httpproxy.Refusal):
        check(isinstance(result.response(), bytes), "response")
        return
    assert isinstance(result, (httpproxy.Connect, httpproxy.Forward))
    check(stream.endswith(result.rest), "rest is not the input's tail")
    check(1 <= result.destination.port <= 0xFFFF, "port")
    check((result.user == "u") if with_users else result.user is None, "user")
    if isinstance(result, httpproxy.Forward):
        head = result.head
        check(head.endswith(b"\r\n\r\n"), "head end")
        lines = head[:-4].split(b"\r\n")
        check(not any(CONTROL.search(line.replace(b"\t", b" ")) for line in lines), "control")
        check(lines[1].startswith(b"Host: ") and lines[-1].startswith(b"Connection: "), "order")
        method, path, version = lines[0].split(b" ")  # origin-form: METHOD /path VERSION
        check(path.startswith(b"/") and version in (b"HTTP/1.0", b"HTTP/1.1"), "request line")
        names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
        check(all(b": " in line for line in lines[1:]), "a header line without a colon")
        check(names.count(b"host") == 1 and names.count(b"connection") == 1, "Host/Connection")


def close(chunks: list, max_head: int) -> tuple:
    closer = httpproxy.ResponseCloser(max_head)
    out = b""
    for chunk in chunks:
        out += closer.feed(chunk)
        check(closer.done or len(closer._buffer) < max_head, "holds too much")
    return out + closer.end(), closer


def test_one_input(data: bytes) -> None:
    if not data:
        return
    with_users = bool(data[0] & 2)
    max_head = (64, 256, 1024, 65536)[data[0] >> 2 & 3]
    stream = data[1:]
    if data[0] & 1:
        whole, _ = close([stream], max_head)
        cut, _ = close(splits(data[-16:], stream, 12), max_head)
        check(cut == whole, "output depends on how the bytes are cut")
        if whole != stream:
            check(b"Connection: close\r\n\r\n" in whole, "rewritten without Connection: close")
        again, _ = close([whole], max_head)
        check(again == whole, f"not idempotent: {whole!r} -> {again!r}")
        return
    whole = request([stream], with_users, max_head)
    cut = request(splits(data[-16:], stream, 12), with_users, max_head)
    check(cut == whole, "result depends on how the bytes are cut")
    if whole is not None:
        check_request(whole, stream, with_users)


if __name__ == "__main__":
    _fuzzlib.main("httpproxy", test_one_input, sys.argv)
