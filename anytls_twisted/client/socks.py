"""The server side of a local SOCKS5 (RFC 1928, 1929) or SOCKS4/4a connection, sans I/O. Pure.

The client's local proxy port speaks SOCKS and HTTP, told apart by the first byte
(:func:`sniff`; client-behaviour.md section 7). :class:`SocksServer` takes the bytes a local
application sends and returns events in the order they happen:

* :class:`Send`: bytes to write now (the method choice, the RFC 1929 status, an error reply).
* :class:`Authenticated`: the RFC 1929 user and password were accepted.
* :class:`ConnectRequest` / :class:`UdpAssociateRequest`: the request; answer it with
  :meth:`SocksServer.reply` once you know the outcome (or at once: the reference clients
  reply success before the stream exists).
* :class:`Data`: bytes past the request (a pipelined TLS ClientHello, say). Never lost: the
  bytes that came with the request follow it as a :class:`Data` event, as does anything fed
  later.
* :class:`Failed`: the handshake is over and failed; write the :class:`Send` events before it,
  then close. It comes at most once, and ``receive`` never raises.

Memory is bounded: the machine holds at most one incomplete handshake message, under
:data:`MAX_MESSAGE_SIZE` bytes, since every field is length-prefixed or (SOCKS4's NUL-ended
ones) cut off at 255 bytes.

The UDP ASSOCIATE datagram header (:func:`parse_udp_datagram`, :func:`encode_udp_datagram`)
and the SYNACK error to reply code mapping (:func:`reply_code_for_error`) are here too.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Callable, Dict, List, Literal, NamedTuple, Optional, Union

from ..protocol.address import (
    SOCKS_DOMAIN,
    SOCKS_IPV4,
    SOCKS_IPV6,
    AddressError,
    Destination,
    encode_socks_address,
    parse_socks_address,
)

__all__ = [
    "MAX_MESSAGE_SIZE",
    "Authenticated",
    "ConnectRequest",
    "Data",
    "Event",
    "Failed",
    "Reply",
    "Send",
    "SocksError",
    "SocksServer",
    "State",
    "UdpAssociateRequest",
    "UdpDatagram",
    "encode_reply",
    "encode_socks4_reply",
    "encode_udp_datagram",
    "parse_udp_datagram",
    "reply_code_for_error",
    "sniff",
]

SOCKS4, SOCKS5 = 4, 5
AUTH_VERSION = 1  # RFC 1929's sub-negotiation version
METHOD_NONE, METHOD_PASSWORD, METHOD_UNACCEPTABLE = 0x00, 0x02, 0xFF
CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE = 1, 2, 3
SOCKS4_GRANTED, SOCKS4_REJECTED = 0x5A, 0x5B
#: Longest NUL-terminated SOCKS4 field (user id, 4a host name) we wait for, NUL excluded.
MAX_SOCKS4_FIELD = 255

_GREETING_MAX = 2 + 255  # VER NMETHODS METHODS
_AUTH_MAX = 1 + 1 + 255 + 1 + 255  # VER ULEN UNAME PLEN PASSWD
_REQUEST_MAX = 3 + 1 + 1 + 255 + 2  # VER CMD RSV, ATYP, a 255-byte name, port
_SOCKS4_MAX = 8 + 2 * (MAX_SOCKS4_FIELD + 1)  # header, user id and 4a host, each with NUL
#: The most bytes a :class:`SocksServer` holds between two ``receive`` calls.
MAX_MESSAGE_SIZE = max(_GREETING_MAX, _AUTH_MAX, _REQUEST_MAX, _SOCKS4_MAX)

#: The bound address of a failure reply (RFC 1928 leaves it meaningless).
UNSPECIFIED = Destination("0.0.0.0", 0)


class Reply(enum.IntEnum):
    """RFC 1928 section 6 reply codes."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class State(enum.Enum):
    GREETING = "greeting"  # waiting for the method negotiation (or a SOCKS4 request)
    AUTH = "auth"  # waiting for the RFC 1929 user and password
    REQUEST = "request"  # waiting for the SOCKS5 request
    PENDING = "pending"  # a request event went out; the shell must call reply()
    OPEN = "open"  # success replied: every byte is Data
    CLOSED = "closed"  # failed, or a failure replied: nothing more


