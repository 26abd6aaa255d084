"""The client's sessions: which server and which session carry a new stream, dialling with
failover, reuse, reaping, liveness, pre-warming and the SYNACK watchdog.

:class:`SessionManager` is the Twisted shell around the pure rules of :class:`~.pool.Pool`,
:class:`~.pool.Watchdog`, :class:`~.servers.Servers` and
:class:`~anytls_twisted.protocol.liveness.Liveness` (client-behaviour.md sections 1, 2, 4 and 9):

* a stream takes the newest idle session; one silent for a while is first asked with a
  heartbeat (the stream waits for the answer and goes elsewhere without one);
* with no idle session, a new one is dialled to the next healthy server; a failed dial marks
  that server down and is retried on the next one after 0, 100, 200, 300 and 400 ms (five
  attempts), never waiting when no server is up; down servers are probed in the background
  with a growing, jittered backoff and come back when a probe is answered;
* a session carries one stream at a time; when the stream ended and its FIN was written, the
  session goes back to the pool; every ``idle_session_check_interval`` seconds the pool's reap
  closes sessions idle too long (pre-warmed ones excepted);
* a session that dies before its stream was answered gives the stream to another session (or
  server) when that cannot deliver anything twice: nothing was sent yet but the SYN, or the
  server never answered the session at all;
* busy sessions that go silent are asked with a heartbeat and closed if it is not answered;
* ``prewarm`` sessions per healthy server are kept open and answered, ready for the next stream;
* opens on reused sessions of v2 servers are watched: no SYNACK in time resets the stream if
  the session is otherwise alive, or closes the session if it went silent;
* a reload (:meth:`SessionManager.reconfigure`) closes idle sessions to servers that are gone
  or changed at once, and busy ones when their stream ends; live streams are not cut;
* what happens is reported to ``metrics`` (:mod:`.metrics`; does nothing without ``--metrics``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Set, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from ..interfaces import IStream
from ..logs import get_logger
from ..protocol.liveness import Liveness
from ..protocol.padding import DEFAULT_SCHEME, PaddingScheme
from .nullmetrics import CLIENT_NULL_METRICS, ClientNullMetrics, dial_failure_reason, session_end
from .pool import CloseSession, Pool, ResetStream, Watchdog
from .servers import RETRY_DELAYS, ServerHealth, Servers
from .session import ClientSessionProtocol, SessionOwner
from .stream import ClientStream

_log = get_logger("anytls_twisted.client.sessions")

#: Seconds between liveness checks of busy sessions (and pre-warm top-ups); shorter when the
#: heartbeat settings are (:attr:`SessionManager.tick_interval`).
LIVENESS_TICK = 5.0
#: Seconds between a stream taking a pre-warmed session and the dial that replaces it.
REFILL_AFTER_TAKE = 1.0
#: Seconds a probe or pre-warm session may take to be answered by the server.
WARM_TIMEOUT = 10.0


@attr.frozen
class Route:
    """One server as new sessions reach it.

    @ivar name: ``host:port``, for logs and metrics.
    @ivar endpoint: makes the endpoint one session dials (TCP, then TLS unless plain).
    @ivar password: the server's password.
    @ivar tls: whether the endpoint is TLS (a close before the handshake is a failed dial).
    @ivar key: what identifies the server across reloads (equal keys: same server, same
        credentials and trust), or None to compare by name.
    """

    name: str
    endpoint: Callable[[], IStreamClientEndpoint] = attr.field(eq=False)
    password: str = attr.field(repr=False)
    tls: bool = False
    key: Optional[Hashable] = None

    @property
    def identity(self) -> Hashable:
        return self.key if self.key is not None else (self.name, self.password, self.tls)


Health = ServerHealth[Route]


class _SessionFactory(Factory):
    noisy = False

    def __init__(self, manager: SessionManager, health: Health) -> None:
        self.manager = manager
        self.health = health

    def buildProtocol(self, addr: Any) -> ClientSessionProtocol:
        m, route = self.manager, self.health.config
        session = ClientSessionProtocol(
            route.password, m.padding, m.clock, m, m.client_name, randrange=m.randrange
        )
        session.factory = self
        session.server = route.name
        m._health_of[session] = self.health
        m._dial_started[session] = m.clock.seconds()
        return session


@attr.define
class _Warming:
    """A session dialled to be ready (a probe of a down server, or a pre-warm)."""

    health: Health
    started: float
    probe: bool
    timer: Any = None


class SessionManager(Service, SessionOwner):
    """Opens streams on pooled sessions to one or several servers.

    Give either ``routes`` (several servers) or ``endpoint`` and ``password`` (one).

    @param endpoint: makes the endpoint a new session dials (TCP plus TLS to the server).
    @param tls: whether that endpoint is TLS: a session that closes before its handshake
        completed is then a failed dial.
    @ivar servers: the servers and their health (:class:`~.servers.Servers`).
    @ivar metrics: the :class:`~.metrics.ClientNullMetrics` interface.
    @ivar padding: the padding scheme new sessions start with (the server's latest).
    @ivar sessions: every live session, idle or busy (pre-warm and probe sessions included).
    @ivar prewarm: idle sessions kept open and answered per healthy server.
    @ivar generation: how many reloads changed a server; a session dialled under an older one
        to a server that changed carries its stream to the end and is then closed.
    @ivar retries: dial attempts made after a failed one.
    """

    def __init__(
        self,
        endpoint: Optional[Callable[[], IStreamClientEndpoint]],
        password: str,
        clock: Any,
        pool: Optional[Pool[ClientSessionProtocol]] = None,
        client_name: str = "",
        randrange: Optional[Callable[[int, int], int]] = None,
        server: str = "?",
        metrics: ClientNullMetrics = CLIENT_NULL_METRICS,
        tls: bool = False,
        routes: Optional[Sequence[Route]] = None,
        strategy: str = "round-robin",
        prewarm: int = 0,
        liveness: Optional[Liveness[ClientSessionProtocol]] = None,
        uniform: Optional[Callable[[float, float], float]] = None,
    ) -> None:
        if routes is None:
            if endpoint is None:
                raise ValueError("give routes, or an endpoint and a password")
            routes = [Route(server, endpoint, password, tls)]
        self._uniform = uniform
        self.servers: Servers[Route] = Servers([(r.name, r) for r in routes], strategy, uniform)
        self.clock = clock
        self.pool: Pool[ClientSessionProtocol] = pool if pool is not None else Pool()
        self.watchdog: Watchdog[ClientSessionProtocol, IStream] = Watchdog()
        # Not ``liveness or Liveness()``: a Liveness has a length, and a new one is empty.
        self.liveness: Liveness[ClientSessionProtocol] = (
            liveness if liveness is not None else Liveness()
        )
        self.client_name = client_name
        self.randrange = randrange
        self.padding: PaddingScheme = DEFAULT_SCHEME
        self.sessions: Set[ClientSessionProtocol] = set()
        self.prewarm = prewarm
        self.dials = 0
        self.retries = 0
        self.generation = 0
        self.metrics = metrics
        self._health_of: Dict[ClientSessionProtocol, Health] = {}
        self._dial_started: Dict[ClientSessionProtocol, float] = {}
        self._retired: Set[ClientSessionProtocol] = set()
        self._warming: Dict[ClientSessionProtocol, _Warming] = {}
        self._warm_dials: Dict[int, int] = {}  # id(health) -> dials in flight
        self._checking: Dict[ClientSessionProtocol, Tuple[ClientStream, Any]] = {}
        self._retry_calls: Set[Any] = set()
        # Pre-warming held back per server (id of its health): (until, last delay), after the
        # server closed idle sessions on its own, so that such a server is not redialled hot.
        self._refill_hold: Dict[int, Tuple[float, float]] = {}
        self._refill_timer: Any = None
        # Sessions this manager closed, and why (a SESSION_CLOSE_REASONS class).
        self._causes: Dict[ClientSessionProtocol, str] = {}
        metrics.watch(self)
        self._reaper = LoopingCall(self.reap)
        self._reaper.clock = clock
        self._ticker = LoopingCall(self.tick)
        self._ticker.clock = clock
        self._watch_timer: Any = None
        self._probe_timer: Any = None
        self._closed_waiters: List[Deferred[None]] = []

    # The first server's settings (one-server callers and tests read them).
    @property
    def endpoint(self) -> Callable[[], IStreamClientEndpoint]:
        return self.servers.servers[0].config.endpoint

    @property
    def password(self) -> str:
        return self.servers.servers[0].config.password

    @property
    def server(self) -> str:
        return self.servers.servers[0].name

    @property
    def tls(self) -> bool:
        return self.servers.servers[0].config.tls

    # Service.
    def startService(self) -> None:
        super().startService()
        self._reaper.start(self.pool.idle_session_check_interval, now=False)
        self._ticker.start(self.tick_interval, now=False)
        self._refill()

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        for loop in (self._reaper, self._ticker):
            if loop.running:
                loop.stop()
        self._cancel_watch_timer()
        for call in [self._probe_timer, self._refill_timer, *self._retry_calls]:
            if call is not None and call.active():
                call.cancel()
        self._probe_timer = self._refill_timer = None
        self._retry_calls.clear()
        for session in list(self.sessions) + list(self._warming) + list(self._checking):
            self._close(session, "the client is stopping", "stopping", abort=True)
        return None

    def wait_closed(self) -> Deferred[None]:
        """Fire once no session is left: after :meth:`stopService`, when the aborted
        connections are gone (a reactor turn later), so an owner can stop cleanly."""
        if not self.sessions and not self._warming:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        return d

    # Streams.
    def open(self, stream: ClientStream) -> None:
        """Open ``stream`` on the newest idle session, or on a new one."""
        now = self.clock.seconds()
        while True:
            session = self.pool.take(now)
            if session is None:
                break
            if session.closed:
                self.pool.remove(session)
                continue
            if session.machine.peer_version >= 2 and self.liveness.should_ask(session, now):
                self._check_then_open(session, stream, now)
                return
            self._open_on(session, stream, reused=True)
            self._refill_after_take()
            return
        self._dial(stream, 0)

    def _check_then_open(
        self, session: ClientSessionProtocol, stream: ClientStream, now: float
    ) -> None:
        """Ask a silent idle session with a heartbeat; ``stream`` waits for the answer."""
        _log.debug(
            "session {session_id} ({server}) was silent for {heartbeat_idle:g}s or more: "
            "asking it with a heartbeat before reuse",
            session_id=session.session_id,
            server=session.server,
            heartbeat_idle=self.liveness.check_after,
        )
        session.heartbeat()
        self.liveness.asked(session, now)
        timer = self.clock.callLater(self.liveness.answer_timeout, self._check_failed, session)
        self._checking[session] = (stream, timer)

    def _check_failed(self, session: ClientSessionProtocol) -> None:
        stream, _ = self._checking.pop(session)
        self._close(
            session,
            f"no answer to a heartbeat in {self.liveness.answer_timeout:g}s before reuse",
            "liveness",
            abort=True,
        )
        self.open(stream)

    def _dial(self, stream: ClientStream, attempt: int) -> None:
        """Dial a session for ``stream`` (``attempt`` 0 to 4) to the next healthy server."""
        if stream.state != "opening":
            return  # the application left while it waited
        health = self.servers.pick(self.clock.seconds())
        if health is None:
            stream.failed(self._all_down())
            return
        if attempt:
            self.retries += 1
            self.metrics.dial_retried()
        self.dials += 1
        self.metrics.session_dialled()
        d = health.config.endpoint().connect(_SessionFactory(self, health))
        d.addCallbacks(
            self._dialled,
            self._dial_failed,
            callbackArgs=(stream, self.generation, attempt),
            errbackArgs=(stream, health, attempt),
        )

    def _all_down(self) -> str:
        due = self.servers.next_probe_at()
        when = "" if due is None else f"; next check in {max(0.0, due - self.clock.seconds()):.0f}s"
        return f"every server is down ({', '.join(s.name for s in self.servers.servers)}{when})"

    def _dialled(
        self, session: ClientSessionProtocol, stream: ClientStream, generation: int, attempt: int
    ) -> None:
        self.sessions.add(session)
        self.pool.created(session)
        if generation != self.generation and self._is_retired_route(session):
            self._retired.add(session)
        _log.info(
            "session {session_id} to the server open ({server})",
            session_id=session.session_id,
            server=session.server,
        )
        stream.attempts = attempt
        if stream.state != "opening":  # the application left during the dial: keep it idle
            self.stream_ended(session, stream)
            return
        self._open_on(session, stream, reused=False)

    def _dial_failed(
        self, failure: Failure, stream: ClientStream, health: Health, attempt: int
    ) -> None:
        error = failure.getErrorMessage() or getattr(failure.type, "__name__", "error")
        _log.warn("cannot reach the server {server}: {error}", server=health.name, error=error)
        self.metrics.dial_failed(dial_failure_reason(failure))
        self._server_failed(health, error)
        self._retry(stream, attempt, f"cannot reach the server {health.name}: {error}")

    def _retry(self, stream: ClientStream, attempt: int, error: str) -> None:
        """Dial again for ``stream`` after the schedule's delay, or fail it: attempts used up,
        or no server up (then at once: waiting would only delay the same answer)."""
        following = attempt + 1
        if stream.state != "opening":
            return
        if following >= len(RETRY_DELAYS):
            stream.failed(f"{error} (after {len(RETRY_DELAYS)} attempts)")
            return
        if not self.servers.any_up:
            stream.failed(error if len(self.servers) == 1 else self._all_down())
            return

        def again() -> None:
            self._retry_calls.discard(call)
            self._dial(stream, following)

        call = self.clock.callLater(RETRY_DELAYS[following], again)
        self._retry_calls.add(call)

    def _open_on(self, session: ClientSessionProtocol, stream: ClientStream, reused: bool) -> None:
        health = self._health_of.get(session)
        if health is not None:
            self._refill_hold.pop(id(health), None)  # the server serves: warm freely again
        watch = reused and session.machine.peer_version >= 2
        session.open(stream)
        self.metrics.stream_opened(stream)
        if watch and stream.context is not None and session.machine.streams.get(stream.sid):
            self.watchdog.opened(stream, session, self.clock.seconds())
            self._arm_watch_timer()

    # Server health.
    def _server_failed(self, health: Health, error: str) -> None:
        if self.servers.dial_failed(health, self.clock.seconds()):
            _log.warn(
                "server {server} is down: {error}; checking it again in the background",
                server=health.name,
                error=error,
            )
        self._arm_probe_timer()

    def _server_answered(self, health: Health, rtt: Optional[float]) -> None:
        if self.servers.dial_succeeded(health, rtt):
            _log.info("server {server} is up again", server=health.name)
            self._refill()

    def _arm_probe_timer(self) -> None:
        if self._probe_timer is not None and self._probe_timer.active():
            self._probe_timer.cancel()
        self._probe_timer = None
        due = self.servers.next_probe_at()
        if due is None or not self.running:
            return
        self._probe_timer = self.clock.callLater(
            max(0.0, due - self.clock.seconds()), self._probe_due
        )

    def _probe_due(self) -> None:
        self._probe_timer = None
        for health in self.servers.due(self.clock.seconds()):
            self.servers.probe_started(health)
            self._warm_dial(health, probe=True)
        self._arm_probe_timer()

    # Ready sessions: probes of down servers and pre-warming.
    def _warm_dial(self, health: Health, probe: bool) -> None:
        """Dial a session that announces itself and waits for the server's answer; answered,
        it goes to the pool ready for a stream."""
        self.dials += 1
        self.metrics.session_dialled()
        key = id(health)
        self._warm_dials[key] = self._warm_dials.get(key, 0) + 1
        d = health.config.endpoint().connect(_SessionFactory(self, health))
        d.addCallbacks(
            self._warm_dialled,
            self._warm_dial_failed,
            callbackArgs=(health, probe),
            errbackArgs=(health, probe),
        )

    def _warm_done(self, health: Health) -> None:
        key = id(health)
        self._warm_dials[key] -= 1
        if not self._warm_dials[key]:
            del self._warm_dials[key]

    def _warm_dialled(self, session: ClientSessionProtocol, health: Health, probe: bool) -> None:
        self._warm_done(health)
        if not self.running:
            session.close("the client is stopping", abort=True)
            return
        warming = _Warming(health, self.clock.seconds(), probe)
        warming.timer = self.clock.callLater(WARM_TIMEOUT, self._warm_timed_out, session)
        self._warming[session] = warming
        session.announce()

    def _warm_dial_failed(self, failure: Failure, health: Health, probe: bool) -> None:
        self._warm_done(health)
        error = failure.getErrorMessage() or getattr(failure.type, "__name__", "error")
        self.metrics.dial_failed(dial_failure_reason(failure))
        self._warm_failed(health, probe, error)

    def _warm_failed(self, health: Health, probe: bool, error: str) -> None:
        if probe:
            self.servers.probe_failed(health, self.clock.seconds())
            _log.debug("probe of {server} failed: {error}", server=health.name, error=error)
            self._arm_probe_timer()
        else:
            self._server_failed(health, error)

    def _warm_timed_out(self, session: ClientSessionProtocol) -> None:
        warming = self._warming.get(session)
        if warming is None:
            return
        warming.timer = None
        if session.frames_seen or not session.connected:
            return
        if session.handshake_done and session.machine.peer_version < 2:
            # Open and quiet: a version-1 server, which never answers before a stream.
            self._warm_answered(session, warming)
            return
        self._close(session, f"no answer from the server in {WARM_TIMEOUT:g}s", "error", abort=True)

    def _warm_answered(self, session: ClientSessionProtocol, warming: _Warming) -> None:
        del self._warming[session]
        if warming.timer is not None and warming.timer.active():
            warming.timer.cancel()
        rtt = self.clock.seconds() - warming.started
        self._server_answered(warming.health, rtt)
        self.sessions.add(session)
        self.pool.created(session)
        self.pool.give_back(session, self.clock.seconds())
        _log.info(
            "session {session_id} to the server open ({server}, ready{why})",
            session_id=session.session_id,
            server=session.server,
            why=", probe" if warming.probe else ", pre-warmed",
        )
        self._refill()

    def _refill(self) -> None:
        """Dial what pre-warming is short of: ``prewarm`` idle sessions per healthy server,
        counting dials under way."""
        if not self.prewarm or not self.running:
            return
        idle: Dict[int, int] = {}
        for session in self.pool.idle_sessions():
            health = self._health_of.get(session)
            if health is not None:
                idle[id(health)] = idle.get(id(health), 0) + 1
        for warming in self._warming.values():
            if not warming.probe:
                idle[id(warming.health)] = idle.get(id(warming.health), 0) + 1
        now = self.clock.seconds()
        held_until: Optional[float] = None
        for health in self.servers.servers:
            if not health.up:
                continue
            until, _ = self._refill_hold.get(id(health), (0.0, 0.0))
            if until > now:
                held_until = until if held_until is None else min(held_until, until)
                continue
            have = idle.get(id(health), 0) + self._warm_dials.get(id(health), 0)
            for _ in range(self.prewarm - have):
                self._warm_dial(health, probe=False)
        if held_until is not None and self._refill_timer is None:

            def again() -> None:
                self._refill_timer = None
                self._refill()

            self._refill_timer = self.clock.callLater(held_until - now, again)

    def _refill_after_take(self) -> None:
        """Replace a taken idle session :data:`REFILL_AFTER_TAKE` seconds later, not now: the
        new session's TLS handshake would share this one thread with the stream that just took
        the warm session, and delay its first bytes by the handshake's CPU time."""
        if not self.prewarm or self._refill_timer is not None:
            return

        def later() -> None:
            self._refill_timer = None
            self._refill()

        self._refill_timer = self.clock.callLater(REFILL_AFTER_TAKE, later)

    def _hold_refill(self, health: Health) -> None:
        """The server closed an idle session by itself: wait before dialling it a warm one
        again, twice as long each time in a row (1 s to 30 s)."""
        _, delay = self._refill_hold.get(id(health), (0.0, 0.0))
        delay = min(30.0, delay * 2 if delay else 1.0)
        self._refill_hold[id(health)] = (self.clock.seconds() + delay, delay)

    # Reloads.
    def reconfigure(
        self,
        routes: Sequence[Route],
        check_interval: float,
        idle_timeout: float,
        min_idle: int,
        strategy: Optional[str] = None,
    ) -> Tuple[int, int]:
        """Use new servers and pool settings from now on (a reload). Servers whose route is
        unchanged keep their sessions and health; sessions to servers gone or changed are
        retired: the idle ones are closed now, the busy ones once their stream ends, so no
        live stream is cut. Returns (closed now, retiring)."""
        old_interval = self.pool.idle_session_check_interval
        self.pool.configure(check_interval, idle_timeout, min_idle)
        if self._reaper.running and self.pool.idle_session_check_interval != old_interval:
            self._reaper.stop()
            self._reaper.start(self.pool.idle_session_check_interval, now=False)
        kept = {h.config.identity: h for h in self.servers.servers}
        new = Servers(
            [(r.name, r) for r in routes], strategy or self.servers.strategy, self._uniform
        )
        for health in new.servers:
            old = kept.get(health.config.identity)
            if old is not None:  # same server: keep what is known of it
                health.up, health.failures, health.rtt = old.up, old.failures, old.rtt
                health.next_probe = old.next_probe
        same = {h.config.identity for h in new.servers} == set(kept)
        self.servers = new
        survivors = {h.config.identity: h for h in new.servers}
        for session, health in list(self._health_of.items()):
            replacement = survivors.get(health.config.identity)
            if replacement is not None:
                self._health_of[session] = replacement
        if same:
            self._arm_probe_timer()
            return 0, 0
        self.generation += 1
        self.padding = DEFAULT_SCHEME  # a scheme learnt from one server says nothing of another
        closed = 0
        for session in self.pool.idle_sessions():
            if self._is_retired_route(session):
                self.pool.remove(session)
                self._close(session, "the server changed (reload)", "reload")
                closed += 1
        busy = [
            s for s in self.sessions if not s.closed and s.streams and self._is_retired_route(s)
        ]
        self._retired.update(busy)
        for session in list(self._warming):
            if self._is_retired_route(session):
                self._close(session, "the server changed (reload)", "reload")
        self._arm_probe_timer()
        self._refill()
        return closed, len(busy)

    def _is_retired_route(self, session: ClientSessionProtocol) -> bool:
        health = self._health_of.get(session)
        return health is None or health not in self.servers.servers

    # SessionOwner: what sessions report.
    def padding_updated(self, scheme: PaddingScheme) -> None:
        if scheme.md5 == self.padding.md5:
            return
        self.padding = scheme
        for session in self.sessions:
            session.writer.update_scheme(scheme)

    def frame_arrived(self, session: ClientSessionProtocol) -> None:
        now = self.clock.seconds()
        self.watchdog.activity(session, 0.0)
        rtt = self.liveness.answered(session, now)
        if rtt is not None:
            health = self._health_of.get(session)
            if health is not None:
                self.servers.rtt_sample(health, rtt)
        started = self._dial_started.pop(session, None)
        if started is not None and session not in self._warming:
            health = self._health_of.get(session)
            if health is not None:
                self._server_answered(health, now - started)
        warming = self._warming.get(session)
        if warming is not None:
            self._dial_started.pop(session, None)
            self._warm_answered(session, warming)
        checking = self._checking.pop(session, None)
        if checking is not None:
            stream, timer = checking
            if timer.active():
                timer.cancel()
            self._open_on(session, stream, reused=True)
            self._refill()

    def synack_arrived(
        self, session: ClientSessionProtocol, stream: IStream, error: str = ""
    ) -> None:
        self.watchdog.acknowledged(stream)
        if error:
            self.metrics.stream_refused()

    def stream_ended(self, session: ClientSessionProtocol, stream: IStream) -> None:
        self.watchdog.acknowledged(stream)
        self.metrics.stream_closed(stream)
        if session.closed or session.streams:
            return
        if session in self._retired:
            self.pool.remove(session)
            self._close(session, "the server changed (reload)", "reload")
        elif not self.pool.give_back(session, self.clock.seconds()):
            self._close(session, "not kept for reuse", "idle")

    def rescue(self, session: ClientSessionProtocol, stream: IStream) -> bool:
        """``session`` died with ``stream`` unanswered: open it elsewhere if nothing can reach
        the destination twice (the server never answered the session, or the stream sent
        nothing but its SYN). True: the stream was taken over."""
        if not isinstance(stream, ClientStream) or not self.running:
            return False
        answered = session.frames_seen
        if answered and stream.bytes_out:
            return False
        if not stream.rewind():
            return False
        self.watchdog.acknowledged(stream)
        self.metrics.stream_closed(stream)
        health = self._health_of.get(session)
        reason = session.close_reason or "the session closed"
        if not answered and health is not None:
            self._server_failed(health, reason)
        _log.info(
            "stream to {destination}: session {session_id} ({server}) closed before the "
            "server answered ({reason}); trying again",
            destination=str(stream.destination),
            session_id=session.session_id,
            server=session.server,
            reason=reason,
        )
        self._retry(stream, stream.attempts, f"{session.server}: {reason}")
        return True

    def session_closed(
        self, session: ClientSessionProtocol, reason: Optional[Failure] = None
    ) -> None:
        self.sessions.discard(session)
        self._retired.discard(session)
        self.pool.remove(session)
        self.watchdog.session_closed(session)
        self.liveness.forget(session)
        self._dial_started.pop(session, None)
        health = self._health_of.pop(session, None)
        tls = health.config.tls if health is not None else False
        secured = session.handshake_done or not tls
        end = session_end(self._causes.pop(session, None), reason, secured, session.frames_seen)
        self.metrics.session_closed(end.reason)
        if end.tls_failed:
            self.metrics.dial_failed("tls")
        elif end.auth_failed:
            self.metrics.auth_failed()
        warming = self._warming.pop(session, None)
        if warming is not None:
            if warming.timer is not None and warming.timer.active():
                warming.timer.cancel()
            self._warm_failed(warming.health, warming.probe, session.close_reason or "closed")
        elif (
            self.prewarm
            and health is not None
            and end.reason in ("server_closed", "error")
            and not session.machine.streams_opened
        ):
            self._hold_refill(health)
        checking = self._checking.pop(session, None)
        if checking is not None:  # closed while asked before reuse: the stream goes elsewhere
            stream, timer = checking
            if timer.active():
                timer.cancel()
            if self.running:
                self.open(stream)
        self._refill()
        if not self.sessions and not self._warming:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def _close(
        self, session: ClientSessionProtocol, why: str, cause: str, abort: bool = False
    ) -> None:
        """Close ``session`` for ``why`` (the log's words); ``cause`` is the metrics' class.

        Sessions presumed dead (a heartbeat, a SYNACK or a probe unanswered) are closed with
        ``abort``: a polite close would wait :data:`~..session_shell.CLOSE_GRACE` seconds for
        the peer's close_notify, which a dead path never brings, and only then end the
        session's streams (the application told late, a stream waiting for its SYNACK moved to
        another session late)."""
        if not session.closed:
            self._causes[session] = cause
        session.close(why, abort=abort)

    # Timers.
    def reap(self) -> None:
        now = self.clock.seconds()
        timeout = self.pool.idle_session_timeout
        spare: Dict[int, int] = {}
        for session in self.pool.reap(now):
            health = self._health_of.get(session)
            if self.prewarm and health is not None and health.up:
                count = spare.get(id(health), 0)
                if count + self._idle_count(health) < self.prewarm:
                    spare[id(health)] = count + 1
                    self.pool.created(session)  # kept warm: back in the pool
                    self.pool.give_back(session, now)
                    continue
            self._close(session, f"idle: no stream for over {timeout:g}s", "idle")

    def server_sessions(self) -> Dict[str, Tuple[int, int]]:
        """Sessions open now by server name: (idle in the pool, busy with streams)."""
        idle = set(self.pool.idle_sessions())
        counts: Dict[str, Tuple[int, int]] = {}
        for session in self.sessions:
            health = self._health_of.get(session)
            if health is None or session.closed:
                continue
            i, b = counts.get(health.name, (0, 0))
            counts[health.name] = (i + 1, b) if session in idle else (i, b + 1)
        return counts

    def _idle_count(self, health: Health) -> int:
        return sum(1 for s in self.pool.idle_sessions() if self._health_of.get(s) is health)

    @property
    def tick_interval(self) -> float:
        """Seconds between :meth:`tick` calls: :data:`LIVENESS_TICK`, or less when the
        heartbeat settings are shorter, so that a busy session is asked about when it has been
        silent for ``check_after`` and closed about ``answer_timeout`` later (with a 5 s tick,
        ``--heartbeat-timeout 1`` took up to 5 s, and detection up to two ticks)."""
        return min(LIVENESS_TICK, self.liveness.check_after, self.liveness.answer_timeout)

    def tick(self) -> None:
        """Every :attr:`tick_interval`: ask busy sessions that went silent, close those that
        did not answer, and keep idle ones that wait for pre-warmed streams answered."""
        now = self.clock.seconds()
        busy = [
            s for s in self.sessions if s.streams and not s.closed and s.machine.peer_version >= 2
        ]
        if self.prewarm:
            busy += [s for s in self.pool.idle_sessions() if s.machine.peer_version >= 2]
        ask, dead = self.liveness.tick(now, busy)
        for session in ask:
            session.heartbeat()
            self.liveness.asked(session, now)
        for session in dead:
            self._close(
                session,
                f"no answer to a heartbeat in {self.liveness.answer_timeout:g}s (presumed dead)",
                "liveness",
                abort=True,
            )
        self._refill()

    def _arm_watch_timer(self) -> None:
        deadline = self.watchdog.next_deadline()
        if deadline is None or self._watch_timer is not None:
            return
        delay = max(0.0, deadline - self.clock.seconds())
        self._watch_timer = self.clock.callLater(delay, self._watch)

    def _cancel_watch_timer(self) -> None:
        if self._watch_timer is not None and self._watch_timer.active():
            self._watch_timer.cancel()
        self._watch_timer = None

    def _watch(self) -> None:
        self._watch_timer = None
        reason = f"no SYNACK from the server in {self.watchdog.timeout:g} seconds (timed out)"
        for action in self.watchdog.expired(self.clock.seconds()):
            if isinstance(action, ResetStream):
                stream: Any = action.stream
                self.metrics.watchdog_reset()
                stream.reset(reason)
            elif isinstance(action, CloseSession):
                self.metrics.watchdog_closed()
                self._close(action.session, f"silent: {reason}", "watchdog", abort=True)
        self._arm_watch_timer()


__all__: List[str] = ["LIVENESS_TICK", "Route", "SessionManager", "WARM_TIMEOUT"]
