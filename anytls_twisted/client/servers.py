"""Which server a new session dials, and what the client knows of each server's health, as
pure logic: no Twisted, no clock (``now`` comes in as an argument), randomness injected.

The rules (client-behaviour.md section 9, issue 10):

* every new session goes to the next *healthy* server: round robin by default, ``first`` (the
  first healthy one in the order given: a primary with fall-backs), or ``least-latency`` (the
  lowest smoothed round trip measured on handshakes and heartbeats; unmeasured servers first,
  so each gets measured);
* a failed dial marks its server down; the shell retries on the next healthy server after
  :data:`RETRY_DELAYS` (v2ray's ``ExponentialBackoff(5, 100)``: 0, 100, 200, 300, 400 ms, five
  attempts in all), but never waits when no server is up: the stream fails at once;
* a down server is probed in the background (never by user traffic) after a backoff that
  doubles from :data:`MIN_BACKOFF` to :data:`MAX_BACKOFF` seconds, with jitter so that many
  clients do not probe in step; it is up again when a probe succeeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Generic, List, Optional, Sequence, Tuple, TypeVar

__all__ = [
    "MAX_BACKOFF",
    "MIN_BACKOFF",
    "RETRY_DELAYS",
    "STRATEGIES",
    "ServerHealth",
    "Servers",
]

C = TypeVar("C")

STRATEGIES = ("round-robin", "first", "least-latency")
#: Seconds to wait before each dial attempt of one stream: v2ray-core's schedule (it sleeps
#: after each failure; here the first attempt does not wait). Five attempts at most.
RETRY_DELAYS = (0.0, 0.1, 0.2, 0.3, 0.4)
#: A down server's first probe comes after about this many seconds; each failed probe doubles it.
MIN_BACKOFF = 1.0
#: The longest wait between two probes of a down server (seconds), jitter included.
MAX_BACKOFF = 30.0
#: Weight of a new round-trip sample in the smoothed round trip (as TCP's SRTT: 1/8).
RTT_WEIGHT = 0.125


@dataclass
class ServerHealth(Generic[C]):
    """One server and what is known of it.

    @ivar config: the server's settings (opaque here).
    @ivar name: ``host:port``, for logs and metrics.
    @ivar up: whether new sessions may go to it.
    @ivar failures: failed dials and probes since it was last up (drives the backoff).
    @ivar next_probe: when a down server is due for its next probe.
    @ivar probing: whether a probe is under way (one at a time).
    @ivar rtt: smoothed round trip in seconds, or None before the first sample.
    """

    config: C
    name: str
    up: bool = True
    failures: int = 0
    next_probe: float = 0.0
    probing: bool = False
    rtt: Optional[float] = None
    dial_failures: int = field(default=0)
    went_down: int = field(default=0)


class Servers(Generic[C]):
    """The servers a client may use, in the order configured, with their health.

    The shell calls :meth:`pick` before each dial, :meth:`dial_failed`/:meth:`dial_succeeded`
    with the outcome, :meth:`due` to learn which down servers to probe (at
    :meth:`next_probe_at`), and :meth:`probe_started`/:meth:`probe_failed`/
    :meth:`dial_succeeded` around each probe. Methods that change ``up`` return whether it
    changed, so the shell logs each change once.
    """

    def __init__(
        self,
        servers: Sequence[Tuple[str, C]],
        strategy: str = "round-robin",
        uniform: Optional[Callable[[float, float], float]] = None,
    ) -> None:
        if not servers:
            raise ValueError("at least one server is needed")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        self.servers: List[ServerHealth[C]] = [ServerHealth(c, name) for name, c in servers]
        self.strategy = strategy
        self._uniform = uniform or random.SystemRandom().uniform
        self._next = 0

    def __len__(self) -> int:
        return len(self.servers)

    @property
    def any_up(self) -> bool:
        return any(s.up for s in self.servers)

    def pick(self, now: float) -> Optional[ServerHealth[C]]:
        """The server the next new session dials; None when every server is down."""
        healthy = [s for s in self.servers if s.up]
        if not healthy:
            return None
        if self.strategy == "first":
            return healthy[0]
        if self.strategy == "least-latency":
            unmeasured = [s for s in healthy if s.rtt is None]
            if unmeasured:
                return unmeasured[0]
            return min(healthy, key=lambda s: s.rtt if s.rtt is not None else 0.0)
        # Round robin over the configured order, skipping servers that are down.
        count = len(self.servers)
        for step in range(count):
            server = self.servers[(self._next + step) % count]
            if server.up:
                self._next = (self._next + step + 1) % count
                return server
        return None  # unreachable: healthy is not empty

    def dial_succeeded(self, server: ServerHealth[C], rtt: Optional[float] = None) -> bool:
        """A session to ``server`` (or a probe) was answered; True if it just came back up."""
        server.probing = False
        server.failures = 0
        if rtt is not None:
            self.rtt_sample(server, rtt)
        if server.up:
            return False
        server.up = True
        return True

    def dial_failed(self, server: ServerHealth[C], now: float) -> bool:
        """A dial to ``server`` failed: mark it down and schedule its first probe; True if it
        was up until now."""
        server.dial_failures += 1
        was_up = server.up
        server.up = False
        self._schedule(server, now)
        if was_up:
            server.went_down += 1
        return was_up

    def probe_started(self, server: ServerHealth[C]) -> None:
        server.probing = True

    def probe_failed(self, server: ServerHealth[C], now: float) -> None:
        """A probe of a down server failed: wait longer before the next one."""
        server.probing = False
        server.dial_failures += 1
        self._schedule(server, now)

    def _schedule(self, server: ServerHealth[C], now: float) -> None:
        server.failures += 1
        ceiling = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** (server.failures - 1))
        # "Equal jitter": half the ceiling for sure, the other half at random.
        server.next_probe = now + self._uniform(ceiling / 2, ceiling)

    def due(self, now: float) -> List[ServerHealth[C]]:
        """Down servers whose probe is due and not under way."""
        return [s for s in self.servers if not s.up and not s.probing and s.next_probe <= now]

    def next_probe_at(self) -> Optional[float]:
        """When :meth:`due` next has a server; None when no probe is pending."""
        times = [s.next_probe for s in self.servers if not s.up and not s.probing]
        return min(times) if times else None

    def rtt_sample(self, server: ServerHealth[C], seconds: float) -> None:
        """A measured round trip (handshake or heartbeat) to ``server``."""
        if seconds < 0:
            return
        if server.rtt is None:
            server.rtt = seconds
        else:
            server.rtt += RTT_WEIGHT * (seconds - server.rtt)