class SocksError(ValueError):
    """Bytes that are not a valid SOCKS5 UDP datagram header."""


# Events.
class Send(NamedTuple):
    """Write ``data`` to the local client now."""

    data: bytes


class Authenticated(NamedTuple):
    """RFC 1929: ``user`` gave a password the ``users`` check accepted."""

    user: str


class ConnectRequest(NamedTuple):
    """CONNECT to ``destination``; ``version`` is 5, or 4 for SOCKS4/4a (reply the same way)."""

    destination: Destination
    version: int


class UdpAssociateRequest(NamedTuple):
    """UDP ASSOCIATE; ``destination`` is where the client says it will send from (often
    ``0.0.0.0:0``). Reply with the relay's UDP address as the bound address."""

    destination: Destination


class Data(NamedTuple):
    """Bytes the client sent after its request, in order."""

    data: bytes


class Failed(NamedTuple):
    """The handshake failed (``reason`` is for the log): write what was sent, then close."""

    reason: str


Event = Union[Send, Authenticated, ConnectRequest, UdpAssociateRequest, Data, Failed]

#: What a SOCKS message parser step returns: bytes consumed, or 0 for "need more bytes".
_NEED_MORE = 0


class SocksServer:
    """One local connection's SOCKS handshake, from the first byte to the reply.

    @param users: checks an RFC 1929 ``(user, password)``; with it, method 0x02 is required
        (and SOCKS4, which has no password, is refused); without it, method 0x00 is.
        Names and passwords are decoded as UTF-8, undecodable bytes kept as surrogates.
    @ivar state: where the handshake is (:class:`State`).
    @ivar version: 5 or 4 once the first byte has been read, else ``None``.
    @ivar user: the authenticated user name, if any.
    """

    def __init__(self, users: Optional[Callable[[str, str], bool]] = None) -> None:
        self._users = users
        self._buffer = bytearray()
        self.state = State.GREETING
        self.version: Optional[int] = None
        self.user: Optional[str] = None

    @property
    def buffered(self) -> int:
        """Bytes held as an incomplete handshake message (at most :data:`MAX_MESSAGE_SIZE`)."""
        return len(self._buffer)

    def receive(self, data: bytes) -> List[Event]:
        """Take the client's bytes; return what happened, in order. Never raises."""
        state = self.state
        if state is State.CLOSED or not data:
            return []
        if state is State.PENDING or state is State.OPEN:
            return [Data(bytes(data))]
        self._buffer += data
        events: List[Event] = []
        while self.state in _HANDSHAKE and self._buffer:
            consumed = _STEPS[self.state](self, events)
            if consumed == _NEED_MORE:
                break
            del self._buffer[:consumed]
        if self.state is State.CLOSED:
            self._buffer.clear()
        elif self.state is State.PENDING and self._buffer:
            events.append(Data(bytes(self._buffer)))
            self._buffer.clear()
        return events

    def reply(self, code: int, bound: Destination = UNSPECIFIED) -> bytes:
        """The reply to the pending request, in its version's format; write it to the client.

        ``code`` is a :class:`Reply`; ``bound`` the address the proxy uses (for UDP
        ASSOCIATE, the relay's UDP address: the client sends there). Success opens the
        connection (later bytes come as :class:`Data`); any other code ends it: close after
        writing. SOCKS4 turns the code into granted (0x5A) or rejected (0x5B).
        """
        if self.state is not State.PENDING:
            raise RuntimeError(f"no request to reply to (state {self.state.value})")
        self.state = State.OPEN if code == Reply.SUCCEEDED else State.CLOSED
        if self.version == SOCKS4:
            return encode_socks4_reply(code == Reply.SUCCEEDED, bound)
        return encode_reply(code, bound)

    # Steps: each parses the message its state expects at the start of the buffer, appends
    # events, and returns the bytes consumed, or _NEED_MORE.

    def _fail(self, events: List[Event], reason: str, reply: Optional[bytes] = None) -> int:
        if reply is not None:
            events.append(Send(reply))
        events.append(Failed(reason))
        self.state = State.CLOSED
        return len(self._buffer)

    def _greeting(self, events: List[Event]) -> int:
        buf = self._buffer
        version = buf[0]
        if version == SOCKS4:
            self.version = SOCKS4
            return self._socks4(events)
        if version != SOCKS5:
            return self._fail(events, f"not a SOCKS4 or SOCKS5 client (first byte {version})")
        self.version = SOCKS5
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return _NEED_MORE
        end = 2 + buf[1]
        methods = buf[2:end]
        wanted = METHOD_NONE if self._users is None else METHOD_PASSWORD
        if wanted not in methods:
            offered = ",".join(f"{m:#04x}" for m in methods) or "none"
            return self._fail(
                events,
                f"no acceptable authentication method (offered {offered}, need {wanted:#04x})",
                bytes([SOCKS5, METHOD_UNACCEPTABLE]),
            )
        events.append(Send(bytes([SOCKS5, wanted])))
        self.state = State.AUTH if wanted == METHOD_PASSWORD else State.REQUEST
        return end

    def _auth(self, events: List[Event]) -> int:
        buf = self._buffer
        if len(buf) < 2:
            return _NEED_MORE
        if buf[0] != AUTH_VERSION:
            return self._fail(
                events,
                f"bad username/password version {buf[0]}",
                bytes([AUTH_VERSION, 1]),
            )
        plen_at = 2 + buf[1]
        if len(buf) < plen_at + 1 or len(buf) < plen_at + 1 + buf[plen_at]:
            return _NEED_MORE
        end = plen_at + 1 + buf[plen_at]
        user = bytes(buf[2:plen_at]).decode("utf-8", "surrogateescape")
        password = bytes(buf[plen_at + 1 : end]).decode("utf-8", "surrogateescape")
        assert self._users is not None  # AUTH is entered only with users configured
        if not self._users(user, password):
            return self._fail(events, f"bad password for user {user!r}", bytes([AUTH_VERSION, 1]))
        events.append(Send(bytes([AUTH_VERSION, 0])))
        events.append(Authenticated(user))
        self.user = user
        self.state = State.REQUEST
        return end

    def _request(self, events: List[Event]) -> int:
        buf = self._buffer
        if buf[0] != SOCKS5:
            return self._fail(events, f"bad request version {buf[0]}")
        if len(buf) < 2:
            return _NEED_MORE
        cmd = buf[1]
        if cmd not in (CMD_CONNECT, CMD_UDP_ASSOCIATE):
            name = "BIND" if cmd == CMD_BIND else f"command {cmd}"
            return self._fail(
                events, f"{name} is not supported", encode_reply(Reply.COMMAND_NOT_SUPPORTED)
            )
        if len(buf) < 4:
            return _NEED_MORE
        atyp = buf[3]
        if atyp not in (SOCKS_IPV4, SOCKS_DOMAIN, SOCKS_IPV6):
            return self._fail(
                events,
                f"address type {atyp} is not supported",
                encode_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED),
            )
        try:
            parsed = parse_socks_address(buf, 3)
        except AddressError as e:
            return self._fail(events, f"bad address: {e}", encode_reply(Reply.GENERAL_FAILURE))
        if parsed is None:
            return _NEED_MORE
        destination, end = parsed
        if cmd == CMD_CONNECT:
            events.append(ConnectRequest(destination, SOCKS5))
        else:
            events.append(UdpAssociateRequest(destination))
        self.state = State.PENDING
        return end

    def _socks4(self, events: List[Event]) -> int:
        """SOCKS4: VN CD DSTPORT DSTIP USERID NUL; 4a (DSTIP 0.0.0.x, x != 0): HOST NUL."""
        buf = self._buffer
        rejected = encode_socks4_reply(False)
        if len(buf) < 2:
            return _NEED_MORE
        if buf[1] != CMD_CONNECT:
            name = "BIND" if buf[1] == CMD_BIND else f"command {buf[1]}"
            return self._fail(events, f"SOCKS4 {name} is not supported", rejected)
        if self._users is not None:
            return self._fail(events, "SOCKS4 has no password, and one is required", rejected)
        if len(buf) < 8:
            return _NEED_MORE
        user_end = _find_nul(buf, 8)
        if user_end is None:
            return self._too_long(events, len(buf) - 8, "user id", rejected)
        port, ip = buf[2:4], buf[4:8]
        if ip[:3] != b"\0\0\0" or ip[3] == 0:
            destination = Destination(str(ipaddress.IPv4Address(bytes(ip))), _u16(port))
            events.append(ConnectRequest(destination, SOCKS4))
            self.state = State.PENDING
            return user_end + 1
        host_end = _find_nul(buf, user_end + 1)
        if host_end is None:
            return self._too_long(events, len(buf) - user_end - 1, "4a host name", rejected)
        host = bytes(buf[user_end + 1 : host_end])
        try:  # as a SOCKS5 domain address, to share its checks (and IP literal handling)
            parsed = parse_socks_address(bytes([SOCKS_DOMAIN, len(host)]) + host + port)
        except AddressError as e:
            return self._fail(events, f"bad SOCKS4a host name: {e}", rejected)
        assert parsed is not None  # the whole address is there
        events.append(ConnectRequest(parsed[0], SOCKS4))
        self.state = State.PENDING
        return host_end + 1

    def _too_long(self, events: List[Event], have: int, field: str, reply: bytes) -> int:
        if have <= MAX_SOCKS4_FIELD:
            return _NEED_MORE
        return self._fail(events, f"SOCKS4 {field} longer than {MAX_SOCKS4_FIELD} bytes", reply)


