"""The pure abuse-limit rules: sources, token buckets in a bounded table, counts, the log's
choice of lines (anytls_twisted/server/limits.py)."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import metrics
from anytls_twisted.server import limits
from anytls_twisted.server.limits import Occupancy, RateLimiter, RefusalLog, source_key


class SourceKeyTests(SynchronousTestCase):
    def test_ipv4_is_its_address(self):
        """If the peer is IPv4, then the source is the address itself."""
        self.assertEqual(source_key("203.0.113.9"), "203.0.113.9")
        self.assertNotEqual(source_key("203.0.113.9"), source_key("203.0.113.10"))

    def test_ipv6_grouped_by_64(self):
        """If two IPv6 peers share a /64, then they are one source; another /64 is another."""
        a = source_key("2001:db8:1:2::1")
        self.assertEqual(a, "2001:db8:1:2::/64")
        self.assertEqual(source_key("2001:db8:1:2:ffff:ffff:ffff:ffff"), a)
        self.assertNotEqual(source_key("2001:db8:1:3::1"), a)
        self.assertEqual(source_key("fe80::1%eth0"), "fe80::/64")

    def test_ipv4_mapped_is_ipv4(self):
        """If an IPv6 socket reports an IPv4 client (::ffff:a.b.c.d), then it is that IPv4
        address, not the /64 every IPv4 client would share."""
        self.assertEqual(source_key("::ffff:198.51.100.7"), "198.51.100.7")
        self.assertNotEqual(source_key("::ffff:198.51.100.7"), source_key("::ffff:198.51.100.8"))

    def test_not_an_address(self):
        """If the peer has no IP address (a Unix socket), then there is no source."""
        for host in (None, "", "localhost", b"127.0.0.1", 5):
            self.assertIsNone(source_key(host))

    def test_names_match_metrics(self):
        """The limits' names are the metric's label values, exported from the start."""
        self.assertEqual(limits.LIMITS, metrics.LIMITS)


class RateLimiterTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        """If a source opens ``burst`` connections at once, then the next is refused, and one
        more is allowed each ``1 / rate`` seconds after that."""
        r = RateLimiter(10)
        self.assertEqual([r.allow("a", 0.0, 2.0, 5) for _ in range(6)], [True] * 5 + [False])
        self.assertFalse(r.allow("a", 0.4, 2.0, 5))  # 0.8 tokens
        self.assertTrue(r.allow("a", 0.5, 2.0, 5))  # 0.8 + 0.2
        self.assertFalse(r.allow("a", 0.5, 2.0, 5))
        self.assertTrue(r.allow("a", 1.0, 2.0, 5))

    def test_sources_are_independent(self):
        """If one source has used its burst, then another source is not affected."""
        r = RateLimiter(10)
        for _ in range(3):
            r.allow("a", 0.0, 1.0, 3)
        self.assertFalse(r.allow("a", 0.0, 1.0, 3))
        self.assertTrue(r.allow("b", 0.0, 1.0, 3))

    def test_refill_capped_at_burst(self):
        """If a source is quiet for a long time, then it gets back ``burst`` tokens, no more."""
        r = RateLimiter(10)
        r.allow("a", 0.0, 1.0, 3)
        self.assertEqual(r.tokens("a", 1000.0, 1.0, 3), 3.0)
        self.assertEqual(sum(r.allow("a", 1000.0, 1.0, 3) for _ in range(10)), 3)

    def test_zero_rate_is_no_limit(self):
        """If the rate is 0, then every connection is allowed and nothing is remembered."""
        r = RateLimiter(10)
        self.assertTrue(all(r.allow("a", 0.0, 0.0, 1) for _ in range(100)))
        self.assertEqual(len(r), 0)

    def test_clock_going_back_refills_nothing(self):
        """If the clock goes backwards, then no tokens appear (or vanish)."""
        r = RateLimiter(10)
        r.allow("a", 100.0, 1.0, 1)
        self.assertFalse(r.allow("a", 50.0, 1.0, 1))
        self.assertEqual(r.tokens("a", 50.0, 1.0, 1), 0.0)

    def test_least_recently_used_forgotten(self):
        """If the table is full, then a new source evicts the least recently seen one, which
        comes back with a full bucket."""
        r = RateLimiter(2)
        r.allow("a", 0.0, 1.0, 1)
        r.allow("b", 0.0, 1.0, 1)
        self.assertFalse(r.allow("a", 0.0, 1.0, 1))  # "a" used most recently; "b" is oldest
        r.allow("c", 0.0, 1.0, 1)
        self.assertEqual((len(r), "b" in r, "a" in r, r.evicted), (2, False, True, 1))
        self.assertTrue(r.allow("b", 0.0, 1.0, 1))

    def test_capacity_must_be_positive(self):
        self.assertRaises(ValueError, RateLimiter, 0)

    @settings(deadline=None, max_examples=200)
    @given(
        capacity=st.integers(1, 8),
        calls=st.lists(
            st.tuples(st.integers(0, 20), st.floats(0, 5, allow_nan=False)), max_size=200
        ),
    )
    def test_table_never_exceeds_capacity(self, capacity, calls):
        """Whatever the sources and times, the table never holds more than its capacity."""
        r = RateLimiter(capacity)
        now = 0.0
        for key, step in calls:
            now += step
            r.allow(key, now, 3.0, 4)
            self.assertLessEqual(len(r), capacity)

    @settings(deadline=None, max_examples=200)
    @given(
        rate=st.floats(0.1, 100, allow_nan=False),
        burst=st.integers(1, 50),
        steps=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=100),
    )
    def test_allowed_never_exceeds_burst_plus_rate_times_time(self, rate, burst, steps):
        """Over any run, a connection is allowed exactly when the source's bucket holds a
        token, and one source is allowed at most ``burst + rate * elapsed`` connections."""
        r = RateLimiter(4)
        now, allowed = 0.0, 0
        for step in steps:
            now += step
            before = r.tokens("s", now, rate, burst)
            ok = r.allow("s", now, rate, burst)
            self.assertEqual(ok, before >= 1.0)
            allowed += ok
            self.assertLessEqual(allowed, burst + rate * now + 1e-6)


class OccupancyTests(SynchronousTestCase):
    def test_caps(self):
        """If the total or a key's count is at its cap, then acquiring is refused and says
        which; 0 means no cap."""
        o = Occupancy()
        self.assertIsNone(o.acquire("alice", total_cap=3, key_cap=2))
        self.assertIsNone(o.acquire("alice", total_cap=3, key_cap=2))
        self.assertEqual(o.acquire("alice", total_cap=3, key_cap=2), "key")
        self.assertIsNone(o.acquire("bob", total_cap=3, key_cap=2))
        self.assertEqual(o.acquire("carol", total_cap=3, key_cap=2), "total")
        self.assertEqual((o.total, o.held("alice"), o.held("carol")), (3, 2, 0))
        self.assertIsNone(o.acquire("carol"))  # no caps

    def test_release(self):
        """If a key gives back what it held, then its entry goes, and a key holding nothing
        cannot drive the counts below zero."""
        o = Occupancy()
        o.acquire("a")
        o.acquire("a")
        o.release("a")
        self.assertEqual((o.total, o.held("a"), len(o)), (1, 1, 1))
        o.release("a")
        o.release("a")
        o.release("nobody")
        self.assertEqual((o.total, len(o)), (0, 0))

    @settings(deadline=None, max_examples=200)
    @given(st.lists(st.tuples(st.booleans(), st.integers(0, 4)), max_size=100))
    def test_counts_match_a_model(self, ops):
        """Whatever the order of acquisitions and releases, the counts are those of a plain
        model, and the table holds only keys holding something."""
        o, model = Occupancy(), {}
        for take, key in ops:
            if take:
                granted = o.acquire(key, total_cap=6, key_cap=3) is None
                self.assertEqual(granted, sum(model.values()) < 6 and model.get(key, 0) < 3)
                if granted:
                    model[key] = model.get(key, 0) + 1
            else:
                o.release(key)
                if model.get(key):
                    model[key] -= 1
            model = {k: v for k, v in model.items() if v}
            self.assertEqual(o.total, sum(model.values()))
            self.assertEqual(len(o), len(model))


class RefusalLogTests(SynchronousTestCase):
    def test_first_per_source_per_interval(self):
        """If a source is refused again within the interval, then only the first refusal gets
        a line; after the interval it gets one again; the rest are in the summary."""
        log = RefusalLog(interval=60.0, lines=10, capacity=100)
        self.assertTrue(log.refused("rate", "a", 0.0))
        self.assertFalse(log.refused("rate", "a", 1.0))
        self.assertFalse(log.refused("rate", "a", 59.0))
        self.assertTrue(log.refused("rate", "b", 59.0))
        self.assertTrue(log.refused("sessions", "a", 59.0))  # another limit
        self.assertTrue(log.refused("rate", "a", 60.0))
        self.assertEqual(log.summary(), {"rate": 2})
        self.assertEqual(log.summary(), {})

    def test_lines_per_limit_between_summaries(self):
        """If many sources are refused, then at most ``lines`` get a line per limit until
        the next summary, which counts the others."""
        log = RefusalLog(interval=60.0, lines=3, capacity=100)
        logged = [log.refused("rate", str(i), 0.0) for i in range(10)]
        self.assertEqual(logged, [True] * 3 + [False] * 7)
        self.assertEqual(log.summary(), {"rate": 7})
        self.assertTrue(log.refused("rate", "new", 1.0))

    @settings(deadline=None, max_examples=100)
    @given(st.lists(st.tuples(st.sampled_from(limits.LIMITS), st.integers(0, 50)), max_size=300))
    def test_bounded_and_every_refusal_accounted(self, refusals):
        """The table stays within its capacity, and each refusal is either a line or in the
        summary, never lost."""
        log = RefusalLog(interval=60.0, lines=4, capacity=16)
        lines = 0
        for index, (limit, source) in enumerate(refusals):
            lines += log.refused(limit, source, index * 0.5)
            self.assertLessEqual(len(log), 16)
        self.assertEqual(lines + sum(log.summary().values()), len(refusals))
