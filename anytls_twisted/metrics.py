"""Prometheus metrics (``--metrics ENDPOINT``): what the server counts and the HTTP resources.

The HTTP resources (``/metrics``, ``/healthz``) and the listener serve the client's metrics
(:mod:`anytls_twisted.client.metrics`) too.

The protocol code calls a few small methods on ``factory.metrics`` at session and stream
events. By default that is :class:`NullMetrics`, whose methods do nothing, so every code path
calls them unconditionally and unit tests need no registry. :class:`Metrics` owns the
prometheus_client objects on its own ``CollectorRegistry`` (never the global default), so one
process can hold several servers.

The hot path is left alone: streams already count their bytes and datagrams in plain
attributes. Those are read when the stream closes (added to per-user totals) and, for streams
still open, at scrape time by a custom collector; no prometheus call is made per frame.

Every metric is described in docs/metrics.md.
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import Any, Callable, Dict, Iterable, Optional, Protocol, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource

from .nullmetrics import NULL_METRICS, NullMetrics, check_endpoint

#: Label values known in advance, exported as 0 from the start.
AUTH_FAILURE_REASONS = ("wrong_password", "timeout")
#: Why a connection went to the fallback (protocol/fallback.py REASONS).
FALLBACK_REASONS = ("wrong_password", "timeout")
CONNECT_FAILURE_REASONS = ("refused", "timeout", "no_such_host", "policy", "other")
#: Why the reaper closed a session: ``idle`` (--idle-session-timeout), ``heartbeat`` (a
#: heartbeat went unanswered, --heartbeat-timeout).
REAP_REASONS = ("idle", "heartbeat")
STREAM_KINDS = ("tcp", "udp")
DIRECTIONS = ("client_to_origin", "origin_to_client")
#: The abuse limits (``server/limits.py``'s names).
LIMITS = ("connection_rate", "sessions", "sessions_per_user", "streams", "streams_per_session")
#: SYNACK latency buckets (seconds): loopback connects up to the guard (2 s) and the connect
#: timeout (5 s).
SYNACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0)


class Metrics(NullMetrics):
    """The live metrics of one server, on their own registry (``self.registry``).

    docs/metrics.md describes each metric; the Prometheus name is given below.

    @ivar registry: The ``CollectorRegistry`` that holds every metric of this server, and
        that ``/metrics`` renders.
    @ivar sessions_total: ``anytls_sessions_total``: sessions authenticated, by user.
    @ivar streams_total: ``anytls_streams_total``: streams opened, by kind (tcp, udp).
    @ivar auth_failures: ``anytls_auth_failures_total``, by reason.
    @ivar fallbacks: ``anytls_fallbacks_total``: connections handed to the fallback, by reason.
    @ivar connect_failures: ``anytls_origin_connect_failures_total``, by reason.
    @ivar refused: ``anytls_destinations_refused_total``: destinations the policy refused, by
        kind.
    @ivar synack_latency: ``anytls_synack_latency_seconds``, by kind and result.
    @ivar reaped: ``anytls_sessions_reaped_total``: sessions the reaper closed, by reason.
    @ivar heartbeats: ``anytls_heartbeats_sent_total``: heartbeats sent to silent idle sessions.
    @ivar limit_refusals: ``anytls_limit_refusals_total``: refusals by abuse limit.
    @ivar _sessions: The authenticated sessions open now.
    @ivar _streams: The streams open now; their byte and datagram counters are read at scrape
        time.
    @ivar _bytes: Payload bytes of closed streams, by ``(direction, user)``.
    @ivar _datagrams: UDP-over-TCP datagrams of closed streams, by direction.
    @ivar _dropped: UDP-over-TCP datagrams dropped by closed streams.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._sessions: Set[Any] = set()
        self._streams: Set[Any] = set()
        # Totals folded in from closed streams; open streams are read at scrape time.
        self._bytes: Dict[Tuple[str, str], int] = _Tally()
        self._datagrams: Dict[str, int] = _Tally()
        self._dropped = 0
        self.sessions_total = Counter(
            "anytls_sessions", "Sessions authenticated, by user.", ["user"], registry=r
        )
        self.streams_total = Counter(
            "anytls_streams",
            "Streams opened (destination received), by kind.",
            ["kind"],
            registry=r,
        )
        self.auth_failures = Counter(
            "anytls_auth_failures",
            "Connections closed for failing authentication, by reason.",
            ["reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            "anytls_fallbacks",
            "Connections that failed authentication and were relayed to the fallback, by reason.",
            ["reason"],
            registry=r,
        )
        self.connect_failures = Counter(
            "anytls_origin_connect_failures",
            "TCP origin connects that failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.refused = Counter(
            "anytls_destinations_refused",
            "Destinations refused by the destination policy (tcp: streams, udp: datagrams).",
            ["kind"],
            registry=r,
        )
        self.synack_latency = Histogram(
            "anytls_synack_latency_seconds",
            "Seconds from a stream's destination address to its SYNACK (success or error).",
            ["kind", "result"],
            buckets=SYNACK_BUCKETS,
            registry=r,
        )
        self.reaped = Counter(
            "anytls_sessions_reaped",
            "Sessions closed by the reaper, by reason (idle, heartbeat: no answer).",
            ["reason"],
            registry=r,
        )
        self.heartbeats = Counter(
            "anytls_heartbeats_sent", "Heartbeats sent to silent idle sessions.", registry=r
        )
        for reason in REAP_REASONS:
            self.reaped.labels(reason)
        self.limit_refusals = Counter(
            "anytls_limit_refusals",
            "Connections, sessions and streams refused by an abuse limit, by limit.",
            ["limit"],
            registry=r,
        )
        for limit in LIMITS:
            self.limit_refusals.labels(limit)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)
        for reason in CONNECT_FAILURE_REASONS:
            self.connect_failures.labels(reason)
        for kind in STREAM_KINDS:
            self.streams_total.labels(kind)
            self.refused.labels(kind)
        r.register(_LiveCollector(self))

    # Sessions.
    def session_opened(self, session) -> None:
        self._sessions.add(session)
        self.sessions_total.labels(session.user).inc()

    def session_closed(self, session) -> None:
        self._sessions.discard(session)

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def session_reaped(self, reason: str = "idle") -> None:
        self.reaped.labels(reason).inc()

    def heartbeat_sent(self) -> None:
        self.heartbeats.inc()

    def fallback(self, reason: str) -> None:
        self.fallbacks.labels(reason).inc()

    def limit_refused(self, limit: str) -> None:
        self.limit_refusals.labels(limit).inc()

    # Streams.
    def stream_opened(self, stream) -> None:
        self._streams.add(stream)
        self.streams_total.labels(stream.kind).inc()

    def stream_closed(self, stream) -> None:
        if stream not in self._streams:
            return
        self._streams.discard(stream)
        user = _user_of(stream)
        self._bytes["client_to_origin", user] += stream.bytes_in
        self._bytes["origin_to_client", user] += stream.bytes_out
        if stream.kind == "udp":
            self._datagrams["client_to_origin"] += stream.datagrams_in
            self._datagrams["origin_to_client"] += stream.datagrams_out
            self._dropped += stream.dropped

    def synack_sent(self, stream, error: str = "") -> None:
        context = stream.context
        if context.peer_version < 2 or stream.kind not in STREAM_KINDS:
            return  # protocol v1 has no SYNACK; a refused address opened no stream
        latency = max(context.clock.seconds() - stream.opened_at, 0.0)
        result = "error" if error else "ok"
        self.synack_latency.labels(stream.kind, result).observe(latency)

    def connect_failed(self, reason: str) -> None:
        if reason not in CONNECT_FAILURE_REASONS:
            reason = "other"
        self.connect_failures.labels(reason).inc()
        if reason == "policy":
            self.refused.labels("tcp").inc()

    def destination_refused(self, kind: str) -> None:
        self.refused.labels(kind).inc()

    # Read by the collector at scrape time.
    def live_bytes(self) -> Dict[Tuple[str, str], int]:
        totals = _Tally(self._bytes)
        for stream in self._streams:
            user = _user_of(stream)
            totals["client_to_origin", user] += stream.bytes_in
            totals["origin_to_client", user] += stream.bytes_out
        return totals

    def live_datagrams(self) -> Tuple[Dict[str, int], int]:
        totals, dropped = _Tally(self._datagrams), self._dropped
        for stream in self._streams:
            if stream.kind == "udp":
                totals["client_to_origin"] += stream.datagrams_in
                totals["origin_to_client"] += stream.datagrams_out
                dropped += stream.dropped
        return totals, dropped


