"""The registry, the idle-session reaper and shutdown, driven by a memory reactor's clock."""

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol.codec import Command
from anytls_twisted.server.service import ReaperService, build_service

from .helpers import Server
from .test_session import open_stream


class ReaperTests(SynchronousTestCase):
    def setUp(self):
        self.server = Server(idle_session_timeout=300, idle_session_check_interval=30)
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
