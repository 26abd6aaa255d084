"""The fallback: its routes (pure), and the relay on fake transports and a memory reactor.

A connection that is not an AnyTLS client is relayed byte for byte to the fallback endpoint,
the bytes already read first, with backpressure both ways, the connect and idle timeouts, and
bounded buffers; without a fallback it is closed as before.
"""

from __future__ import annotations

import json
import os

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from anytls_twisted.interfaces import IFallback, IFallbackDialer
from anytls_twisted.metrics import Metrics
from anytls_twisted.protocol.auth import encode_preamble
from anytls_twisted.protocol.fallback import FallbackRoutes
from anytls_twisted.server import fallback as relay_module
from anytls_twisted.server.fallback import CONNECT_BUFFER_LIMIT, FallbackDialer
from anytls_twisted.server.load import load
from anytls_twisted.server.session import CLOSE_GRACE
from anytls_twisted.server.tap import Options, makeService

from .helpers import PASSWORD, Server, capture_events
from .test_config_reload import INBOUND

REQUEST = b"GET / HTTP/1.1\r\nHost: decoy.example\r\nAccept: */*\r\n\r\n"
PAGE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ndecoy"
DECOY = "tcp:127.0.0.1:8080"


class RoutesTests(SynchronousTestCase):
    def test_default_only(self):
        routes = FallbackRoutes(DECOY)
        self.assertTrue(routes)
        self.assertEqual(routes.choose(None), (DECOY, ""))
        self.assertEqual(routes.choose("h2"), (DECOY, ""))

    def test_by_alpn_as_sing_box(self):
        """With per-ALPN routes, a negotiated protocol takes its route or none; no protocol
        takes the default (sing-box's trojan inbound does the same)."""
        routes = FallbackRoutes(DECOY, (("h2", "tcp:127.0.0.1:8081"),))
        self.assertEqual(routes.choose("h2"), ("tcp:127.0.0.1:8081", ""))
        self.assertEqual(routes.choose("http/1.1"), (None, "no fallback for ALPN http/1.1"))
        self.assertEqual(routes.choose(None), (DECOY, ""))
        without = FallbackRoutes(None, (("h2", "tcp:127.0.0.1:8081"),))
        self.assertEqual(without.choose(None), (None, "no default fallback"))

    def test_empty(self):
        self.assertFalse(FallbackRoutes())
        self.assertEqual(FallbackRoutes().choose("h2"), (None, "no default fallback"))

    def test_unreachable(self):
        routes = FallbackRoutes(None, (("h2", "a"), ("http/1.1", "b")))
        self.assertEqual(routes.unreachable(()), ("h2", "http/1.1"))
        self.assertEqual(routes.unreachable(("h2", "http/1.1")), ())


def decoy_server(**overrides) -> Server:
    overrides.setdefault("fallback", FallbackRoutes(DECOY))
    server = Server(**overrides)
    server.metrics = Metrics()
    server.factory.metrics = server.metrics
    return server


def counted(server: Server, reason: str) -> float:
    value = server.metrics.registry.get_sample_value("anytls_fallbacks_total", {"reason": reason})
    return value or 0.0


