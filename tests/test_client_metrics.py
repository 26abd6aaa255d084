"""The client's Prometheus metrics (anytls_twisted.client.metrics), driven through the session
manager, the local port and the UDP association on fake transports and a memory reactor; the
page (checked by ``promtool`` when installed); ``--metrics`` parsing and wiring."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from anytls_twisted.client.local import LocalProxyFactory
from anytls_twisted.client.metrics import (
    DIAL_FAILURE_REASONS,
    SESSION_CLOSE_REASONS,
    ClientMetrics,
    ClientNullMetrics,
    SessionEnd,
    session_end,
)
from anytls_twisted.client.options import Options
from anytls_twisted.client.pool import Pool
from anytls_twisted.client.sessions import SessionManager
from anytls_twisted.client.stream import ClientStream
from anytls_twisted.client.tls import CertificateVerifyError
from anytls_twisted.metrics import metrics_site
from anytls_twisted.protocol.address import Destination
from anytls_twisted.protocol.codec import Command

from .helpers import capture_events
from .test_client_session import LOW, PASSWORD, FakeEndpoint, Local, Transport
from .test_client_udp import Reactor
from .test_metrics import http_get

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URI = "anytls://s3cret@proxy.example:8443/?sni=front.example"
DONE = Failure(error.ConnectionDone("closed cleanly"))
EXAMPLE = Destination("example.com", 80)
RESET = Failure(ConnectionResetError("connection reset by peer"))


class Endpoint(FakeEndpoint):
    """:class:`FakeEndpoint` that can fail with any exception."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: Exception | None = None

    def connect(self, factory):
        if self.failure is not None:
            return defer.fail(self.failure)
        return super().connect(factory)


def metered(tls=False, **pool):
    clock = MemoryReactorClock()
    endpoint = Endpoint()
    endpoint.tls = tls
    metrics = ClientMetrics()
    m = SessionManager(
        lambda: endpoint, PASSWORD, clock, Pool(**pool), randrange=LOW, metrics=metrics, tls=tls
    )
    return m, endpoint, clock, metrics


def value(metrics, name, **labels):
    """A sample's value, 0 if it is absent."""
    return metrics.registry.get_sample_value(name, labels) or 0


def closed(metrics):
    """``{reason: count}`` of the sessions closed, without the zeros."""
    counts = {
        r: value(metrics, "anytls_client_sessions_closed_total", reason=r)
        for r in SESSION_CLOSE_REASONS
    }
    return {r: n for r, n in counts.items() if n}


def open_stream(m, clock, destination=EXAMPLE):
    local = Local()
    stream = ClientStream(local, destination, clock)
    m.open(stream)
    return stream, local


class PureRuleTests(SynchronousTestCase):
    def test_session_end(self):
        self.assertEqual(session_end("idle", RESET, False, False), SessionEnd("idle"))
        self.assertEqual(session_end(None, RESET, False, False), SessionEnd("error", True))
        self.assertEqual(session_end(None, DONE, False, True), SessionEnd("error", True))
        self.assertEqual(session_end(None, DONE, True, True), SessionEnd("server_closed"))
        lost = Failure(error.ConnectionLost("eof"))
        self.assertEqual(session_end(None, lost, True, True), SessionEnd("server_closed"))
        self.assertEqual(session_end(None, RESET, True, True), SessionEnd("error"))
        self.assertEqual(
            session_end(None, DONE, True, False), SessionEnd("server_closed", auth_failed=True)
        )
        self.assertEqual(
            session_end(None, RESET, True, False), SessionEnd("error", auth_failed=True)
        )


class InterfaceTests(SynchronousTestCase):
    def test_null_metrics_has_every_hook(self):
        hooks = {n for n in vars(ClientMetrics) if not n.startswith("_") and n != "live_bytes"}
        self.assertTrue(hooks)
        for name in hooks:
            self.assertTrue(callable(getattr(ClientNullMetrics, name, None)), name)

    def test_default_manager_has_null_metrics(self):
        m = SessionManager(lambda: Endpoint(), PASSWORD, MemoryReactorClock())
        self.assertIsInstance(m.metrics, ClientNullMetrics)
        self.assertNotIsInstance(m.metrics, ClientMetrics)

    def test_registries_are_separate(self):
        a, b = ClientMetrics(), ClientMetrics()
        a.session_dialled()
        self.assertEqual(value(a, "anytls_client_sessions_dialled_total"), 1)
        self.assertEqual(value(b, "anytls_client_sessions_dialled_total"), 0)

    def test_known_labels_exported_as_zero(self):
        metrics = ClientMetrics()
        for reason in DIAL_FAILURE_REASONS:
            self.assertEqual(
                metrics.registry.get_sample_value(
                    "anytls_client_dial_failures_total", {"reason": reason}
                ),
                0,
            )
        for reason in SESSION_CLOSE_REASONS:
            self.assertEqual(
                metrics.registry.get_sample_value(
                    "anytls_client_sessions_closed_total", {"reason": reason}
                ),
                0,
            )
        for kind in ("tcp", "udp"):
            for name in ("anytls_client_streams_total", "anytls_client_streams_open"):
                self.assertEqual(metrics.registry.get_sample_value(name, {"kind": kind}), 0)
        for direction in ("upload", "download"):
            self.assertEqual(
                metrics.registry.get_sample_value(
                    "anytls_client_bytes_total", {"direction": direction}
                ),
                0,
            )
        self.assertEqual(metrics.registry.get_sample_value("anytls_client_sessions_open"), 0)


