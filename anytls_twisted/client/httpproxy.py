"""The local proxy's HTTP side, sans I/O: parse a request head, build the proxy's responses.

The client's one local port serves SOCKS5 and HTTP (docs: client-behaviour.md section 7); this
module is the HTTP half's parser. Twisted's ``twisted.web.proxy`` has no CONNECT, so the
project keeps a small, bounded machine of its own that a protocol shell drives:

* ``CONNECT host:port HTTP/1.1`` (IPv6 in brackets) -> :class:`Connect`: the shell opens a
  stream to the destination, answers :func:`connection_established` (before the stream exists,
  as anytls-go and sing-box do) and then relays bytes both ways, starting with
  :attr:`Connect.rest`.
* An absolute-form request (``GET http://host[:port]/path?q HTTP/1.1``) -> :class:`Forward`:
  the shell opens a stream to the destination and writes :attr:`Forward.head` (the origin-form
  request line and the rewritten headers) followed by :attr:`Forward.rest`, then relays bytes
  both ways. ``https:`` URLs are refused: browsers use CONNECT for them.
* Anything else -> :class:`Refusal`: the shell writes :meth:`Refusal.response` and closes.

Persistent connections: one local connection carries one request, and that request one
upstream stream. :class:`Forward` adds ``Connection: close`` to the request (or keeps
``Connection: upgrade`` for a WebSocket), so the origin ends the response by closing; the shell
closes the local connection when the stream ends. The shell never parses a second request or
a body: bytes after the head (a body, or pipelined requests the origin will ignore after
``close``) go upstream untouched. The cost is one stream per request where a keep-alive proxy
could reuse one; AnyTLS opens streams cheaply inside an existing session, and it spares the
shell from framing bodies (chunked encoding, Content-Length) and from the request smuggling
that mistakes there allow. Browsers retry unanswered pipelined requests on a new connection.

The response says so too: :class:`ResponseCloser` rewrites the head of the final response
to carry ``Connection: close`` (interim ``1xx`` heads pass unchanged, and so does a ``101``
upgrade), so a client never sends its next request, perhaps for another host, down a
connection whose stream leads to this origin, even when the origin leaves the header out.

Bounds: the head may be at most ``max_head`` bytes and ``max_headers`` header lines; past
either the result is a 431 :class:`Refusal`, so a client cannot make the parser hold more.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Callable, List, Optional, Tuple, Union

import attr

from ..protocol.address import AddressError, Destination, parse_host_port

#: The realm in ``Proxy-Authenticate``.
REALM = "anytls-twisted"
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100

#: Headers meaningful for one connection only (RFC 9110 section 7.6.1), never forwarded.
#: Transfer-Encoding is hop-by-hop too, but the body passes through untouched, so it stays.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)

REASONS = {
    200: "Connection established",
    400: "Bad Request",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(r"HTTP/1\.[01]")
#: The blank line ending a head; bare LF line ends are tolerated (RFC 9112 section 2.2).
_END = re.compile(rb"\n\r?\n")
#: Kept even when ``Connection`` lists them: the body passes through untouched, so dropping
#: its framing would make the origin read it differently from the client.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: ``users(name, password) -> bool``: whether the pair may use the proxy.
Users = Callable[[str, str], bool]


@attr.frozen
class Connect:
    """A ``CONNECT`` request: tunnel to ``destination``.

    @ivar destination: Where to tunnel.
    @ivar user: The authenticated user name, or ``None`` without authentication.
    @ivar rest: Bytes received after the head (the tunnel's first bytes, e.g. a TLS hello).
    """

    destination: Destination
    user: Optional[str]
    rest: bytes


@attr.frozen
class Forward:
    """A plain (absolute-form) request to forward to ``destination``.

    @ivar destination: The origin server (port 80 unless the URL names one).
    @ivar head: The request head to send upstream: origin-form request line, headers without
        hop-by-hop ones, ``Host`` from the URL, ``Connection: close`` (or ``upgrade``), and
        the blank line.
    @ivar upgrade: Whether the request asks for a protocol upgrade (WebSocket).
    @ivar user: The authenticated user name, or ``None`` without authentication.
    @ivar rest: Bytes received after the head (body, pipelined data), untouched.
    """

    destination: Destination
    head: bytes
    upgrade: bool
    user: Optional[str]
    rest: bytes


@attr.frozen
class Refusal:
    """A request the proxy answers itself with an error and then closes.

    @ivar status: 400, 407 or 431.
    @ivar message: Why, one line for the response body and the log.
    """

    status: int
    message: str

    def response(self) -> bytes:
        """The bytes to send before closing the local connection."""
        if self.status == 407:
            return proxy_authentication_required()
        return error_response(self.status, self.message)


Result = Union[Connect, Forward, Refusal]


# --------------------------------------------------------------------------------------------
# Responses


def connection_established() -> bytes:
    """The answer to a ``CONNECT``, sent before the stream exists (as anytls-go does)."""
    return b"HTTP/1.1 200 Connection established\r\n\r\n"


def error_response(status: int, message: str, extra: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    """A complete ``status`` response with ``message`` as a one-line text body; the proxy
    closes afterwards, so it says ``Connection: close``."""
    body = (_CONTROL.sub(" ", message).strip() + "\n").encode("utf-8")
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    lines += [f"{name}: {value}" for name, value in extra]
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def proxy_authentication_required() -> bytes:
    """407 with the Basic challenge, so browsers ask for the proxy's user name and password."""
    return error_response(
        407,
        "proxy authentication required",
        (("Proxy-Authenticate", f'Basic realm="{REALM}"'),),
    )


def bad_request(message: str) -> bytes:
    """400, for a request the parser refused or the shell cannot serve."""
    return error_response(400, message)


def bad_gateway(message: str) -> bytes:
    """502: the stream could not be opened; ``message`` carries the server's SYNACK error
    text (or the session's failure), so the user sees why."""
    return error_response(502, message)


def gateway_timeout(message: str = "the server did not answer in time") -> bytes:
    """504: no SYNACK (or no session) in time."""
    return error_response(504, message)


# --------------------------------------------------------------------------------------------
# The parser


class RequestParser:
    """Incremental parser of one request head: :meth:`feed` until it returns a result.

    @ivar users: The credential check, or ``None`` for a proxy without authentication.
    @ivar max_head: The longest head accepted, in bytes, including the blank line.
    @ivar max_headers: The most header lines accepted.
    """

    def __init__(
        self,
        users: Optional[Users] = None,
        max_head: int = MAX_HEAD,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        self.users = users
        self.max_head = max_head
        self.max_headers = max_headers
        self._buffer = bytearray()
        self._start = 0
        self._scanned = 0
        self._done = False

    def feed(self, data: bytes) -> Optional[Result]:
        """Add received bytes; ``None`` while the head is incomplete, else the result. Never
        raises for any input; calling again after a result is a programming error."""
        if self._done:
            raise RuntimeError("RequestParser.feed called after the head was complete")
        buffer = self._buffer
        buffer += data
        # Empty lines before the request line are ignored (RFC 9112 section 2.2); where the
        # head starts is kept, so CR/LF bytes arriving one at a time cost no rescans.
        start = self._start
        while start < len(buffer) and buffer[start] in b"\r\n":
            start += 1
        self._start = start
        limit = min(len(buffer), self.max_head)
        match = _END.search(buffer, max(start, self._scanned - 2), limit)
        if match is None:
            self._scanned = limit
            if len(buffer) >= self.max_head:
                self._done = True
                self._buffer = bytearray()
                return Refusal(431, f"request head longer than {self.max_head} bytes")
            return None
        self._done = True
        head = bytes(buffer[start : match.start()])
        rest = bytes(buffer[match.end() :])
        self._buffer = bytearray()
        return self._parse(head, rest)

    def _parse(self, head: bytes, rest: bytes) -> Result:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
        if len(lines) - 1 > self.max_headers:
            return Refusal(431, f"more than {self.max_headers} header lines")
        text = [line.decode("latin-1") for line in lines]
        request_line = _request_line(text[0])
        if isinstance(request_line, Refusal):
            return request_line
        headers = _headers(text[1:])
        if isinstance(headers, Refusal):
            return headers
        user = None
        if self.users is not None:
            user = _authenticate(self.users, headers)
            if user is None:
                return Refusal(407, "proxy authentication required")
        method, target, version = request_line
        if method == "CONNECT":
            destination = _authority(target, None)
            if isinstance(destination, Refusal):
                return destination
            return Connect(destination, user, rest)
        return _forward(method, target, version, headers, user, rest)


Header = Tuple[str, str]


def _request_line(line: str) -> Union[Tuple[str, str, str], Refusal]:
    parts = line.split(" ")
    if len(parts) != 3 or _CONTROL.search(line) or "\t" in line:
        return Refusal(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or not target:
        return Refusal(400, "malformed request line")
    if not _VERSION.fullmatch(version):
        return Refusal(400, "only HTTP/1.0 and HTTP/1.1 are supported")
    return method, target, version


def _headers(lines: List[str]) -> Union[List[Header], Refusal]:
    headers: List[Header] = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            # Includes obsolete line folding (a line starting with whitespace): RFC 9112
            # section 5.2 lets a proxy refuse it.
            return Refusal(400, "malformed header line")
        value = value.strip(" \t")
        if _CONTROL.search(value):
            return Refusal(400, f"control character in header {name}")
        headers.append((name, value))
    return headers


def _authenticate(users: Users, headers: List[Header]) -> Optional[str]:
    """The user name if exactly one ``Proxy-Authorization: Basic`` header holds valid
    credentials, else ``None``."""
    values = [value for name, value in headers if name.lower() == "proxy-authorization"]
    if len(values) != 1:
        return None
    scheme, _, encoded = values[0].partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    name, colon, password = decoded.partition(":")
    if not colon or not users(name, password):
        return None
    return name


def _authority(text: str, default_port: Optional[int]) -> Union[Destination, Refusal]:
    try:
        return parse_host_port(text, default_port)
    except AddressError as e:
        return Refusal(400, str(e))


def _forward(
    method: str, target: str, version: str, headers: List[Header], user: Optional[str], rest: bytes
) -> Union[Forward, Refusal]:
    scheme, sep, after = target.partition("://")
    if not sep:
        return Refusal(400, "not a proxy request: the target must be an absolute http:// URL")
    if scheme.lower() == "https":
        return Refusal(400, "https:// URLs go through CONNECT (as browsers send them)")
    if scheme.lower() != "http":
        return Refusal(400, f"unsupported URL scheme {scheme!r}")
    cut = min(
        (i for i in (after.find("/"), after.find("?"), after.find("#")) if i >= 0),
        default=len(after),
    )
    authority, path = after[:cut], after[cut:].partition("#")[0]
    if "@" in authority:
        return Refusal(400, "user information in the URL is not supported")
    destination = _authority(authority, 80)
    if isinstance(destination, Refusal):
        return destination
    if not path.startswith("/"):
        path = "/" + path
    connection = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    upgrade = "upgrade" in connection and any(name.lower() == "upgrade" for name, _ in headers)
    kept = [
        (name, value)
        for name, value in headers
        if (name.lower() not in connection or name.lower() in _FRAMING)
        and name.lower() not in HOP_BY_HOP
        and name.lower() != "host"
    ]
    if upgrade:
        kept += [(name, value) for name, value in headers if name.lower() == "upgrade"]
    kept.insert(0, ("Host", authority))
    kept.append(("Connection", "upgrade" if upgrade else "close"))
    lines = [f"{method} {path} {version}"] + [f"{name}: {value}" for name, value in kept]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return Forward(destination, head, upgrade, user, rest)


# --------------------------------------------------------------------------------------------
# The response


#: A response's status line: the version and the three-digit code.
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: |$)")
#: Response headers about the connection, replaced by ``Connection: close``.
_CONNECTION_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection"})


class ResponseCloser:
    """Rewrites the origin's final response head to say ``Connection: close``, sans I/O.

    :meth:`feed` takes the bytes from the origin and returns the bytes for the client: nothing
    while a head is incomplete (at most ``max_head`` bytes are held), the rewritten head and
    what follows once it is complete, then everything unchanged. What is not a parseable
    response head (too long, not HTTP/1.x) passes unchanged: the client then sees what the
    origin sent. :meth:`end` returns what is held when the stream ends.
    """

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self.done = False
        self._buffer = bytearray()

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self._buffer += data
        out = bytearray()
        while not self.done:
            match = _END.search(self._buffer, 0, self.max_head)
            if match is None:
                if len(self._buffer) >= self.max_head:
                    out += self._give_up()
                break
            head = bytes(self._buffer[: match.start()])
            end = match.end()
            status = _STATUS.match(head)
            if status is None:
                out += self._give_up()
                break
            code = int(status.group(1))
            if 100 <= code < 200 and code != 101:  # interim: the final head follows
                out += self._buffer[:end]
                del self._buffer[:end]
                continue
            self.done = True
            rest = bytes(self._buffer[end:])
            self._buffer = bytearray()
            if code == 101:  # switching protocols: the connection is the tunnel now
                out += head + bytes(match.group(0)) + rest
            else:
                out += _closing_head(head) + rest
        return bytes(out)

    def end(self) -> bytes:
        """The bytes still held (a head cut short); nothing more will come."""
        return self._give_up() if not self.done else b""

    def _give_up(self) -> bytes:
        self.done = True
        held, self._buffer = bytes(self._buffer), bytearray()
        return held


def _line(line: bytes) -> bytes:
    """A head line without its line end: one CR, no more. A line of stray CRs is not empty (it
    did not end the head), so it must not become an empty line that ends the rewritten one."""
    return line[:-1] if line.endswith(b"\r") else line


def _closing_head(head: bytes) -> bytes:
    lines = head.split(b"\n")
    kept = [_line(lines[0])]
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name not in _CONNECTION_HEADERS:
            kept.append(_line(line))
    kept.append(b"Connection: close")
    return b"\r\n".join(kept) + b"\r\n\r\n"
