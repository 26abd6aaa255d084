"""The abuse limits' Twisted shell (anytls_twisted/server/admission.py): where each limit is
asked, what a refusal does to the connection, session or stream, its metric and its log."""

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.metrics import Metrics
from anytls_twisted.protocol.codec import Command
from anytls_twisted.protocol.session import State
from anytls_twisted.server.admission import (
    LOG_INTERVAL,
    LOG_LINES,
    AdmissionFactory,
    AdmittingProxyFactory,
)
from anytls_twisted.server.settings import Limits, ServerConfig

from .helpers import Server, capture_events


def tcp(host="203.0.113.9", port=40000):
    return IPv4Address("TCP", host, port)


def refusal_lines(events):
    return [e for e in events if e.get("log_namespace") == "anytls_twisted.limits"]


class _Marker:
    """A stand-in for the TLS factory: its protocols are recognisable objects."""

    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        proto = object()
        self.built.append((addr, proto))
        return proto

    def doStart(self):
        pass

    def doStop(self):
        pass


class ConnectionRateTests(SynchronousTestCase):
    def setUp(self):
        self.server = Server(limits=Limits(connection_rate=2.0, connection_burst=3))
        self.admission = self.server.factory.admission
        self.inner = _Marker()
        self.port = AdmissionFactory(self.inner, self.admission, rate=True)
        self.events = capture_events(self)

    def test_burst_then_refused_then_refilled(self):
        """If a source opens more than the burst at once, then the extra connections get no
        protocol (the port closes them before any TLS object exists); after 1/rate seconds
        one more is let in, and the protocol let in is the wrapped factory's own."""
        built = [self.port.buildProtocol(tcp()) for _ in range(5)]
        self.assertEqual([p is not None for p in built], [True, True, True, False, False])
        self.assertEqual(built[:3], [proto for _, proto in self.inner.built])
        self.server.reactor.advance(0.5)
        self.assertIsNotNone(self.port.buildProtocol(tcp()))
        self.assertIsNone(self.port.buildProtocol(tcp()))
        self.assertEqual(self.admission.refused["connection_rate"], 3)

    def test_other_sources_unaffected(self):
        """If one source is refused, then another address, and another IPv6 /64, are not;
        but two addresses of one /64 share a bucket."""
        for _ in range(4):
            self.port.buildProtocol(tcp())
        self.assertIsNone(self.port.buildProtocol(tcp(port=1)))
        self.assertIsNotNone(self.port.buildProtocol(tcp("203.0.113.10")))
        v6 = [IPv6Address("TCP", f"2001:db8:0:1::{i}", 1) for i in range(1, 5)]
        self.assertEqual([self.port.buildProtocol(a) is not None for a in v6], [1, 1, 1, 0])
        other = IPv6Address("TCP", "2001:db8:0:2::1", 1)
        self.assertIsNotNone(self.port.buildProtocol(other))

    def test_plain_port_and_unix_peers_not_rate_limited(self):
        """If the port is plain (its peer is a TLS-terminating proxy) or the peer has no IP
        address (a Unix socket), then the rate does not apply."""
        plain = AdmissionFactory(self.inner, self.admission, rate=False)
        self.assertTrue(all(plain.buildProtocol(tcp()) is not None for _ in range(20)))
        unix = UNIXAddress(None)
        self.assertTrue(all(self.port.buildProtocol(unix) is not None for _ in range(20)))

    def test_zero_rate_is_off(self):
        """If the rate is 0, then no connection is refused for its rate."""
        self.server.factory.live.update(
            ServerConfig(users=self.server.config.users, limits=Limits(connection_rate=0))
        )
        self.assertTrue(all(self.port.buildProtocol(tcp()) is not None for _ in range(200)))

    def test_reload_applies_at_next_connection(self):
        """If a reload changes the rate and burst, then the next connection uses them."""
        for _ in range(3):
            self.port.buildProtocol(tcp())
        self.assertIsNone(self.port.buildProtocol(tcp()))
        self.server.factory.live.update(
            ServerConfig(
                users=self.server.config.users,
                limits=Limits(connection_rate=1000.0, connection_burst=3),
            )
        )
        self.server.reactor.advance(0.01)  # 10 tokens at the new rate, capped at 3
        self.assertEqual(sum(self.port.buildProtocol(tcp()) is not None for _ in range(5)), 3)

    def test_one_line_per_source_then_summary(self):
        """If a source floods, then its first refusal is logged (naming the source, the limit
        and the option) and the rest are summed up in one line after the interval."""
        for _ in range(1003):
            self.port.buildProtocol(tcp())
        lines = refusal_lines(self.events)
        self.assertEqual(len(lines), 1)
        [line] = lines
        self.assertEqual((line["limit"], line["source"]), ("connection_rate", "203.0.113.9"))
        self.assertIn("--connection-rate", line["reason"])
        self.admission.startService()
        self.addCleanup(self.admission.stopService)
        self.server.reactor.advance(LOG_INTERVAL)
        summary = refusal_lines(self.events)[1:]
        self.assertEqual(len(summary), 1)
        self.assertEqual(
            (summary[0]["refusals"], summary[0]["counts"]), (999, {"connection_rate": 999})
        )
        self.server.reactor.advance(LOG_INTERVAL)
        self.assertEqual(len(refusal_lines(self.events)), 2)  # nothing new: no summary

    def test_many_sources_bounded_lines(self):
        """If thousands of sources are refused, then at most LOG_LINES lines are written per
        interval; the rate table stays within its capacity."""
        for i in range(3000):
            host = f"10.{i // 250}.{i % 250}.1"
            for _ in range(4):
                self.port.buildProtocol(tcp(host))
        self.assertEqual(len(refusal_lines(self.events)), LOG_LINES)
        self.assertLessEqual(len(self.admission.rates), self.admission.rates.capacity)

    def test_metric(self):
        """If a connection is refused, then anytls_limit_refusals_total{limit} counts it."""
        metrics = Metrics()
        self.admission.metrics = metrics
        for _ in range(5):
            self.port.buildProtocol(tcp())
        value = metrics.registry.get_sample_value
        self.assertEqual(value("anytls_limit_refusals_total", {"limit": "connection_rate"}), 2)
        self.assertEqual(value("anytls_limit_refusals_total", {"limit": "sessions"}), 0)


