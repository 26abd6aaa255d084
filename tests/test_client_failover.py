"""The session manager across several servers, on fake transports and a fake clock: failover
with v2ray's retry schedule, servers marked down and probed back, streams moved off sessions
that died before answering, heartbeats before reuse and on busy sessions, pre-warming and
sessions that are never reused."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.client.pool import Pool
from anytls_twisted.client.sessions import LIVENESS_TICK, REFILL_AFTER_TAKE, Route, SessionManager
from anytls_twisted.client.stream import ClientStream
from anytls_twisted.protocol.address import Destination
from anytls_twisted.protocol.codec import Command
from anytls_twisted.protocol.liveness import ANSWER_TIMEOUT, CHECK_AFTER, Liveness

from .helpers import capture_events
from .test_client_session import LOW, PASSWORD, FakeEndpoint, Local

HIGH = lambda low, high: high  # noqa: E731  (backoff without jitter: the whole ceiling)
CLOSED = Failure(ConnectionDone("closed"))


def kill(server, failure=CLOSED):
    """The connection under ``server``'s session ends."""
    server.session.connectionLost(failure)


def answer(server, *streams):
    """The server says v2, and acknowledges ``streams``."""
    server.send(Command.SERVER_SETTINGS, 0, b"v=2")
    for stream in streams:
        server.send(Command.SYNACK, stream.sid)


class Base(SynchronousTestCase):
    names = ("a.example:443", "b.example:443")

    def setUp(self):
        self.events = capture_events(self)
        self.clock = MemoryReactorClock()
        self.endpoints = {name: FakeEndpoint() for name in self.names}
        self.m = self.make()
        self.m.startService()
        self.addCleanup(self.m.stopService)

    def make(self, strategy="round-robin", prewarm=0, pool=None, liveness=None):
        routes = [
            Route(name, (lambda e=endpoint: e), PASSWORD)
            for name, endpoint in self.endpoints.items()
        ]
        return SessionManager(
            None,
            "",
            self.clock,
            pool if pool is not None else Pool(),
            randrange=LOW,
            routes=routes,
            strategy=strategy,
            prewarm=prewarm,
            uniform=HIGH,
            liveness=liveness,
        )

    def stream(self):
        local = Local()
        s = ClientStream(local, Destination("example.com", 80), self.clock)
        self.m.open(s)
        return s, local

    def lines(self, fragment):
        return [formatEvent(e) for e in self.events if fragment in formatEvent(e)]

    def health(self, name):
        return next(h for h in self.m.servers.servers if h.name == name)


