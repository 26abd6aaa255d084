"""Destination addresses: the two wire encodings and the policy on where we may connect.

* SOCKS style (ATYP 1 IPv4, 3 domain, 4 IPv6, then port): stream destinations and the UoT v2
  request header (anytls-protocol.md sections 7.2, 10.1).
* UoT AddrParser style (family 0 IPv4, 1 IPv6, 2 domain, then port): per-packet addresses.

Parsers are incremental: they return ``None`` while more bytes are needed, and raise
:class:`AddressError` on bytes that can never form an address. Pure functions, no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import struct
from typing import (
    Callable,
    List,
    Optional,
    ParamSpec,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    cast,
)

import attr

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: What the parsers read: a frame's bytes, or the UDP-over-TCP stream's receive buffer.
Buffer = Union[bytes, bytearray]

#: The longest SOCKS address: ATYP + length + 255 name bytes + port.
MAX_ADDRESS_SIZE = 1 + 1 + 255 + 2

SOCKS_IPV4, SOCKS_DOMAIN, SOCKS_IPV6 = 1, 3, 4
UOT_IPV4, UOT_IPV6, UOT_DOMAIN = 0, 1, 2


class AddressError(ValueError):
    """Bytes that cannot be an address (unknown type, empty or non-ASCII name)."""


@attr.frozen
class Destination:
    """A host (IP literal text or domain name) and port, as the client asked for it.

    @ivar host: An IP address in its canonical text (IPv4-mapped IPv6 unwrapped, no brackets),
        or a domain name as the client sent it.
    @ivar port: The port, 0 to 65535.
    """

    host: str
    port: int

    @property
    def ip(self) -> Optional[IPAddress]:
        """The host as an IP address if it is a literal, else ``None``."""
        return parse_ip(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: Entries kept by each memoised helper below. A UDP-over-TCP stream parses the same few
#: addresses for every datagram, and ``ipaddress`` is slow at it (docs/performance.md); the
#: results are immutable, and the bound keeps a client sending many addresses from growing them.
CACHE_SIZE = 1024

_P = ParamSpec("_P")
_R = TypeVar("_R", covariant=True)


class _Memoised(Protocol[_P, _R]):
    """A function memoised by :func:`_memoise`: its own signature, and the cache's statistics."""

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R: ...

    def cache_info(self) -> functools._CacheInfo: ...


def _memoise(function: Callable[_P, _R]) -> _Memoised[_P, _R]:
    """``functools.lru_cache(maxsize=CACHE_SIZE)``, typed so that mypy still checks the
    arguments of calls (``lru_cache``'s own type accepts any hashable ones)."""
    return cast("_Memoised[_P, _R]", functools.lru_cache(maxsize=CACHE_SIZE)(function))


