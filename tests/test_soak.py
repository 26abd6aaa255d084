"""The short soak (benches/soak.py, docs/performance.md "Soak"): our server under held load and
session churn through real clients, then back to its baseline.

100 concurrent streams through two sing-box 1.14 clients (one session per stream), 100 streams
over 10 sessions opened with our client's session machine, then 500 short sessions through
``twistd anytls-client --disable-reuse``; every echo checked by SHA-256. After each load the
server must report every session closed, hold as many fds as before (plus 2), and have its RSS
back within 10% of the baseline after the held load and 5% after the churn, as an operator sees
it: the server runs as the systemd units run it (``PYTHONMALLOC=malloc``) and gives memory back
itself when its last session closes (``anytls_twisted.memory``), so no gdb is needed.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer
from twisted.trial import unittest

from tests.e2e_support import PASSWORD, REPO_ROOT, Harness, e2e_test, free_port
from tests.test_e2e_client import start_our_client

sys.path.insert(0, os.path.join(REPO_ROOT, "benches"))
import soak  # noqa: E402

SIZE = 16 * 1024
FD_SLACK = 2


class SoakTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.h = Harness(self)

    @defer.inlineCallbacks
    def at_rest(self, pid: int, limit: float = 0.0):
        """``/proc/PID/status`` once RSS is at most ``limit`` MiB (the server gives memory back
        a reactor turn after its last session closed), or after 10 s."""
        if limit:
            yield soak.rss_back(pid, limit, 10.0)
        return soak.proc_status(pid)

    def sing_box_clients(self, server, count=2):
        return defer_all([self.h.start_client(server) for _ in range(count)])

    @e2e_test
    def test_short_soak(self):
        metrics_port = free_port()
        server = yield self.h.start_server(
            kind="twistd",
            launcher=["env", f"PYTHONMALLOC={soak.SERVER_MALLOC}"],
            extra_args=[
                "--metrics",
                f"tcp:{metrics_port}:interface=127.0.0.1",
                "--connection-rate",  # 100 sessions at once from 127.0.0.1, by design
                "0",
            ],
        )
        pid = server.process.pid
        echo, port = soak.listen_echo()
        self.h.registry.ports.append(port)
        uri = f"anytls://{PASSWORD}@127.0.0.1:{server.port}/?sni=localhost"
        ours_args = ["--server", uri, "--certificate", server.cert_path, "--disable-reuse"]

        # Warm-up: first-use imports and caches belong in the baseline.
        clients = yield self.sing_box_clients(server)
        yield soak.hold([c.socks_port for c in clients], echo.port, 20, SIZE, tag="warmup")
        yield defer_all([c.process.stop() for c in clients])
        ours = yield start_our_client(self.h, ours_args)
        yield soak.churn(ours.socks_port, echo.port, 50, 8, 1024)
        yield ours.process.stop()
        yield soak.settle(metrics_port)
        base = yield self.at_rest(pid)

        # 100 held streams through sing-box: 100 sessions.
        seen = {}

        def at_peak(key):
            def measure():
                values = soak.scrape(metrics_port)
                seen[key] = (
                    soak.gauge(values, "anytls_sessions_open"),
                    soak.gauge(values, "anytls_streams_open"),
                    echo.open,
                )

            return measure

        clients = yield self.sing_box_clients(server)
        held = yield soak.hold(
            [c.socks_port for c in clients], echo.port, 100, SIZE, on_held=at_peak("held")
        )
        self.assertEqual(held["exchanges_verified"], 200)
        sessions, streams, origins = seen["held"]
        self.assertEqual((streams, origins), (100, 100))
        self.assertGreaterEqual(sessions, 100)  # a stock client: one session per stream
        yield defer_all([c.process.stop() for c in clients])
        yield soak.settle(metrics_port)

        # 100 streams over 10 sessions.
        muxed = yield soak.mux(
            server.port, PASSWORD, server.cert_path, echo.port, 10, 10, SIZE, at_peak("mux")
        )
        self.assertEqual(muxed["exchanges_verified"], 200)
        self.assertEqual(seen["mux"], (10, 100, 100))
        yield soak.settle(metrics_port)

        bound = base["vmrss"] * 1.10
        after = yield self.at_rest(pid, bound)
        self.assertLessEqual(after["fds"], base["fds"] + FD_SLACK, (base, after))
        self.assertLessEqual(after["vmrss"], bound, (base, after))

        # 500 short sessions, one stream each.
        ours = yield start_our_client(self.h, ours_args)
        before_total = soak.gauge(soak.scrape(metrics_port), "anytls_sessions_total")
        yield soak.churn(ours.socks_port, echo.port, 500, 8, 1024)
        yield ours.process.stop()
        yield soak.settle(metrics_port)
        total = soak.gauge(soak.scrape(metrics_port), "anytls_sessions_total")
        self.assertEqual(total - before_total, 500)
        bound = after["vmrss"] * 1.05
        end = yield self.at_rest(pid, bound)
        self.assertLessEqual(end["fds"], after["fds"] + FD_SLACK, (after, end))
        self.assertLessEqual(end["vmrss"], bound, (after, end))


def defer_all(ds):
    return defer.gatherResults(ds, consumeErrors=True)
