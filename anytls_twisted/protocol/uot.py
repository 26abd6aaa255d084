"""UDP over TCP (sing "udp-over-tcp", anytls-protocol.md section 10): the stream codec. Pure.

A UoT stream is an ordinary stream whose destination is a magic name (any port). Its bytes are,
in both directions, a sequence of packets; v2 adds a request header in front of the client's:

* v2 request header, once: ``connect u8`` (non-zero: connect mode), SOCKS address + port.
* connect-mode packet: ``length u16 BE``, payload; the address is the header's (client to
  server) or absent (replies).
* non-connect packet (and every v1 packet): UoT AddrParser address + port, ``length``, payload.
  From the client the address is the datagram's destination; in a reply, its source.

So the client's packets and the server's replies share a layout, and one pair of encoders
serves both sides. :class:`UoTReader` parses the client's bytes on the server; the same reader
in connect mode, or a v1 one, also parses the server's replies on a client.
"""

from __future__ import annotations

import struct
from typing import Iterator, NamedTuple, Optional, Union

from .address import (
    MAX_ADDRESS_SIZE,
    AddressError,
    Destination,
    encode_socks_address,
    encode_uot_address,
    parse_socks_address,
    parse_uot_address,
)

__all__ = [
    "MAGIC_V1",
    "MAGIC_V2",
    "MAX_HEADER_SIZE",
    "MAX_PACKET_SIZE",
    "MAX_PAYLOAD",
    "AddressError",
    "UoTPacket",
    "UoTReader",
    "UoTRequest",
    "encode_connect_packet",
    "encode_packet",
    "encode_request",
    "magic_destination",
    "uot_version",
]

MAGIC_V2 = "sp.v2.udp-over-tcp.arpa"
MAGIC_V1 = "sp.udp-over-tcp.arpa"
_VERSIONS = {MAGIC_V2: 2, MAGIC_V1: 1}

LENGTH = struct.Struct(">H")
#: The largest payload a packet carries (the u16 length).
MAX_PAYLOAD = 0xFFFF
#: The longest v2 request header: the connect byte and a SOCKS address with a 255-byte name.
MAX_HEADER_SIZE = 1 + MAX_ADDRESS_SIZE
#: The longest packet: a UoT address with a 255-byte name (as long as a SOCKS one), the
#: length and the largest payload: 259 + 2 + 65535 = 65796 bytes.
MAX_PACKET_SIZE = MAX_ADDRESS_SIZE + LENGTH.size + MAX_PAYLOAD


def uot_version(dest: Destination) -> Optional[int]:
    """2 or 1 for the magic destinations (exact, case-sensitive, any port), else ``None``."""
    return _VERSIONS.get(dest.host)


def magic_destination(version: int = 2) -> Destination:
    """The stream destination a client opens for UoT ``version`` (port 0, as sing sends)."""
    for host, known in _VERSIONS.items():
        if known == version:
            return Destination(host, 0)
    raise ValueError(f"no UDP-over-TCP version {version}")


class UoTRequest(NamedTuple):
    """The v2 request header: the mode, and the destination (connect mode's only one)."""

    connect: bool
    destination: Destination


class UoTPacket(NamedTuple):
    """One datagram: where it goes (from a client) or comes from (a reply), and its bytes."""

    destination: Destination
    payload: bytes