class FailoverTests(Base):
    def test_round_robin_spreads_new_sessions(self):
        self.stream()
        self.stream()
        self.stream()
        a, b = self.endpoints.values()
        self.assertEqual((len(a.sessions), len(b.sessions)), (2, 1))

    def test_a_failed_dial_moves_to_the_next_server_after_100ms(self):
        a, b = self.endpoints.values()
        a.fail = True
        s, local = self.stream()
        self.assertEqual(len(b.sessions), 0)
        self.clock.advance(0.099)
        self.assertEqual(len(b.sessions), 0)
        self.clock.advance(0.001)
        self.assertEqual(len(b.sessions), 1)
        answer(b.sessions[0], s)
        self.assertEqual(local.events, ["established"])
        self.assertFalse(self.health("a.example:443").up)
        self.assertEqual(len(self.lines("server a.example:443 is down")), 1)
        self.assertEqual(self.m.retries, 1)
        # New sessions go to b only while a is down.
        self.stream()
        self.assertEqual((len(a.sessions), len(b.sessions)), (0, 2))

    def test_every_server_down_fails_at_once_without_dialling(self):
        a, b = self.endpoints.values()
        a.fail = b.fail = True
        s, local = self.stream()
        self.clock.advance(0.1)
        self.assertEqual(local.events[0][0], "refused")
        self.assertIn("every server is down", local.events[0][1])
        dials = self.m.dials
        s2, local2 = self.stream()
        self.assertEqual(self.m.dials, dials)
        self.assertIn("every server is down (a.example:443, b.example:443", local2.events[0][1])
        self.assertIn("next check in", local2.events[0][1])

    def test_five_attempts_at_most(self):
        """A server that fails and comes straight back up (as a flapping one might) is not
        tried forever: five attempts, 0 + 0.1 + 0.2 + 0.3 + 0.4 s."""
        a, b = self.endpoints.values()
        a.fail = b.fail = True
        up = self.m.servers.dial_succeeded
        s, local = self.stream()
        for delay in (0.1, 0.2, 0.3, 0.4):
            for health in self.m.servers.servers:
                up(health)  # as if probes had found both up again
            self.clock.advance(delay)
        self.assertEqual(self.m.dials, 5)
        self.assertEqual(local.events[0][0], "refused")
        self.assertIn("after 5 attempts", local.events[0][1])

    def test_probe_brings_a_server_back_and_its_session_is_used(self):
        a, b = self.endpoints.values()
        a.fail = True
        self.stream()
        self.clock.advance(0.1)  # b takes the stream
        a.fail = False
        self.clock.advance(0.899)
        self.assertEqual(len(a.sessions), 0)  # first probe 1 s after the failure (no jitter)
        self.clock.advance(0.001)
        self.assertEqual(len(a.sessions), 1)
        probe = a.sessions[0]
        settings = [f for f in probe.frames() if f.cmd == Command.SETTINGS]
        self.assertEqual(len(settings), 1)  # announced without a stream
        probe.send(Command.SERVER_SETTINGS, 0, b"v=2")
        self.assertTrue(self.health("a.example:443").up)
        self.assertEqual(len(self.lines("server a.example:443 is up again")), 1)
        self.assertEqual(self.m.pool.idle_sessions(), [probe.session])
        dials = self.m.dials
        s, local = self.stream()
        self.assertEqual(self.m.dials, dials)  # the probe's session carries it
        self.assertEqual(s.context.session_id, probe.session.session_id)

    def test_failed_probes_back_off(self):
        a, b = self.endpoints.values()
        a.fail = True
        self.stream()
        self.clock.advance(0.1)
        probes = []
        for _ in range(4):
            before = self.m.dials
            waited = 0.0
            while self.m.dials == before:
                self.clock.advance(0.5)
                waited += 0.5
            probes.append(waited)
        self.assertEqual(probes, [1.0, 2.0, 4.0, 8.0])  # the first counted from 0.1 s
        self.assertFalse(self.health("a.example:443").up)


class RescueTests(Base):
    def test_a_session_that_never_answers_hands_its_stream_to_the_next_server(self):
        """The first server closes the session before any answer (a wrong password there, a
        dead server): the stream, with the bytes the application sent, goes to the next server
        and the application sees one success."""
        a, b = self.endpoints.values()
        s, local = self.stream()
        s.send(b"GET / HTTP/1.1\r\n\r\n")
        kill(a.sessions[0])
        self.assertEqual(local.events, [])
        self.assertFalse(self.health("a.example:443").up)
        self.clock.advance(0.1)
        server = b.sessions[0]
        frames = server.frames()
        self.assertEqual([f.cmd for f in frames if f.cmd == Command.SYN], [Command.SYN])
        payload = b"".join(f.data for f in frames if f.cmd == Command.PSH)
        self.assertTrue(payload.endswith(b"GET / HTTP/1.1\r\n\r\n"))
        answer(server, s)
        self.assertEqual(local.events, ["established"])
        self.assertEqual(len(self.lines("closed before the server answered")), 1)

    def test_a_reused_session_that_dies_takes_only_a_bare_syn_elsewhere(self):
        a, b = self.endpoints.values()
        first, _ = self.stream()
        answer(a.sessions[0], first)
        first.local_closed()
        bare, bare_local = self.stream()  # reuses the session: a SYN and nothing else
        kill(a.sessions[0], Failure(ConnectionLost("reset")))
        self.clock.advance(0.1)
        self.assertEqual(len(b.sessions), 1)  # a is answered-then-dead: not marked down...
        self.assertTrue(self.health("a.example:443").up)
        answer(b.sessions[0], bare)
        self.assertEqual(bare_local.events, ["established"])

    def test_data_already_sent_on_an_answered_session_is_not_sent_twice(self):
        a, b = self.endpoints.values()
        first, _ = self.stream()
        answer(a.sessions[0], first)
        first.local_closed()
        sent, local = self.stream()
        sent.send(b"POST /pay HTTP/1.1\r\n\r\n")
        kill(a.sessions[0], Failure(ConnectionLost("reset")))
        self.clock.advance(1)
        self.assertEqual(len(b.sessions), 0)
        self.assertEqual(local.events[0][0], "refused")