def _user_of(stream) -> str:
    return stream.context.user or ""


class _LiveCollector:
    """Gauges of what is open now, and the counters kept in plain integers on the hot path."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable:
        return self._families(empty=True)

    def collect(self) -> Iterable:
        return self._families(empty=False)

    def _families(self, empty: bool):
        m = self.metrics
        sessions = GaugeMetricFamily("anytls_sessions_open", "Authenticated sessions open now.")
        streams = GaugeMetricFamily(
            "anytls_streams_open", "Streams open now, by kind.", labels=["kind"]
        )
        byte_counter = CounterMetricFamily(
            "anytls_bytes",
            "Stream payload bytes relayed, by direction and user (UDP-over-TCP: its encoding).",
            labels=["direction", "user"],
        )
        datagrams = CounterMetricFamily(
            "anytls_uot_datagrams",
            "UDP-over-TCP datagrams relayed, by direction.",
            labels=["direction"],
        )
        dropped = CounterMetricFamily(
            "anytls_uot_datagrams_dropped",
            "UDP-over-TCP datagrams dropped (policy, name resolution, send errors, client backed up).",
        )
        if not empty:
            sessions.add_metric([], len(m._sessions))
            open_by_kind = _Tally(stream.kind for stream in m._streams)
            for kind in STREAM_KINDS:
                streams.add_metric([kind], open_by_kind[kind])
            for (direction, user), value in sorted(m.live_bytes().items()):
                byte_counter.add_metric([direction, user], value)
            counts, dropped_count = m.live_datagrams()
            for direction in DIRECTIONS:
                datagrams.add_metric([direction], counts[direction])
            dropped.add_metric([], dropped_count)
        return [sessions, streams, byte_counter, datagrams, dropped]


class MetricsPage(Resource):
    """``/metrics``: the registry in the Prometheus text format (or OpenMetrics if asked).

    Rendered in the reactor thread (unlike prometheus_client's WSGI ``MetricsResource``), as
    the collector reads live session and stream objects.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self.registry)


