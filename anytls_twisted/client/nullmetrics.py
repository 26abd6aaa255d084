"""The client's metrics interface without Prometheus: :class:`ClientNullMetrics` (what the
session manager, the local ports and the sessions call without ``--metrics``) and the pure rules
that classify a session's end and a failed dial.

Kept apart from :mod:`anytls_twisted.client.metrics` so that a client without ``--metrics``
never imports prometheus_client (docs/performance.md, "Idle memory"); that module re-exports
these names.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional

from twisted.internet import defer, error
from twisted.python.failure import Failure


class SessionEnd(NamedTuple):
    """Why a session ended, for the metrics.

    @ivar reason: one of :data:`~anytls_twisted.client.metrics.SESSION_CLOSE_REASONS`.
    @ivar tls_failed: the TLS handshake never completed (a dial failure, ``tls``).
    @ivar auth_failed: the handshake completed but the server closed the session before
        sending a single byte: what servers do with a wrong password.
    """

    reason: str
    tls_failed: bool = False
    auth_failed: bool = False


def session_end(
    cause: Optional[str], failure: Optional[Failure], secured: bool, frames_seen: bool
) -> SessionEnd:
    """Classify a session's end.

    @param cause: the reason class when the client itself closed the session (``idle``,
        ``watchdog``, ``stopping``), else None.
    @param failure: what ``connectionLost`` was given.
    @param secured: the TLS handshake completed (always True over plain TCP).
    @param frames_seen: anything arrived from the server.
    """
    if cause is not None:
        return SessionEnd(cause)
    if not secured:
        return SessionEnd("error", tls_failed=True)
    clean = failure is None or failure.check(error.ConnectionDone, error.ConnectionLost)
    return SessionEnd("server_closed" if clean else "error", auth_failed=not frames_seen)


def dial_failure_reason(failure: Failure) -> str:
    """A failed TCP connect to the server: ``timeout`` or ``connect`` (refused, unreachable,
    name not resolved)."""
    if failure.check(error.TimeoutError, defer.TimeoutError, TimeoutError):
        return "timeout"
    return "connect"


class ClientNullMetrics:
    """The client's metrics interface, doing nothing: the default without ``--metrics``."""

    def watch(self, manager: Any) -> None:
        """The session manager whose sessions and pool the gauges read at scrape time."""

    def session_dialled(self) -> None:
        """A new session is being dialled (no idle session could take a stream)."""

    def dial_failed(self, reason: str) -> None:
        """A dial did not give a session: ``connect``, ``timeout`` or ``tls``."""

    def dial_retried(self) -> None:
        """A stream's dial is being tried again after a failure (possibly on another server)."""

    def auth_failed(self) -> None:
        """The server closed a session after the TLS handshake without sending anything."""

    def session_closed(self, reason: str) -> None:
        """A session that connected ended; ``reason`` is one of :data:`~anytls_twisted.client.metrics.SESSION_CLOSE_REASONS`."""

    def stream_opened(self, stream: Any) -> None:
        """A stream's SYN went out on a session (``stream.kind``: tcp or udp)."""

    def stream_closed(self, stream: Any) -> None:
        """A stream left its session (ignored for streams never opened)."""

    def stream_refused(self) -> None:
        """The server's SYNACK carried an error: it could not open the stream."""

    def watchdog_reset(self) -> None:
        """The SYNACK watchdog reset a stream on a session that was otherwise alive."""

    def watchdog_closed(self) -> None:
        """The SYNACK watchdog closed a silent session."""

    def local_refused(self, protocol: str) -> None:
        """The local port refused a request (``socks`` or ``http``): malformed, unsupported,
        or failing proxy authentication."""


#: The shared do-nothing instance.
CLIENT_NULL_METRICS = ClientNullMetrics()


__all__: List[str] = [
    "CLIENT_NULL_METRICS",
    "ClientNullMetrics",
    "SessionEnd",
    "dial_failure_reason",
    "session_end",
]
