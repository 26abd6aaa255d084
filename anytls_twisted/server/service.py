"""The Twisted shells around the session: factory, live-session registry, reaper, service.

``AnyTLSService`` is a ``MultiService`` holding one listener per ``--port`` and the idle-session
reaper. Stopping it closes the listeners first (no new sessions), then the sessions, aborting
any that have not closed within the shutdown grace.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, List, Optional, Set

from twisted.application import service, strports
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory

from .. import tls
from ..logs import get_logger
from ..metrics import NULL_METRICS
from .dialer import OriginDialer
from .session import SessionProtocol
from .settings import ServerConfig
from .udp import listen_udp as quiet_listen_udp

_log = get_logger("anytls_twisted.service")


class SessionRegistry:
    """The live sessions of one process, for the reaper and for shutdown."""

    def __init__(self, clock, config: ServerConfig, metrics=NULL_METRICS) -> None:
        self.clock = clock
        self.config = config
        self.metrics = metrics
        self.sessions: Set[SessionProtocol] = set()
        self.reaped = 0
        self._emptied: List[defer.Deferred] = []

    def add(self, session: SessionProtocol) -> None:
        self.sessions.add(session)

    def discard(self, session: SessionProtocol) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            waiting, self._emptied = self._emptied, []
            for d in waiting:
                d.callback(None)

    def reap_idle(self) -> None:
        """Close authenticated sessions with no streams and no frames for the idle timeout.

        Errors are logged per session: a ``LoopingCall`` stops for good after an exception.
        """
        now = self.clock.seconds()
        timeout = self.config.idle_session_timeout
        for session in list(self.sessions):
            try:
                idle_for = now - session.last_activity
                if session.user is not None and session.idle and idle_for >= timeout:
                    self.reaped += 1
                    self.metrics.session_reaped()
                    session.close(f"idle for {idle_for:.0f}s with no streams")
            except Exception:
                _log.failure("reaping session {session_id}", session_id=session.session_id)

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
    """Builds sessions and gives them what they share: config, clock, dialer, UDP, registry."""

    protocol = SessionProtocol
    noisy = False

    def __init__(
        self,
        config: ServerConfig,
        clock,
        dialer: OriginDialer,
        listen_udp: Callable,
        registry: SessionRegistry,
        metrics=NULL_METRICS,
    ) -> None:
        self.config = config
        self.clock = clock
        self.dialer = dialer
        self.listen_udp = listen_udp
        self.registry = registry
        self.metrics = metrics  # metrics.Metrics, or NullMetrics (does nothing)


class ReaperService(service.Service):
    """Runs ``registry.reap_idle`` every check interval with a ``LoopingCall``."""

    def __init__(self, registry: SessionRegistry, interval: float, clock) -> None:
        self.registry = registry
        self.interval = interval
        self.loop = task.LoopingCall(registry.reap_idle)
        self.loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.interval, now=False)

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


class AnyTLSService(service.MultiService):
    """Listeners plus reaper; shuts down listeners, then sessions, within a bounded time."""

    factory: AnyTLSFactory  # set by build_service
    reloader: service.Service  # set by tap.makeService

    def __init__(self, config: ServerConfig, registry: SessionRegistry) -> None:
        super().__init__()
        self.config = config
        self.registry = registry
        self.listeners: List[service.Service] = []

    def add_listener(self, description: str, factory, reactor) -> service.Service:
        if callable(description):  # a ready listener, e.g. workers.AdoptedPort
            listener = description(factory)
        else:
            listener = strports.service(tls.listen_endpoint(description), factory, reactor=reactor)
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
        # Everything built so far (modules, Twisted, the TLS contexts, the config) lives as long
        # as the process. Moving it out of the collector's generations makes each full
        # collection scan only what sessions allocate: the collector took 8-12% of the server's
        # samples while 100 sessions were set up, 0-4% after (benches/profile.py parallel --size 10).
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


def build_service(
    config: ServerConfig,
    listeners: List[tuple],
    reactor,
    dialer: Optional[OriginDialer] = None,
    listen_udp: Optional[Callable] = None,
    metrics=None,
) -> AnyTLSService:
    """Assemble the service: ``listeners`` is a list of ``(endpoint string, wrap)`` where
    ``wrap`` turns the session factory into the one that listens (TLS or identity).
    ``dialer`` and ``listen_udp`` are injectable for tests; ``metrics`` is a
    :class:`~anytls_twisted.metrics.Metrics` (default: none kept)."""
    if metrics is None:
        metrics = NULL_METRICS
    registry = SessionRegistry(reactor, config, metrics)
    if dialer is None:
        dialer = OriginDialer(reactor, config.connect_timeout)
    if listen_udp is None:
        listen_udp = quiet_listen_udp(reactor)

    factory = AnyTLSFactory(config, reactor, dialer, listen_udp, registry, metrics)
    top = AnyTLSService(config, registry)
    top.factory = factory
    for description, wrap in listeners:
        top.add_listener(description, wrap(factory), reactor)
    ReaperService(registry, config.idle_session_check_interval, reactor).setServiceParent(top)
    return top
