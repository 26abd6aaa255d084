"""The abuse limits at run time: the Twisted shell around :mod:`.limits`.

:class:`Admission` answers at four moments, and never per frame or per byte:

* a connection is accepted (:class:`AdmissionFactory`, the listening factory of every port,
  before any protocol or TLS object exists): the server-wide cap on open connections
  (``--max-sessions``), and on TLS ports the new-connection rate of the source address
  (``--connection-rate``, ``--connection-burst``). A refused connection is closed at once.
* the PROXY header of a ``haproxy:`` port has been read (:class:`AdmittingProxyFactory`,
  Twisted's header reader asking before the first byte past the header reaches TLS): the rate
  of the client's address from the header.
* a session authenticates: the user's open sessions (``--max-sessions-per-user``); a refused
  session gets an Alert and is closed.
* a stream opens: the server-wide cap on open streams (``--max-streams``), asked by the session
  machine; a refused stream gets a SYNACK error and FIN, as for ``--max-streams-per-session``.

Each refusal is counted (``anytls_limit_refusals_total{limit}``) and the first of each limit
and source within a minute is logged, at most :data:`LOG_LINES` lines per limit a minute; the
rest are summed up in one line a minute (docs/logging.md, "Abuse limits").
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from twisted.application import service
from twisted.internet import task
from twisted.protocols import policies
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory

from ..logs import get_logger, plural
from ..nullmetrics import NULL_METRICS
from . import limits
from .settings import RATE_LIMIT_SOURCES, Limits, LiveConfig

_log = get_logger("anytls_twisted.limits")

#: Seconds between two log lines about one limit and source, and between summaries.
LOG_INTERVAL = 60.0
#: Refusal lines per limit between two summaries; the rest are only counted.
LOG_LINES = 10
#: (limit, source) pairs remembered for the log.
LOG_SOURCES = 4096


def _host(address: Any) -> Any:
    return getattr(address, "host", None)


def source_of(address: Any) -> str:
    """What a refusal's log line names: the source key (address or IPv6 /64), else the host,
    else ``local`` (a Unix socket)."""
    host = _host(address)
    return limits.source_key(host) or (host if isinstance(host, str) and host else "local")


class Admission(service.Service):
    """The limits of one server process, its counts and its refusal log.

    @ivar live: the :class:`~.settings.LiveConfig`; its ``limits`` are read at each question.
    @ivar registry: the open connections (``SessionRegistry``), for ``--max-sessions``.
    @ivar rates: the per-source token buckets.
    @ivar sessions: authenticated sessions held, per user.
    @ivar streams: streams held, over all sessions.
    @ivar refused: refusals by limit, since start.
    """

    def __init__(
        self,
        live: LiveConfig,
        clock: Any,
        registry: Any,
        metrics: Any = NULL_METRICS,
        capacity: int = RATE_LIMIT_SOURCES,
    ) -> None:
        self.live = live
        self.clock = clock
        self.registry = registry
        self.metrics = metrics
        self.rates = limits.RateLimiter(capacity)
        self.sessions = limits.Occupancy()
        self.streams = limits.Occupancy()
        self.refused: Dict[str, int] = dict.fromkeys(limits.LIMITS, 0)
        self.log = limits.RefusalLog(LOG_INTERVAL, LOG_LINES, LOG_SOURCES)
        self._loop = task.LoopingCall(self.summarise)
        self._loop.clock = clock

    @property
    def limits(self) -> Limits:
        return self.live.config.limits

    def startService(self) -> None:
        super().startService()
        self._loop.start(LOG_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.summarise()

    # The questions.
    def admit_connection(self, address: Any, rate: bool) -> bool:
        """A connection from ``address`` was accepted: may it go on? ``rate``: apply the
        source's rate (False where the address is not the client's, or not known yet)."""
        cap = self.limits.max_sessions
        if cap > 0 and len(self.registry.sessions) >= cap:
            self.refuse(
                limits.SESSIONS,
                source_of(address),
                "a new connection",
                f"{plural(cap, 'connection')} open, the server's limit (--max-sessions)",
            )
            return False
        return self.admit_source(address) if rate else True

    def admit_source(self, address: Any) -> bool:
        """A new connection from ``address`` (the client's): within its source's rate?"""
        current = self.limits
        rate = current.connection_rate
        if rate <= 0:
            return True
        key = limits.source_key(_host(address))
        if key is None:
            return True
        if self.rates.allow(key, self.clock.seconds(), rate, current.connection_burst):
            return True
        self.refuse(
            limits.RATE,
            key,
            "a new connection",
            f"over {rate:g} new connections a second (burst {current.connection_burst}) "
            "from this source (--connection-rate)",
        )
        return False

    def admit_session(self, user: str, source: str, session_id: int) -> bool:
        """Session ``session_id`` of ``user`` authenticated: may it go on? If so it holds one
        of the user's sessions until :meth:`session_left`."""
        cap = self.limits.max_sessions_per_user
        if self.sessions.acquire(user, key_cap=cap) is None:
            return True
        self.refuse(
            limits.SESSIONS_PER_USER,
            source,
            f"session {session_id} of user {user}",
            f"{plural(cap, 'session')} of this user open (--max-sessions-per-user)",
            key=user,
            user=user,
            session_id=session_id,
        )
        return False

    def session_left(self, user: str) -> None:
        self.sessions.release(user)

    def take_stream(self) -> Optional[int]:
        """For the session machine: a server-wide stream slot (None), or the full cap."""
        cap = self.limits.max_streams
        return None if self.streams.acquire(None, cap) is None else cap

    def stream_ended(self) -> None:
        self.streams.release(None)

    def stream_refused(self, source: str, session_id: int, stream_id: int, event: Any) -> None:
        """The session machine refused a stream (``StreamRefused``)."""
        if event.server:
            limit, why = limits.STREAMS, "open, the server's limit (--max-streams)"
        else:
            limit, why = limits.STREAMS_PER_SESSION, "open on this session"
            why += " (--max-streams-per-session)"
        self.refuse(
            limit,
            source,
            f"stream {session_id}/{stream_id}",
            f"{plural(event.limit, 'stream')} {why}",
            session_id=session_id,
            stream_id=stream_id,
        )

    # Counting and logging.
    def refuse(
        self, limit: str, source: str, what: str, reason: str, key: Any = None, **fields: Any
    ) -> None:
        """Count a refusal; log it if it is the first of its limit and source for a while."""
        self.refused[limit] += 1
        self.metrics.limit_refused(limit)
        if not self.log.refused(limit, source if key is None else key, self.clock.seconds()):
            return
        _log.warn(
            "refused {what} from {source}: {reason}",
            limit=limit,
            what=what,
            source=source,
            reason=reason,
            **fields,
        )

    def summarise(self) -> None:
        """Log the refusals that had no line of their own since the last summary, if any."""
        quiet = self.log.summary()
        if not quiet:
            return
        total = sum(quiet.values())
        _log.warn(
            "limits: {refusals_text} more in the last {interval:g}s without a line of their "
            "own: {counts_text}",
            refusals=total,
            refusals_text=plural(total, "refusal"),
            interval=LOG_INTERVAL,
            counts=quiet,
            counts_text=", ".join(f"{name} {n}" for name, n in sorted(quiet.items())),
        )


class AdmissionFactory(policies.WrappingFactory):
    """A port's listening factory: asks :class:`Admission` as a connection is accepted; when
    it may go on, returns the wrapped factory's protocol itself (nothing is added to the
    connection's path), else None, which closes the connection at once.

    @ivar admission: the :class:`Admission` asked.
    @ivar rate: whether the peer's address is the client's (TLS ports), so its rate applies.
    """

    noisy = False

    def __init__(self, wrapped: Any, admission: Admission, rate: bool) -> None:
        super().__init__(wrapped)
        self.admission = admission
        self.rate = rate

    def buildProtocol(self, addr: Any) -> Any:
        if not self.admission.admit_connection(addr, self.rate):
            return None
        return self.wrappedFactory.buildProtocol(addr)

    def logPrefix(self) -> str:
        """The wrapped factory's (``AnyTLSFactory (TLS) starting on 8443``, as before)."""
        wrapped = self.wrappedFactory
        return wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__

    def build_proxied(self, addr: Any) -> Any:
        """As ``buildProtocol`` under a PROXY header reader: the rate waits for the header."""
        if not self.admission.admit_connection(addr, rate=False):
            return None
        return self.wrappedFactory.buildProtocol(addr)


class _Held:
    """Stands in for the wrapped protocol while the header is read: keeps what follows it."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def _refused_session(protocol: Any) -> Any:
    """The session protocol under ``protocol``'s wrappers (TLS), or None."""
    while protocol is not None and not hasattr(protocol, "refused_by_limit"):
        protocol = getattr(protocol, "wrappedProtocol", None)
    return protocol


class _AdmittingProxyProtocol(HAProxyProtocolWrapper):
    """Twisted's PROXY header reader, asking admission about the header's client address
    before anything past the header reaches the wrapped protocol (TLS)."""

    factory: AdmittingProxyFactory

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        inner, held = self.wrappedProtocol, _Held()
        self.wrappedProtocol = held  # type: ignore[assignment]
        try:
            super().dataReceived(data)
        finally:
            self.wrappedProtocol = inner
        if self._proxyInfo is None:
            return  # more header to come, or a bad header (the connection is closing)
        if not self.factory.admit(self.getPeer()):
            session = _refused_session(inner)
            if session is not None:
                session.refused_by_limit = "connection_rate"
            self.transport.abortConnection()
            return
        if held.data:
            inner.dataReceived(held.data)


class AdmittingProxyFactory(HAProxyWrappingFactory):
    """``haproxy:`` ports: reads the PROXY header, then asks :class:`Admission` (through the
    :class:`AdmissionFactory` it wraps) about the client's address."""

    protocol = _AdmittingProxyProtocol  # type: ignore[assignment]
    noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        wrapped = self.wrappedFactory
        if isinstance(wrapped, AdmissionFactory):
            inner = wrapped.build_proxied(addr)
        else:
            inner = wrapped.buildProtocol(addr)
        return None if inner is None else _AdmittingProxyProtocol(self, inner)  # type: ignore[arg-type]

    def admit(self, address: Any) -> bool:
        wrapped = self.wrappedFactory
        if isinstance(wrapped, AdmissionFactory):
            return wrapped.admission.admit_source(address)
        return True


def admitting(admission: Admission, rate: bool) -> Callable[[Any], AdmissionFactory]:
    """``factory -> AdmissionFactory(factory, admission, rate)``."""
    return lambda factory: AdmissionFactory(factory, admission, rate)
