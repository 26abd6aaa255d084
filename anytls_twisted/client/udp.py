"""SOCKS5 UDP ASSOCIATE on the client, carried as UDP over TCP v2 (anytls-protocol.md
section 10; client-behaviour.md section 6).

One :class:`UdpAssociation` per UDP ASSOCIATE: a UDP socket bound on the control connection's
local address (port 0), and ONE stream to ``sp.v2.udp-over-tcp.arpa:0`` in non-connect mode.
The request header (connect byte 0, the ASSOCIATE request's address) is sent when the stream
opens, so servers that answer the SYN only after the header (sing-box) answer at once.

* Application to server: datagrams only from the control connection's IP; the first one fixes
  the port. Each becomes ``encode_packet(destination, payload)``; names are not resolved.
  Fragments (FRAG != 0) and malformed datagrams are dropped and counted. Before the stream is
  on a session at most :data:`MAX_EARLY` datagrams wait; later ones are dropped and counted.
* Server to application: replies have no header (v1 framing), parsed by a v1
  :class:`~anytls_twisted.protocol.uot.UoTReader`, sent as SOCKS UDP datagrams from their
  source.
* The association ends with its control connection, and the control connection with it.

The association is its stream's local side and that side's "transport": the stream writes
the server's bytes to it, pauses it (the UDP socket stops reading) and closes it.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.internet.protocol import DatagramProtocol

from ..logs import get_logger
from ..protocol.address import AddressError, Destination
from ..protocol.uot import UoTPacket, UoTReader, encode_packet, encode_request, magic_destination
from . import socks
from .stream import ClientStream, LocalSide

_log = get_logger("anytls_twisted.client.udp")

#: Datagrams kept while the stream waits for a session; more are dropped.
MAX_EARLY = 8


def _plain(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 literal written as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else host


class _Socket(DatagramProtocol):
    def __init__(self, owner: UdpAssociation) -> None:
        self.owner = owner

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.owner.from_application(data, addr)


class UdpAssociation(LocalSide):
    """One UDP ASSOCIATE: the UDP port, the UoT stream, the counters.

    @param control: the SOCKS control connection's transport (closed when this ends).
    @param request: the address in the ASSOCIATE request (sent in the UoT header).
    @ivar bound: the UDP relay address to reply with.
    @ivar dropped: datagrams dropped, by reason.
    """

    def __init__(self, control: Any, request: Destination, manager: Any, reactor: Any) -> None:
        self.control = control
        self.request = request
        self.transport = self  # the stream writes the server's bytes here (see module doc)
        local_host = _plain(control.getHost().host)
        self.client_ip = _plain(control.getPeer().host)
        self.client_port: Optional[int] = None
        self.port = reactor.listenUDP(0, _Socket(self), interface=local_host)
        self.bound = Destination(local_host, self.port.getHost().port)
        self.reader = UoTReader(1)
        self.datagrams_out = self.datagrams_in = 0
        self.dropped = {"fragment": 0, "foreign": 0, "malformed": 0, "early": 0, "no client": 0}
        self.closed = False
        self.stream = ClientStream(self, magic_destination(2), reactor)
        self.stream.kind = "udp"  # for the metrics
        self.stream.send(encode_request(False, request))
        _log.debug(
            "UDP association {bound} for {client} open",
            bound=str(self.bound),
            client=self.client_ip,
        )
        manager.open(self.stream)

    # The application's datagrams.
    def from_application(self, data: bytes, addr: Any) -> None:
        host, port = _plain(addr[0]), addr[1]
        if self.closed:
            return
        if host != self.client_ip or (self.client_port is not None and port != self.client_port):
            self.dropped["foreign"] += 1
            return
        try:
            datagram = socks.parse_udp_datagram(data)
            if datagram.frag != 0:
                self.dropped["fragment"] += 1
                return
            packet = encode_packet(datagram.destination, datagram.payload)
        except (socks.SocksError, ValueError):
            self.dropped["malformed"] += 1
            return
        self.client_port = port
        if self.stream.context is None and self.stream.queued >= MAX_EARLY:
            self.dropped["early"] += 1
            return
        self.datagrams_out += 1
        self.stream.send(packet)

    # The stream's "transport".
    def write(self, data: bytes) -> None:
        """Stream bytes from the server: reply packets, to the application."""
        if self.closed:
            return
        self.reader.feed(data)
        try:
            for item in self.reader:
                assert isinstance(item, UoTPacket)
                self._reply(item)
        except AddressError as e:
            _log.debug(
                "UDP association {bound}: bad reply: {error}", bound=str(self.bound), error=e
            )
            self.stream.local_closed()
            self.loseConnection()

    def _reply(self, packet: UoTPacket) -> None:
        if self.client_port is None:
            self.dropped["no client"] += 1
            return
        self.datagrams_in += 1
        datagram = socks.encode_udp_datagram(packet.destination, packet.payload)
        self.port.write(datagram, (self.client_ip, self.client_port))

    def pauseProducing(self) -> None:
        if not self.closed:
            self.port.stopReading()

    def resumeProducing(self) -> None:
        if not self.closed:
            self.port.startReading()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """UDP has no backpressure toward the application."""

    def unregisterProducer(self) -> None:
        """See :meth:`registerProducer`."""

    def loseConnection(self) -> None:
        """The stream ended: end the association and its control connection."""
        self.close("the stream ended")

    def refused(self, error: str) -> None:
        _log.info(
            "UDP association {bound}: stream failed: {error}", bound=str(self.bound), error=error
        )
        self.close(error)

    # Ending.
    def close(self, reason: str) -> None:
        """End the association: the UDP port, the stream, the control connection."""
        if self.closed:
            return
        self.closed = True
        self.port.stopListening()
        self.stream.local_closed()
        self.control.loseConnection()
        _log.debug(
            "UDP association {bound} closed: {reason} ({out} datagrams out, {in_} in, "
            "dropped {dropped})",
            bound=str(self.bound),
            reason=reason,
            out=self.datagrams_out,
            in_=self.datagrams_in,
            dropped=self.dropped,
        )


__all__ = ["MAX_EARLY", "UdpAssociation"]
