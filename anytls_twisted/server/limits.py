"""Abuse limits, pure: which source a connection counts against, a token bucket per source in a
bounded table, concurrency counts, and which refusals get a log line. No Twisted, no clock:
time is passed in (seconds), so tests drive it directly.

The Twisted side (:mod:`.admission`) asks these at connection, session and stream events only;
nothing here runs per frame or per byte (docs/configuration.md, "Abuse limits").
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Dict, Hashable, List, Optional, Tuple

#: The limits' names: the ``limit`` label of ``anytls_limit_refusals_total`` and of the log.
RATE = "connection_rate"
SESSIONS = "sessions"
SESSIONS_PER_USER = "sessions_per_user"
STREAMS = "streams"
STREAMS_PER_SESSION = "streams_per_session"
LIMITS = (RATE, SESSIONS, SESSIONS_PER_USER, STREAMS, STREAMS_PER_SESSION)

#: IPv6 sources are grouped by this prefix: one subscriber usually gets a whole /64.
IPV6_PREFIX = 64


def source_key(host: object) -> Optional[str]:
    """The source a connection from ``host`` counts against: an IPv4 address as it is, an IPv6
    address's /64 (an IPv4-mapped one as its IPv4 address), or None for what is not an IP
    address (a Unix socket's peer), which no per-source limit applies to."""
    if not isinstance(host, str):
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


class RateLimiter:
    """A token bucket per key, in a table of at most ``capacity`` keys.

    Each key may take ``burst`` tokens at once and gets ``rate`` tokens a second back, up to
    ``burst``. The table forgets the least recently used key when a new one would exceed
    ``capacity``; a forgotten key starts again with a full bucket, which is what it would have
    had after ``burst / rate`` seconds of quiet anyway. ``rate`` and ``burst`` are passed at
    each call, so a reload applies at the next connection.

    @ivar capacity: the most keys kept.
    @ivar evicted: keys forgotten to make room (a table too small for the sources it sees).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.evicted = 0
        # key -> [tokens, last refill time]; most recently used last.
        self._buckets: OrderedDict[Hashable, List[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._buckets

    def tokens(self, key: Hashable, now: float, rate: float, burst: int) -> float:
        """The tokens ``key`` would have at ``now`` (``burst`` for an unknown key)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(burst)
        return min(float(burst), bucket[0] + max(now - bucket[1], 0.0) * rate)

    def allow(self, key: Hashable, now: float, rate: float, burst: int) -> bool:
        """Take one token for ``key`` at ``now``; False (nothing taken) when it has none.

        ``rate`` <= 0 means no limit: always True, and the table is not touched."""
        if rate <= 0:
            return True
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.capacity:
                buckets.popitem(last=False)
                self.evicted += 1
            bucket = buckets[key] = [float(burst), now]
        else:
            buckets.move_to_end(key)
            # A clock that went backwards refills nothing (and takes nothing back).
            bucket[0] = min(float(burst), bucket[0] + max(now - bucket[1], 0.0) * rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        return False


class Occupancy:
    """How many of something are held, in total and per key, against caps (0 = no cap).

    Every acquisition is counted whatever the caps, so a cap turned on by a reload counts what
    is already held. A key's entry goes when its count returns to 0, so the table is never
    larger than what is held.

    @ivar total: held now, over all keys.
    """

    def __init__(self) -> None:
        self.total = 0
        self._by_key: Dict[Hashable, int] = {}

    def held(self, key: Hashable) -> int:
        return self._by_key.get(key, 0)

    def __len__(self) -> int:
        """The keys holding at least one."""
        return len(self._by_key)

    def acquire(self, key: Hashable = None, total_cap: int = 0, key_cap: int = 0) -> Optional[str]:
        """Take one for ``key``: None when taken, else which cap is full (``"total"`` or
        ``"key"``), and nothing is taken."""
        if total_cap > 0 and self.total >= total_cap:
            return "total"
        held = self._by_key.get(key, 0)
        if key_cap > 0 and held >= key_cap:
            return "key"
        self._by_key[key] = held + 1
        self.total += 1
        return None

    def release(self, key: Hashable = None) -> None:
        """Give back one that ``key`` holds (a key holding none is left alone)."""
        held = self._by_key.get(key, 0)
        if held <= 0:
            return
        if held == 1:
            del self._by_key[key]
        else:
            self._by_key[key] = held - 1
        self.total -= 1


class RefusalLog:
    """Which refusals get a log line of their own, so a flood does not flood the log.

    The first refusal of a ``(limit, source)`` pair within ``interval`` seconds gets a line,
    and at most ``lines`` of them per limit between two :meth:`summary` calls (made every
    ``interval`` seconds); every other refusal is only counted, for the summary. The table of
    pairs keeps at most ``capacity``, forgetting the least recently logged.

    @ivar interval: seconds between two lines about the same limit and source.
    @ivar lines: lines per limit between two summaries.
    """

    def __init__(self, interval: float, lines: int, capacity: int) -> None:
        self.interval = interval
        self.lines = lines
        self._capacity = capacity
        self._logged: OrderedDict[Tuple[str, Hashable], float] = OrderedDict()
        self._lines: Dict[str, int] = {}
        self._quiet: Dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._logged)

    def refused(self, limit: str, source: Hashable, now: float) -> bool:
        """Note a refusal; True when it deserves its own log line."""
        key = (limit, source)
        last = self._logged.get(key)
        if (last is not None and now - last < self.interval) or (
            self._lines.get(limit, 0) >= self.lines
        ):
            self._quiet[limit] = self._quiet.get(limit, 0) + 1
            return False
        self._lines[limit] = self._lines.get(limit, 0) + 1
        self._logged[key] = now
        self._logged.move_to_end(key)
        while len(self._logged) > self._capacity:
            self._logged.popitem(last=False)
        return True

    def summary(self) -> Dict[str, int]:
        """The refusals without a line since the last summary, by limit; starts a new round
        of lines."""
        quiet, self._quiet, self._lines = self._quiet, {}, {}
        return quiet