class RelayTests(SynchronousTestCase):
    def setUp(self):
        self.server = decoy_server(auth_timeout=10, connect_timeout=5, idle_session_timeout=300)
        self.client = self.server.connect()

    def connected(self):
        """The fallback connect the server made: accept it; return its transport."""
        host, port, _factory, _timeout, _bind = self.server.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 8080))
        proto, transport = self.server.origin_connect()
        return proto, transport

    def test_http_request_relayed_byte_for_byte(self):
        """An HTTP request goes to the fallback as read (the bytes before the decision
        included), its answer comes back, and later bytes follow both ways."""
        events = capture_events(self)
        self.client.send(REQUEST[:10])
        self.assertEqual(self.server.reactor.tcpClients, [])
        self.client.send(REQUEST[10:])
        self.assertEqual(len(self.server.reactor.tcpClients), 1)
        self.assertEqual(self.client.transport.producerState, "paused")  # until connected
        proto, target = self.connected()
        self.assertEqual(target.value(), REQUEST)
        self.assertEqual(self.client.transport.producerState, "producing")
        proto.dataReceived(PAGE)
        self.assertEqual(self.client.transport.value(), PAGE)
        self.client.send(b"more")
        self.assertEqual(target.value(), REQUEST + b"more")
        self.assertFalse(self.client.closed)
        self.assertEqual(counted(self.server, "wrong_password"), 1)
        self.assertEqual(
            self.server.metrics.registry.get_sample_value(
                "anytls_auth_failures_total", {"reason": "wrong_password"}
            ),
            1,
        )
        lines = [e for e in events if "relayed to the fallback" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["endpoint"], DECOY)
        self.assertEqual(lines[0]["reason"], "wrong_password")
        self.assertEqual(lines[0]["log_level"].name, "info")
        verifyObject(IFallback, self.client.proto.fallback)
        verifyObject(IFallbackDialer, FallbackDialer(self.server.reactor))

    def test_bytes_during_connect_kept_in_order(self):
        self.client.send(REQUEST)
        self.client.send(b"pipelined")
        _, target = self.connected()
        self.assertEqual(target.value(), REQUEST + b"pipelined")

    def test_backpressure_both_ways(self):
        """A full fallback pauses reading the client; a full client pauses reading the
        fallback; each resumes when drained."""
        self.client.send(REQUEST)
        _, target = self.connected()
        target.producer.pauseProducing()
        self.assertEqual(self.client.transport.producerState, "paused")
        target.producer.resumeProducing()
        self.assertEqual(self.client.transport.producerState, "producing")
        self.client.transport.producer.pauseProducing()
        self.assertEqual(target.producerState, "paused")
        self.client.transport.producer.resumeProducing()
        self.assertEqual(target.producerState, "producing")

    def test_fallback_closes_then_client(self):
        """The fallback's answer and close reach the client in that order, politely."""
        self.client.send(REQUEST)
        proto, target = self.connected()
        proto.dataReceived(PAGE)
        target.loseConnection()
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.client.transport.value(), PAGE)
        self.assertTrue(self.client.transport.disconnecting)
        self.assertFalse(self.client.transport.disconnected)  # not aborted

    def test_client_closes_then_fallback(self):
        self.client.send(REQUEST)
        _, target = self.connected()
        self.client.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(target.disconnecting)
        self.assertIsNone(target.producer)

    def test_fallback_unreachable_closes_client(self):
        events = capture_events(self)
        self.client.send(REQUEST)
        self.server.origin_fail(error.ConnectionRefusedError())
        self.assertTrue(self.client.closed)
        self.assertEqual(self.client.transport.value(), b"")
        self.assertTrue(any("unreachable" in e.get("log_format", "") for e in events))
        relay = self.client.proto.fallback
        self.client.send(b"late" * 1000)  # read while waiting for close_notify: dropped
        self.assertEqual((relay.bytes_in, relay._pending), (len(REQUEST), [REQUEST]))

    def test_connect_timeout(self):
        """A fallback that never answers the connect is given up at --connect-timeout."""
        self.client.send(REQUEST)
        self.server.reactor.advance(4.9)
        self.assertFalse(self.client.closed)
        self.server.reactor.advance(0.2)
        self.assertTrue(self.client.closed)

    def test_auth_timer_cancelled_idle_timeout_applies(self):
        """Once relayed, the auth timeout no longer applies; --idle-session-timeout without a
        byte either way closes both sides, and every byte restarts it."""
        self.client.send(REQUEST)
        proto, target = self.connected()
        self.server.reactor.advance(200)
        proto.dataReceived(b"x")
        self.server.reactor.advance(200)
        self.assertFalse(self.client.closed)
        self.client.send(b"y")
        self.server.reactor.advance(299)
        self.assertFalse(self.client.closed)
        self.server.reactor.advance(2)
        self.assertTrue(self.client.transport.disconnecting)
        self.assertTrue(target.disconnecting)
        self.server.reactor.advance(CLOSE_GRACE + 0.1)
        self.assertTrue(self.client.transport.disconnected)  # aborted after the close grace

    def test_buffer_before_connect_is_bounded(self):
        self.client.send(REQUEST)
        self.client.send(b"z" * CONNECT_BUFFER_LIMIT)
        self.assertTrue(self.client.closed)

    def test_shutdown_closes_relays(self):
        self.client.send(REQUEST)
        _, target = self.connected()
        target.producer.pauseProducing()  # reading the client paused by a full fallback
        self.server.registry.close_all(1.0)
        self.assertTrue(self.client.transport.disconnecting)
        self.assertEqual(self.client.transport.producerState, "producing")  # to see close_notify


