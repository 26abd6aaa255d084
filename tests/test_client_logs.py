"""The client's structured log events: every session and stream event carries its numbers as
fields (session_id, stream_id, server, bytes, duration, reason), so the JSON form can be
filtered without parsing text, and no event carries the password."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import logs
from anytls_twisted.client.pool import Pool
from anytls_twisted.client.sessions import SessionManager
from anytls_twisted.client.stream import ClientStream
from anytls_twisted.protocol.address import Destination
from anytls_twisted.protocol.codec import Command

from .helpers import capture_events
from .test_client_session import LOW, PASSWORD, FakeEndpoint, Local


def by_text(events, fragment):
    return [e for e in events if fragment in formatEvent(e)]


class ClientLogEventTests(SynchronousTestCase):
    def setUp(self):
        logs.set_level("debug")
        self.addCleanup(logs.set_level, "info")
        self.events = capture_events(self)
        self.clock = MemoryReactorClock()
        self.endpoint = FakeEndpoint()
        self.m = SessionManager(
            lambda: self.endpoint,
            PASSWORD,
            self.clock,
            Pool(idle_session_check_interval=10, idle_session_timeout=10),
            randrange=LOW,
            server="proxy.example:8443",
        )

    def test_session_and_stream_events_carry_their_fields(self):
        self.m.startService()
        self.addCleanup(self.m.stopService)
        local = Local()
        stream = ClientStream(local, Destination("example.com", 80), self.clock)
        self.m.open(stream)
        server = self.endpoint.sessions[0]
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, stream.sid)
        server.send(Command.PSH, stream.sid, b"x" * 300)
        stream.send(b"y" * 40)
        self.clock.advance(2)
        stream.local_closed()
        self.clock.advance(20)  # reaped
        server.session.connectionLost(Failure(ConnectionError("closed")))

        (opened,) = by_text(self.events, "to the server open")
        self.assertEqual(opened["server"], "proxy.example:8443")
        session_id = opened["session_id"]
        (stream_open,) = by_text(self.events, "open to example.com:80")
        self.assertEqual(
            (stream_open["session_id"], stream_open["stream_id"], stream_open["kind"]),
            (session_id, 1, "tcp"),
        )
        self.assertEqual(stream_open["log_level"].name, "debug")
        (stream_closed,) = by_text(self.events, f"stream {session_id}/1 closed")
        self.assertEqual(
            {k: stream_closed[k] for k in ("bytes_in", "bytes_out", "duration", "destination")},
            {"bytes_in": 300, "bytes_out": 40, "duration": 2.0, "destination": "example.com:80"},
        )
        self.assertIn("local connection closed", stream_closed["reason"])
        (closed,) = by_text(self.events, "to the server closed")
        self.assertEqual(closed["session_id"], session_id)
        self.assertEqual(closed["server"], "proxy.example:8443")
        self.assertEqual(closed["streams"], 1)
        self.assertEqual(closed["reason"], "idle: no stream for over 10s")
        self.assertEqual(closed["duration"], 22.0)
        self.assertGreater(closed["bytes_out"], 40)
        self.assertFalse(any(PASSWORD in formatEvent(e) for e in self.events))

    def test_refused_stream_names_its_session_and_stream(self):
        from anytls_twisted.client.local import LocalProxyFactory

        factory = LocalProxyFactory(self.m, self.clock)
        protocol = factory.buildProtocol(None)
        from twisted.internet.testing import StringTransport

        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        server = self.endpoint.sessions[0]
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, 1, b"connection refused")
        (failed,) = by_text(self.events, "failed: remote: connection refused")
        self.assertEqual((failed["stream_id"], failed["destination"]), (1, "example.com:443"))
        self.assertEqual(failed["session_id"], server.session.session_id)
        self.assertEqual(failed["log_level"].name, "info")

    def test_dial_failure_names_the_server(self):
        self.endpoint.fail = True
        self.m.open(ClientStream(Local(), Destination("example.com", 80), self.clock))
        (line,) = by_text(self.events, "cannot reach the server")
        self.assertEqual(line["server"], "proxy.example:8443")
        self.assertIn("refused", line["error"])
