"""End to end over loopback with real TLS: probes are decided at 32 bytes, and connections that
are not AnyTLS clients reach the decoy site (``--fallback``) while real sing-box clients on the
same port still proxy; what sing-box clients offer as ALPN, and what they tolerate.

A browser (headless Chromium, Debian's ``chromium``) must get the decoy page; the test skips
with the reason when Chromium is not installed (scripts/test.sh installs it as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import List, Optional, Sequence

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from anytls_twisted import certs, tls

from .e2e_support import (
    PASSWORD,
    SERVER_KIND,
    Event,
    Harness,
    TwistdServer,
    e2e_test,
    free_port,
    label,
    make_self_signed,
    payload_bytes,
    poll_until,
    run_to_completion,
    wait_for_port,
    within,
)

DECOY_TEXT = b"Welcome to the decoy bakery"
DECOY_PAGE = (
    b"<!doctype html><html><head><title>Bakery</title></head><body><h1>%s</h1></body></html>"
    % (DECOY_TEXT)
)
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
#: An HTTP/2 client's first flight: the preface and an empty SETTINGS frame (33 bytes).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class _TLSProbe(protocol.Protocol):
    """A TLS client that writes ``payload`` at once and records what comes back, the ALPN the
    server selected, and when the connection ended (reactor seconds)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.alpn: Optional[bytes] = None
        self.started = 0.0
        self.ended = 0.0
        self.lost = Event()

    def connectionMade(self) -> None:
        self.started = reactor.seconds()
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.alpn = self.transport.negotiatedProtocol
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:
        self.ended = reactor.seconds()
        self.reason = reason
        self.lost.fire(None)


def tls_probe(port: int, payload: bytes, alpn: Sequence[bytes] = ()) -> defer.Deferred:
    """Connect with TLS (no certificate check, ``alpn`` offered), write ``payload``."""
    options = CertificateOptions(acceptableProtocols=list(alpn) or None)
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, options)
    return within(connectProtocol(endpoint, _TLSProbe(payload)), 10.0, "a TLS connection")


class _Recorder(protocol.Protocol):
    """An origin that keeps every byte it gets (``factory.received``, one entry per
    connection) and answers nothing."""

    def connectionMade(self) -> None:
        self.factory.received.append(b"")

    def dataReceived(self, data: bytes) -> None:
        self.factory.received[-1] += data


class _ALPNRecordingOptions(tls._ServerOptions):
    """Our server TLS, remembering each ClientHello's ALPN list."""

    offered: List[List[bytes]]

    def _select(self, connection, offered):
        self.offered.append(list(offered))
        return super()._select(connection, offered)


