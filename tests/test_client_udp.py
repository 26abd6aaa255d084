"""SOCKS5 UDP ASSOCIATE on the client (anytls_twisted.client.udp), with fake transports."""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from anytls_twisted.client import socks
from anytls_twisted.client.local import LocalProxyFactory
from anytls_twisted.client.udp import MAX_EARLY
from anytls_twisted.protocol.address import Destination, encode_socks_address
from anytls_twisted.protocol.codec import Command
from anytls_twisted.protocol.uot import encode_packet, encode_request, magic_destination

from .test_client_session import Transport, manager, set_endpoint

CLIENT = "127.0.0.1"  # the fake transport's peer
LOCAL = "10.0.0.1"  # and its host


class FakeUdpPort:
    def __init__(self, protocol: Any, interface: str) -> None:
        self.protocol = protocol
        self.interface = interface
        self.sent: List[Tuple[bytes, Any]] = []
        self.listening = True
        self.reading = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface, 40000)

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def stopListening(self) -> None:
        self.listening = False

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.udp: List[FakeUdpPort] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 0):
        udp = FakeUdpPort(protocol, interface)
        self.udp.append(udp)
        return udp


def datagram(host: str, port: int, payload: bytes, frag: int = 0) -> bytes:
    return bytes([0, 0, frag]) + encode_socks_address(Destination(host, port)) + payload


class UdpAssociateTests(unittest.TestCase):
    def setUp(self):
        self.m, self.endpoint, _ = manager()
        self.reactor = Reactor()
        self.m.clock = self.reactor
        self.associate()

    def associate(self):
        self.factory = LocalProxyFactory(self.m, self.reactor)
        self.local = self.factory.buildProtocol(None)
        self.transport = Transport()
        self.local.makeConnection(self.transport)
        self.local.dataReceived(b"\x05\x01\x00")
        self.transport.clear()
        self.local.dataReceived(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        self.port = self.reactor.udp[-1]

    def from_app(self, data: bytes, addr=(CLIENT, 5555)) -> None:
        self.port.protocol.datagramReceived(data, addr)

    def server(self):
        server = self.endpoint.sessions[0]
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        return server

    def test_reply_names_the_udp_port_on_the_control_connections_address(self):
        self.assertEqual(self.port.interface, LOCAL)
        self.assertEqual(self.transport.value(), socks.encode_reply(0, Destination(LOCAL, 40000)))

    def test_one_non_connect_uot_stream_relays_both_ways(self):
        self.from_app(datagram("example.com", 53, b"ping"))  # a name: sent unresolved
        self.from_app(datagram("::1", 7, b"six"))
        server = self.server()
        data = [f.data for f in server.frames() if f.cmd == Command.PSH]
        self.assertEqual(
            b"".join(data),
            encode_socks_address(magic_destination(2))
            + encode_request(False, Destination("0.0.0.0", 0))
            + encode_packet(Destination("example.com", 53), b"ping")
            + encode_packet(Destination("::1", 7), b"six"),
        )
        server.send(Command.SYNACK, 1)
        reply = encode_packet(Destination("1.2.3.4", 53), b"pong")
        server.send(Command.PSH, 1, reply[:3])  # a reply split across frames
        server.send(Command.PSH, 1, reply[3:] + encode_packet(Destination("::1", 7), b"xis"))
        self.assertEqual(
            self.port.sent,
            [
                (datagram("1.2.3.4", 53, b"pong"), (CLIENT, 5555)),
                (datagram("::1", 7, b"xis"), (CLIENT, 5555)),
            ],
        )
        self.assertEqual(len(self.endpoint.sessions), 1)

    def test_foreign_sources_and_fragments_are_dropped_and_counted(self):
        self.from_app(datagram("1.1.1.1", 53, b"a"))
        self.from_app(datagram("1.1.1.1", 53, b"b"), ("127.0.0.2", 5555))  # another host
        self.from_app(datagram("1.1.1.1", 53, b"c"), (CLIENT, 6666))  # another port
        self.from_app(datagram("1.1.1.1", 53, b"d", frag=1))
        self.from_app(b"\x00\x00")
        association = self.local.association
        self.assertEqual(association.dropped["foreign"], 2)
        self.assertEqual(association.dropped["fragment"], 1)
        self.assertEqual(association.dropped["malformed"], 1)
        self.assertEqual(association.datagrams_out, 1)

    def test_early_datagrams_are_bounded(self):
        dialling: Deferred[Any] = Deferred()
        set_endpoint(self.m, lambda: type("Pending", (), {"connect": lambda _, f: dialling})())
        self.associate()  # a second association, whose session is still being dialled
        for i in range(MAX_EARLY + 5):
            self.from_app(datagram("1.1.1.1", 53, b"%d" % i))
        association = self.local.association
        self.assertEqual(association.dropped["early"], 6)  # the header takes one place
        self.assertEqual(association.stream.queued, MAX_EARLY)

    def test_control_connection_close_ends_the_association(self):
        server = self.server()
        self.local.connectionLost(Failure(ConnectionError("gone")))
        self.assertFalse(self.port.listening)
        self.assertIn(Command.FIN, [f.cmd for f in server.frames()])

    def test_stream_end_closes_the_control_connection(self):
        server = self.server()
        server.send(Command.SYNACK, 1)
        server.send(Command.FIN, 1)
        self.assertFalse(self.port.listening)
        self.assertTrue(self.transport.disconnecting)

    def test_bad_reply_ends_the_association(self):
        server = self.server()
        server.send(Command.SYNACK, 1)
        server.send(Command.PSH, 1, b"\x09garbage")
        self.assertFalse(self.port.listening)
        self.assertTrue(self.transport.disconnecting)
