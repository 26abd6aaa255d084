"""The registry, the idle-session reaper and shutdown, driven by a memory reactor's clock."""

import attr
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import logs
from anytls_twisted.protocol.codec import Command, encode_frame
from anytls_twisted.server.service import ReaperService, build_service

from .helpers import SETTINGS_V2, Server, capture_events
from .test_session import open_stream


class ReaperTests(SynchronousTestCase):
    def setUp(self):
        self.server = Server(
            idle_session_timeout=300, idle_session_check_interval=30, heartbeat_interval=0
        )
        self.reaper = ReaperService(self.server.registry, 30, self.server.reactor)
        self.reaper.startService()
        self.addCleanup(self.reaper.stopService)

    def session(self):
        client = self.server.connect()
        client.auth()
        client.received()
        return client

    def test_idle_session_reaped(self):
        """A session with no streams and no frames for the timeout is closed at the next check."""
        client = self.session()
        self.server.reactor.advance(270)
        self.assertFalse(client.closed)
        self.server.reactor.advance(30)
        self.assertTrue(client.closed)
        self.assertEqual(client.transport.value(), b"")
        self.assertEqual(self.server.registry.reaped, 1)

    def test_frames_keep_session(self):
        client = self.session()
        self.server.reactor.advance(240)
        client.frame(Command.HEART_REQUEST, 0)
        self.server.reactor.advance(120)
        self.assertFalse(client.closed)

    def test_open_stream_never_reaped(self):
        """A quiet session with an open stream is kept however long it is quiet."""
        client = self.session()
        open_stream(client)
        self.server.origin_connect()
        self.server.reactor.advance(3600)
        self.assertFalse(client.closed)

    def test_unauthenticated_not_counted(self):
        """Connections still in auth are the auth timeout's business, not the reaper's."""
        client = self.server.connect()
        self.server.reactor.advance(9)
        self.assertEqual(self.server.registry.reaped, 0)
        self.assertFalse(client.closed)

    def test_error_in_one_session_does_not_stop_reaper(self):
        """A session that raises while reaped is logged; the loop keeps running for others."""
        bad = self.session()
        good = self.session()
        bad.proto.close = None  # calling it raises TypeError
        self.server.reactor.advance(330)
        self.assertTrue(good.closed)
        self.assertTrue(self.reaper.loop.running)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_stops_with_service(self):
        self.reaper.stopService()
        self.assertFalse(self.reaper.loop.running)
        client = self.session()
        self.server.reactor.advance(1000)
        self.assertFalse(client.closed)


