"""One live configuration: what a reload makes current reaches the registry's reaper, new
sessions and every TLS port (matched by port description, never by position)."""

import attr
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import tls
from anytls_twisted.protocol.auth import UserTable
from anytls_twisted.server.service import build_service
from anytls_twisted.server.settings import LiveConfig, Port, PortsChanged, ServerConfig

from .helpers import Client, Server, TCPStringTransport


class FakeTLSOptions:
    """Stands for a port's TLS options: says which it is when a handshake asks."""

    def __init__(self, name):
        self.name = name

    def serverConnectionForTLS(self, protocol):
        return (self.name, protocol)


def port(description, options=None):
    return Port(spec=tls.parse_port(description), tls_options=options)


class LiveConfigTests(SynchronousTestCase):
    def setUp(self):
        self.config = ServerConfig(users=UserTable([("u", "p")]))
        self.live = LiveConfig(
            self.config,
            [port("ssl:1", FakeTLSOptions("one")), port("ssl:2", FakeTLSOptions("two"))]
            + [port("tcp:3")],
        )

    def test_of(self):
        """A plain ServerConfig is wrapped (no ports); a live configuration is itself."""
        wrapped = LiveConfig.of(self.config)
        self.assertIs(wrapped.config, self.config)
        self.assertEqual(wrapped.ports, frozenset())
        self.assertIs(LiveConfig.of(self.live), self.live)

    def test_tls_follows_port_description_when_ports_are_reordered(self):
        """Each port's TLS asks for its own port's current options: a reload listing the same
        ports in another order gives each port its new options, not its neighbour's."""
        one, two = self.live.tls_for("ssl:1"), self.live.tls_for("ssl:2")
        self.assertEqual(one.serverConnectionForTLS("c"), ("one", "c"))
        new = attr.evolve(self.config, users=UserTable([("v", "q")]))
        self.live.update(
            new,
            [
                port("tcp:3"),
                port("ssl:2", FakeTLSOptions("two'")),
                port("ssl:1", FakeTLSOptions("one'")),
            ],
        )
        self.assertEqual(one.serverConnectionForTLS("c"), ("one'", "c"))
        self.assertEqual(two.serverConnectionForTLS("c"), ("two'", "c"))
        self.assertIs(self.live.config, new)

    def test_other_ports_refused_as_a_whole(self):
        """A reload naming other ports changes nothing and says ports need a restart."""
        one = self.live.tls_for("ssl:1")
        new = attr.evolve(self.config, users=UserTable([("v", "q")]))
        e = self.assertRaises(
            PortsChanged,
            self.live.update,
            new,
            [port("ssl:1", FakeTLSOptions("x")), port("ssl:4", FakeTLSOptions("y")), port("tcp:3")],
        )
        self.assertIn("ssl:2", str(e))
        self.assertIn("ssl:4", str(e))
        self.assertIn("listening ports need a restart", str(e))
        self.assertIs(self.live.config, self.config)
        self.assertEqual(one.serverConnectionForTLS("c"), ("one", "c"))

    def test_unknown_port(self):
        self.assertRaises(KeyError, self.live.tls_for, "ssl:9")


class EveryPartReadsTheLiveConfigTests(SynchronousTestCase):
    """build_service wraps the config once; factory, registry and service read that."""

    def setUp(self):
        self.server = Server(idle_session_timeout=300, idle_session_check_interval=30)
        self.live = LiveConfig(self.server.config)
        self.top = build_service(
            self.live,
            [("tcp:0", lambda f: f)],
            self.server.reactor,
            self.server.dialer,
            self.server.factory.listen_udp,
        )
        self.top.startService()
        self.addCleanup(self.top.stopService)

    def connect(self, password):
        peer = IPv4Address("TCP", "198.51.100.7", 40000)
        proto = self.top.factory.buildProtocol(peer)
        client = Client(proto, TCPStringTransport(peerAddress=peer))
        proto.makeConnection(client.transport)
        client.auth(password)
        return client

    def test_one_object(self):
        for part in (self.top, self.top.factory, self.top.registry):
            self.assertIs(part.config, self.live.config)
        new = attr.evolve(self.server.config, udp_timeout=7.0)
        self.live.update(new)
        for part in (self.top, self.top.factory, self.top.registry):
            self.assertIs(part.config, new)

    def test_reaper_uses_the_current_timeout(self):
        """After a reload, the reaper closes idle sessions by the new timeout."""
        client = self.connect("PASS")
        self.assertEqual(client.proto.user, "alice")
        self.live.update(attr.evolve(self.server.config, idle_session_timeout=60.0))
        self.server.reactor.advance(30)
        self.assertFalse(client.closed)
        self.server.reactor.advance(30)
        self.assertTrue(client.closed)  # 300 s would have kept it

    def test_new_sessions_use_the_current_users(self):
        self.live.update(attr.evolve(self.server.config, users=UserTable([("carol", "c")])))
        self.assertEqual(self.connect("c").proto.user, "carol")
        late = self.connect("PASS")
        self.assertIsNone(late.proto.user)
        self.assertTrue(late.closed)