class LivenessTests(Base):
    names = ("a.example:443",)

    def idle_session(self):
        (a,) = self.endpoints.values()
        s, _ = self.stream()
        answer(a.sessions[0], s)
        s.local_closed()
        a.sessions[0].frames()
        return a.sessions[0]

    def test_a_silent_idle_session_is_asked_before_reuse(self):
        server = self.idle_session()
        self.clock.advance(CHECK_AFTER)
        s, local = self.stream()
        frames = server.frames()
        self.assertEqual([f.cmd for f in frames], [Command.HEART_REQUEST])
        server.send(Command.HEART_RESPONSE, 0)
        frames = server.frames()
        self.assertIn(Command.SYN, [f.cmd for f in frames])
        server.send(Command.SYNACK, s.sid)
        self.assertEqual(local.events, ["established"])
        self.assertEqual(self.m.dials, 1)

    def test_no_answer_before_reuse_means_another_session_without_losing_the_stream(self):
        (a,) = self.endpoints.values()
        server = self.idle_session()
        self.clock.advance(CHECK_AFTER + 1)
        s, local = self.stream()
        self.clock.advance(ANSWER_TIMEOUT)
        self.assertTrue(server.transport.aborted)  # presumed dead: no polite close
        kill(server)
        self.assertEqual(len(a.sessions), 2)
        answer(a.sessions[1], s)
        self.assertEqual(local.events, ["established"])
        self.assertEqual(len(self.lines("no answer to a heartbeat in 5s before reuse")), 1)

    def test_a_recently_heard_session_is_reused_at_once(self):
        server = self.idle_session()
        self.clock.advance(CHECK_AFTER - 1)
        self.stream()
        self.assertIn(Command.SYN, [f.cmd for f in server.frames()])

    def test_a_busy_session_gone_silent_is_asked_then_closed(self):
        (a,) = self.endpoints.values()
        s, local = self.stream()
        server = a.sessions[0]
        answer(server, s)
        server.frames()
        self.clock.advance(LIVENESS_TICK * 3)  # 15 s of silence: asked
        self.assertEqual([f.cmd for f in server.frames()], [Command.HEART_REQUEST])
        self.clock.advance(LIVENESS_TICK)  # answer_timeout (5 s) later: presumed dead
        # Aborted: a polite close would wait CLOSE_GRACE (5 s) for a close_notify that a dead
        # path never brings, and the application would be told only then.
        self.assertTrue(server.transport.aborted)
        kill(server)
        self.assertTrue(local.transport.disconnecting)  # an error, not a hang
        self.assertEqual(len(self.lines("presumed dead")), 1)

    def test_the_given_heartbeat_settings_are_used(self):
        """--heartbeat-idle and --heartbeat-timeout reach the manager: a new Liveness is
        empty, hence false, and must not be swapped for the default one (it was)."""
        liveness = Liveness(1.0, 1.0)
        self.m.stopService()
        self.m = self.make(liveness=liveness)
        self.m.startService()
        self.assertIs(self.m.liveness, liveness)
        server = self.idle_session()
        self.clock.advance(1.0)
        s, local = self.stream()
        self.assertEqual([f.cmd for f in server.frames()], [Command.HEART_REQUEST])
        self.clock.advance(1.0)
        self.assertTrue(server.transport.disconnecting)
        kill(server)
        self.assertEqual(len(self.lines("no answer to a heartbeat in 1s before reuse")), 1)

    def test_a_silent_reused_session_is_aborted_and_its_stream_moved_at_once(self):
        """A stream opened on a reused session that stays silent past the SYNACK deadline:
        the session is aborted (not closed politely, which waited CLOSE_GRACE, 5 s more, before
        the stream could move), and the stream, which sent only its SYN, opens elsewhere."""
        (a,) = self.endpoints.values()
        server = self.idle_session()
        s, local = self.stream()  # heard from just now: reused without asking
        self.assertIn(Command.SYN, [f.cmd for f in server.frames()])
        self.clock.advance(self.m.watchdog.timeout)
        self.assertTrue(server.transport.aborted)
        kill(server, Failure(ConnectionLost("aborted")))  # what the abort brings
        self.clock.advance(0.1)  # the retry schedule's second step
        self.assertEqual(len(a.sessions), 2)
        answer(a.sessions[1], s)
        self.assertEqual(local.events, ["established"])

    def test_short_heartbeat_settings_check_busy_sessions_as_often(self):
        """With --heartbeat-idle 1 --heartbeat-timeout 1 a silent busy session is asked after
        1 s and closed 1 s later, not at the 5 s liveness ticks (up to 10 s)."""
        self.m.stopService()
        self.m = self.make(liveness=Liveness(1.0, 1.0))
        self.m.startService()
        self.assertEqual(self.m.tick_interval, 1.0)
        (a,) = self.endpoints.values()
        s, local = self.stream()
        server = a.sessions[0]
        answer(server, s)
        server.frames()
        self.clock.advance(1.0)
        self.assertEqual([f.cmd for f in server.frames()], [Command.HEART_REQUEST])
        self.clock.advance(1.0)
        self.assertTrue(server.transport.aborted)
        kill(server)
        self.assertTrue(local.transport.disconnecting)
        self.assertEqual(len(self.lines("no answer to a heartbeat in 1s (presumed dead)")), 1)

    def test_a_busy_session_that_answers_stays(self):
        (a,) = self.endpoints.values()
        s, _ = self.stream()
        server = a.sessions[0]
        answer(server, s)
        for _ in range(10):
            self.clock.advance(LIVENESS_TICK)
            for frame in server.frames():
                if frame.cmd == Command.HEART_REQUEST:
                    server.send(Command.HEART_RESPONSE, 0)
        self.assertFalse(server.transport.disconnecting)