class FallbackEndToEndTests(unittest.TestCase):
    # A backstop only: every wait inside a test has its own, shorter deadline.
    timeout = 180

    def setUp(self):
        if SERVER_KIND != "twistd":
            raise unittest.SkipTest("decisions at 32 bytes and the fallback are our server's")
        self.h = Harness(self)

    def decoy_site(self) -> int:
        root = Resource()
        root.putChild(b"", Data(DECOY_PAGE, "text/html; charset=utf-8"))
        site = Site(root)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.h.registry.ports.append(port)
        return port.getHost().port

    def recorder(self):
        factory = Factory.forProtocol(_Recorder)
        factory.noisy = False
        factory.received = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.h.registry.ports.append(port)
        return factory, port.getHost().port

    @defer.inlineCallbacks
    def scrape(self, port: int) -> defer.Deferred:
        agent = Agent(reactor, connectTimeout=5)
        url = f"http://127.0.0.1:{port}/metrics".encode("ascii")
        response = yield within(agent.request(b"GET", url), 10.0, "GET /metrics")
        body = yield within(readBody(response), 10.0, "the body of /metrics")
        return body.decode("utf-8")

    # 1 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_random_bytes_decided_at_32(self):
        """Without a fallback, random bytes after TLS are closed as soon as 32 are in (32, 33,
        100 and 70000 bytes, whatever padding length bytes 33-34 announce), and 1 or 31 bytes
        at the auth timeout (4 s here): before 32 bytes there is nothing to decide."""
        auth_timeout = 4.0
        server = yield self.h.start_server(extra_args=["--auth-timeout", f"{auth_timeout:g}"])
        data = b"\xff" * 34 + payload_bytes(label("probe"), 70000)  # bytes 33-34: 65535
        sizes = (1, 31, 32, 33, 100, 70000)
        probes = {}
        for size in sizes:
            probes[size] = yield tls_probe(server.port, data[:size])
        yield within(
            defer.gatherResults([p.lost.wait() for p in probes.values()]),
            auth_timeout + 10.0,
            "every probe connection to end",
        )
        for size, probe in probes.items():
            elapsed = probe.ended - probe.started
            self.assertEqual(probe.received, b"", f"{size} bytes got an answer")
            if size >= 32:
                self.assertLess(elapsed, auth_timeout / 2, f"{size} bytes held {elapsed:.2f}s")
            else:
                self.assertGreater(
                    elapsed, auth_timeout - 0.5, f"{size} bytes closed after {elapsed:.2f}s"
                )
        failed = "closed before authentication: authentication failed"
        timed_out = "closed before authentication: handshake and authentication not finished"
        yield poll_until(
            lambda: (
                len(server.process.matching_lines(failed)) == 4
                and len(server.process.matching_lines(timed_out)) == 2
            ),
            10.0,
            "four 'authentication failed' and two timeout lines",
        )

    # 2 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_decoy_site_and_proxy_on_one_port(self):
        """An HTTP request over TLS gets the decoy site's page through --fallback, and a
        sing-box 1.14 client on the same port still proxies; the fallback is counted and
        logged with its reason."""
        web = self.decoy_site()
        metrics_port = free_port("127.0.0.1")
        server = yield self.h.start_server(
            extra_args=[
                "--fallback",
                f"tcp:127.0.0.1:{web}",
                "--metrics",
                f"tcp:{metrics_port}:interface=127.0.0.1",
            ]
        )
        probe = yield tls_probe(server.port, HTTP_REQUEST, alpn=[b"h2", b"http/1.1"])
        yield within(probe.lost.wait(), 10.0, "the decoy site's answer and close")
        self.assertTrue(probe.received.startswith(b"HTTP/1.1 200 OK"), probe.received[:200])
        self.assertIn(DECOY_TEXT, probe.received)
        self.assertIsNone(probe.alpn, "the server selected an ALPN protocol by default")
        self.assertTrue(
            server.process.matching_lines(
                rf"not AnyTLS clients go to the fallback tcp:127\.0\.0\.1:{web}$"
            )
        )
        yield server.process.wait_for_line(
            r"connection from 127\.0\.0\.1:\d+ relayed to the fallback tcp:127\.0\.0\.1:\d+: "
            r"its first 32 bytes match no user's password",
            10.0,
            what="the fallback log line",
        )
        client = yield self.h.start_client(server)
        echo = self.h.tcp_echo()
        yield self.h.echo_once(client, echo, b"through the proxy beside the decoy")
        self.assertEqual(echo.accepted, 1)
        text = yield self.scrape(metrics_port)
        self.assertIn('anytls_fallbacks_total{reason="wrong_password"} 1.0', text)
        self.assertIn('anytls_sessions_total{user="default"} 1.0', text)

    @e2e_test
    def test_browser_gets_the_decoy_page(self):
        """Headless Chromium opening https://127.0.0.1:PORT/ shows the decoy page (over HTTP/1.1:
        the server selects no ALPN by default), while a sing-box client on the same port still
        proxies."""
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            raise unittest.SkipTest(
                "headless Chromium is not installed (Debian package chromium; scripts/test.sh "
                "installs it when run as root)"
            )
        web = self.decoy_site()
        server = yield self.h.start_server(extra_args=["--fallback", f"tcp:127.0.0.1:{web}"])
        profile = os.path.join(self.h.base, "chromium-profile")
        proc = yield run_to_completion(
            self.h,
            "chromium",
            browser,
            [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--ignore-certificate-errors",
                f"--user-data-dir={profile}",
                "--timeout=20000",
                "--dump-dom",
                f"https://127.0.0.1:{server.port}/",
            ],
            seconds=60.0,
        )
        self.assertIn(
            DECOY_TEXT.decode(),
            proc.tail(),
            f"Chromium did not show the decoy page:\n{proc.tail()}",
        )
        self.assertIn("<title>Bakery</title>", proc.tail())
        self.assertTrue(server.process.matching_lines("relayed to the fallback"))
        client = yield self.h.start_client(server)
        echo = self.h.tcp_echo()
        yield self.h.echo_once(client, echo, b"after the browser")

    # ALPN ---------------------------------------------------------------------------------------

    @e2e_test
    def test_what_sing_box_clients_offer(self):
        """Recorded ClientHellos: sing-box 1.14 and 1.12 anytls outbounds offer no ALPN without
        tls.alpn, and exactly their tls.alpn list with it."""
        directory = os.path.join(self.h.base, "recorder")
        os.makedirs(directory)
        cert, key = make_self_signed(directory)
        material = certs.Certificates(directory, "localhost").get(cert, key)
        options = _ALPNRecordingOptions(material, [], raiseMinimumTo=TLSVersion.TLSv1_2)
        options.offered = []
        handshakes = Factory.forProtocol(_Recorder)  # each session's preamble, after TLS
        handshakes.noisy = False
        handshakes.received = []
        port = reactor.listenTCP(0, tls.wrap_tls(handshakes, options), interface="127.0.0.1")
        self.h.registry.ports.append(port)
        fake = TwistdServer()
        fake.port, fake.cert_path = port.getHost().port, cert
        echo = self.h.tcp_echo()
        findings = {}
        for version in ("1.14", "1.12"):
            for alpn in (None, ["h2", "http/1.1"]):
                client = yield self.h.start_client(fake, version=version, alpn=alpn)
                before, offered_before = len(handshakes.received), len(options.offered)
                d = self.h.socks_connect(client, echo.host, echo.port, seconds=5.0)
                d.addErrback(lambda f: None)  # the recorder serves no AnyTLS
                yield poll_until(
                    lambda before=before: (
                        len(handshakes.received) > before and handshakes.received[before]
                    ),
                    10.0,
                    f"a {version} client's preamble after the TLS handshake",
                )
                # The ALPN callback runs only for a ClientHello that offers ALPN.
                offered = options.offered[offered_before:]
                findings[version, tuple(alpn or ())] = offered[0] if offered else []
                yield d
                yield client.process.stop()
        self.assertEqual(
            findings,
            {
                ("1.14", ()): [],
                ("1.14", ("h2", "http/1.1")): [b"h2", b"http/1.1"],
                ("1.12", ()): [],
                ("1.12", ("h2", "http/1.1")): [b"h2", b"http/1.1"],
            },
        )

    @e2e_test
    def test_alpn_routes_and_clients_tolerate_h2(self):
        """With tls.alpn [h2, http/1.1] and fallback_for_alpn, probes are routed by the
        negotiated protocol (h2 to the h2 backend, http/1.1 to the web site; none: the default),
        and sing-box 1.14 and 1.12 clients still proxy though the server selects h2 for them."""
        web = self.decoy_site()
        h2_backend, h2_port = self.recorder()
        config = {
            "type": "anytls",
            "users": [{"name": "e2e", "password": PASSWORD}],
            "tls": {"enabled": True, "alpn": ["h2", "http/1.1"]},
            "fallback": {"server": "127.0.0.1", "server_port": web},
            "fallback_for_alpn": {
                "h2": {"server": "127.0.0.1", "server_port": h2_port},
                "http/1.1": {"server": "127.0.0.1", "server_port": web},
            },
        }
        path = os.path.join(self.h.base, "server.json")
        with open(path, "w") as f:
            json.dump(config, f)
        server = yield self.h.start_server(password_args=["--config", path])

        h2 = yield tls_probe(server.port, H2_PREFACE, alpn=[b"h2", b"http/1.1"])
        yield poll_until(
            lambda: h2_backend.received and h2_backend.received[0] == H2_PREFACE,
            10.0,
            "the h2 preface at the h2 backend",
        )
        self.assertEqual(h2.transport.negotiatedProtocol, b"h2")
        h2.transport.loseConnection()
        for offered in ([b"http/1.1"], []):
            probe = yield tls_probe(server.port, HTTP_REQUEST, alpn=offered)
            yield within(probe.lost.wait(), 10.0, "the decoy page")
            self.assertIn(DECOY_TEXT, probe.received)
            self.assertEqual(probe.alpn, offered[0] if offered else None)
        yield server.process.wait_for_line(r"relayed to the fallback .*\(ALPN h2\)", 10.0)

        echo = self.h.tcp_echo()
        for version in ("1.14", "1.12"):
            for alpn in (["h2", "http/1.1"], None):
                client = yield self.h.start_client(server, version=version, alpn=alpn)
                yield self.h.echo_once(client, echo, f"{version} {alpn}".encode())
        self.assertEqual(echo.accepted, 4)
        self.assertEqual(len(h2_backend.received), 1)
        lines = server.process.matching_lines(r"session \S+ open from")
        self.assertEqual(len(lines), 4, lines)
        self.assertFalse(re.search("Traceback", server.process.tail()))

    @e2e_test
    def test_unreachable_fallback_closes(self):
        """A fallback that refuses connections: the probe is closed, with one warning line."""
        dead = free_port("127.0.0.1")
        server = yield self.h.start_server(extra_args=["--fallback", f"tcp:127.0.0.1:{dead}"])
        probe = yield tls_probe(server.port, HTTP_REQUEST)
        yield within(probe.lost.wait(), 10.0, "the close")
        self.assertEqual(probe.received, b"")
        yield server.process.wait_for_line(
            rf"fallback tcp:127\.0\.0\.1:{dead} unreachable", 10.0, what="the warning"
        )
        yield wait_for_port("127.0.0.1", server.port, 5.0, server.process)
