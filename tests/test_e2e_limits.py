"""End to end: the abuse limits on a real ``twistd anytls`` over loopback, with a sing-box
client whose established session must keep working while other connections are refused."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from .e2e_support import SERVER_KIND, Harness, TrackedProtocol, e2e_test, poll_until, within

#: Raw connections opened at once from 127.0.0.1 in the flood.
FLOOD = 60
#: The burst the server allows per source; the rate is low enough that the few seconds of the
#: test refill only a few tokens.
BURST = 30


class LimitsEndToEndTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        if SERVER_KIND == "singbox":
            raise unittest.SkipTest("the abuse limits are our server's feature")
        self.h = Harness(self)

    @defer.inlineCallbacks
    def open_raw(self, server, count):
        """``count`` plain TCP connections to the server, all made (the kernel accepts each
        before the server decides); they send nothing, so an admitted one stays open until
        the auth timeout."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        connections = []
        for _ in range(count):
            proto = TrackedProtocol()
            proto.registry = self.h.registry
            connections.append(proto)
        yield within(
            defer.gatherResults([connectProtocol(endpoint, p) for p in connections]),
            20.0,
            f"{count} connections to be made",
        )
        return connections

    @e2e_test
    def test_flood_refused_while_established_session_keeps_working(self):
        """If one address opens connections beyond its burst, then the extra ones are closed
        at once with one log line naming the source and the option, the admitted ones stay
        open, and a sing-box client whose session was established before keeps relaying."""
        h = self.h
        server = yield h.start_server(
            extra_args=[
                "--connection-rate",
                "0.5",
                "--connection-burst",
                str(BURST),
                "--auth-timeout",
                "60",
            ]
        )
        yield server.process.wait_for_line("closed before authentication", 10.0)  # the probe
        client = yield h.start_client(server)
        echo = h.tcp_echo()
        yield h.echo_once(client, echo, b"before the flood")

        probes = len(server.process.matching_lines("closed before authentication"))
        flood = yield self.open_raw(server, FLOOD)
        closed = lambda: [p for p in flood if p.lost.fired]  # noqa: E731
        # At most BURST tokens (less the client's session and the harness's port probes)
        # plus a few refilled: well over 20 of the 60 must be refused.
        yield poll_until(lambda: len(closed()) >= 20, 20.0, "refused connections to close")
        yield h.echo_once(client, echo, b"during the flood")
        self.assertGreaterEqual(FLOOD - len(closed()), BURST - 10, "admitted ones stay open")
        self.assertLessEqual(FLOOD - len(closed()), BURST)
        lines = server.process.matching_lines(r"refused a new connection from 127\.0\.0\.1: ")
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("--connection-rate", lines[0])
        unauthenticated = server.process.matching_lines("closed before authentication")
        self.assertEqual(len(unauthenticated), probes, "refused connections log nothing more")

    @e2e_test
    def test_global_session_cap_refuses_the_next_session(self):
        """If --max-sessions sessions are open, then the next connection is closed at once
        with a clear log line, and the open session keeps working."""
        h = self.h
        server = yield h.start_server(extra_args=["--max-sessions", "1", "--connection-rate", "0"])
        # The harness's port probe must have gone, so that only the client's session counts.
        yield server.process.wait_for_line("closed before authentication", 10.0)
        client = yield h.start_client(server)
        echo = h.tcp_echo()
        yield h.echo_once(client, echo, b"the one session")
        [extra] = yield self.open_raw(server, 1)
        yield within(extra.lost.wait(), 10.0, "the extra connection to be closed")
        line = yield server.process.wait_for_line(
            r"refused a new connection from 127\.0\.0\.1: 1 connection open, the server's "
            r"limit \(--max-sessions\)",
            10.0,
        )
        self.assertIsNotNone(line)
        yield h.echo_once(client, echo, b"still working")
