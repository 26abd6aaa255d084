"""The client's Prometheus metrics (``twistd anytls-client --metrics ENDPOINT``).

The session manager, the local proxy port and the session call a few small methods on
``manager.metrics`` at session, stream and failure events. By default that is
:class:`ClientNullMetrics`, whose methods do nothing. :class:`ClientMetrics` owns the
prometheus_client objects on its own ``CollectorRegistry`` (never the global default); the
HTTP side (``/metrics``, ``/healthz``) is the server's, from :mod:`anytls_twisted.metrics`.

As on the server, the hot path is left alone: streams count their bytes in plain attributes,
read when the stream closes (added to totals) and, for streams still open, at scrape time by a
custom collector; the session and idle gauges are read from the session manager and its pool
at scrape time too. No prometheus call is made per frame.

:func:`session_end` is the pure rule that tells why a session ended (and whether that was a
failed TLS handshake or a refused password). Every metric is described in docs/metrics.md.
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import Any, Dict, Iterable, Optional, Set

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .nullmetrics import (
    CLIENT_NULL_METRICS,
    ClientNullMetrics,
    SessionEnd,
    dial_failure_reason,
    session_end,
)

#: Label values known in advance, exported as 0 from the start.
DIAL_FAILURE_REASONS = ("connect", "timeout", "tls")
SESSION_CLOSE_REASONS = (
    "idle",
    "watchdog",
    "liveness",
    "reload",
    "stopping",
    "server_closed",
    "error",
)
STREAM_KINDS = ("tcp", "udp")
DIRECTIONS = ("upload", "download")
LOCAL_PROTOCOLS = ("socks", "http")


class ClientMetrics(ClientNullMetrics):
    """The live metrics of one client, on their own registry (``self.registry``).

    @ivar registry: the ``CollectorRegistry`` that ``/metrics`` renders.
    @ivar dials: ``anytls_client_sessions_dialled_total``.
    @ivar dial_failures: ``anytls_client_dial_failures_total``, by reason.
    @ivar auth_failures: ``anytls_client_auth_failures_total``.
    @ivar sessions_closed: ``anytls_client_sessions_closed_total``, by reason.
    @ivar streams_total: ``anytls_client_streams_total``, by kind.
    @ivar streams_refused: ``anytls_client_streams_refused_total``.
    @ivar watchdog_resets: ``anytls_client_watchdog_resets_total``.
    @ivar watchdog_closes: ``anytls_client_watchdog_session_closes_total``.
    @ivar local_refusals: ``anytls_client_local_requests_refused_total``, by protocol.
    @ivar manager: the session manager the gauges read (see :meth:`watch`), or None.
    @ivar _streams: the streams open now; their byte counters are read at scrape time.
    @ivar _bytes: payload bytes of closed streams, by direction.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.manager: Any = None
        self._streams: Set[Any] = set()
        self._bytes: Dict[str, int] = _Tally()
        self.dials = Counter(
            "anytls_client_sessions_dialled",
            "New sessions dialled to the server (no idle session could take a stream).",
            registry=r,
        )
        self.dial_failures = Counter(
            "anytls_client_dial_failures",
            "Dials that gave no session: TCP connect failed, timed out, or TLS failed.",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "anytls_client_auth_failures",
            "Sessions the server closed after TLS without sending anything (wrong password?).",
            registry=r,
        )
        self.sessions_closed = Counter(
            "anytls_client_sessions_closed",
            "Sessions that ended, by reason.",
            ["reason"],
            registry=r,
        )
        self.streams_total = Counter(
            "anytls_client_streams",
            "Streams opened on a session (SYN sent), by kind.",
            ["kind"],
            registry=r,
        )
        self.streams_refused = Counter(
            "anytls_client_streams_refused",
            "Streams the server refused with an error in its SYNACK.",
            registry=r,
        )
        self.watchdog_resets = Counter(
            "anytls_client_watchdog_resets",
            "Streams reset by the SYNACK watchdog while their session was alive.",
            registry=r,
        )
        self.watchdog_closes = Counter(
            "anytls_client_watchdog_session_closes",
            "Silent sessions closed by the SYNACK watchdog.",
            registry=r,
        )
        self.dial_retries = Counter(
            "anytls_client_dial_retries",
            "Dials made again for a stream after a failed one (on the next healthy server).",
            registry=r,
        )
        self.local_refusals = Counter(
            "anytls_client_local_requests_refused",
            "Requests the local proxy port refused (malformed, unsupported, proxy auth).",
            ["protocol"],
            registry=r,
        )
        for reason in DIAL_FAILURE_REASONS:
            self.dial_failures.labels(reason)
        for reason in SESSION_CLOSE_REASONS:
            self.sessions_closed.labels(reason)
        for kind in STREAM_KINDS:
            self.streams_total.labels(kind)
        for protocol in LOCAL_PROTOCOLS:
            self.local_refusals.labels(protocol)
        r.register(_LiveCollector(self))

    def watch(self, manager: Any) -> None:
        self.manager = manager

    # Sessions.
    def session_dialled(self) -> None:
        self.dials.inc()

    def dial_failed(self, reason: str) -> None:
        if reason not in DIAL_FAILURE_REASONS:
            reason = "connect"
        self.dial_failures.labels(reason).inc()

    def dial_retried(self) -> None:
        self.dial_retries.inc()

    def auth_failed(self) -> None:
        self.auth_failures.inc()

    def session_closed(self, reason: str) -> None:
        self.sessions_closed.labels(reason).inc()

    def watchdog_closed(self) -> None:
        self.watchdog_closes.inc()

    # Streams.
    def stream_opened(self, stream: Any) -> None:
        self._streams.add(stream)
        self.streams_total.labels(stream.kind).inc()

    def stream_closed(self, stream: Any) -> None:
        if stream not in self._streams:
            return
        self._streams.discard(stream)
        self._bytes["upload"] += stream.bytes_out
        self._bytes["download"] += stream.bytes_in

    def stream_refused(self) -> None:
        self.streams_refused.inc()

    def watchdog_reset(self) -> None:
        self.watchdog_resets.inc()

    def local_refused(self, protocol: str) -> None:
        self.local_refusals.labels(protocol).inc()

    # Read by the collector at scrape time.
    def live_bytes(self) -> Dict[str, int]:
        totals = _Tally(self._bytes)
        for stream in self._streams:
            totals["upload"] += stream.bytes_out
            totals["download"] += stream.bytes_in
        return totals