class GlobalSessionCapTests(SynchronousTestCase):
    def test_cap_counts_open_connections(self):
        """If --max-sessions connections are open (authenticated or not), then the next is
        refused at accept, with a line naming the option; once one closes, one more gets in."""
        server = Server(limits=Limits(max_sessions=2, connection_rate=0))
        events = capture_events(self)
        port = AdmissionFactory(server.factory, server.factory.admission, rate=True)
        clients = []
        for i in range(2):
            proto = port.buildProtocol(tcp(port=i))
            proto.makeConnection(StringTransport(peerAddress=tcp(port=i)))
            clients.append(proto)
        self.assertIsNone(port.buildProtocol(tcp("198.51.100.1")))
        [line] = refusal_lines(events)
        self.assertEqual((line["limit"], line["source"]), ("sessions", "198.51.100.1"))
        self.assertIn("--max-sessions", line["reason"])
        clients[0].connectionLost(Failure(Exception("gone")))
        self.assertIsNotNone(port.buildProtocol(tcp("198.51.100.1")))


PROXY_V1 = b"PROXY TCP4 192.0.2.50 10.0.0.1 5555 443\r\n"


class ProxiedPortTests(SynchronousTestCase):
    def setUp(self):
        self.server = Server(limits=Limits(connection_rate=1.0, connection_burst=2))
        admission = self.server.factory.admission
        self.port = AdmittingProxyFactory(AdmissionFactory(self.server.factory, admission, False))

    def connect(self, header=PROXY_V1):
        wrapper = self.port.buildProtocol(tcp("10.0.0.2", 1))  # the proxy's address
        transport = StringTransport(peerAddress=tcp("10.0.0.2", 1))
        wrapper.makeConnection(transport)
        wrapper.dataReceived(header + b"\x16\x03\x01")  # the header, then what follows
        return wrapper, transport

    def test_rate_applies_to_the_header_address(self):
        """If connections through the proxy carry one client address beyond its burst, then
        the extra ones are aborted right after the header, before anything past it reaches
        the wrapped protocol, and closing them logs no "closed before authentication" line;
        another client behind the same proxy is let in."""
        events = capture_events(self)
        (w1, t1), (w2, t2), (w3, t3) = [self.connect() for _ in range(3)]
        self.assertFalse(t1.disconnected or t2.disconnected)
        self.assertTrue(t3.disconnected)
        self.assertEqual(w1.wrappedProtocol.bytes_in, 3)  # the bytes after the header
        session = w3.wrappedProtocol
        self.assertEqual((session.bytes_in, session.refused_by_limit), (0, "connection_rate"))
        w3.connectionLost(Failure(Exception("aborted")))
        self.assertNotIn(
            "closed before authentication", " ".join(e.get("log_format", "") for e in events)
        )
        [line] = refusal_lines(events)
        self.assertEqual(line["source"], "192.0.2.50")
        _, other = self.connect(b"PROXY TCP4 192.0.2.51 10.0.0.1 5555 443\r\n")
        self.assertFalse(other.disconnected)

    def test_header_in_pieces(self):
        """If the header arrives in pieces, then the check waits for all of it and the bytes
        after it are delivered once."""
        wrapper = self.port.buildProtocol(tcp("10.0.0.2", 1))
        wrapper.makeConnection(StringTransport(peerAddress=tcp("10.0.0.2", 1)))
        wrapper.dataReceived(PROXY_V1[:16])  # Twisted's reader wants 16 bytes to start
        for i in range(16, len(PROXY_V1), 7):
            wrapper.dataReceived(PROXY_V1[i : i + 7])
        self.assertEqual(wrapper.wrappedProtocol.bytes_in, 0)
        wrapper.dataReceived(b"abc")
        wrapper.dataReceived(b"de")
        self.assertEqual(wrapper.wrappedProtocol.bytes_in, 5)
        self.assertEqual(wrapper.getPeer().host, "192.0.2.50")