class HeartbeatTests(SynchronousTestCase):
    """--heartbeat-interval 60, --heartbeat-timeout 15: the reaper checks every 7.5 s."""

    def setUp(self):
        self.events = capture_events(self)
        self.build()

    def build(self, **overrides):
        settings = dict(
            idle_session_timeout=300,
            idle_session_check_interval=30,
            heartbeat_interval=60,
            heartbeat_timeout=15,
        )
        settings.update(overrides)
        self.server = Server(**settings)
        self.reaper = ReaperService(self.server.registry, None, self.server.reactor)
        self.reaper.startService()
        self.addCleanup(self.reaper.stopService)

    def session(self, settings=SETTINGS_V2):
        client = self.server.connect()
        client.auth(settings=settings)
        client.received()
        return client

    def advance(self, seconds, step=0.5):
        for _ in range(round(seconds / step)):
            self.server.reactor.advance(step)

    def commands(self, client):
        return [(frame.cmd, frame.sid, frame.data) for frame in client.received()]

    def closing_lines(self, client):
        client.proto.connectionLost(Failure(ConnectionDone()))
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_format", "").startswith("session {session_id} closed")
        ]

    def test_check_interval(self):
        """Checks come often enough for the heartbeat settings; without heartbeats, every
        --idle-session-check-interval."""
        self.assertEqual(self.server.registry.check_interval(), 7.5)
        self.assertEqual(self.reaper.loop.interval, 7.5)
        self.build(heartbeat_interval=10, heartbeat_timeout=30)
        self.assertEqual(self.server.registry.check_interval(), 5)
        self.build(heartbeat_interval=0)
        self.assertEqual(self.server.registry.check_interval(), 30)

    def test_silent_idle_session_asked_then_closed(self):
        """A v2 session silent for the interval gets one HeartRequest; unanswered for the
        timeout, it is closed politely, the reason logged and counted."""
        client = self.session()
        self.advance(59.5)
        self.assertEqual(client.received(), [])
        self.advance(0.5)
        self.assertEqual(self.commands(client), [(Command.HEART_REQUEST, 0, b"")])
        self.advance(14.5)
        self.assertFalse(client.closed)
        self.assertEqual(client.received(), [], "asked once, not again while waiting")
        self.advance(0.5)
        self.assertTrue(client.closed)
        self.assertFalse(client.transport.disconnected, "a polite close, not an abort")
        self.assertEqual(self.server.registry.reaped, 1)
        self.advance(30)
        self.assertEqual(self.server.registry.reaped, 1, "a closing session is not reaped again")
        (line,) = self.closing_lines(client)
        self.assertIn("closed: no answer to a heartbeat in 15s (presumed dead)", line)

    def test_answered_session_kept_and_asked_again(self):
        """An answer starts the silence again: the next heartbeat comes an interval later."""
        client = self.session()
        self.advance(60)
        self.assertEqual(self.commands(client), [(Command.HEART_REQUEST, 0, b"")])
        self.advance(1)
        client.frame(Command.HEART_RESPONSE, 0)
        self.advance(59.5)
        self.assertEqual(client.received(), [])
        self.advance(7.5)
        self.assertEqual(self.commands(client), [(Command.HEART_REQUEST, 0, b"")])
        self.assertFalse(client.closed)
        self.assertEqual(self.server.registry.reaped, 0)

    def test_answer_logged_at_debug(self):
        logs.set_level("debug")
        self.addCleanup(logs.set_level, "info")
        client = self.session()
        self.advance(60)
        self.server.reactor.advance(0.25)
        client.frame(Command.HEART_RESPONSE, 0)
        texts = [formatEvent(e) for e in self.events]
        self.assertIn(
            f"session {client.proto.session_id} was silent for 60s or more: asking it with a "
            "heartbeat",
            texts,
        )
        self.assertIn(f"session {client.proto.session_id} answered the heartbeat in 0.250s", texts)

    def test_any_frame_answers(self):
        """Any frame from the client proves it alive, as a HeartResponse does."""
        client = self.session()
        self.advance(60)
        client.frame(Command.HEART_REQUEST, 7)
        self.advance(30)
        self.assertFalse(client.closed)
        self.assertEqual(
            self.commands(client),
            [(Command.HEART_REQUEST, 0, b""), (Command.HEART_RESPONSE, 7, b"")],
        )

    def test_answers_do_not_keep_an_idle_session_from_the_idle_timeout(self):
        """Answering our heartbeats, padded or not, is not activity: the session is still
        closed as idle after --idle-session-timeout."""
        client = self.session()
        for round_ in range(4):
            self.advance(60 if round_ == 0 else 67.5)
            self.assertEqual(self.commands(client), [(Command.HEART_REQUEST, 0, b"")])
            answer = encode_frame(Command.HEART_RESPONSE, 0)
            if round_ % 2:  # as a padded sing-box write: the answer and a Waste frame
                answer += encode_frame(Command.WASTE, 0, b"\0" * 30)
            client.send(answer)
        self.advance(300 - 262.5)
        self.assertTrue(client.closed)
        (line,) = self.closing_lines(client)
        self.assertIn("closed: idle for 300s with no streams", line)

    def test_client_frames_are_activity(self):
        """A read with more than answers and padding counts for the idle timeout."""
        self.build(idle_session_timeout=100)
        client = self.session()
        self.advance(60)
        client.received()
        client.send(encode_frame(Command.HEART_RESPONSE, 0) + encode_frame(Command.SYN, 1))
        client.frame(Command.FIN, 1)
        self.advance(60)
        self.assertEqual(self.commands(client), [(Command.HEART_REQUEST, 0, b"")])
        client.frame(Command.HEART_RESPONSE, 0)
        self.advance(30)
        self.assertFalse(client.closed, "idle since 60 s, not since the start")
        self.advance(15)
        self.assertTrue(client.closed)
        (line,) = self.closing_lines(client)
        self.assertIn("closed: idle for 105s with no streams", line)

    def test_v1_session_never_asked(self):
        """v1 clients do not speak heartbeats: never asked, so never closed for not answering."""
        client = self.session(settings=b"v=1")
        self.advance(299.5)
        self.assertEqual(client.received(), [])
        self.assertFalse(client.closed)

    def test_session_with_open_stream_never_asked(self):
        """A session carrying a stream may not read for a long time (a stock client whose local
        application stops reading): not asked. Once the stream ends, its silence starts."""
        client = self.session()
        open_stream(client)
        self.server.origin_connect()
        self.assertEqual(self.commands(client), [(Command.SYNACK, 1, b"")])
        self.advance(600)
        self.assertEqual(client.received(), [])
        self.assertFalse(client.closed)
        client.frame(Command.FIN, 1)
        self.advance(59.5)
        self.assertEqual(client.received(), [])
        self.advance(7.5)
        self.assertEqual(self.commands(client), [(Command.HEART_REQUEST, 0, b"")])

    def test_stream_opened_after_the_question_answers_it(self):
        """A SYN after the heartbeat (the client reusing the session) is an answer; the busy
        session is not closed at the deadline."""
        client = self.session()
        self.advance(60)
        client.received()
        open_stream(client)
        self.server.origin_connect()
        self.advance(120)
        self.assertFalse(client.closed)

    def test_off(self):
        self.build(heartbeat_interval=0)
        client = self.session()
        self.advance(299.5)
        self.assertEqual(client.received(), [])
        self.assertFalse(client.closed)

    def test_reload_changes_the_interval(self):
        """The reaper reads the heartbeat settings at each check and adapts its own pace."""
        client = self.session()
        self.advance(7.5)
        registry = self.server.registry
        registry.live.update(attr.evolve(registry.config, heartbeat_interval=2))
        self.advance(7.5)
        self.assertEqual(self.reaper.loop.interval, 1)
        self.assertEqual(self.commands(client), [(Command.HEART_REQUEST, 0, b"")])
        registry.live.update(attr.evolve(registry.config, heartbeat_interval=0))
        self.advance(60)
        self.assertFalse(client.closed, "heartbeats turned off: no deadline either")
        self.assertEqual(self.reaper.loop.interval, 30)

    def test_closed_session_forgotten(self):
        client = self.session()
        self.advance(60)
        self.assertEqual(len(self.server.registry.heartbeats), 1)
        client.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.server.registry.heartbeats), 0)