class PrewarmSetup(Base):
    """A manager with ``--prewarm 1`` and a 10 s idle timeout (no tests of its own)."""

    def setUp(self):
        super().setUp()
        self.m.stopService()
        self.m = self.make(prewarm=1, pool=Pool(10, 10))
        self.m.startService()
        self.addCleanup(self.m.stopService)

    def answer_warm(self):
        for endpoint in self.endpoints.values():
            for server in endpoint.sessions:
                if not server.session.frames_seen and not server.session.closed:
                    server.send(Command.SERVER_SETTINGS, 0, b"v=2")


class PrewarmTests(PrewarmSetup):
    def test_ready_sessions_per_server_and_refilled_after_use(self):
        a, b = self.endpoints.values()
        self.assertEqual((len(a.sessions), len(b.sessions)), (1, 1))
        self.answer_warm()
        self.assertEqual(len(self.m.pool), 2)
        dials = self.m.dials
        s, local = self.stream()
        # No dial for the stream, and the refill waits so that its handshake does not delay
        # the stream's first bytes.
        self.assertEqual(self.m.dials, dials)
        self.clock.advance(REFILL_AFTER_TAKE - 0.01)
        self.assertEqual(self.m.dials, dials)
        self.clock.advance(0.01)
        self.assertEqual(self.m.dials, dials + 1)
        self.assertIsNotNone(s.context)
        self.answer_warm()
        self.assertEqual(len(self.m.pool), 2)
        self.assertEqual(len(self.lines("pre-warmed")), 3)

    def servers(self):
        return [server for e in self.endpoints.values() for server in e.sessions]

    def test_warm_sessions_are_not_reaped_and_kept_answered(self):
        self.answer_warm()
        warm = set(self.m.pool.idle_sessions())
        asked = 0
        for _ in range(12):  # a minute, past the 10 s idle timeout many times
            self.clock.advance(LIVENESS_TICK)
            for server in self.servers():
                for frame in server.frames():
                    if frame.cmd == Command.HEART_REQUEST:
                        asked += 1
                        server.send(Command.HEART_RESPONSE, 0)
        self.assertEqual(set(self.m.pool.idle_sessions()), warm)
        for session in warm:
            self.assertFalse(session.transport.disconnecting)
        self.assertGreaterEqual(asked, 2 * 3)  # each asked every 15 s or so

    def test_a_warm_session_that_stops_answering_is_replaced(self):
        self.answer_warm()
        a, b = self.endpoints.values()
        dead = a.sessions[0]
        for _ in range(4):  # 20 s: asked at 15 s, no answer by 20 s
            self.clock.advance(LIVENESS_TICK)
            for server in b.sessions:
                for frame in server.frames():
                    if frame.cmd == Command.HEART_REQUEST:
                        server.send(Command.HEART_RESPONSE, 0)
        self.assertTrue(dead.transport.aborted)
        kill(dead)
        self.assertEqual(len(a.sessions), 2)  # refilled

    def test_a_failed_warm_dial_marks_the_server_down_without_a_storm(self):
        a, b = self.endpoints.values()
        kill(a.sessions[0])  # never answered
        self.assertFalse(self.health("a.example:443").up)
        self.clock.advance(0.5)
        self.assertEqual(len(a.sessions), 1)  # no refill for a down server


