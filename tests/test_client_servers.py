"""Choosing a server and tracking its health (client/servers.py), without a reactor."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.client.servers import (
    MAX_BACKOFF,
    MIN_BACKOFF,
    RETRY_DELAYS,
    Servers,
)

HIGH = lambda low, high: high  # noqa: E731  (no jitter: the whole ceiling)
LOW = lambda low, high: low  # noqa: E731


def servers(count=3, strategy="round-robin", uniform=HIGH):
    return Servers([(f"s{i}:443", f"config{i}") for i in range(count)], strategy, uniform)


class PickTests(SynchronousTestCase):
    def test_round_robin_skips_down_servers(self):
        s = servers()
        self.assertEqual(
            [s.pick(0).name for _ in range(4)], ["s0:443", "s1:443", "s2:443", "s0:443"]
        )
        self.assertTrue(s.dial_failed(s.servers[1], 0.0))
        self.assertEqual(
            [s.pick(0).name for _ in range(4)], ["s2:443", "s0:443", "s2:443", "s0:443"]
        )

    def test_first_is_primary_with_fallbacks(self):
        s = servers(strategy="first")
        self.assertEqual({s.pick(0).name for _ in range(3)}, {"s0:443"})
        s.dial_failed(s.servers[0], 0.0)
        self.assertEqual(s.pick(0).name, "s1:443")
        self.assertTrue(s.dial_succeeded(s.servers[0]))
        self.assertEqual(s.pick(0).name, "s0:443")

    def test_least_latency_measures_everyone_then_prefers_the_fastest(self):
        s = servers(strategy="least-latency")
        for expected, rtt in (("s0:443", 0.05), ("s1:443", 0.01), ("s2:443", 0.08)):
            chosen = s.pick(0)
            self.assertEqual(chosen.name, expected)
            s.dial_succeeded(chosen, rtt)
        self.assertEqual(s.pick(0).name, "s1:443")
        # Smoothed: one slow sample does not flip the choice, a sustained change does.
        s.rtt_sample(s.servers[1], 0.2)
        self.assertEqual(s.pick(0).name, "s1:443")
        for _ in range(20):
            s.rtt_sample(s.servers[1], 0.2)
        self.assertEqual(s.pick(0).name, "s0:443")

    def test_all_down_means_none_at_once(self):
        s = servers(2)
        for server in s.servers:
            s.dial_failed(server, 0.0)
        self.assertIsNone(s.pick(0))
        self.assertFalse(s.any_up)

    def test_bad_arguments(self):
        self.assertRaises(ValueError, Servers, [], "round-robin")
        self.assertRaises(ValueError, Servers, [("a:1", 1)], "fastest")

    @given(
        st.lists(st.booleans(), min_size=1, max_size=8),
        st.sampled_from(["round-robin", "first", "least-latency"]),
    )
    def test_never_picks_a_down_server(self, ups, strategy):
        s = servers(len(ups), strategy)
        for server, up in zip(s.servers, ups):
            if not up:
                s.dial_failed(server, 0.0)
        for _ in range(2 * len(ups)):
            chosen = s.pick(0)
            if any(ups):
                self.assertTrue(chosen.up)
            else:
                self.assertIsNone(chosen)

    @given(st.integers(min_value=1, max_value=8), st.integers(min_value=1, max_value=40))
    def test_round_robin_is_fair(self, count, rounds):
        s = servers(count)
        picks = [s.pick(0).name for _ in range(count * rounds)]
        self.assertEqual({picks.count(server.name) for server in s.servers}, {rounds})


class HealthTests(SynchronousTestCase):
    def test_backoff_doubles_to_the_cap_and_probes_come_due(self):
        s = servers(1)
        server = s.servers[0]
        self.assertTrue(s.dial_failed(server, 100.0))
        self.assertFalse(s.dial_failed(server, 100.0))  # already down: no second change
        self.assertEqual(server.next_probe, 100.0 + 2 * MIN_BACKOFF)
        self.assertEqual(s.due(101.0), [])
        self.assertEqual(s.due(102.0), [server])
        waits = []
        now = 102.0
        for _ in range(10):
            s.probe_started(server)
            self.assertEqual(s.due(now + 1000), [])  # one probe at a time
            self.assertIsNone(s.next_probe_at())
            s.probe_failed(server, now)
            waits.append(server.next_probe - now)
            now = server.next_probe
        self.assertEqual(waits[:3], [4.0, 8.0, 16.0])
        self.assertEqual(max(waits), MAX_BACKOFF)
        self.assertTrue(s.dial_succeeded(server, 0.02))
        self.assertEqual((server.up, server.failures, server.probing), (True, 0, False))
        self.assertEqual(server.dial_failures, 12)
        self.assertEqual(server.went_down, 1)

    def test_jitter_stays_within_half_to_whole_ceiling(self):
        low = servers(1, uniform=LOW)
        low.dial_failed(low.servers[0], 0.0)
        self.assertEqual(low.servers[0].next_probe, MIN_BACKOFF / 2)
        self.assertEqual(low.next_probe_at(), MIN_BACKOFF / 2)

    def test_retry_schedule_is_v2rays(self):
        self.assertEqual(RETRY_DELAYS, (0.0, 0.1, 0.2, 0.3, 0.4))