_HANDSHAKE = frozenset({State.GREETING, State.AUTH, State.REQUEST})
_STEPS: Dict[State, Callable[[SocksServer, List[Event]], int]] = {
    State.GREETING: SocksServer._greeting,
    State.AUTH: SocksServer._auth,
    State.REQUEST: SocksServer._request,
}


def _u16(raw: Union[bytes, bytearray]) -> int:
    return int.from_bytes(raw, "big")


def _find_nul(buf: bytearray, start: int) -> Optional[int]:
    """The index of the NUL ending a SOCKS4 field at ``start``, if it is within the limit."""
    end = buf.find(0, start, start + MAX_SOCKS4_FIELD + 1)
    return None if end < 0 else end


def encode_reply(code: int, bound: Destination = UNSPECIFIED) -> bytes:
    """A SOCKS5 reply: VER REP RSV, then ``bound`` as ATYP, address and port."""
    return bytes([SOCKS5, code, 0]) + encode_socks_address(bound)


def encode_socks4_reply(granted: bool, bound: Destination = UNSPECIFIED) -> bytes:
    """A SOCKS4 reply: VN 0, 0x5A or 0x5B, port and IPv4 address (zeros unless ``bound`` is
    IPv4: clients ignore them for CONNECT)."""
    ip = bound.ip
    packed = ip.packed if ip is not None and ip.version == 4 else bytes(4)
    port = bound.port if ip is not None and ip.version == 4 else 0
    code = SOCKS4_GRANTED if granted else SOCKS4_REJECTED
    return bytes([0, code]) + struct.pack(">H", port) + packed


