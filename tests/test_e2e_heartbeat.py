"""End to end: the server's heartbeats (``--heartbeat-interval``) over loopback.

Stock sing-box clients (1.14 and 1.12) never send heartbeats but answer them: an idle pooled
session is asked several times, stays open, and then carries the next stream. A peer that
authenticates as a v2 client and then never answers is closed, with the reason logged; a v1
peer is never asked. See ``tests/e2e_support.py``.
"""

from __future__ import annotations

from twisted.internet import defer, endpoints, protocol, reactor, ssl
from twisted.trial import unittest

from anytls_twisted.protocol.auth import encode_preamble
from anytls_twisted.protocol.codec import Command, FrameDecoder, encode_frame

from .e2e_support import PASSWORD, SERVER_KIND, Event, Harness, e2e_test, within

#: Answers the server logs at debug level.
ANSWERED = r"session {sid} answered the heartbeat in"
ASKED = r"session {sid} was silent for 1s or more: asking it with a heartbeat"


class RawPeer(protocol.Protocol):
    """An AnyTLS peer by hand: the preamble and Settings, then only listens."""

    def __init__(self, settings: bytes) -> None:
        self.settings = settings
        self.decoder = FrameDecoder()
        self.commands: list = []
        self.asked = Event()
        self.lost = Event()

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(
            encode_preamble(PASSWORD, 0) + encode_frame(Command.SETTINGS, 0, self.settings)
        )

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            self.commands.append(frame.cmd)
            if frame.cmd == Command.HEART_REQUEST and not self.asked.fired:
                self.asked.fire(reactor.seconds())

    def connectionLost(self, reason=None) -> None:
        self.lost.fire(reactor.seconds())


class ServerHeartbeatTests(unittest.TestCase):
    # A backstop only: every wait inside a test has its own, shorter deadline.
    timeout = 120

    def setUp(self):
        if SERVER_KIND != "twistd":
            raise unittest.SkipTest("sing-box's anytls inbound sends no heartbeats")
        self.h = Harness(self)

    def start_server(self, interval="1", timeout="2"):
        return self.h.start_server(
            log_level="debug",
            extra_args=["--heartbeat-interval", interval, "--heartbeat-timeout", timeout],
        )

    @defer.inlineCallbacks
    def _stock_client_answers(self, version):
        """An idle pooled session of a stock client is asked at least three times, answers
        each time, and then carries the next stream: still the one session."""
        server = yield self.start_server()
        client = yield self.h.start_client(
            server, version=version, idle_session_timeout=300, idle_session_check_interval=60
        )
        echo = self.h.tcp_echo()
        yield self.h.echo_once(client, echo, b"before the heartbeats")
        match = yield server.process.wait_for_line(
            r"session (\d+) open from", 10.0, what="the session's open line"
        )
        sid = match.group(1)
        mark = server.process.line_count
        for n in range(3):
            yield server.process.wait_for_line(
                ANSWERED.format(sid=sid),
                10.0,
                since=mark,
                what=f"the client to answer heartbeat {n + 1} on session {sid}",
            )
            mark = server.process.line_count
        asked = server.process.matching_lines(ASKED.format(sid=sid))
        answered = server.process.matching_lines(ANSWERED.format(sid=sid))
        self.assertGreaterEqual(len(asked), 3)
        self.assertGreaterEqual(len(answered), 3)
        yield self.h.echo_once(client, echo, b"after the heartbeats")
        self.assertEqual(echo.accepted, 2)
        self.assertEqual(
            server.sessions_opened(), 1, "the idle session carried the second stream too"
        )
        self.assertEqual(server.process.matching_lines(r"no answer to a heartbeat"), [])
        self.assertEqual(server.process.matching_lines(rf"session {sid} closed"), [])
        self.h.assert_alive(server.process)

    @e2e_test
    def test_singbox_114_client_answers(self):
        yield self._stock_client_answers("1.14")

    @e2e_test
    def test_singbox_112_client_answers(self):
        yield self._stock_client_answers("1.12")

    @defer.inlineCallbacks
    def _connect(self, server, settings):
        with open(server.cert_path, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust)
        endpoint = endpoints.wrapClientTLS(
            options, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", server.port, timeout=10)
        )
        peer = RawPeer(settings)
        yield within(
            endpoints.connectProtocol(endpoint, peer), 10.0, "a raw TLS connection to the server"
        )
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.fired else None)
        return peer

    @e2e_test
    def test_silent_peer_closed(self):
        """A v2 peer that never answers is asked, then closed after the timeout with the reason
        logged; a v1 peer on the same server is never asked and stays open."""
        server = yield self.start_server(interval="1", timeout="1")
        silent = yield self._connect(server, b"v=2\nclient=silent-test\npadding-md5=x")
        v1 = yield self._connect(server, b"v=1\nclient=v1-test\npadding-md5=x")
        asked_at = yield within(silent.asked.wait(), 10.0, "a HeartRequest to the silent peer")
        line = yield server.process.wait_for_line(
            r"session \d+ closed: no answer to a heartbeat in \d+s \(presumed dead\).*client "
            r"silent-test",
            10.0,
            what="the server to close the silent session",
        )
        lost_at = yield within(silent.lost.wait(), 10.0, "the silent peer's connection to close")
        self.assertGreaterEqual(lost_at - asked_at, 0.9, f"closed too early: {line.group(0)}")
        self.assertIn(Command.SERVER_SETTINGS, silent.commands)
        self.assertEqual(silent.commands.count(Command.HEART_REQUEST), 1, "asked once only")
        # The v1 peer has been idle as long: never asked, still open.
        self.assertFalse(v1.lost.fired, "the v1 peer was closed")
        self.assertNotIn(Command.HEART_REQUEST, v1.commands)
        self.assertEqual(len(server.process.matching_lines(r"closed: no answer to a heartbeat")), 1)
        self.h.assert_alive(server.process)