class ShutdownTests(SynchronousTestCase):
    def build(self):
        self.server = Server(shutdown_grace=5)
        top = build_service(
            self.server.config,
            [("tcp:0", lambda f: f)],
            self.server.reactor,
            self.server.dialer,
            self.server.factory.listen_udp,
        )
        top.startService()
        return top

    def test_tcp_listeners_get_a_large_backlog(self):
        """TCP ports without a backlog listen with DEFAULT_BACKLOG (Twisted's 50 overflowed on
        a burst of 100 sessions); a given backlog is kept."""
        from anytls_twisted import tls

        self.build()
        self.assertEqual(self.server.reactor.tcpServers[0][2], tls.DEFAULT_BACKLOG)
        server = Server()
        build_service(
            server.config,
            [("tcp:0:backlog=7", lambda f: f)],
            server.reactor,
            server.dialer,
            server.factory.listen_udp,
        ).startService()
        self.assertEqual(server.reactor.tcpServers[0][2], 7)

    def test_listener_and_reaper_children(self):
        """makeService's shape: one listener per port plus the reaper, all started."""
        top = self.build()
        self.assertEqual(len(self.server.reactor.tcpServers), 1)
        kinds = [type(s).__name__ for s in top]
        self.assertIn("ReaperService", kinds)
        self.assertTrue(all(s.running for s in top))
        top.stopService()

    def test_startup_objects_frozen_while_running(self):
        """Start-up objects are kept out of the collector while the service runs (gc.freeze)
        and handed back when it stops."""
        import gc

        self.assertEqual(gc.get_freeze_count(), 0)
        top = self.build()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.successResultOf(top.stopService())
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_stop_closes_listener_then_sessions(self):
        """Stopping closes the port, then every session; stragglers are aborted after grace."""
        top = self.build()
        factory = top.factory
        proto = factory.buildProtocol(IPv4Address("TCP", "203.0.113.1", 5))
        transport = StringTransport()
        proto.makeConnection(transport)
        d = top.stopService()
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(d)
        self.server.reactor.advance(5)
        self.assertTrue(transport.disconnected)  # aborted
        proto.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertEqual(self.server.registry.sessions, set())


class CollectWhenEmptiedTests(SynchronousTestCase):
    """The registry runs one full collection when it empties after many sessions: closed
    sessions are reference cycles, which a server at rest would otherwise hold."""

    def setUp(self):
        from twisted.internet.task import Clock

        from anytls_twisted.server import service

        self.collected = []
        self.patch(service.gc, "collect", lambda: self.collected.append(1))
        self.clock = Clock()
        self.registry = service.SessionRegistry(self.clock, Server().config)
        self.threshold = service.COLLECT_AFTER

    def cycle(self, count):
        sessions = [object() for _ in range(count)]
        for s in sessions:
            self.registry.add(s)
        for s in sessions:
            self.registry.discard(s)

    def test_collect_after_many(self):
        """Emptied after COLLECT_AFTER sessions: one collection, on the next reactor turn."""
        self.cycle(self.threshold)
        self.assertEqual(self.collected, [])
        self.clock.advance(0)
        self.assertEqual(self.collected, [1])
        self.cycle(1)  # counted again from zero
        self.clock.advance(0)
        self.assertEqual(self.collected, [1])

    def test_not_after_few(self):
        """Fewer sessions since the last collection: none, until they add up."""
        self.cycle(self.threshold - 1)
        self.clock.advance(0)
        self.assertEqual(self.collected, [])
        self.cycle(1)
        self.clock.advance(0)
        self.assertEqual(self.collected, [1])

    def test_not_while_sessions_remain(self):
        keep = object()
        self.registry.add(keep)
        self.cycle(self.threshold * 2)
        self.clock.advance(0)
        self.assertEqual(self.collected, [])
        self.registry.discard(keep)
        self.clock.advance(0)
        self.assertEqual(self.collected, [1])