class NoReuseTests(Base):
    names = ("a.example:443",)

    def test_every_stream_gets_its_own_session(self):
        self.m.stopService()
        self.m = self.make(pool=Pool(reuse=False))
        self.m.startService()
        self.addCleanup(self.m.stopService)
        (a,) = self.endpoints.values()
        for _ in range(3):
            s, _ = self.stream()
            server = a.sessions[-1]
            answer(server, s)
            s.local_closed()
            self.assertTrue(server.transport.disconnecting)
        self.assertEqual(len(a.sessions), 3)


class PrewarmHoldTests(PrewarmSetup):
    names = ("a.example:443",)

    def test_a_server_closing_idle_sessions_at_once_is_not_redialled_hot(self):
        """A server that answers, then closes every idle session by itself: the refills wait
        1, 2, 4 s... instead of dialling in a loop; a stream served resets the wait."""
        (a,) = self.endpoints.values()
        waits = []
        for _ in range(4):
            self.answer_warm()
            before = len(a.sessions)
            kill(a.sessions[-1])
            waited = 0.0
            while len(a.sessions) == before:
                self.clock.advance(0.25)
                waited += 0.25
            waits.append(waited)
        self.assertEqual(waits, [1.0, 2.0, 4.0, 8.0])
        self.answer_warm()
        s, _ = self.stream()  # takes the warm session: the server serves
        self.assertIsNotNone(s.context)
        self.assertEqual(self.m._refill_hold, {})


class SettingsKeptTests(SynchronousTestCase):
    def test_an_empty_liveness_or_pool_given_is_the_one_used(self):
        """Both are empty containers (false) when new: a manager must not take them for
        "not given" and fall back to defaults (``--heartbeat-idle`` was once ignored so)."""
        from anytls_twisted.protocol.liveness import Liveness

        liveness, pool = Liveness(0.5, 1.0), Pool(reuse=False)
        m = SessionManager(
            lambda: FakeEndpoint(), PASSWORD, MemoryReactorClock(), pool, liveness=liveness
        )
        self.assertIs(m.liveness, liveness)
        self.assertIs(m.pool, pool)
