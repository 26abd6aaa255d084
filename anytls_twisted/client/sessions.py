"""The client's sessions: which one carries a new stream, dialling, reuse, reaping, watchdog.

:class:`SessionManager` is the Twisted shell around the pure :class:`~.pool.Pool` and
:class:`~.pool.Watchdog` (client-behaviour.md sections 1 and 2):

* a stream takes the newest idle session, or a new one is dialled (TCP, then TLS, through the
  endpoint factory given);
* a session carries one stream at a time; when the stream ended and its FIN was written, the
  session goes back to the pool;
* every ``idle_session_check_interval`` seconds the pool's reap closes sessions idle too long;
* opens on reused sessions of v2 servers are watched: no SYNACK in time resets the stream if
  the session is otherwise alive, or closes the session if it went silent;
* a reload (:meth:`SessionManager.reconfigure`) that changes the server closes the idle
  sessions at once and the busy ones when their stream ends; live streams are not cut.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Set, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from ..interfaces import IStream
from ..logs import get_logger
from ..protocol.padding import DEFAULT_SCHEME, PaddingScheme
from .pool import CloseSession, Pool, ResetStream, Watchdog
from .session import ClientSessionProtocol, SessionOwner
from .stream import ClientStream

_log = get_logger("anytls_twisted.client.sessions")


class _SessionFactory(Factory):
    noisy = False

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    def buildProtocol(self, addr: Any) -> ClientSessionProtocol:
        m = self.manager
        session = ClientSessionProtocol(
            m.password, m.padding, m.clock, m, m.client_name, randrange=m.randrange
        )
        session.factory = self
        session.server = m.server
        return session


class SessionManager(Service, SessionOwner):
    """Opens streams on pooled sessions to one server.

    @param endpoint: makes the endpoint a new session dials (TCP plus TLS to the server).
    @ivar padding: the padding scheme new sessions start with (the server's latest).
    @ivar sessions: every live session, idle or busy.
    @ivar server: ``host:port`` of the server, for the log.
    @ivar generation: how many reloads changed the server; a session dialled under an older
        one carries its stream to the end and is then closed instead of pooled.
    """

    def __init__(
        self,
        endpoint: Callable[[], IStreamClientEndpoint],
        password: str,
        clock: Any,
        pool: Optional[Pool[ClientSessionProtocol]] = None,
        client_name: str = "",
        randrange: Optional[Callable[[int, int], int]] = None,
        server: str = "?",
    ) -> None:
        self.endpoint = endpoint
        self.server = server
        self.password = password
        self.clock = clock
        self.pool: Pool[ClientSessionProtocol] = pool if pool is not None else Pool()
        self.watchdog: Watchdog[ClientSessionProtocol, IStream] = Watchdog()
        self.client_name = client_name
        self.randrange = randrange
        self.padding: PaddingScheme = DEFAULT_SCHEME
        self.sessions: Set[ClientSessionProtocol] = set()
        self.dials = 0
        self.generation = 0
        self._retired: Set[ClientSessionProtocol] = set()
        self._reaper = LoopingCall(self.reap)
        self._reaper.clock = clock
        self._watch_timer: Any = None
        self._closed_waiters: List[Deferred[None]] = []

    # Service.
    def startService(self) -> None:
        super().startService()
        self._reaper.start(self.pool.idle_session_check_interval, now=False)

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        if self._reaper.running:
            self._reaper.stop()
        self._cancel_watch_timer()
        for session in list(self.sessions):
            session.close("the client is stopping", abort=True)
        return None

    def wait_closed(self) -> Deferred[None]:
        """Fire once no session is left: after :meth:`stopService`, when the aborted
        connections are gone (a reactor turn later), so an owner can stop cleanly."""
        if not self.sessions:
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
            if session is None or not session.closed:
                break
            self.pool.remove(session)
        if session is not None:
            self._open_on(session, stream, reused=True)
            return
        self.dials += 1
        d = self.endpoint().connect(_SessionFactory(self))
        d.addCallbacks(
            self._dialled,
            self._dial_failed,
            callbackArgs=(stream, self.generation),
            errbackArgs=(stream,),
        )

    def _dialled(
        self, session: ClientSessionProtocol, stream: ClientStream, generation: int
    ) -> None:
        self.sessions.add(session)
        self.pool.created(session)
        if generation != self.generation:  # dialled before a reload changed the server
            self._retired.add(session)
        _log.info(
            "session {session_id} to the server open ({server})",
            session_id=session.session_id,
            server=session.server,
        )
        self._open_on(session, stream, reused=False)

    def _dial_failed(self, failure: Failure, stream: ClientStream) -> None:
        error = failure.getErrorMessage() or getattr(failure.type, "__name__", "error")
        _log.warn("cannot reach the server {server}: {error}", server=self.server, error=error)
        stream.failed(f"cannot reach the server: {error}")

    def _open_on(self, session: ClientSessionProtocol, stream: ClientStream, reused: bool) -> None:
        watch = reused and session.machine.peer_version >= 2
        session.open(stream)
        if watch and stream.context is not None and session.machine.streams.get(stream.sid):
            self.watchdog.opened(stream, session, self.clock.seconds())
            self._arm_watch_timer()

    def reconfigure(
        self,
        endpoint: Callable[[], IStreamClientEndpoint],
        password: str,
        check_interval: float,
        idle_timeout: float,
        min_idle: int,
        server_changed: bool,
        server: Optional[str] = None,
    ) -> Tuple[int, int]:
        """Use new settings from now on (a reload). New sessions dial ``endpoint`` with
        ``password``; the pool settings apply from the next check. When ``server_changed``,
        sessions to the old server are retired: the idle ones are closed now, the busy ones
        once their stream ends, so no live stream is cut. Returns (closed now, retiring)."""
        self.endpoint = endpoint
        self.password = password
        if server is not None:
            self.server = server
        old_interval = self.pool.idle_session_check_interval
        self.pool.configure(check_interval, idle_timeout, min_idle)
        if self._reaper.running and self.pool.idle_session_check_interval != old_interval:
            self._reaper.stop()
            self._reaper.start(self.pool.idle_session_check_interval, now=False)
        if not server_changed:
            return 0, 0
        self.generation += 1
        self.padding = DEFAULT_SCHEME  # the old server's scheme says nothing of the new one
        idle = self.pool.drain()
        for session in idle:
            session.close("the server changed (reload)")
        busy = [s for s in self.sessions if not s.closed and s not in idle]
        self._retired.update(busy)
        return len(idle), len(busy)

    # SessionOwner: what sessions report.
    def padding_updated(self, scheme: PaddingScheme) -> None:
        if scheme.md5 == self.padding.md5:
            return
        self.padding = scheme
        for session in self.sessions:
            session.writer.update_scheme(scheme)

    def frame_arrived(self, session: ClientSessionProtocol) -> None:
        self.watchdog.activity(session, 0.0)

    def synack_arrived(self, session: ClientSessionProtocol, stream: IStream) -> None:
        self.watchdog.acknowledged(stream)

    def stream_ended(self, session: ClientSessionProtocol, stream: IStream) -> None:
        self.watchdog.acknowledged(stream)
        if session.closed or session.streams:
            return
        if session in self._retired:
            self.pool.remove(session)
            session.close("the server changed (reload)")
        elif not self.pool.give_back(session, self.clock.seconds()):
            session.close("not kept for reuse")

    def session_closed(self, session: ClientSessionProtocol) -> None:
        self.sessions.discard(session)
        self._retired.discard(session)
        self.pool.remove(session)
        self.watchdog.session_closed(session)
        if not self.sessions:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    # Timers.
    def reap(self) -> None:
        timeout = self.pool.idle_session_timeout
        for session in self.pool.reap(self.clock.seconds()):
            session.close(f"idle: no stream for over {timeout:g}s")

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
                stream.reset(reason)
            elif isinstance(action, CloseSession):
                action.session.close(f"silent: {reason}")
        self._arm_watch_timer()


__all__: List[str] = ["SessionManager"]
