"""A new stream before its destination has arrived: read the address, then hand over.

The first bytes of every stream are a SOCKS address (anytls-protocol.md section 7.2), possibly
split across frames. Once it is complete the pending stream builds the stream that serves it,
UDP-over-TCP for the magic names and TCP otherwise, and asks the context to put that stream in
its place; the bytes that followed the address go to the new stream's ``start``.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from ..interfaces import IStream
from ..protocol.address import MAX_ADDRESS_SIZE, AddressError, Destination, parse_socks_address
from ..protocol.uot import uot_version
from .stream import BaseStream, TCPStream
from .udp import UoTStream


def stream_for(context: Any, sid: int, destination: Destination) -> BaseStream:
    """The stream serving ``destination``: UDP-over-TCP for the magic names, else TCP."""
    opened_at = context.clock.seconds()
    version = uot_version(destination)
    if version is not None:
        return UoTStream(context, sid, destination, opened_at, version)
    return TCPStream(context, sid, destination, opened_at)


@implementer(IStream)
class PendingStream:
    """Collects a stream's destination address (at most 259 bytes) and hands over.

    @ivar buffer: the address bytes so far.
    """

    kind = "pending"
    destination = None
    bytes_in = bytes_out = 0

    def __init__(self, context: Any, sid: int) -> None:
        self.context = context
        self.sid = sid
        self.buffer = b""
        self.closed = False
        self.opened_at = context.clock.seconds()

    def start(self, data: bytes = b"") -> None:
        if data:
            self.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        try:
            parsed = parse_socks_address(self.buffer)
        except AddressError as e:
            self.context.end(self, f"bad destination address: {e}", f"bad destination address: {e}")
            return
        if parsed is None:
            if len(self.buffer) >= MAX_ADDRESS_SIZE:  # pragma: no cover - parser bounds this
                self.context.end(self, "bad destination address", "bad destination address")
            return
        destination, end = parsed
        stream = stream_for(self.context, self.sid, destination)
        self.closed = True
        self.context.replace(self, stream)
        stream.start(self.buffer[end:])

    def connectionLost(self, reason: str) -> None:
        self.closed = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