class DecisionTests(SynchronousTestCase):
    def test_right_password_is_not_relayed(self):
        server = decoy_server()
        client = server.connect()
        client.auth()
        self.assertEqual(client.proto.user, "alice")
        self.assertIsNone(client.proto.fallback)
        self.assertEqual(server.reactor.tcpClients, [])

    def test_short_preamble_relayed_at_auth_timeout(self):
        """Fewer than 32 bytes decide nothing; at the auth timeout they go to the fallback."""
        server = decoy_server(auth_timeout=10)
        client = server.connect()
        client.send(b"GET / HTTP/1.0\r\n\r\n")
        server.reactor.advance(9.9)
        self.assertEqual(server.reactor.tcpClients, [])
        server.reactor.advance(0.2)
        _, target = server.origin_connect()
        self.assertEqual(target.value(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertFalse(client.closed)
        self.assertEqual(counted(server, "timeout"), 1)

    def test_silent_connection_closed_at_auth_timeout(self):
        server = decoy_server(auth_timeout=10)
        client = server.connect()
        server.reactor.advance(10.1)
        self.assertEqual(server.reactor.tcpClients, [])
        self.assertTrue(client.transport.disconnected)
        self.assertEqual(counted(server, "timeout"), 0)

    def test_user_with_slow_padding_not_relayed(self):
        """A user's digest with its padding still missing at the timeout is closed, never
        shown to the fallback."""
        server = decoy_server(auth_timeout=10)
        client = server.connect()
        client.send(encode_preamble(PASSWORD, 500)[:100])
        server.reactor.advance(10.1)
        self.assertEqual(server.reactor.tcpClients, [])
        self.assertTrue(client.closed)

    def test_alpn_routes(self):
        """The negotiated ALPN picks the route; a protocol without one is closed."""
        routes = FallbackRoutes(DECOY, (("h2", "tcp:127.0.0.1:8082"),))
        for alpn, expected in ((b"h2", 8082), (None, 8080), (b"http/1.1", None)):
            server = decoy_server(fallback=routes)
            client = server.connect()
            client.transport.negotiatedProtocol = alpn
            client.send(REQUEST)
            if expected is None:
                self.assertEqual(server.reactor.tcpClients, [])
                self.assertTrue(client.closed)
            else:
                self.assertEqual(server.reactor.tcpClients[-1][1], expected)

    def test_no_fallback_closes_at_once(self):
        server = Server()
        client = server.connect()
        client.send(REQUEST)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(server.reactor.tcpClients, [])


class DialerTests(SynchronousTestCase):
    def test_endpoint_strings(self):
        relay_module.check_endpoint("tcp:127.0.0.1:8080")
        relay_module.check_endpoint("tcp:host=\\:\\:1:port=8080")
        relay_module.check_endpoint("unix:/run/decoy.sock")
        for bad in ("nonsense:1", "tcp:", "tcp:host=x:port=notaport"):
            with self.assertRaises(ValueError) as caught:
                relay_module.check_endpoint(bad)
            self.assertNotIn("\n", str(caught.exception))

    def test_dials_the_endpoint(self):
        server = Server()
        dialer = FallbackDialer(server.reactor)
        d = dialer.connect("tcp:192.0.2.1:81", relay_module._FallbackFactory(None), 5)
        self.assertEqual(server.reactor.tcpClients[0][:2], ("192.0.2.1", 81))
        server.reactor.advance(5.1)
        self.failureResultOf(d)


class ConfigTests(SynchronousTestCase):
    """``--fallback`` and the config file's ``fallback``/``fallback_for_alpn`` (sing-box's
    trojan inbound shape), their errors, and reload."""

    def write(self, document):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump(document, f)
        return path

    def load(self, *args):
        options = Options()
        options.parseOptions(["--state-dir", self.mktemp()] + list(args))
        return load(options)

    def test_file_shape(self):
        path = self.write(
            dict(
                INBOUND,
                fallback={"server": "127.0.0.1", "server_port": 8080},
                fallback_for_alpn={
                    "h2": {"server": "::1", "server_port": 8081},
                    "http/1.1": {"server": "decoy.internal", "server_port": 8082},
                },
            )
        )
        settings = self.load("--config", path)
        self.assertEqual(
            settings.config.fallback,
            FallbackRoutes(
                "tcp:host=127.0.0.1:port=8080",
                (
                    ("h2", "tcp:host=\\:\\:1:port=8081"),
                    ("http/1.1", "tcp:host=decoy.internal:port=8082"),
                ),
            ),
        )
        self.assertEqual(settings.warnings, ())  # INBOUND's tls.alpn selects both

    def test_command_line_beats_file_default(self):
        path = self.write(dict(INBOUND, fallback={"server": "127.0.0.1", "server_port": 8080}))
        settings = self.load("--config", path, "--fallback", "unix:/run/decoy.sock")
        self.assertEqual(settings.config.fallback.default, "unix:/run/decoy.sock")
        self.assertEqual(self.load("--password", "p").config.fallback, FallbackRoutes())

    def test_unreachable_alpn_route_warned(self):
        document = dict(INBOUND, fallback_for_alpn={"h2": {"server": "a", "server_port": 1}})
        document["tls"] = {"enabled": True}
        path = self.write(document)
        (warning,) = self.load("--config", path).warnings
        self.assertIn("fallback_for_alpn h2 is never used", warning)
        self.assertIn("now: none", warning)

    def test_errors_are_one_line(self):
        cases = [
            ({"fallback": {"server": "x"}}, "fallback.server_port"),
            ({"fallback": {"server": "x", "server_port": 0}}, "fallback.server_port"),
            ({"fallback": {"server_port": 80}}, "fallback.server"),
            ({"fallback": {"server": "x", "server_port": 80, "detour": "y"}}, "fallback.detour"),
            ({"fallback": "tcp:1.2.3.4:80"}, "fallback"),
            ({"fallback_for_alpn": {"h2": 8080}}, "fallback_for_alpn.h2"),
            ({"fallback_for_alpn": ["h2"]}, "fallback_for_alpn"),
        ]
        for extra, field in cases:
            path = self.write(dict(INBOUND, **extra))
            e = self.assertRaises(usage.UsageError, self.load, "--config", path)
            self.assertIn(f"{path}: {field}", str(e))
            self.assertNotIn("\n", str(e))
        e = self.assertRaises(usage.UsageError, self.load, "--password", "p", "--fallback", "x:1")
        self.assertTrue(str(e).startswith("--fallback: Twisted cannot use"), str(e))
        self.assertNotIn("\n", str(e))

    def test_help_lists_the_option_and_default(self):
        text = str(Options())
        self.assertIn("--fallback=", text)
        self.assertIn("[default: the config file's fallback, else none", " ".join(text.split()))

    def test_reload_picks_up_fallback_changes(self):
        document = dict(INBOUND, listen="127.0.0.1", listen_port=0)
        path = self.write(document)
        options = Options()
        options.parseOptions(["--config", path, "--state-dir", os.path.abspath(self.mktemp())])
        reactor = MemoryReactorClock()
        top = makeService(options, reactor=reactor)
        self.assertFalse(top.factory.config.fallback)
        document["fallback"] = {"server": "127.0.0.1", "server_port": 8080}
        with open(path, "w") as f:
            json.dump(document, f)
        self.assertTrue(top.reloader.reload("test"))
        self.assertEqual(top.factory.config.fallback.default, "tcp:host=127.0.0.1:port=8080")
        proto = top.factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
        proto.makeConnection(StringTransport())
        proto.dataReceived(REQUEST)
        self.assertEqual(reactor.tcpClients[-1][:2], ("127.0.0.1", 8080))
