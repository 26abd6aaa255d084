"""End to end: ``twistd anytls --metrics`` scraped over loopback while real sing-box clients
relay TCP and UDP through it; the scraped page must satisfy ``promtool check metrics``.

Uses the harness of ``tests/e2e_support.py`` (see tests/test_e2e.py); every wait has a deadline.
"""

from __future__ import annotations

import os
import shutil

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from .e2e_support import (
    SERVER_KIND,
    Harness,
    e2e_test,
    free_port,
    label,
    payload_bytes,
    run_to_completion,
    wait_for_port,
    within,
)

#: Datagram sizes: small to around the MTU (the client's SOCKS relay takes at most 8192).
UDP_SIZES = [4, 17, 100, 512, 1024, 1200, 1400, 1472, 2048, 4000]
USER = "default"  # the user a lone --password authenticates as


def samples_of(text: str) -> dict:
    """``{(sample name, sorted label items): value}`` from a Prometheus text page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsEndToEndTests(unittest.TestCase):
    # A backstop only: every wait inside the test has its own, shorter deadline.
    timeout = 180

    def setUp(self):
        if SERVER_KIND != "twistd":
            raise unittest.SkipTest("metrics are a feature of our server, not sing-box's")
        self.h = Harness(self)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, connectTimeout=5, pool=self.pool)

    @defer.inlineCallbacks
    def get(self, port: int, path: str):
        url = f"http://127.0.0.1:{port}{path}".encode("ascii")
        response = yield within(
            self.agent.request(b"GET", url), 10.0, f"the response to GET {path}"
        )
        body = yield within(readBody(response), 10.0, f"the body of GET {path}")
        return response, body

    @defer.inlineCallbacks
    def scrape(self, port: int):
        response, body = yield self.get(port, "/metrics")
        self.assertEqual(response.code, 200, body[:500])
        [content_type] = response.headers.getRawHeaders(b"content-type")
        self.assertTrue(content_type.startswith(b"text/plain"), content_type)
        return body.decode("utf-8")

    @e2e_test
    def test_metrics_move_with_real_traffic(self):
        metrics_port = free_port("127.0.0.1")
        server = yield self.h.start_server(
            extra_args=["--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"]
        )
        yield wait_for_port("127.0.0.1", metrics_port, 10.0, server.process)

        response, body = yield self.get(metrics_port, "/healthz")
        self.assertEqual((response.code, body), (200, b"ok\n"))
        before = samples_of((yield self.scrape(metrics_port)))
        self.assertEqual(sample(before, "anytls_sessions_open"), 0)
        self.assertEqual(sample(before, "anytls_streams_total", kind="tcp"), 0)

        client = yield self.h.start_client(server)
        # TCP: one echo stream.
        echo = self.h.tcp_echo()
        tcp_payload = b"metrics " + payload_bytes(label("metrics-tcp"), 100_000)
        yield self.h.echo_once(client, echo, tcp_payload)
        # UDP-over-TCP: datagrams to a UDP echo, each echoed.
        udp = self.h.udp_echo("127.0.0.1")
        assoc = yield self.h.udp_associate(client)
        yield assoc.exchange(udp.host, udp.port, UDP_SIZES, label("metrics-udp"))
        self.assertEqual(assoc.errors, [])
        udp_payload = sum(UDP_SIZES)
        # A closed port: an origin connect refused.
        yield self.h.expect_refused(client, "127.0.0.1", free_port("127.0.0.1"))
        # A wrong password: an authentication failure.
        bad = yield self.h.start_client(server, password="not-the-password")
        yield self.h.expect_refused(bad, echo.host, echo.port)

        text = yield self.scrape(metrics_port)
        after = samples_of(text)
        self.assertGreaterEqual(sample(after, "anytls_sessions_open"), 1, text)
        self.assertGreaterEqual(sample(after, "anytls_sessions_total", user=USER), 1, text)
        self.assertGreaterEqual(sample(after, "anytls_streams_total", kind="tcp"), 2, text)
        self.assertGreaterEqual(sample(after, "anytls_streams_total", kind="udp"), 1, text)
        for direction in ("client_to_origin", "origin_to_client"):
            self.assertGreaterEqual(
                sample(after, "anytls_bytes_total", direction=direction, user=USER),
                len(tcp_payload) + udp_payload,
                f"{direction}\n{text}",
            )
            self.assertGreaterEqual(
                sample(after, "anytls_uot_datagrams_total", direction=direction),
                len(UDP_SIZES),
                text,
            )
        self.assertGreaterEqual(
            sample(after, "anytls_synack_latency_seconds_count", kind="tcp", result="ok"), 1, text
        )
        self.assertGreaterEqual(
            sample(after, "anytls_synack_latency_seconds_count", kind="tcp", result="error"),
            1,
            text,
        )
        self.assertGreaterEqual(
            sample(after, "anytls_origin_connect_failures_total", reason="refused"), 1, text
        )
        self.assertGreaterEqual(
            sample(after, "anytls_auth_failures_total", reason="wrong_password"), 1, text
        )
        self.assertNotIn(("anytls_sessions_total", (("user", ""),)), after)
        self.h.assert_alive(server.process)

        # The page passes Prometheus' own checker (format and naming lint).
        promtool = shutil.which("promtool")
        if promtool is None:
            raise unittest.SkipTest("promtool is not installed (Debian package prometheus)")
        path = os.path.join(self.h.base, "scraped.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        proc = yield run_to_completion(
            self.h,
            "promtool",
            "/bin/sh",
            ["-c", 'exec "$0" check metrics < "$1"', promtool, path],
            60.0,
        )
        self.assertEqual(proc.exit_code, 0, f"promtool check metrics failed:\n{proc.tail()}")
