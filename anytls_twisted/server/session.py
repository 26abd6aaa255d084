"""One AnyTLS session per TLS connection: the Twisted shell around the session machine.

:class:`~anytls_twisted.protocol.session.ServerSession` decides everything about frames, states
and the stream table; this ``Protocol`` feeds it the bytes it reads, carries out the events it
returns (write, open a stream, hand data to a stream, close), owns the timers, and logs.
Streams reach the session only through its :class:`SessionContext`
(:class:`~anytls_twisted.interfaces.IStreamContext`).

The session is also the streaming producer registered on its TLS transport: when the client is
slow to read, every stream of the session stops reading its origin (docs/architecture.md).
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import logs
from ..interfaces import IFallback, IStream, IStreamContext
from ..logs import get_logger
from ..protocol import fallback as routes
from ..protocol import session as machine
from ..protocol.session import ALERT_NO_SETTINGS, State  # noqa: F401 (re-exported)
from ..session_shell import CLOSE_GRACE, ContextShell, SessionShell, describe
from .fallback import FallbackRelay
from .limits import source_key
from .pending import PendingStream
from .stream import no_delay

_log = get_logger("anytls_twisted.session")

#: Seconds between two "destination refused by policy" info lines of one session.
POLICY_LOG_INTERVAL = 60.0
_session_ids = itertools.count(1)


@implementer(IStreamContext)
class SessionContext(ContextShell):
    """What the streams of one session may use and ask: settings, clock, dialer, UDP sockets,
    metrics, and the four requests of :class:`~anytls_twisted.interfaces.IStreamContext`.

    @ivar dialer: the origin dialer (``OriginDialer``), shared by the server.
    @ivar listen_udp: ``(port, protocol, interface) -> port``, for UDP-over-TCP sockets.
    """

    def __init__(self, session: SessionProtocol) -> None:
        self._session = session
        factory = session.factory
        self.clock = factory.clock
        self.dialer = factory.dialer
        self.listen_udp = factory.listen_udp
        self.metrics = factory.metrics
        self.session_id = session.session_id
        self._acknowledged: set[int] = set()
        self._policy_logged_at: Optional[float] = None

    @property
    def config(self) -> Any:
        return self._session.factory.config

    @property
    def user(self) -> Optional[str]:
        return self._session.machine.user

    @property
    def peer_version(self) -> int:
        return self._session.machine.peer_version

    def acknowledge(self, stream: IStream, error: str = "") -> None:
        if stream.sid in self._acknowledged:
            return
        self._acknowledged.add(stream.sid)
        self._session.write(self._session.machine.synack(stream.sid, error))
        self.metrics.synack_sent(stream, error)

    def write(self, stream: IStream, data: bytes) -> None:
        frames = self._session.machine.data(stream.sid, data)
        if frames:
            self._session.transport.writeSequence(frames)

    def flush(self) -> None:
        """Send what the TLS layer holds back for the reactor's next turn now (UDP replies)."""
        flush = getattr(self._session.transport, "flush_aggregated", None)
        if flush is not None:
            flush()

    def end(self, stream: IStream, reason: str, error: Optional[str] = None) -> None:
        session = self._session
        if not session.machine.detach(stream.sid, stream):
            return
        if error is not None:
            self.acknowledge(stream, error)
        session.write(session.machine.fin(stream.sid))
        session.stream_ended(stream, reason)

    def replace(self, old: IStream, new: IStream) -> None:
        session = self._session
        if session.machine.streams.get(old.sid) is not old:
            return
        session.machine.attach(new.sid, new)
        self.metrics.stream_opened(new)
        if logs.DEBUG:  # skip building an event the filter drops
            _log.debug(
                "stream {session_id}/{stream_id} open to {destination} ({kind})",
                session_id=self.session_id,
                stream_id=new.sid,
                destination=str(new.destination),
                kind=new.kind,
            )
        if session.machine.write_paused:
            new.pauseProducing()

    def policy_refused(self, kind: str, why: str) -> None:
        """Say at info level that the policy refused a destination, at most once a minute per
        session: otherwise operators never learn about ``--allow-private``."""
        now = self.clock.seconds()
        last = self._policy_logged_at
        if last is not None and now - last < POLICY_LOG_INTERVAL:
            return
        self._policy_logged_at = now
        _log.info(
            "session {session_id}: {kind} destination refused: {why}; start the server with "
            "--allow-private to allow loopback and private destinations",
            session_id=self.session_id,
            kind=kind,
            why=why,
        )