# SYNACK error text -> reply code. The server's texts follow Go's net package (our
# server/dialer.py, anytls-go, sing-box); first match wins, case-insensitively, so
# "connection refused" is tested before the policy's "refused by server policy".
_ERROR_CODES = [
    ("connection refused", Reply.CONNECTION_REFUSED),  # ECONNREFUSED: the port is closed
    # Our server's DestinationPolicy, and permission errors from the origin's firewall.
    ("refused by server policy", Reply.NOT_ALLOWED),
    ("not a public address", Reply.NOT_ALLOWED),
    ("not allowed", Reply.NOT_ALLOWED),
    ("permission denied", Reply.NOT_ALLOWED),
    ("network is unreachable", Reply.NETWORK_UNREACHABLE),  # ENETUNREACH
    ("no route to host", Reply.HOST_UNREACHABLE),  # EHOSTUNREACH
    ("host is unreachable", Reply.HOST_UNREACHABLE),
    ("no such host", Reply.HOST_UNREACHABLE),  # the name did not resolve: no host to reach
    ("server misbehaving", Reply.HOST_UNREACHABLE),  # Go: the DNS server failed
    # A connect that timed out: the host did not answer. "TTL expired" (6) means an ICMP
    # time-exceeded, which a proxy cannot see; curl and browsers show 4 as "host unreachable".
    ("i/o timeout", Reply.HOST_UNREACHABLE),
    ("timed out", Reply.HOST_UNREACHABLE),
    ("deadline exceeded", Reply.HOST_UNREACHABLE),
]