class SessionsPerUserTests(SynchronousTestCase):
    def test_user_over_cap_gets_alert(self):
        """If a user already has --max-sessions-per-user sessions open, then the next session
        of that user is sent an Alert and closed, without being counted as a session; another
        user is not affected; when one closes, the user may open another."""
        server = Server(limits=Limits(max_sessions_per_user=2))
        events = capture_events(self)
        alice = [server.connect(peer=("198.51.100.7", 1 + i)) for i in range(3)]
        for client in alice:
            client.auth()
        self.assertFalse(alice[0].closed or alice[1].closed)
        self.assertTrue(alice[2].closed)
        [alert] = alice[2].received()
        self.assertEqual(
            (alert.cmd, alert.data), (Command.ALERT, b"too many sessions for this user")
        )
        bob = server.connect()
        bob.auth(password="other")
        self.assertFalse(bob.closed)
        alice[2].proto.connectionLost(Failure(Exception("closed")))
        [line] = refusal_lines(events)
        self.assertEqual((line["limit"], line["user"]), ("sessions_per_user", "alice"))
        self.assertIn("--max-sessions-per-user", line["reason"])
        texts = " ".join(e.get("log_format", "") for e in events)
        self.assertNotIn("closed before authentication", texts)
        alice[0].proto.connectionLost(Failure(Exception("closed")))
        again = server.connect()
        again.auth()
        self.assertFalse(again.closed)
        self.assertEqual(server.factory.admission.sessions.held("alice"), 2)

    def test_counted_while_unlimited(self):
        """If the cap is off, then sessions are still counted, so a reload that sets a cap
        counts the sessions already open."""
        server = Server()
        clients = [server.connect() for _ in range(2)]
        for client in clients:
            client.auth()
        self.assertEqual(server.factory.admission.sessions.held("alice"), 2)
        server.factory.live.update(
            ServerConfig(users=server.config.users, limits=Limits(max_sessions_per_user=2))
        )
        third = server.connect()
        third.auth()
        self.assertTrue(third.closed)
        for client in clients:
            client.proto.connectionLost(Failure(Exception("closed")))
        self.assertEqual(server.factory.admission.sessions.held("alice"), 0)


class GlobalStreamCapTests(SynchronousTestCase):
    def test_cap_over_all_sessions(self):
        """If --max-streams streams are open over all sessions, then a new SYN on any session
        gets a SYNACK error and FIN; once a stream ends, a new one is accepted."""
        server = Server(limits=Limits(max_streams=2))
        events = capture_events(self)
        a, b = server.connect(), server.connect()
        for client in (a, b):
            client.auth()
            client.received()
        a.frame(Command.SYN, 1)
        b.frame(Command.SYN, 1)
        b.frame(Command.SYN, 3)
        frames = b.received()
        self.assertEqual(
            [(f.cmd, f.sid, f.data) for f in frames],
            [(Command.SYNACK, 3, b"server busy: too many streams"), (Command.FIN, 3, b"")],
        )
        self.assertEqual(set(b.proto.streams), {1})
        [line] = refusal_lines(events)
        self.assertEqual((line["limit"], line["stream_id"]), ("streams", 3))
        self.assertIn("--max-streams", line["reason"])
        a.frame(Command.FIN, 1)
        b.frame(Command.SYN, 5)
        self.assertEqual(set(b.proto.streams), {1, 5})
        self.assertEqual(server.factory.admission.streams.total, 2)
        b.proto.connectionLost(Failure(Exception("closed")))
        self.assertEqual(server.factory.admission.streams.total, 0)

    def test_streams_per_session_refusal_counted_and_logged_once(self):
        """If a client floods SYNs past --max-streams-per-session, then each refusal is
        counted but one line is logged."""
        server = Server(max_streams=1)
        events = capture_events(self)
        client = server.connect()
        client.auth()
        for sid in range(1, 200, 2):
            client.frame(Command.SYN, sid)
        admission = server.factory.admission
        self.assertEqual(admission.refused["streams_per_session"], 99)
        [line] = refusal_lines(events)
        self.assertEqual((line["limit"], line["source"]), ("streams_per_session", "198.51.100.7"))
        self.assertEqual(client.proto.state, State.OPEN)