class UoTReader:
    """Incremental parser of a UoT byte stream: :meth:`feed` bytes, then :meth:`next_item`.

    A v2 reader gives one :class:`UoTRequest` first, then :class:`UoTPacket` items; in connect
    mode each packet's destination is the request's. A v1 reader has no header and gives
    non-connect packets from the first byte. Bytes that can never parse (an unknown address
    type, an empty or non-ASCII name) raise :class:`AddressError` from :meth:`next_item`; the
    stream is then unusable, and the reader must not be used further.

    Items come out one per :meth:`next_item` call, so the caller can stop between two (for
    instance when handling one closed the stream) and sends nothing past bytes that turn out to
    be bad. The usual loop::

        reader.feed(data)
        while not closed:
            item = reader.next_item()   # may raise AddressError
            if item is None:
                break                   # the rest is an incomplete item: wait for more
            ...

    Iterating over the reader does the same until it runs out (``for item in reader``).

    Memory: the reader holds the bytes that do not yet form an item. Once :meth:`next_item`
    has returned ``None`` that is less than one item: under :data:`MAX_HEADER_SIZE` (260)
    bytes before the header, under :data:`MAX_PACKET_SIZE` (65796) after it, since every
    length field is a u16. Fed bytes are parsed where they are (payloads are sliced out of
    them, one copy each); only an incomplete item's bytes are copied, into a ``bytearray``
    that is dropped once that item is complete. ``feed`` takes ``bytes``, which it keeps a
    reference to: a mutable buffer must not be changed after it is fed.

    @ivar version: 2 or 1.
    @ivar request: the v2 request header once parsed, else ``None`` (always ``None`` for v1).
    """

    def __init__(self, version: int) -> None:
        if version not in (1, 2):
            raise ValueError(f"no UDP-over-TCP version {version}")
        self.version = version
        self.request: Optional[UoTRequest] = None
        self._data: Union[bytes, bytearray] = b""  # the fed bytes, or the held incomplete item
        self._pos = 0  # where the next item starts in ``_data``
        self._connect: Optional[Destination] = None  # connect mode's destination
        self._need_header = version == 2

    @property
    def connect(self) -> bool:
        """Whether packets are connect-mode ones (no address): a v2 header said so."""
        return self._connect is not None

    @property
    def pending(self) -> int:
        """The number of bytes fed but not yet returned as items."""
        return len(self._data) - self._pos

    def buffered(self) -> bytes:
        """The bytes fed but not yet returned as items (a copy, for tests and logs)."""
        return bytes(self._data[self._pos :])

    def feed(self, data: bytes) -> None:
        """Add stream bytes; parse them with :meth:`next_item`."""
        held, pos = self._data, self._pos
        if pos == len(held):  # nothing held: parse the caller's bytes where they are
            self._data = data
        elif isinstance(held, bytearray):
            del held[:pos]
            held += data
        else:  # an item is cut short: copy what there is of it, and add to that
            incomplete = bytearray(memoryview(held)[pos:])
            incomplete += data
            self._data = incomplete
        self._pos = 0

    def next_item(self) -> Union[UoTRequest, UoTPacket, None]:
        """The next complete item, or ``None`` until more bytes arrive; raises AddressError."""
        item = self._parse(self._data, self._pos)
        if item is None and self._pos == len(self._data):
            self._data, self._pos = b"", 0  # let go of fed bytes that are all parsed
        return item

    def __iter__(self) -> Iterator[Union[UoTRequest, UoTPacket]]:
        """Every complete item, as :meth:`next_item` gives them."""
        item = self.next_item()
        while item is not None:
            yield item
            item = self.next_item()

    def _parse(self, data: Union[bytes, bytearray], pos: int) -> Union[UoTRequest, UoTPacket, None]:
        if self._need_header:
            parsed = parse_socks_address(data, pos + 1)
            if parsed is None:
                return None
            destination, self._pos = parsed
            self._need_header = False
            request = self.request = UoTRequest(data[pos] != 0, destination)
            if request.connect:
                self._connect = destination
            return request
        if self._connect is not None:
            destination = self._connect
        else:
            parsed = parse_uot_address(data, pos)
            if parsed is None:
                return None
            destination, pos = parsed
        start = pos + LENGTH.size
        if len(data) < start:
            return None
        end = start + LENGTH.unpack_from(data, pos)[0]
        if len(data) < end:
            return None
        self._pos = end
        # tuple.__new__ skips the named tuple's __new__, which is Python code: cheaper per datagram.
        if isinstance(data, bytes):
            return tuple.__new__(UoTPacket, (destination, data[start:end]))
        with memoryview(data) as view:  # one copy out of the held bytes
            return tuple.__new__(UoTPacket, (destination, view[start:end].tobytes()))


def encode_request(connect: bool, destination: Destination) -> bytes:
    """A client's v2 request header: the connect byte and the SOCKS-style destination."""
    return (b"\x01" if connect else b"\x00") + encode_socks_address(destination)


def encode_packet(address: Destination, payload: bytes) -> bytes:
    """A non-connect (or v1) packet: a client's datagram to ``address``, or a reply from it.

    IPv4-mapped IPv6 literals are written as IPv4 (family 0), as the protocol asks for replies.
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"UDP payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return encode_uot_address(address) + LENGTH.pack(len(payload)) + payload


def encode_connect_packet(payload: bytes) -> bytes:
    """A connect-mode packet, either way: the length and the payload, no address."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"UDP payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return LENGTH.pack(len(payload)) + payload