class HealthPage(Resource):
    """``/healthz``: 200 ``ok`` while the service runs, 503 once it is stopping."""

    isLeaf = True

    def __init__(self, running: Callable[[], bool]) -> None:
        super().__init__()
        self.running = running

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.running():
            return b"ok\n"
        request.setResponseCode(503)
        return b"stopping\n"


class _Index(Resource):
    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"anytls-twisted: /metrics, /healthz\n"

    def getChild(self, path, request):
        if path == b"":
            return self
        return super().getChild(path, request)


class HasRegistry(Protocol):
    """What the HTTP side needs of a metrics object: the server's :class:`Metrics` or the
    client's ``ClientMetrics``."""

    registry: CollectorRegistry


def metrics_resource(metrics: HasRegistry, running: Callable[[], bool]) -> Resource:
    """The root resource: ``/metrics`` and ``/healthz``."""
    root = _Index()
    root.putChild(b"metrics", MetricsPage(metrics.registry))
    root.putChild(b"healthz", HealthPage(running))
    return root


def metrics_site(metrics: HasRegistry, running: Callable[[], bool]):
    """A ``twisted.web`` Site for the resource, without per-request access logging."""
    from twisted.web.server import Site

    site = Site(metrics_resource(metrics, running))
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # Prometheus scrapes often
    return site


def metrics_service(description: str, metrics: HasRegistry, running: Callable[[], bool], reactor):
    """The ``--metrics`` listener: a child service serving :func:`metrics_site` on an endpoint."""
    from twisted.application import strports

    return strports.service(description, metrics_site(metrics, running), reactor=reactor)


__all__ = [
    "NULL_METRICS",
    "HealthPage",
    "Metrics",
    "MetricsPage",
    "NullMetrics",
    "check_endpoint",
    "metrics_resource",
    "metrics_service",
    "metrics_site",
]
