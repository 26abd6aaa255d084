"""The metrics interface without Prometheus: :class:`NullMetrics` (what the protocol code calls
when ``--metrics`` is not given) and the ``--metrics`` endpoint check.

Kept apart from :mod:`anytls_twisted.metrics` so that a server without ``--metrics`` never
imports prometheus_client and twisted.web (about 5 MiB of RSS, docs/performance.md "Idle
memory"); that module re-exports these names.
"""

from __future__ import annotations

from typing import List


class NullMetrics:
    """The metrics interface, doing nothing: the default when ``--metrics`` is not given."""

    def session_opened(self, session) -> None:
        """A session authenticated."""

    def session_closed(self, session) -> None:
        """A session ended (ignored for sessions that never authenticated)."""

    def auth_failed(self, reason: str) -> None:
        """A connection failed authentication: ``wrong_password`` or ``timeout``."""

    def fallback(self, reason: str) -> None:
        """A connection that failed authentication was handed to the fallback."""

    def stream_opened(self, stream) -> None:
        """A TCP or UoT stream was created (its destination address has arrived)."""

    def stream_closed(self, stream) -> None:
        """A stream ended (ignored for streams never opened, e.g. a refused bad address)."""

    def synack_sent(self, stream, error: str = "") -> None:
        """A stream's one SYNACK: success (empty, guard SYNACKs included) or ``error``."""

    def connect_failed(self, reason: str) -> None:
        """An origin connect failed; ``policy`` also counts a refused TCP destination."""

    def destination_refused(self, kind: str) -> None:
        """The destination policy refused a destination (``udp``: one datagram)."""

    def session_reaped(self, reason: str = "idle") -> None:
        """The reaper closed a session: ``idle`` or ``heartbeat`` (no answer)."""

    def heartbeat_sent(self) -> None:
        """The reaper asked a silent idle session with a heartbeat."""

    def limit_refused(self, limit: str) -> None:
        """An abuse limit refused a connection, session or stream (``metrics.LIMITS``)."""


#: The shared do-nothing instance.
NULL_METRICS = NullMetrics()


def check_endpoint(description: str) -> None:
    """Raise ``ValueError`` if ``description`` is not a server endpoint string we can build."""
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise ValueError(str(e) or e.__class__.__name__) from None


__all__: List[str] = ["NULL_METRICS", "NullMetrics", "check_endpoint"]
