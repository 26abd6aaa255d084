"""The Twisted shells around the session: factory, live-session registry, reaper, service.

``AnyTLSService`` is a ``MultiService`` that builds and owns the session factory, the registry,
one listener per ``--port`` and the reaper, which closes idle sessions and asks silent idle
ones with heartbeats (the rule: :class:`~anytls_twisted.protocol.liveness.Liveness`). Stopping it closes the listeners first
(no new sessions), then the sessions, aborting any that have not closed within the shutdown
grace. All of them read the settings from one :class:`~.settings.LiveConfig` when they use them,
so a reload reaches every part at once.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple, Union

from twisted.application import service, strports
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory

from .. import memory, tls
from ..endpoints import HAPROXY, EndpointString
from ..logs import get_logger
from ..nullmetrics import NULL_METRICS
from ..protocol.liveness import Liveness
from ..protocol.session import State
from .admission import Admission, AdmissionFactory, AdmittingProxyFactory
from .dialer import OriginDialer
from .fallback import FallbackDialer
from .session import SessionProtocol
from .settings import LiveConfig, ServerConfig
from .udp import listen_udp as quiet_listen_udp

_log = get_logger("anytls_twisted.service")

#: Sessions opened since the last collection after which the registry emptying runs a full
#: ``gc.collect()`` and ``malloc_trim`` (:mod:`..memory`; docs/performance.md, "Soak"): closed
#: sessions are reference cycles (the
#: session and its context, Twisted's connector and client transport), and a load's last ones
#: are in the oldest generation by then, where they wait for the next full collection, which a
#: server at rest does not reach; a few MiB of sessions and their OpenSSL state per 1000.
COLLECT_AFTER = 100


class SessionRegistry:
    """The live sessions of one process, for the reaper and for shutdown.

    @ivar live: the :class:`~.settings.LiveConfig` (the reaper reads the idle timeout).
    @ivar sessions: the sessions whose connection is open, authenticated or not.
    @ivar reaped: sessions the reaper has closed (idle, or not answering a heartbeat).
    @ivar heartbeats: which idle sessions to ask with a heartbeat, which are presumed dead.
    """

    def __init__(
        self, clock, config: Union[ServerConfig, LiveConfig], metrics=NULL_METRICS
    ) -> None:
        self.clock = clock
        self.live = LiveConfig.of(config)
        self.metrics = metrics
        self.sessions: Set[SessionProtocol] = set()
        self.reaped = 0
        self.heartbeats: Liveness[SessionProtocol] = Liveness(
            self.config.heartbeat_interval or 1.0, self.config.heartbeat_timeout
        )
        self._emptied: List[defer.Deferred] = []
        self._since_collect = 0

    @property
    def config(self) -> ServerConfig:
        """The current settings (the reaper reads the idle timeout at each check)."""
        return self.live.config

    def add(self, session: SessionProtocol) -> None:
        self.sessions.add(session)
        self._since_collect += 1

    def discard(self, session: SessionProtocol) -> None:
        self.sessions.discard(session)
        self.heartbeats.forget(session)
        if not self.sessions:
            if self._since_collect >= COLLECT_AFTER:
                # once the closing session's frames are gone; with everything built at startup
                # frozen, this scans only what sessions left (a few ms per 1000)
                self._since_collect = 0
                self.clock.callLater(0, memory.release)
            waiting, self._emptied = self._emptied, []
            for d in waiting:
                d.callback(None)

    def check_interval(self) -> float:
        """Seconds between two checks: ``--idle-session-check-interval``, or less with
        heartbeats, so that one goes out at most half an interval late and an unanswered one
        is noticed at most half a timeout late."""
        config = self.config
        interval = config.idle_session_check_interval
        if config.heartbeat_interval > 0:
            interval = min(interval, config.heartbeat_interval / 2, config.heartbeat_timeout / 2)
        return interval

    def reap_idle(self) -> None:
        """One check of the authenticated sessions with no open streams: close those with no
        frames for the idle timeout; ask those of v2 clients silent for the heartbeat interval
        with a heartbeat, and close those whose heartbeat went unanswered.

        Sessions with open streams are left alone: a stock client whose local application stops
        reading stops reading the whole session, so it may not answer for a long time. Errors
        are logged per session: a ``LoopingCall`` stops for good after an exception.
        """
        now = self.clock.seconds()
        config = self.config
        timeout = config.idle_session_timeout
        heartbeats = config.heartbeat_interval > 0
        watched: List[SessionProtocol] = []
        for session in list(self.sessions):
            try:
                if session.user is None or not session.idle or session.state is State.CLOSED:
                    continue
                idle_for = now - session.last_activity
                if idle_for >= timeout:
                    self.reaped += 1
                    self.metrics.session_reaped("idle")
                    session.close(f"idle for {idle_for:.0f}s with no streams")
                elif heartbeats and session.peer_version >= 2:
                    self.heartbeats.heard(session, session.last_activity)
                    watched.append(session)
            except Exception:
                _log.failure("reaping session {session_id}", session_id=session.session_id)
        if watched:
            self._check_heartbeats(now, watched)

    def _check_heartbeats(self, now: float, watched: List[SessionProtocol]) -> None:
        rule = self.heartbeats
        rule.check_after = self.config.heartbeat_interval  # a reload may have changed them
        rule.answer_timeout = self.config.heartbeat_timeout
        ask, dead = rule.tick(now, watched)
        for session in dead:
            try:
                waited = now - (rule.asked_at(session) or now)
                self.reaped += 1
                self.metrics.session_reaped("heartbeat")
                session.close(f"no answer to a heartbeat in {waited:.0f}s (presumed dead)")
            except Exception:
                _log.failure("closing session {session_id}", session_id=session.session_id)
        for session in ask:
            try:
                _log.debug(
                    "session {session_id} was silent for {heartbeat_interval:g}s or more: "
                    "asking it with a heartbeat",
                    session_id=session.session_id,
                    heartbeat_interval=rule.check_after,
                )
                session.heartbeat()
                rule.asked(session, now)
                self.metrics.heartbeat_sent()
            except Exception:
                _log.failure("asking session {session_id}", session_id=session.session_id)

    def answered(self, session: SessionProtocol) -> None:
        """``session`` sent a HeartResponse."""
        rtt = self.heartbeats.answered(session, self.clock.seconds())
        if rtt is not None:
            _log.debug(
                "session {session_id} answered the heartbeat in {rtt:.3f}s",
                session_id=session.session_id,
                rtt=rtt,
            )

    def close_all(self, grace: float) -> defer.Deferred:
        """Close every session; abort those still open after ``grace`` seconds."""
        if not self.sessions:
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        self._emptied.append(done)
        for session in list(self.sessions):
            session.close("server shutting down")

        def abort() -> None:
            for session in list(self.sessions):
                session.transport.abortConnection()

        timer = self.clock.callLater(grace, abort)
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done


class AnyTLSFactory(Factory):
    """Builds sessions and gives them what they share: config, clock, dialer, UDP, registry.

    @ivar live: the :class:`~.settings.LiveConfig`; ``config`` is its current value.
    @ivar clock: the reactor (``IReactorTime``), or a test clock.
    @ivar dialer: the :class:`~.dialer.OriginDialer` for TCP streams and UDP name lookups.
    @ivar listen_udp: ``(port, protocol, interface) -> port`` for UDP-over-TCP sockets.
    @ivar registry: the :class:`SessionRegistry` sessions join and leave.
    @ivar metrics: a ``metrics.Metrics``, or ``NullMetrics`` (does nothing).
    @ivar fallback_dialer: connects to fallback endpoints (``IFallbackDialer``).
    @ivar admission: the :class:`~.admission.Admission` (abuse limits) sessions ask.
    """

    protocol = SessionProtocol
    noisy = False

    def __init__(
        self,
        config: Union[ServerConfig, LiveConfig],
        clock,
        dialer: OriginDialer,
        listen_udp: Callable,
        registry: SessionRegistry,
        metrics=NULL_METRICS,
        fallback_dialer=None,
        admission: Optional[Admission] = None,
    ) -> None:
        self.live = LiveConfig.of(config)
        self.clock = clock
        self.dialer = dialer
        self.listen_udp = listen_udp
        self.registry = registry
        self.metrics = metrics  # metrics.Metrics, or NullMetrics (does nothing)
        self.fallback_dialer = fallback_dialer or FallbackDialer(clock)
        if admission is None:
            admission = Admission(self.live, clock, registry, metrics)
        self.admission = admission

    @property
    def config(self) -> ServerConfig:
        """The current settings; sessions and streams read it when they use a value."""
        return self.live.config


class ReaperService(service.Service):
    """Runs ``registry.reap_idle`` every check interval with a ``LoopingCall``.

    @ivar registry: the sessions to check.
    @ivar interval: seconds between checks; None: ``registry.check_interval()``, read again
        after every check (a reload may change the heartbeat settings).
    @ivar loop: the ``LoopingCall``, running while the service runs.
    """

    def __init__(self, registry: SessionRegistry, interval: Optional[float], clock) -> None:
        self.registry = registry
        self.interval = interval
        self.loop = task.LoopingCall(self._check)
        self.loop.clock = clock

    def _check(self) -> None:
        self.registry.reap_idle()
        if self.interval is None:
            self.loop.interval = self.registry.check_interval()

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.interval or self.registry.check_interval(), now=False)

    def stopService(self) -> None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()


@contextlib.contextmanager
def _exit_on_listen_failure():
    try:
        yield
    except CannotListenError as e:
        raise SystemExit(
            f"twistd anytls: error: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}"
        ) from None


#: A listener: a Twisted endpoint string, or a callable making the listening service from the
#: factory (``workers.AdoptedPort``); and ``wrap``, which turns the session factory into the one
#: that listens (TLS, or the identity).
Listener = Tuple[Union[str, Callable[[Any], service.Service]], Callable[[Factory], Any]]


class AnyTLSService(service.MultiService):
    """Listeners plus reaper; shuts down listeners, then sessions, within a bounded time.

    @ivar live: the :class:`~.settings.LiveConfig` every part reads.
    @ivar registry: the :class:`SessionRegistry` of live sessions.
    @ivar factory: the :class:`AnyTLSFactory` building sessions.
    @ivar listeners: the listening services, one per ``listeners`` entry, in order.
    @ivar reaper: the :class:`ReaperService` closing idle sessions and asking silent ones.
    @ivar admission: the :class:`~.admission.Admission` (abuse limits) every port asks.
    """

    def __init__(
        self,
        config: Union[ServerConfig, LiveConfig],
        listeners: Sequence[Listener],
        reactor,
        dialer: Optional[OriginDialer] = None,
        listen_udp: Optional[Callable] = None,
        metrics=None,
    ) -> None:
        """``listeners`` is a list of ``(endpoint string, wrap)`` where ``wrap`` turns the
        session factory into the one that listens (TLS or identity). ``dialer`` and
        ``listen_udp`` are injectable for tests; ``metrics`` is a
        :class:`~anytls_twisted.metrics.Metrics` (default: none kept)."""
        super().__init__()
        self.live = LiveConfig.of(config)
        if metrics is None:
            metrics = NULL_METRICS
        self.registry = SessionRegistry(reactor, self.live, metrics)
        if dialer is None:
            dialer = OriginDialer(reactor, self.config.connect_timeout)
        if listen_udp is None:
            listen_udp = quiet_listen_udp(reactor)

        self.admission = Admission(self.live, reactor, self.registry, metrics)
        self.admission.setServiceParent(self)
        self.factory = AnyTLSFactory(
            self.live, reactor, dialer, listen_udp, self.registry, metrics, admission=self.admission
        )
        self.listeners: List[service.Service] = []
        for where, wrap in listeners:
            self.add_listener(where, self.admitted(wrap(self.factory)), reactor)
        self.reaper = ReaperService(self.registry, None, reactor)
        self.reaper.setServiceParent(self)

    @property
    def config(self) -> ServerConfig:
        return self.live.config

    def admitted(self, factory) -> AdmissionFactory:
        """A port's listening factory: the abuse limits asked at accept, around ``factory``
        (TLS, or the session factory itself). The source's rate applies on TLS ports, whose
        peer is the client (plain ports are for use behind a TLS-terminating proxy, whose
        address every client would share); ``haproxy:`` ports apply it to the header's."""
        return AdmissionFactory(factory, self.admission, isinstance(factory, TLSMemoryBIOFactory))

    def add_listener(
        self, description: Union[str, Callable[[Any], service.Service]], factory, reactor
    ) -> service.Service:
        if callable(description):  # a ready listener, e.g. workers.AdoptedPort
            listener = description(factory)
        else:
            endpoint = tls.listen_endpoint(description)
            inner = _without_haproxy(endpoint)
            if inner is not None:  # our PROXY header reader, which asks the limits
                endpoint, factory = inner, AdmittingProxyFactory(factory)
            listener = strports.service(endpoint, factory, reactor=reactor)
        listener.setServiceParent(self)
        self.listeners.append(listener)
        return listener

    def privilegedStartService(self) -> None:
        """Bind the ports (twistd does this first); a busy port ends twistd with one line."""
        with _exit_on_listen_failure():
            super().privilegedStartService()

    def startService(self) -> None:
        with _exit_on_listen_failure():
            super().startService()
        # Start-up garbage (option parsing, the plugin cache, the certificate, modules compiled
        # without a .pyc) goes first, and the C heap it leaves is handed back: 0.1 to 0.8 MiB
        # of idle RSS (docs/performance.md, "Idle memory"). Everything left lives as long as the
        # process: out of the collector's generations, full collections scan only what
        # sessions allocate (docs/performance.md).
        memory.release()
        gc.freeze()

    @defer.inlineCallbacks
    def stopService(self):
        gc.unfreeze()
        service.Service.stopService(self)
        yield defer.gatherResults(
            [defer.maybeDeferred(listener.stopService) for listener in self.listeners]
        )
        yield self.registry.close_all(self.config.shutdown_grace)
        others = [s for s in self if s not in self.listeners]
        yield defer.gatherResults([defer.maybeDeferred(s.stopService) for s in others])


def _without_haproxy(endpoint: str) -> Optional[str]:
    """The endpoint inside ``haproxy:ENDPOINT``, or None for any other endpoint."""
    try:
        inner = EndpointString.parse(endpoint).unwrap(HAPROXY)
    except ValueError:
        return None
    return None if inner is None else inner.format()


#: Assemble the service (the name callers and tests have used; the class builds the parts).
build_service = AnyTLSService