@implementer(IPushProducer)
class SessionProtocol(SessionShell, Protocol):
    """The server side of one AnyTLS session.

    ``factory`` supplies ``config`` (live settings), ``clock``, ``dialer``, ``listen_udp``,
    ``metrics`` and ``registry`` (live sessions, for the reaper and shutdown).

    @ivar machine: the protocol rules (:class:`~anytls_twisted.protocol.session.ServerSession`).
    @ivar context: what this session's streams use (:class:`SessionContext`).
    @ivar session_id: a process-wide number, for logs.
    @ivar peer: the client's address as ``host:port`` (from the PROXY header when there is one).
    @ivar refused_by_limit: the abuse limit that refused this connection or session, or None.
    @ivar opened_at: when the connection was made (clock seconds).
    @ivar last_activity: when a frame last arrived or a stream last ended, for the reaper; reads
        made only of HeartResponse and Waste frames do not count (answering our heartbeats
        does not keep an idle session from the idle timeout).
    @ivar fallback: the relay to the fallback (an ``IFallback``) once the connection turned
        out not to be an AnyTLS client and was handed over, else None.
    """

    transport: Any  # TLS over TCP: ITransport, IPushProducer and abortConnection

    def __init__(self) -> None:
        self.session_id = next(_session_ids)
        self.peer = "?"
        self._host: Any = None
        self.refused_by_limit: Optional[str] = None
        self._holds_user: Optional[str] = None
        self.opened_at = 0.0
        self.last_activity = 0.0
        self._auth_timer: Any = None
        self.fallback: Optional[IFallback] = None

    # What tests, metrics, the reaper and reload read.
    @property
    def user(self) -> Optional[str]:
        return self.machine.user

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def streams(self) -> Dict[int, Any]:
        return self.machine.streams

    @property
    def streams_opened(self) -> int:
        return self.machine.streams_opened

    @property
    def bytes_in(self) -> int:
        return self.machine.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.machine.bytes_out

    @property
    def peer_version(self) -> int:
        return self.machine.peer_version

    @property
    def client_name(self) -> str:
        return self.machine.client_name

    @property
    def clock(self) -> Any:
        return self.factory.clock

    @property
    def metrics(self) -> Any:
        return self.factory.metrics

    @property
    def idle(self) -> bool:
        return not self.machine.streams

    def still_authorised(self, users: Any) -> bool:
        """Whether this session's password still maps to its user in ``users`` (reloads)."""
        return self.machine.still_authorised(users.lookup)

    # Protocol.
    def _note_peer(self) -> None:
        """Read the client's address. Called again once data arrives (and at a close before
        authentication): behind ``haproxy:`` ports, ``getPeer()`` gives the address from the
        PROXY header only after the header has been read, which is after ``connectionMade``."""
        peer = self.transport.getPeer()
        host = getattr(peer, "host", peer)
        self.peer = f"{host}:{getattr(peer, 'port', '')}".rstrip(":")
        self._host = host

    @property
    def source(self) -> str:
        """What the abuse limits count the client's address as (an IPv6 /64); computed when
        a limit refuses something, not per read."""
        return source_key(self._host) or str(self._host or "local")

    def connectionMade(self) -> None:
        factory = self.factory
        self.machine: machine.ServerSession[IStream] = machine.ServerSession(
            lambda digest: factory.config.users.lookup(digest),
            lambda: factory.config,
            factory.admission.take_stream,
        )
        self.context = SessionContext(self)
        no_delay(self.transport)  # TLS wrappers pass it on to the TCP transport beneath
        self._note_peer()
        self.opened_at = self.last_activity = self.clock.seconds()
        self._auth_timer = self.clock.callLater(factory.config.auth_timeout, self._auth_timed_out)
        self.transport.registerProducer(self, True)
        factory.registry.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.fallback is not None:
            self.fallback.dataReceived(data)
            return
        m = self.machine
        if m.state is State.AUTH:
            self._note_peer()
        filler = m.filler_in
        event: Any
        for event in m.receive(data):
            kind = type(event)
            if kind is machine.StreamData:
                event.stream.dataReceived(event.data)
            elif kind is machine.Send:
                self.write(event.data)
            else:
                self._event(event)
        if m.user is not None and m.filler_in - filler != len(data):
            self.last_activity = self.clock.seconds()

    def _event(self, event: Any) -> None:
        kind = type(event)
        if kind is machine.StreamOpened:
            stream = PendingStream(self.context, event.sid)
            self.machine.attach(event.sid, stream)
            if self.machine.write_paused:
                stream.pauseProducing()
        elif kind is machine.StreamClosedByPeer:
            self.stream_ended(event.stream, "client closed the stream")
        elif kind is machine.Authenticated:
            self._cancel_auth_timer()
            if not self.factory.admission.admit_session(event.user, self.source, self.session_id):
                self.refused_by_limit = "sessions_per_user"
                self.write(self.machine.alert("too many sessions for this user"))
                self.close("too many sessions for this user")
                return
            self._holds_user = event.user
            self.metrics.session_opened(self)
            _log.info(
                "session {session_id} open from {peer} user {user}",
                session_id=self.session_id,
                peer=self.peer,
                user=event.user,
            )
        elif kind is machine.AuthenticationFailed:
            self._not_anytls(event.received, routes.WRONG_PASSWORD)
        elif kind is machine.SessionFailed:
            self.close(event.reason)
        elif kind is machine.StreamRefused:
            self.factory.admission.stream_refused(self.source, self.session_id, event.sid, event)
        elif kind is machine.HeartbeatAnswered:
            self.factory.registry.answered(self)
        elif kind is machine.UnknownCommand and logs.DEBUG:
            _log.debug(
                "session {session_id}: ignoring unknown command {cmd} ({length} bytes)",
                session_id=self.session_id,
                cmd=event.cmd,
                length=event.length,
            )

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        reason_text = self._close_reason or describe(reason)
        self._cancel_auth_timer()
        self._cancel_close_timer()
        for stream in self.machine.close():
            self.stream_ended(stream, "session closed")
        self.factory.registry.discard(self)
        if self._holds_user is not None:
            self.factory.admission.session_left(self._holds_user)
            self._holds_user = None
        self.metrics.session_closed(self)
        relay = self.fallback
        if relay is not None:
            relay.connectionLost(reason_text)
            if logs.DEBUG:
                _log.debug(
                    "fallback connection from {peer} closed: {reason} ({duration:.1f}s, "
                    "{bytes_in} bytes in, {bytes_out} bytes out)",
                    peer=self.peer,
                    reason=reason_text,
                    duration=self.clock.seconds() - self.opened_at,
                    bytes_in=relay.bytes_in,
                    bytes_out=relay.bytes_out,
                )
            return
        if self.refused_by_limit is not None:
            return  # the abuse limits logged it (at most once a minute per source)
        if self.user is None:
            self._note_peer()
            _log.info(
                "connection from {peer} closed before authentication: {reason}",
                peer=self.peer,
                reason=reason_text,
            )
            return
        _log.info(
            "session {session_id} closed: {reason} (user {user}, peer {peer}, {duration:.1f}s, "
            "{bytes_in} bytes in, {bytes_out} bytes out, {streams} streams, client {client})",
            session_id=self.session_id,
            client=self.client_name or "?",
            peer=self.peer,
            user=self.user,
            duration=self.clock.seconds() - self.opened_at,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            streams=self.streams_opened,
            reason=reason_text,
        )

    def _closing(self) -> bool:
        self._cancel_auth_timer()
        if self.fallback is not None:
            self.fallback.closing()
        return True

    def heartbeat(self) -> None:
        """Ask the client whether it is alive (a HeartRequest; nothing for v1 clients)."""
        self.write(self.machine.heartbeat())

    # Not an AnyTLS client.
    def _not_anytls(self, received: bytes, reason: str) -> None:
        """Authentication failed (``reason``, with ``received`` the bytes read so far): hand
        the connection to the fallback its negotiated ALPN selects, or close it."""
        self._cancel_auth_timer()
        self.metrics.auth_failed(reason)
        config = self.factory.config
        alpn = _negotiated_protocol(self.transport)
        endpoint, why_not = config.fallback.choose(alpn) if config.fallback else (None, "")
        if endpoint is None or not received:
            text = "authentication failed"
            if reason == routes.TIMEOUT:
                text = "handshake and authentication not finished in time"
            self.close(f"{text} ({why_not})" if why_not else text, abort=reason == routes.TIMEOUT)
            return
        self.metrics.fallback(reason)
        self._note_peer()
        _log.info(
            "connection from {peer} relayed to the fallback {endpoint}: {why}{alpn_text}",
            peer=self.peer,
            endpoint=endpoint,
            why=routes.WHY[reason],
            reason=reason,
            alpn=alpn or "",
            alpn_text=f" (ALPN {alpn})" if alpn else "",
        )
        self.fallback = FallbackRelay(
            self.transport,
            self.close,
            endpoint,
            received,
            self.factory.fallback_dialer,
            self.clock,
            config.connect_timeout,
            config.idle_session_timeout,
        )

    # For the context.
    def write(self, data: bytes) -> None:
        if data:
            self.transport.write(data)

    def stream_ended(self, stream: IStream, reason: str) -> None:
        """A stream left the table: release its target, count it, log it."""
        stream.connectionLost(reason)
        self.factory.admission.stream_ended()
        self.metrics.stream_closed(stream)
        self.set_reading(self.machine.update_reading())
        self.last_activity = self.clock.seconds()
        if logs.DEBUG:  # skip building an event the filter drops
            _log.debug(
                "stream {session_id}/{stream_id} closed: {reason} ({destination}, {duration:.1f}s, "
                "{bytes_in} bytes in, {bytes_out} bytes out)",
                session_id=self.session_id,
                duration=self.clock.seconds() - stream.opened_at,
                stream_id=stream.sid,
                destination=str(stream.destination),
                bytes_in=stream.bytes_in,
                bytes_out=stream.bytes_out,
                reason=reason,
            )

    # Timers.
    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        self._not_anytls(self.machine.abandon(), routes.TIMEOUT)

    def _cancel_auth_timer(self) -> None:
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None


def _negotiated_protocol(transport: Any) -> Optional[str]:
    """The ALPN protocol the TLS handshake selected; None without TLS or without one."""
    try:
        protocol = getattr(transport, "negotiatedProtocol", None)
    except Exception:  # pyOpenSSL before the handshake, or a plain port's wrapper
        return None
    return protocol.decode("ascii", "replace") if protocol else None


__all__: List[str] = ["CLOSE_GRACE", "SessionContext", "SessionProtocol", "State"]