def reply_code_for_error(text: str) -> Reply:
    """The SOCKS5 reply for an AnyTLS SYNACK error text (empty: success).

    * "connection refused" -> 5 connection refused
    * "... not a public address (refused by server policy)", "not allowed",
      "permission denied" -> 2 not allowed by ruleset
    * "network is unreachable" -> 3 network unreachable
    * "no route to host", "host is unreachable", "lookup x: no such host",
      "server misbehaving" (DNS failure), "i/o timeout", "timed out" -> 4 host unreachable
    * anything else -> 1 general failure
    """
    if not text:
        return Reply.SUCCEEDED
    lowered = text.lower()
    for needle, code in _ERROR_CODES:
        if needle in lowered:
            return code
    return Reply.GENERAL_FAILURE


class UdpDatagram(NamedTuple):
    """A SOCKS5 UDP datagram: ``frag`` (non-zero: a fragment, which the caller drops and
    counts: we do not reassemble), where it goes (or, from the relay, comes from), the data."""

    frag: int
    destination: Destination
    payload: bytes


def parse_udp_datagram(data: bytes) -> UdpDatagram:
    """Parse RSV(2) FRAG(1) ATYP address port, then the payload. RSV is not checked (RFC 1928
    says zero; being lenient costs nothing). Raises :class:`SocksError` on bad or short bytes."""
    if len(data) < 4:
        raise SocksError(f"UDP datagram too short ({len(data)} bytes)")
    try:
        parsed = parse_socks_address(data, 3)
    except AddressError as e:
        raise SocksError(f"UDP datagram has a bad address: {e}") from None
    if parsed is None:
        raise SocksError("UDP datagram ends inside its address")
    destination, end = parsed
    return UdpDatagram(data[2], destination, bytes(data[end:]))


def encode_udp_datagram(source: Destination, payload: bytes, frag: int = 0) -> bytes:
    """The header and payload of a datagram the relay sends: RSV 0, FRAG, ``source``."""
    return bytes([0, 0, frag]) + encode_socks_address(source) + payload


Dialect = Literal["socks5", "socks4", "http"]


def sniff(first_byte: int) -> Optional[Dialect]:
    """What a mixed port's client speaks, from its first byte: 5 or 4 for SOCKS, an
    uppercase ASCII letter for HTTP (every method starts with one), else ``None``."""
    if first_byte == SOCKS5:
        return "socks5"
    if first_byte == SOCKS4:
        return "socks4"
    if 0x41 <= first_byte <= 0x5A:
        return "http"
    return None