@_memoise
def parse_ip(text: str) -> Optional[IPAddress]:
    """Parse an IP literal (brackets allowed around IPv6); unwrap IPv4-mapped IPv6."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _decode_name(raw: bytes) -> str:
    if not raw:
        raise AddressError("empty domain name")
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise AddressError("domain name is not ASCII") from None
    if any(ord(c) < 0x21 or c in "/\\" for c in name):
        raise AddressError("domain name has invalid characters")
    return name


def _parse(
    data: Buffer, offset: int, ipv4: int, ipv6: int, domain: int
) -> Optional[Tuple[Destination, int]]:
    if len(data) - offset < 1:
        return None
    kind = data[offset]
    pos = offset + 1
    if kind == ipv4:
        size = 4
    elif kind == ipv6:
        size = 16
    elif kind == domain:
        if len(data) - pos < 1:
            return None
        size = data[pos]
        pos += 1
    else:
        raise AddressError(f"unknown address type {kind}")
    if len(data) - pos < size + 2:
        return None
    raw = data[pos : pos + size]
    (port,) = struct.unpack_from(">H", data, pos + size)
    if kind == domain:
        name = _decode_name(bytes(raw))
        ip = parse_ip(name)
        host = str(ip) if ip is not None else name
    else:
        host = _ip_text(bytes(raw))
    return Destination(host, port), pos + size + 2


@_memoise
def _ip_text(packed: bytes) -> str:
    """The text of a packed IPv4 or IPv6 address, IPv4-mapped IPv6 unwrapped."""
    return str(parse_ip(str(ipaddress.ip_address(packed))))


def parse_socks_address(data: Buffer, offset: int = 0) -> Optional[Tuple[Destination, int]]:
    """Parse a SOCKS-style address at ``offset``: ``(destination, end offset)`` or ``None``."""
    return _parse(data, offset, SOCKS_IPV4, SOCKS_IPV6, SOCKS_DOMAIN)


def parse_uot_address(data: Buffer, offset: int = 0) -> Optional[Tuple[Destination, int]]:
    """Parse a UoT AddrParser address at ``offset``: ``(destination, end offset)`` or ``None``."""
    return _parse(data, offset, UOT_IPV4, UOT_IPV6, UOT_DOMAIN)


def _encode(dest: Destination, ipv4: int, ipv6: int, domain: int) -> bytes:
    ip = dest.ip
    port = struct.pack(">H", dest.port)
    if ip is None:
        name = dest.host.encode("ascii")
        if not 0 < len(name) <= 255:
            raise AddressError("domain name must be 1 to 255 bytes")
        return bytes([domain, len(name)]) + name + port
    if ip.version == 4:
        return bytes([ipv4]) + ip.packed + port
    return bytes([ipv6]) + ip.packed + port


def encode_socks_address(dest: Destination) -> bytes:
    return _encode(dest, SOCKS_IPV4, SOCKS_IPV6, SOCKS_DOMAIN)


def encode_uot_address(dest: Destination) -> bytes:
    return _encode(dest, UOT_IPV4, UOT_IPV6, UOT_DOMAIN)


@_memoise
def is_public(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses, the only ones reachable by default.

    Loopback, private, link-local, unspecified, multicast, reserved, shared (CGNAT) and
    documentation ranges are refused: a proxy that reaches its own host's or network's
    services is a hole. IPv4-mapped and NAT64-embedded forms are judged by the IPv4 inside.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_public(ipaddress.IPv4Address(ip.packed[-4:]))
        if ip.sixtofour is not None or ip.teredo is not None:
            return False
    return ip.is_global and not ip.is_multicast


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@attr.frozen
class DestinationPolicy:
    """Which resolved addresses the server may reach.

    @ivar allow_private: Whether every address may be reached, loopback and private ranges
        included (``--allow-private``); otherwise only those :func:`is_public` accepts.
    """

    allow_private: bool = False

    def permits(self, ip: IPAddress) -> bool:
        return self.allow_private or is_public(ip)

    def permitted(self, addresses: Sequence[IPAddress]) -> List[IPAddress]:
        """The addresses we may reach, IPv4 first (origins answer on IPv4 more reliably);
        TCP dials and UDP-over-TCP sends both choose through this."""
        return sorted((ip for ip in addresses if self.permits(ip)), key=lambda ip: ip.version)

    @staticmethod
    def refusal(ip: IPAddress) -> str:
        """Why ``ip`` was refused, in the words both TCP and UDP use."""
        return f"destination {ip} is not a public address (refused by server policy)"


#: A URI's reg-name (RFC 3986 section 3.2.2): the host names ``host:port`` text may carry.
_REG_NAME = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=%-]+")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_host_port(text: str, default_port: Optional[int] = None) -> Destination:
    """``HOST:PORT`` or ``[IPV6]:PORT`` (an HTTP CONNECT target, a URI's authority) -> a
    :class:`Destination`, the IP canonical; the port (1 to 65535) may be left out or empty only
    when ``default_port`` is given. Raise :class:`AddressError` saying what is wrong."""
    port_text: Optional[str]
    if text.startswith("["):
        host, bracket, after = text[1:].partition("]")
        if not bracket or ":" not in host or parse_ip(host) is None:
            raise AddressError(f"{text!r} is not a valid [IPv6] address")
        if after and not after.startswith(":"):
            raise AddressError(f"{text!r} has text after the address")
        port_text = after[1:] if after else None
    else:
        host, colon, after = text.partition(":")
        port_text = after if colon else None
        if not _REG_NAME.fullmatch(host):
            raise AddressError(f"{text!r} has no valid host (IPv6 goes in brackets)")
    if port_text:
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise AddressError(f"{text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    elif default_port is None:
        raise AddressError(f"{text!r} has no port")
    else:
        port = default_port
    ip = parse_ip(host)
    return Destination(str(ip) if ip is not None else host, port)