class SessionManagerMetricsTests(SynchronousTestCase):
    def test_sessions_streams_and_bytes(self):
        m, endpoint, clock, metrics = metered()
        s, local = open_stream(m, clock)
        server = endpoint.sessions[0]
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, s.sid)
        self.assertEqual(value(metrics, "anytls_client_sessions_dialled_total"), 1)
        self.assertEqual(value(metrics, "anytls_client_sessions_open"), 1)
        self.assertEqual(value(metrics, "anytls_client_sessions_idle"), 0)
        self.assertEqual(value(metrics, "anytls_client_streams_open", kind="tcp"), 1)
        self.assertEqual(value(metrics, "anytls_client_streams_total", kind="tcp"), 1)
        s.send(b"hello")
        server.send(Command.PSH, s.sid, b"world!")
        # Read live, while the stream is open.
        self.assertEqual(value(metrics, "anytls_client_bytes_total", direction="upload"), 5)
        self.assertEqual(value(metrics, "anytls_client_bytes_total", direction="download"), 6)
        s.local_closed()
        self.assertEqual(value(metrics, "anytls_client_streams_open", kind="tcp"), 0)
        self.assertEqual(value(metrics, "anytls_client_sessions_idle"), 1)
        # Folded into the totals when the stream closed, and not counted twice.
        self.assertEqual(value(metrics, "anytls_client_bytes_total", direction="upload"), 5)
        self.assertEqual(value(metrics, "anytls_client_bytes_total", direction="download"), 6)
        s2, _ = open_stream(m, clock)  # reuses the idle session
        server.send(Command.SYNACK, s2.sid)
        s2.send(b"again")
        s2.local_closed()
        self.assertEqual(value(metrics, "anytls_client_sessions_dialled_total"), 1)
        self.assertEqual(value(metrics, "anytls_client_streams_total", kind="tcp"), 2)
        self.assertEqual(value(metrics, "anytls_client_bytes_total", direction="upload"), 10)
        self.assertEqual(closed(metrics), {})

    def test_reaped_session_closes_as_idle(self):
        m, endpoint, clock, metrics = metered(
            idle_session_check_interval=10, idle_session_timeout=10
        )
        m.startService()
        self.addCleanup(m.stopService)
        s, _ = open_stream(m, clock)
        endpoint.sessions[0].send(Command.SERVER_SETTINGS, 0, b"v=2")
        s.local_closed()
        clock.advance(20)
        endpoint.sessions[0].session.connectionLost(DONE)
        self.assertEqual(closed(metrics), {"idle": 1})
        self.assertEqual(value(metrics, "anytls_client_sessions_open"), 0)
        self.assertEqual(value(metrics, "anytls_client_sessions_idle"), 0)
        self.assertEqual(value(metrics, "anytls_client_auth_failures_total"), 0)

    def test_dial_failures_connect_and_timeout(self):
        m, endpoint, clock, metrics = metered()
        server = m.servers.servers[0]
        for failure in (
            ConnectionRefusedError("refused"),
            error.DNSLookupError("no such host"),
            error.TimeoutError("timed out"),
        ):
            endpoint.failure = failure
            open_stream(m, clock)
            self.assertFalse(server.up)
            m.servers.dial_succeeded(server)  # as if a probe had found it up again
        self.assertEqual(value(metrics, "anytls_client_sessions_dialled_total"), 3)
        self.assertEqual(value(metrics, "anytls_client_dial_failures_total", reason="connect"), 2)
        self.assertEqual(value(metrics, "anytls_client_dial_failures_total", reason="timeout"), 1)
        self.assertEqual(value(metrics, "anytls_client_streams_total", kind="tcp"), 0)
        self.assertEqual(closed(metrics), {})

    def test_tls_failure_is_a_dial_failure(self):
        m, endpoint, clock, metrics = metered(tls=True)
        _, local = open_stream(m, clock)
        failure = Failure(CertificateVerifyError("certificate verify failed: self-signed"))
        endpoint.sessions[0].session.connectionLost(failure)
        self.assertEqual(local.events[0][0], "refused")
        self.assertEqual(value(metrics, "anytls_client_dial_failures_total", reason="tls"), 1)
        self.assertEqual(value(metrics, "anytls_client_auth_failures_total"), 0)
        self.assertEqual(closed(metrics), {"error": 1})
        open_stream(m, clock)
        endpoint.sessions[1].session.connectionLost(Failure(SSL.Error([])))
        self.assertEqual(value(metrics, "anytls_client_dial_failures_total", reason="tls"), 2)

    def test_closed_after_tls_before_any_byte_is_an_auth_failure(self):
        m, endpoint, clock, metrics = metered(tls=True)
        open_stream(m, clock)
        session = endpoint.sessions[0].session
        session.handshakeCompleted()
        session.connectionLost(DONE)
        self.assertEqual(value(metrics, "anytls_client_auth_failures_total"), 1)
        self.assertEqual(value(metrics, "anytls_client_dial_failures_total", reason="tls"), 0)
        self.assertEqual(closed(metrics), {"server_closed": 1})

    def test_plain_tcp_session_closed_before_any_byte_is_an_auth_failure(self):
        m, endpoint, clock, metrics = metered(tls=False)
        open_stream(m, clock)
        endpoint.sessions[0].session.connectionLost(RESET)
        self.assertEqual(value(metrics, "anytls_client_auth_failures_total"), 1)
        self.assertEqual(closed(metrics), {"error": 1})

    def test_server_closing_a_working_session(self):
        m, endpoint, clock, metrics = metered(tls=True)
        open_stream(m, clock)
        server = endpoint.sessions[0]
        server.session.handshakeCompleted()
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.session.connectionLost(DONE)
        self.assertEqual(value(metrics, "anytls_client_auth_failures_total"), 0)
        self.assertEqual(closed(metrics), {"server_closed": 1})
        self.assertEqual(value(metrics, "anytls_client_streams_open", kind="tcp"), 0)

    def test_synack_error_counts_a_refused_stream(self):
        m, endpoint, clock, metrics = metered()
        s, local = open_stream(m, clock)
        server = endpoint.sessions[0]
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, s.sid, b"dial tcp: connection refused")
        self.assertEqual(local.events[0][0], "refused")
        self.assertEqual(value(metrics, "anytls_client_streams_refused_total"), 1)
        self.assertEqual(value(metrics, "anytls_client_streams_open", kind="tcp"), 0)
        server.send(Command.SYNACK, 99)  # success for an unknown stream: nothing
        self.assertEqual(value(metrics, "anytls_client_streams_refused_total"), 1)

    def reused(self):
        """A v2 session whose first stream was answered and ended, and a second stream on it
        (watched) that gets no SYNACK."""
        m, endpoint, clock, metrics = metered()
        s, _ = open_stream(m, clock)
        server = endpoint.sessions[0]
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, s.sid)
        s.local_closed()
        open_stream(m, clock)
        return server, clock, metrics

    def test_watchdog_reset(self):
        server, clock, metrics = self.reused()
        server.send(Command.PSH, 99, b"")  # a frame: the session is alive
        clock.advance(3)
        self.assertEqual(value(metrics, "anytls_client_watchdog_resets_total"), 1)
        self.assertEqual(value(metrics, "anytls_client_watchdog_session_closes_total"), 0)
        self.assertEqual(value(metrics, "anytls_client_streams_open", kind="tcp"), 0)

    def test_watchdog_session_close(self):
        server, clock, metrics = self.reused()
        clock.advance(3)
        self.assertEqual(value(metrics, "anytls_client_watchdog_session_closes_total"), 1)
        self.assertEqual(value(metrics, "anytls_client_watchdog_resets_total"), 0)
        server.session.connectionLost(DONE)
        self.assertEqual(closed(metrics), {"watchdog": 1})

    def test_stopping(self):
        m, endpoint, clock, metrics = metered()
        m.startService()
        open_stream(m, clock)
        m.stopService()
        endpoint.sessions[0].session.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(closed(metrics), {"stopping": 1})
        self.assertEqual(value(metrics, "anytls_client_auth_failures_total"), 0)