class _LiveCollector:
    """Gauges of what is open now, and the byte counters kept in plain integers."""

    def __init__(self, metrics: ClientMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable:
        return self._families(empty=True)

    def collect(self) -> Iterable:
        return self._families(empty=False)

    def _families(self, empty: bool) -> list:
        m = self.metrics
        sessions = GaugeMetricFamily(
            "anytls_client_sessions_open",
            "Sessions to the server open now (idle or carrying a stream).",
        )
        idle = GaugeMetricFamily(
            "anytls_client_sessions_idle", "Sessions waiting in the pool for a stream."
        )
        streams = GaugeMetricFamily(
            "anytls_client_streams_open", "Streams open now, by kind.", labels=["kind"]
        )
        byte_counter = CounterMetricFamily(
            "anytls_client_bytes",
            "Stream payload bytes: upload (local applications to the server), download.",
            labels=["direction"],
        )
        up = GaugeMetricFamily(
            "anytls_client_server_up",
            "1 while new sessions may go to the server, 0 while it is down and probed.",
            labels=["server"],
        )
        rtt = GaugeMetricFamily(
            "anytls_client_server_rtt_seconds",
            "Smoothed round trip to the server (session answers and heartbeats).",
            labels=["server"],
        )
        server_failures = CounterMetricFamily(
            "anytls_client_server_dial_failures",
            "Failed dials and probes, by server.",
            labels=["server"],
        )
        server_down = CounterMetricFamily(
            "anytls_client_server_down",
            "Times the server was marked down.",
            labels=["server"],
        )
        server_sessions = GaugeMetricFamily(
            "anytls_client_server_sessions",
            "Sessions open now, by server and state (idle in the pool, busy with a stream).",
            labels=["server", "state"],
        )
        families = [up, rtt, server_failures, server_down, server_sessions]
        if not empty and m.manager is not None and hasattr(m.manager, "servers"):
            counts = m.manager.server_sessions()
            for health in m.manager.servers.servers:
                up.add_metric([health.name], 1 if health.up else 0)
                if health.rtt is not None:
                    rtt.add_metric([health.name], health.rtt)
                server_failures.add_metric([health.name], health.dial_failures)
                server_down.add_metric([health.name], health.went_down)
                idle_count, busy_count = counts.get(health.name, (0, 0))
                server_sessions.add_metric([health.name, "idle"], idle_count)
                server_sessions.add_metric([health.name, "busy"], busy_count)
        if not empty:
            manager = m.manager
            sessions.add_metric([], len(manager.sessions) if manager is not None else 0)
            idle.add_metric([], len(manager.pool) if manager is not None else 0)
            open_by_kind = _Tally(stream.kind for stream in m._streams)
            for kind in STREAM_KINDS:
                streams.add_metric([kind], open_by_kind[kind])
            totals = m.live_bytes()
            for direction in DIRECTIONS:
                byte_counter.add_metric([direction], totals[direction])
        return [sessions, idle, streams, byte_counter, *families]


__all__ = [
    "CLIENT_NULL_METRICS",
    "ClientMetrics",
    "ClientNullMetrics",
    "SessionEnd",
    "dial_failure_reason",
    "session_end",
]
