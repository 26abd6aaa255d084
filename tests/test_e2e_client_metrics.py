"""End to end: our ``twistd -n anytls-client --metrics`` against our server on loopback,
scraped over HTTP: streams and bytes after real echoes, an authentication failure for a wrong
password, a TLS dial failure for a wrong pin; the page must satisfy ``promtool check metrics``.
Every wait is bounded (tests/e2e_support.py)."""

from __future__ import annotations

import base64
import shutil
import subprocess
import urllib.parse

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from .e2e_support import PASSWORD, Harness, e2e_test, free_port, label, payload_bytes, within
from .test_e2e_client import start_our_client
from .test_e2e_metrics import sample, samples_of


class ClientMetricsEndToEndTests(unittest.TestCase):
    # A backstop only: every wait inside the test has its own, shorter deadline.
    timeout = 180

    def setUp(self):
        self.h = Harness(self)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, connectTimeout=5, pool=self.pool)

    @defer.inlineCallbacks
    def get(self, port: int, path: str):
        url = f"http://127.0.0.1:{port}{path}".encode("ascii")
        response = yield within(self.agent.request(b"GET", url), 10.0, f"GET {path}")
        body = yield within(readBody(response), 10.0, f"the body of GET {path}")
        return response.code, body

    @defer.inlineCallbacks
    def client(self, uri: str, *extra: str):
        port = free_port("127.0.0.1")
        args = ["--server", uri, "--metrics", f"tcp:{port}:interface=127.0.0.1", *extra]
        client = yield start_our_client(self.h, args)
        yield client.process.wait_for_line(
            r"metrics on tcp:\d+", 10.0, what="the metrics endpoint in the start-up line"
        )
        return client, port

    @defer.inlineCallbacks
    def scrape(self, port: int):
        code, body = yield self.get(port, "/metrics")
        self.assertEqual(code, 200, body[:500])
        text = body.decode("utf-8")
        return text, samples_of(text)

    @e2e_test
    def test_client_metrics_move_with_real_traffic(self):
        server = yield self.h.start_server(kind="twistd")
        quoted = urllib.parse.quote(PASSWORD)
        uri = f"anytls://{quoted}@127.0.0.1:{server.port}/?sni=localhost&insecure=1"
        client, port = yield self.client(uri)
        code, body = yield self.get(port, "/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))

        echo = self.h.tcp_echo()
        sent = 0
        for i in range(3):
            data = payload_bytes(label(f"cm{i}"), 1000 + 100 * i)
            yield self.h.echo_once(client, echo, data)
            sent += len(data)
        text, after = yield self.scrape(port)
        self.assertEqual(sample(after, "anytls_client_sessions_dialled_total"), 1, text)
        self.assertEqual(sample(after, "anytls_client_sessions_open"), 1, text)
        self.assertEqual(sample(after, "anytls_client_streams_total", kind="tcp"), 3, text)
        self.assertEqual(sample(after, "anytls_client_bytes_total", direction="upload"), sent)
        self.assertEqual(sample(after, "anytls_client_bytes_total", direction="download"), sent)
        self.assertEqual(sample(after, "anytls_client_auth_failures_total"), 0, text)
        for reason in ("connect", "timeout", "tls"):
            self.assertEqual(
                sample(after, "anytls_client_dial_failures_total", reason=reason), 0, text
            )

        # A wrong password: the server closes the session after TLS without a byte.
        wrong = f"anytls://wrong-{quoted}@127.0.0.1:{server.port}/?sni=localhost&insecure=1"
        bad, bad_port = yield self.client(wrong)
        how = yield self.h.expect_refused(bad, "127.0.0.1", echo.port)
        self.assertIn(how, ("socks-error", "closed"))
        bad_text, bad_samples = yield self.scrape(bad_port)
        self.assertEqual(sample(bad_samples, "anytls_client_auth_failures_total"), 1, bad_text)
        self.assertEqual(
            sample(bad_samples, "anytls_client_dial_failures_total", reason="tls"), 0, bad_text
        )

        # A wrong pin: the TLS handshake fails, a dial failure.
        pin = base64.b64encode(b"\x00" * 32).decode("ascii")
        pinned = f"anytls://{quoted}@127.0.0.1:{server.port}/?sni=localhost"
        unpinned, unpinned_port = yield self.client(pinned, "--certificate-pin", pin)
        yield self.h.expect_refused(unpinned, "127.0.0.1", echo.port)
        tls_text, tls_samples = yield self.scrape(unpinned_port)
        self.assertEqual(
            sample(tls_samples, "anytls_client_dial_failures_total", reason="tls"), 1, tls_text
        )
        self.assertEqual(sample(tls_samples, "anytls_client_auth_failures_total"), 0, tls_text)
        self.h.assert_alive(client.process)
        self.h.assert_alive(server.process)

        promtool = shutil.which("promtool")
        if promtool is None:
            raise unittest.SkipTest("promtool is not installed (Debian package prometheus)")
        for page in (text, bad_text, tls_text):
            proc = subprocess.run(
                [promtool, "check", "metrics"],
                input=page.encode("utf-8"),
                capture_output=True,
                timeout=60,
            )
            output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
            self.assertEqual(proc.returncode, 0, f"promtool check metrics failed:\n{output}")
