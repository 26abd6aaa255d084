"""Prometheus metrics (anytls_twisted.metrics) on fake transports and a memory reactor clock."""

from __future__ import annotations

import struct

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.metrics import (
    AUTH_FAILURE_REASONS,
    CONNECT_FAILURE_REASONS,
    REAP_REASONS,
    Metrics,
    NullMetrics,
    metrics_resource,
    metrics_site,
)
from anytls_twisted.protocol.address import Destination, encode_socks_address, encode_uot_address
from anytls_twisted.protocol.auth import encode_preamble
from anytls_twisted.protocol.codec import Command
from anytls_twisted.protocol.uot import MAGIC_V2
from anytls_twisted.server.service import ReaperService, build_service
from anytls_twisted.server.tap import Options, makeService

from .helpers import SETTINGS_V2, Server
from .test_session import ADDR_V4, open_stream

ADDR_UOT_V2 = encode_socks_address(Destination(MAGIC_V2, 0))
SETTINGS_V1 = b"client=old\npadding-md5=75cff2ad89aadf5e257059ee571ebe11"


def metered(**overrides):
    """A test server whose factory and registry report to a fresh ``Metrics``."""
    server = Server(**overrides)
    metrics = Metrics()
    server.factory.metrics = metrics
    server.registry.metrics = metrics
    return server, metrics


def value(metrics, name, **labels):
    """A sample's value, 0 if it is absent."""
    return metrics.registry.get_sample_value(name, labels) or 0


def session(server, password="PASS", settings=SETTINGS_V2):
    client = server.connect()
    client.auth(password=password, settings=settings)
    client.received()
    return client


def http_get(site, path, accept=None):
    """One HTTP/1.0 GET through ``site`` on a fake transport: ``(status, headers, body)``."""
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
    transport = StringTransport()
    proto.makeConnection(transport)
    request = b"GET " + path + b" HTTP/1.0\r\n"
    if accept:
        request += b"Accept: " + accept + b"\r\n"
    proto.dataReceived(request + b"\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    return status, headers, body


class InterfaceTests(SynchronousTestCase):
    def test_null_metrics_has_every_hook(self):
        """Every hook ``Metrics`` has, ``NullMetrics`` has too (and does nothing)."""
        hooks = {n for n in vars(NullMetrics) if not n.startswith("_")}
        mine = {n for n in vars(Metrics) if not n.startswith("_") and callable(getattr(Metrics, n))}
        self.assertEqual(mine - hooks, {"live_bytes", "live_datagrams"})

    def test_default_factory_has_null_metrics(self):
        """Without --metrics nothing is kept: sessions run against NullMetrics."""
        server = Server()
        self.assertIsInstance(server.factory.metrics, NullMetrics)
        self.assertNotIsInstance(server.factory.metrics, Metrics)
        client = session(server)
        open_stream(client)
        server.origin_connect()
        client.proto.connectionLost(Failure(error.ConnectionDone()))

    def test_registries_are_separate(self):
        """Each Metrics has its own registry, so several servers fit in one process."""
        a, b = Metrics(), Metrics()
        a.session_reaped()
        self.assertEqual(value(a, "anytls_sessions_reaped_total", reason="idle"), 1)
        self.assertEqual(value(b, "anytls_sessions_reaped_total", reason="idle"), 0)

    def test_known_labels_exported_as_zero(self):
        metrics = Metrics()
        for reason in AUTH_FAILURE_REASONS:
            self.assertEqual(
                metrics.registry.get_sample_value("anytls_auth_failures_total", {"reason": reason}),
                0,
            )
        for reason in CONNECT_FAILURE_REASONS:
            self.assertEqual(
                metrics.registry.get_sample_value(
                    "anytls_origin_connect_failures_total", {"reason": reason}
                ),
                0,
            )
        for kind in ("tcp", "udp"):
            self.assertEqual(
                metrics.registry.get_sample_value("anytls_streams_open", {"kind": kind}), 0
            )
        for reason in REAP_REASONS:
            self.assertEqual(
                metrics.registry.get_sample_value(
                    "anytls_sessions_reaped_total", {"reason": reason}
                ),
                0,
            )
        self.assertEqual(metrics.registry.get_sample_value("anytls_heartbeats_sent_total"), 0)
        self.assertEqual(metrics.registry.get_sample_value("anytls_sessions_open"), 0)


class SessionMetricsTests(SynchronousTestCase):
    def test_open_and_close(self):
        server, metrics = metered()
        alice = session(server)
        bob = session(server, password="other")
        self.assertEqual(value(metrics, "anytls_sessions_open"), 2)
        self.assertEqual(value(metrics, "anytls_sessions_total", user="alice"), 1)
        self.assertEqual(value(metrics, "anytls_sessions_total", user="bob"), 1)
        alice.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(value(metrics, "anytls_sessions_open"), 1)
        self.assertEqual(value(metrics, "anytls_sessions_total", user="alice"), 1)
        bob.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(value(metrics, "anytls_sessions_open"), 0)

    def test_wrong_password(self):
        """A failed authentication counts once, by reason, and is no session."""
        server, metrics = metered()
        client = server.connect()
        client.send(encode_preamble("wrong", 30))
        self.assertTrue(client.closed)
        client.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(value(metrics, "anytls_auth_failures_total", reason="wrong_password"), 1)
        self.assertEqual(value(metrics, "anytls_auth_failures_total", reason="timeout"), 0)
        self.assertEqual(value(metrics, "anytls_sessions_open"), 0)
        self.assertEqual(
            [s for s in metrics.registry.collect() if s.name == "anytls_sessions"][0].samples, []
        )

    def test_auth_timeout(self):
        server, metrics = metered(auth_timeout=10)
        client = server.connect()
        client.send(encode_preamble("PASS", 30)[:10])
        server.reactor.advance(10.1)
        self.assertTrue(client.closed)
        self.assertEqual(value(metrics, "anytls_auth_failures_total", reason="timeout"), 1)
        self.assertEqual(value(metrics, "anytls_auth_failures_total", reason="wrong_password"), 0)

    def test_reaped(self):
        server, metrics = metered(
            idle_session_timeout=300, idle_session_check_interval=30, heartbeat_interval=0
        )
        reaper = ReaperService(server.registry, 30, server.reactor)
        reaper.startService()
        self.addCleanup(reaper.stopService)
        client = session(server)
        server.reactor.advance(300)
        self.assertTrue(client.closed)
        self.assertEqual(value(metrics, "anytls_sessions_reaped_total", reason="idle"), 1)
        self.assertEqual(value(metrics, "anytls_sessions_reaped_total", reason="heartbeat"), 0)
        self.assertEqual(value(metrics, "anytls_heartbeats_sent_total"), 0)

    def test_heartbeats_sent_and_unanswered(self):
        """Each heartbeat sent is counted; a session closed for not answering one is reaped
        with reason ``heartbeat``, not ``idle``."""
        server, metrics = metered(heartbeat_interval=60, heartbeat_timeout=15)
        reaper = ReaperService(server.registry, None, server.reactor)
        reaper.startService()
        self.addCleanup(reaper.stopService)
        answering, silent = session(server), session(server)
        server.reactor.advance(67.5)
        self.assertEqual(value(metrics, "anytls_heartbeats_sent_total"), 2)
        answering.frame(Command.HEART_RESPONSE, 0)
        server.reactor.advance(15)
        self.assertTrue(silent.closed)
        self.assertFalse(answering.closed)
        self.assertEqual(value(metrics, "anytls_sessions_reaped_total", reason="heartbeat"), 1)
        self.assertEqual(value(metrics, "anytls_sessions_reaped_total", reason="idle"), 0)


class StreamMetricsTests(SynchronousTestCase):
    def setUp(self):
        self.server, self.metrics = metered()
        self.client = session(self.server)

    def test_tcp_open_close_and_bytes(self):
        """Streams open/total move; bytes are live while open and kept after close."""
        open_stream(self.client, data=b"hello")
        self.assertEqual(value(self.metrics, "anytls_streams_open", kind="tcp"), 1)
        self.assertEqual(value(self.metrics, "anytls_streams_total", kind="tcp"), 1)
        origin, transport = self.server.origin_connect()
        self.client.frame(Command.PSH, 1, b" world")
        origin.dataReceived(b"response")
        up = dict(direction="client_to_origin", user="alice")
        down = dict(direction="origin_to_client", user="alice")
        self.assertEqual(value(self.metrics, "anytls_bytes_total", **up), 11)
        self.assertEqual(value(self.metrics, "anytls_bytes_total", **down), 8)
        origin.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(value(self.metrics, "anytls_streams_open", kind="tcp"), 0)
        self.assertEqual(value(self.metrics, "anytls_bytes_total", **up), 11)
        self.assertEqual(value(self.metrics, "anytls_bytes_total", **down), 8)
        # A second stream adds to the same user's totals.
        open_stream(self.client, sid=2, data=b"abc")
        self.server.origin_connect()
        self.assertEqual(value(self.metrics, "anytls_bytes_total", **up), 14)
        self.assertEqual(value(self.metrics, "anytls_streams_total", kind="tcp"), 2)
        # The session going away closes (and counts) its streams.
        self.client.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(value(self.metrics, "anytls_streams_open", kind="tcp"), 0)
        self.assertEqual(value(self.metrics, "anytls_bytes_total", **up), 14)

    def test_bad_address_is_no_stream(self):
        open_stream(self.client, address=b"\x09\x00\x00")
        self.assertEqual(value(self.metrics, "anytls_streams_total", kind="tcp"), 0)
        self.assertEqual(value(self.metrics, "anytls_streams_open", kind="tcp"), 0)

    def connect_failure(self, reason):
        return value(self.metrics, "anytls_origin_connect_failures_total", reason=reason)

    def test_connect_failure_reasons(self):
        open_stream(self.client, sid=1)
        self.server.origin_fail(error.ConnectionRefusedError())
        open_stream(self.client, sid=2)
        self.server.reactor.advance(5.1)  # --connect-timeout
        open_stream(self.client, sid=3, address=b"\x03\x0cnowhere.test\x00\x50")
        open_stream(self.client, sid=4)
        self.server.origin_fail(error.NoRouteError())
        self.assertEqual(
            {r: self.connect_failure(r) for r in CONNECT_FAILURE_REASONS},
            {"refused": 1, "timeout": 1, "no_such_host": 1, "policy": 0, "other": 1},
        )
        self.assertEqual(value(self.metrics, "anytls_streams_open", kind="tcp"), 0)

    def test_connect_timeout_is_timeout(self):
        """A connect cut by --connect-timeout is a timeout, in the metric and in SYNACK's text
        (a cancelled endpoint connect fails with ConnectingCancelledError, not a connect error)."""
        server, metrics = metered(synack_guard=10, connect_timeout=5)
        client = session(server)
        open_stream(client, sid=1)
        server.reactor.advance(5.1)
        frames = client.received()
        self.assertEqual([f.cmd for f in frames], [Command.SYNACK, Command.FIN])
        self.assertEqual(frames[0].data, b"dial tcp 127.0.0.1:8080: i/o timeout")
        self.assertEqual(
            value(metrics, "anytls_origin_connect_failures_total", reason="timeout"), 1
        )
        self.assertEqual(value(metrics, "anytls_origin_connect_failures_total", reason="other"), 0)

    def test_policy_refusal(self):
        """A destination refused by the policy: a connect failure (policy) and a refused tcp."""
        server, metrics = metered(allow_private=False, names={"evil.test": ["10.0.0.1"]})
        client = session(server)
        open_stream(client, sid=1)
        open_stream(client, sid=2, address=b"\x03\x09evil.test\x00\x50")
        self.assertEqual(value(metrics, "anytls_origin_connect_failures_total", reason="policy"), 2)
        self.assertEqual(value(metrics, "anytls_destinations_refused_total", kind="tcp"), 2)
        self.assertEqual(value(metrics, "anytls_destinations_refused_total", kind="udp"), 0)

    def synack(self, kind="tcp", result="ok"):
        labels = dict(kind=kind, result=result)
        return (
            value(self.metrics, "anytls_synack_latency_seconds_count", **labels),
            value(self.metrics, "anytls_synack_latency_seconds_sum", **labels),
        )

    def test_synack_latency(self):
        """Seconds from the address to the SYNACK, on the reactor's clock."""
        open_stream(self.client, sid=1)
        self.server.reactor.advance(0.25)
        self.server.origin_connect()
        self.assertEqual(self.synack(), (1, 0.25))
        self.assertEqual(
            value(
                self.metrics,
                "anytls_synack_latency_seconds_bucket",
                kind="tcp",
                result="ok",
                le="0.1",
            ),
            0,
        )
        self.assertEqual(
            value(
                self.metrics,
                "anytls_synack_latency_seconds_bucket",
                kind="tcp",
                result="ok",
                le="0.25",
            ),
            1,
        )
        open_stream(self.client, sid=2)
        self.server.reactor.advance(0.5)
        self.server.origin_fail(error.ConnectionRefusedError())
        self.assertEqual(self.synack(result="error"), (1, 0.5))

    def test_guard_synack_counts_when_sent(self):
        """The guard's empty SYNACK is observed when it goes out; the later failure is not."""
        open_stream(self.client, sid=1)
        self.server.reactor.advance(2.0)
        self.assertEqual(self.synack(), (1, 2.0))
        self.server.origin_fail()
        self.assertEqual(self.synack(), (1, 2.0))
        self.assertEqual(self.synack(result="error"), (0, 0))
        self.assertEqual(
            value(self.metrics, "anytls_origin_connect_failures_total", reason="refused"), 1
        )

    def test_v1_session_has_no_synack(self):
        client = session(self.server, settings=SETTINGS_V1)
        open_stream(client, sid=1)
        self.server.origin_connect()
        self.assertEqual(self.synack(), (0, 0))
        self.assertEqual(value(self.metrics, "anytls_streams_total", kind="tcp"), 1)


def uot_packet(payload, dest=None):
    """A v2 packet: non-connect mode carries the UoT address first."""
    prefix = encode_uot_address(dest) if dest is not None else b""
    return prefix + struct.pack(">H", len(payload)) + payload


class UoTMetricsTests(SynchronousTestCase):
    def open_uot(self, server, client, connect_to=None, sid=1):
        header = b"\x01" + encode_socks_address(connect_to) if connect_to else b"\x00" + ADDR_V4
        open_stream(client, sid=sid, address=ADDR_UOT_V2, data=header)
        return client.proto.streams[sid]

    def datagrams(self, metrics, direction):
        return value(metrics, "anytls_uot_datagrams_total", direction=direction)

    def test_datagrams_in_out_dropped(self):
        server, metrics = metered()
        client = session(server)
        dest = Destination("8.8.8.8", 53)
        self.open_uot(server, client, connect_to=dest)
        self.assertEqual(value(metrics, "anytls_streams_open", kind="udp"), 1)
        self.assertEqual(value(metrics, "anytls_streams_total", kind="udp"), 1)
        self.assertEqual(self.synack_count(metrics), 1)
        client.frame(Command.PSH, 1, uot_packet(b"q1") + uot_packet(b"q2"))
        [port] = server.udp_ports
        self.assertEqual(len(port.written), 2)
        port.protocol.datagramReceived(b"answer", ("8.8.8.8", 53))
        self.assertEqual(self.datagrams(metrics, "client_to_origin"), 2)
        self.assertEqual(self.datagrams(metrics, "origin_to_client"), 1)
        # Client side backed up: UDP replies are dropped and counted.
        client.proto.pauseProducing()
        port.protocol.datagramReceived(b"lost", ("8.8.8.8", 53))
        client.proto.resumeProducing()
        self.assertEqual(value(metrics, "anytls_uot_datagrams_dropped_total"), 1)
        # Bytes: the UoT encoding both ways (the header included client to origin).
        up = value(metrics, "anytls_bytes_total", direction="client_to_origin", user="alice")
        down = value(metrics, "anytls_bytes_total", direction="origin_to_client", user="alice")
        self.assertEqual(down, 2 + len(b"answer"))
        self.assertEqual(up, 1 + len(encode_socks_address(dest)) + 2 * 4)
        # Closed: the totals stay.
        client.frame(Command.FIN, 1)
        self.assertEqual(value(metrics, "anytls_streams_open", kind="udp"), 0)
        self.assertEqual(self.datagrams(metrics, "client_to_origin"), 2)
        self.assertEqual(self.datagrams(metrics, "origin_to_client"), 1)
        self.assertEqual(value(metrics, "anytls_uot_datagrams_dropped_total"), 1)
        self.assertEqual(
            value(metrics, "anytls_bytes_total", direction="origin_to_client", user="alice"), down
        )

    def synack_count(self, metrics):
        return value(metrics, "anytls_synack_latency_seconds_count", kind="udp", result="ok")

    def test_refused_udp_destination(self):
        """Each datagram to a refused address counts as a refused udp destination and a drop."""
        server, metrics = metered(allow_private=False)
        client = session(server)
        self.open_uot(server, client)
        loopback = Destination("127.0.0.1", 53)
        client.frame(Command.PSH, 1, uot_packet(b"a", loopback) + uot_packet(b"b", loopback))
        self.assertEqual(value(metrics, "anytls_destinations_refused_total", kind="udp"), 2)
        self.assertEqual(value(metrics, "anytls_uot_datagrams_dropped_total"), 2)
        self.assertEqual(self.datagrams(metrics, "client_to_origin"), 2)
        self.assertEqual(value(metrics, "anytls_destinations_refused_total", kind="tcp"), 0)

    def test_refused_connect_mode_counts_once(self):
        server, metrics = metered(allow_private=False)
        client = session(server)
        header = b"\x01" + encode_socks_address(Destination("10.1.2.3", 53))
        open_stream(client, address=ADDR_UOT_V2, data=header + uot_packet(b"x") + uot_packet(b"y"))
        self.assertEqual(value(metrics, "anytls_destinations_refused_total", kind="udp"), 1)
        self.assertEqual(value(metrics, "anytls_streams_open", kind="udp"), 0)


class ResourceTests(SynchronousTestCase):
    def setUp(self):
        self.server, self.metrics = metered()
        self.running = True
        self.site = metrics_site(self.metrics, lambda: self.running)

    def test_metrics_page_is_valid_text_format(self):
        """Every documented family is in the page, which the reference parser reads."""
        client = session(self.server)
        open_stream(client, data=b"hello")
        self.server.origin_connect()
        status, headers, body = http_get(self.site, b"/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers[b"content-type"].startswith(b"text/plain; version=0.0.4"), headers)
        families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}
        expected = {
            "anytls_sessions_open": "gauge",
            "anytls_sessions": "counter",
            "anytls_streams_open": "gauge",
            "anytls_streams": "counter",
            "anytls_bytes": "counter",
            "anytls_auth_failures": "counter",
            "anytls_origin_connect_failures": "counter",
            "anytls_destinations_refused": "counter",
            "anytls_synack_latency_seconds": "histogram",
            "anytls_uot_datagrams": "counter",
            "anytls_uot_datagrams_dropped": "counter",
            "anytls_sessions_reaped": "counter",
            "anytls_heartbeats_sent": "counter",
        }
        for name, kind in expected.items():
            self.assertIn(name, families)
            self.assertEqual(families[name].type, kind, name)
            self.assertTrue(families[name].documentation, name)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families.values()
            for s in f.samples
        }
        self.assertEqual(samples[("anytls_sessions_open", ())], 1)
        self.assertEqual(
            samples[("anytls_bytes_total", (("direction", "client_to_origin"), ("user", "alice")))],
            5,
        )
        self.assertEqual(
            samples[("anytls_synack_latency_seconds_count", (("kind", "tcp"), ("result", "ok")))], 1
        )

    def test_openmetrics_when_asked(self):
        status, headers, body = http_get(
            self.site, b"/metrics", accept=b"application/openmetrics-text"
        )
        self.assertEqual(status, 200)
        self.assertTrue(headers[b"content-type"].startswith(b"application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_healthz(self):
        self.assertEqual(http_get(self.site, b"/healthz")[::2], (200, b"ok\n"))
        self.running = False
        self.assertEqual(http_get(self.site, b"/healthz")[0], 503)

    def test_index_and_unknown(self):
        self.assertEqual(http_get(self.site, b"/")[0], 200)
        self.assertEqual(http_get(self.site, b"/nothing")[0], 404)

    def test_resource_tree(self):
        root = metrics_resource(self.metrics, lambda: True)
        self.assertEqual(set(root.listNames()), {b"metrics", b"healthz"})


class WiringTests(SynchronousTestCase):
    def test_build_service_passes_metrics(self):
        server = Server()
        metrics = Metrics()
        top = build_service(
            server.config,
            [("tcp:0", lambda f: f)],
            server.reactor,
            server.dialer,
            server.factory.listen_udp,
            metrics=metrics,
        )
        self.assertIs(top.factory.metrics, metrics)
        self.assertIs(top.registry.metrics, metrics)

    def make(self, *extra):
        options = Options()
        options.parseOptions(
            ["--password", "x", "--state-dir", self.mktemp(), "--port", "tcp:0"] + list(extra)
        )
        reactor = MemoryReactorClock()
        return options, reactor, makeService(options, reactor=reactor)

    def test_option_off_by_default(self):
        options, reactor, top = self.make()
        self.assertIsNone(options["metrics"])
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertIsInstance(top.factory.metrics, NullMetrics)
        self.assertNotIsInstance(top.factory.metrics, Metrics)

    def test_option_adds_listener(self):
        """--metrics: one more child service, listening with a twisted.web Site."""
        options, reactor, top = self.make("--metrics", "tcp:9095:interface=127.0.0.1")
        self.assertIsInstance(top.factory.metrics, Metrics)
        top.privilegedStartService()
        top.startService()
        port, site, _, interface = reactor.tcpServers[-1]
        self.assertEqual((port, interface), (9095, "127.0.0.1"))
        self.assertEqual(type(site).__name__, "Site")
        self.assertEqual(http_get(site, b"/healthz")[::2], (200, b"ok\n"))
        status, _, body = http_get(site, b"/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"anytls_sessions_open 0.0", body)
        d = top.stopService()
        self.successResultOf(d)
        self.assertFalse(top.running)

    def test_bad_endpoint_is_usage_error(self):
        from twisted.python import usage

        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(
                ["--password", "x", "--state-dir", self.mktemp(), "--metrics", "bogus:1"]
            )
        self.assertIn("--metrics bogus:1", str(caught.exception))