class LocalPortMetricsTests(SynchronousTestCase):
    def test_refused_requests(self):
        m, endpoint, clock, metrics = metered()
        factory = LocalProxyFactory(m, clock)
        for request in (
            b"\x05\x01\x02",  # SOCKS5 offering username/password only: not acceptable
            b"GET /relative HTTP/1.1\r\n\r\n",  # not a proxy request
        ):
            local = factory.buildProtocol(None)
            local.makeConnection(Transport())
            local.dataReceived(request)
            self.assertTrue(local.transport.disconnecting)
        for protocol in ("socks", "http"):
            self.assertEqual(
                value(metrics, "anytls_client_local_requests_refused_total", protocol=protocol), 1
            )
        self.assertEqual(value(metrics, "anytls_client_sessions_dialled_total"), 0)

    def test_udp_association_stream_is_udp(self):
        m, endpoint, _, metrics = metered()
        reactor = Reactor()
        m.clock = reactor
        local = LocalProxyFactory(m, reactor).buildProtocol(None)
        local.makeConnection(Transport())
        local.dataReceived(b"\x05\x01\x00")
        local.dataReceived(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        self.assertEqual(value(metrics, "anytls_client_streams_total", kind="udp"), 1)
        self.assertEqual(value(metrics, "anytls_client_streams_open", kind="udp"), 1)
        self.assertEqual(value(metrics, "anytls_client_streams_total", kind="tcp"), 0)
        # The UoT request header is stream payload.
        self.assertGreater(value(metrics, "anytls_client_bytes_total", direction="upload"), 0)


#: Every family of the page and its type.
FAMILIES = {
    "anytls_client_sessions_open": "gauge",
    "anytls_client_sessions_idle": "gauge",
    "anytls_client_sessions_dialled": "counter",
    "anytls_client_sessions_closed": "counter",
    "anytls_client_dial_failures": "counter",
    "anytls_client_auth_failures": "counter",
    "anytls_client_streams_open": "gauge",
    "anytls_client_streams": "counter",
    "anytls_client_streams_refused": "counter",
    "anytls_client_bytes": "counter",
    "anytls_client_watchdog_resets": "counter",
    "anytls_client_watchdog_session_closes": "counter",
    "anytls_client_local_requests_refused": "counter",
    "anytls_client_dial_retries": "counter",
    "anytls_client_server_up": "gauge",
    "anytls_client_server_rtt_seconds": "gauge",
    "anytls_client_server_dial_failures": "counter",
    "anytls_client_server_down": "counter",
    "anytls_client_server_sessions": "gauge",
}


class PageTests(SynchronousTestCase):
    def page(self):
        m, endpoint, clock, metrics = metered()
        s, _ = open_stream(m, clock)
        endpoint.sessions[0].send(Command.SERVER_SETTINGS, 0, b"v=2")
        endpoint.sessions[0].send(Command.SYNACK, s.sid)
        s.send(b"abc")
        self.running = True
        site = metrics_site(metrics, lambda: self.running)
        status, headers, body = http_get(site, b"/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers[b"content-type"].startswith(b"text/plain; version=0.0.4"))
        return site, body.decode("utf-8")

    def test_every_documented_family(self):
        _, text = self.page()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        ours = {n for n in families if not n.endswith("_created")}  # the parser's view of *_created
        self.assertEqual(ours, set(FAMILIES))
        for name, kind in FAMILIES.items():
            self.assertEqual(families[name].type, kind, name)
            self.assertTrue(families[name].documentation, name)
        self.assertIn('anytls_client_bytes_total{direction="upload"} 3.0', text)
        self.assertIn("anytls_client_sessions_open 1.0", text)
        with open(os.path.join(ROOT, "docs", "metrics.md"), encoding="utf-8") as f:
            docs = f.read()
        for name, kind in FAMILIES.items():
            documented = name + ("_total" if kind == "counter" else "")
            self.assertIn(f"`{documented}`", docs)

    def test_healthz(self):
        site, _ = self.page()
        self.assertEqual(http_get(site, b"/healthz")[::2], (200, b"ok\n"))
        self.running = False
        self.assertEqual(http_get(site, b"/healthz")[0], 503)

    def test_promtool_accepts_the_page(self):
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool is not installed (Debian package prometheus)")
        _, text = self.page()
        proc = subprocess.run(
            [promtool, "check", "metrics"],
            input=text.encode("utf-8"),
            capture_output=True,
            timeout=60,
        )
        output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        self.assertEqual(proc.returncode, 0, f"promtool check metrics failed:\n{output}")


class OptionTests(SynchronousTestCase):
    def parse(self, *args):
        options = Options()
        options.parseOptions(["--server", URI, *args])
        return options

    def test_off_by_default_and_in_help(self):
        self.assertIsNone(self.parse()["metrics"])
        text = str(Options())
        self.assertIn("--metrics", text)
        self.assertIn("/metrics", text)

    def test_endpoint(self):
        options = self.parse("--metrics", "tcp:9101:interface=127.0.0.1")
        self.assertEqual(options["metrics"], "tcp:9101:interface=127.0.0.1")

    def test_bad_endpoint_is_one_line(self):
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--metrics", "bogus:1")
        message = str(caught.exception)
        self.assertIn("--metrics bogus:1", message)
        self.assertNotIn("\n", message)

    def test_bad_endpoint_under_twistd_is_one_line_and_status_2(self):
        options = Options()
        options.parent = usage.Options()
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--server", URI, "--metrics", "tcp:notaport"])
        self.assertEqual(caught.exception.code, 2)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("--metrics tcp:notaport", lines[0])


class WiringTests(SynchronousTestCase):
    def make(self, *extra):
        from anytls_twisted.client.tap import makeService

        options = Options()
        options.parseOptions(["--server", URI, "--listen", "tcp:0", *extra])
        reactor = MemoryReactorClock()
        return reactor, makeService(options, reactor)

    def test_off_by_default(self):
        reactor, top = self.make()
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertIsNone(top.metrics_listener)
        self.assertNotIsInstance(top.manager.metrics, ClientMetrics)

    def test_listener_serves_the_managers_metrics(self):
        events = capture_events(self)
        reactor, top = self.make("--metrics", "tcp:9101:interface=127.0.0.1")
        self.assertIsInstance(top.manager.metrics, ClientMetrics)
        self.assertTrue(top.manager.tls)
        top.startService()
        ports = {port: (factory, interface) for port, factory, _, interface in reactor.tcpServers}
        site, interface = ports[9101]
        self.assertEqual((type(site).__name__, interface), ("Site", "127.0.0.1"))
        self.assertEqual(http_get(site, b"/healthz")[::2], (200, b"ok\n"))
        status, _, body = http_get(site, b"/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"anytls_client_sessions_open 0.0", body)
        lines = [formatEvent(e) for e in events]
        startup = [line for line in lines if "anytls-client: proxy" in line]
        self.assertEqual(len(startup), 1, lines)
        self.assertIn("metrics on tcp:9101:interface=127.0.0.1", startup[0])
        top.stopService()
        self.assertEqual(http_get(site, b"/healthz")[0], 503)


class ServerMetricsTests(SynchronousTestCase):
    """Per-server figures, read from the session manager at scrape time."""

    def test_up_down_failures_rtt_and_sessions_by_server(self):
        from anytls_twisted.client.sessions import Route

        from .test_client_failover import HIGH

        clock = MemoryReactorClock()
        a, b = Endpoint(), Endpoint()
        metrics = ClientMetrics()
        m = SessionManager(
            None,
            "",
            clock,
            Pool(),
            randrange=LOW,
            metrics=metrics,
            routes=[Route("a:1", lambda: a, PASSWORD), Route("b:1", lambda: b, PASSWORD)],
            uniform=HIGH,
        )
        m.startService()
        self.addCleanup(m.stopService)
        a.failure = ConnectionRefusedError("refused")
        s, _ = open_stream(m, clock)
        clock.advance(0.1)  # the retry goes to b
        clock.advance(0.9)  # 1 s after its failure a is probed, and still refuses
        server = b.sessions[0]
        clock.advance(0.02)
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, s.sid)
        self.assertEqual(value(metrics, "anytls_client_server_up", server="a:1"), 0)
        self.assertEqual(value(metrics, "anytls_client_server_up", server="b:1"), 1)
        self.assertEqual(
            value(metrics, "anytls_client_server_dial_failures_total", server="a:1"), 2
        )
        self.assertEqual(value(metrics, "anytls_client_server_down_total", server="a:1"), 1)
        self.assertEqual(value(metrics, "anytls_client_dial_retries_total"), 1)
        self.assertAlmostEqual(
            value(metrics, "anytls_client_server_rtt_seconds", server="b:1"), 0.92
        )
        self.assertEqual(
            value(metrics, "anytls_client_server_sessions", server="b:1", state="busy"), 1
        )
        s.local_closed()
        self.assertEqual(
            value(metrics, "anytls_client_server_sessions", server="b:1", state="idle"), 1
        )
