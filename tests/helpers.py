"""Shared test doubles: a fake resolver, a session wired to fake transports, frame decoding."""

from __future__ import annotations

import ipaddress
from typing import Dict, List

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from anytls_twisted.protocol import codec
from anytls_twisted.protocol.address import DestinationPolicy
from anytls_twisted.protocol.auth import UserTable, encode_preamble
from anytls_twisted.server.dialer import OriginDialer
from anytls_twisted.server.settings import ServerConfig

PASSWORD = "PASS"
SETTINGS_V2 = b"v=2\nclient=sing-anytls/0.0.11\npadding-md5=75cff2ad89aadf5e257059ee571ebe11"


def capture_events(case) -> List[dict]:
    """Every log event published from now until ``case`` ends."""
    events: List[dict] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def unhex(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


class FakeResolver:
    """Answers from a dict of name -> list of address strings; unknown names fail."""

    def __init__(self, names: Dict[str, List[str]] = None) -> None:
        self.names = names or {}
        self.queries: List[str] = []

    def resolve(self, host, port=0, udp=False):
        self.queries.append(host)
        literal = None
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        if literal is not None:
            return defer.succeed([literal])
        if host not in self.names:
            return defer.fail(error.DNSLookupError(f"no such host {host}"))
        return defer.succeed([ipaddress.ip_address(a) for a in self.names[host]])


class TCPStringTransport(StringTransport):
    """A StringTransport that, like a TCP transport, records ``setTcpNoDelay``."""

    no_delay = False
    bufferSize = 2**16  # Twisted's TCP read size

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


class FakeUDPPort:
    def __init__(self, protocol, interface) -> None:
        self.protocol = protocol
        self.interface = interface
        self.written: List[tuple] = []
        self.stopped = False

    def write(self, data, addr):
        self.written.append((data, addr))

    def stopListening(self):
        self.stopped = True


class Server:
    """A factory on a ``MemoryReactorClock`` with a fake resolver and fake UDP ports."""

    def __init__(self, allow_private: bool = True, names=None, **overrides) -> None:
        from anytls_twisted.server.service import AnyTLSFactory, SessionRegistry

        self.reactor = MemoryReactorClock()
        self.config = ServerConfig(
            users=UserTable([("alice", PASSWORD), ("bob", "other")]),
            policy=DestinationPolicy(allow_private=allow_private),
            **overrides,
        )
        self.resolver = FakeResolver(names)
        self.dialer = OriginDialer(self.reactor, self.config.connect_timeout, self.resolver)
        self.udp_ports: List[FakeUDPPort] = []
        self.registry = SessionRegistry(self.reactor, self.config)
        self.factory = AnyTLSFactory(
            self.config, self.reactor, self.dialer, self._listen_udp, self.registry
        )

    def _listen_udp(self, port, protocol, interface=""):
        fake = FakeUDPPort(protocol, interface)
        self.udp_ports.append(fake)
        protocol.transport = fake
        return fake

    def connect(self, peer=("198.51.100.7", 40000)):
        proto = self.factory.buildProtocol(IPv4Address("TCP", *peer))
        transport = TCPStringTransport(peerAddress=IPv4Address("TCP", *peer))
        proto.makeConnection(transport)
        return Client(proto, transport)

    def origin_connect(self, index=-1):
        """Complete the ``index``-th pending TCP connect; return the origin's transport."""
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = TCPStringTransport(peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(transport)
        return proto, transport

    def origin_fail(self, exc=None, index=-1):
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(None, Failure(exc or error.ConnectionRefusedError()))


class Client:
    """The client end of a session under test: sends frames, decodes what the server wrote."""

    def __init__(self, proto, transport) -> None:
        self.proto = proto
        self.transport = transport
        self._decoder = codec.FrameDecoder()

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def frame(self, cmd, sid=0, data=b"") -> None:
        self.send(codec.encode_frame(cmd, sid, data))

    def auth(self, password=PASSWORD, settings=SETTINGS_V2) -> None:
        self.send(encode_preamble(password, 30))
        if settings is not None:
            self.frame(codec.Command.SETTINGS, 0, settings)

    def received(self) -> List[codec.Frame]:
        data = self.transport.value()
        self.transport.clear()
        return self._decoder.feed(data)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected
