"""The client's session pool and SYNACK watchdog (anytls_twisted.client.pool): pure, no reactor."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.client.pool import CloseSession, Pool, ResetStream, Watchdog, clamp_duration


def pool_with(names, now=0.0, returns=(), **options):
    """A pool that created ``names`` in that order, then got back each ``(name, time)`` of
    ``returns`` in turn; without ``returns``, all of them at ``now``."""
    pool = Pool(**options)
    for name in names:
        pool.created(name)
    for name, when in returns or [(name, now) for name in names]:
        pool.give_back(name, when)
    return pool


class PoolTests(SynchronousTestCase):
    def test_defaults_are_sing_box(self):
        pool = Pool()
        self.assertEqual(pool.idle_session_check_interval, 30.0)
        self.assertEqual(pool.idle_session_timeout, 30.0)
        self.assertEqual(pool.min_idle_session, 0)

    def test_short_durations_clamped_as_sing_anytls(self):
        self.assertEqual(clamp_duration(0), 30.0)
        self.assertEqual(clamp_duration(5), 30.0)
        self.assertEqual(clamp_duration(5.5), 5.5)
        pool = Pool(idle_session_check_interval=2, idle_session_timeout=120)
        self.assertEqual(pool.idle_session_check_interval, 30.0)
        self.assertEqual(pool.idle_session_timeout, 120.0)

    def test_negative_min_idle_refused(self):
        self.assertRaises(ValueError, Pool, min_idle_session=-1)

    def test_empty_pool_means_dial(self):
        self.assertIsNone(Pool().take(0.0))

    def test_take_newest_created_not_last_returned(self):
        # Returned in another order than created: the choice follows creation.
        pool = pool_with("abc", returns=[("c", 1.0), ("a", 2.0), ("b", 3.0)])
        self.assertEqual(pool.idle_sessions(), ["c", "b", "a"])
        self.assertEqual([pool.take(4.0) for _ in range(4)], ["c", "b", "a", None])

    def test_taken_session_is_busy_until_given_back(self):
        pool = pool_with(["a"])
        self.assertEqual(pool.take(1.0), "a")
        self.assertIsNone(pool.take(1.0))
        self.assertEqual(pool.live, 1)
        self.assertTrue(pool.give_back("a", 2.0))
        self.assertEqual(pool.take(3.0), "a")

    def test_given_back_session_keeps_its_place(self):
        pool = pool_with(["old", "new"])
        self.assertEqual(pool.take(1.0), "new")
        pool.created("newest")
        pool.give_back("new", 2.0)
        pool.give_back("newest", 2.0)
        self.assertEqual(pool.idle_sessions(), ["newest", "new", "old"])

    def test_removed_sessions_never_returned(self):
        pool = pool_with(["a", "b", "c"])
        pool.remove("c")
        pool.remove("c")  # idempotent
        self.assertEqual(pool.take(1.0), "b")
        pool.remove("b")  # while busy: its stream's end must not bring it back
        self.assertFalse(pool.give_back("b", 2.0))
        self.assertEqual(pool.take(3.0), "a")
        self.assertIsNone(pool.take(3.0))
        self.assertEqual(pool.reap(1000.0), [])
        self.assertEqual(pool.live, 1)

    def test_unknown_session_not_kept(self):
        pool = Pool()
        self.assertFalse(pool.give_back("stranger", 0.0))
        self.assertEqual(len(pool), 0)
        self.assertEqual(pool.live, 0)

    def test_created_twice_refused(self):
        pool = Pool()
        pool.created("a")
        self.assertRaises(ValueError, pool.created, "a")

    def test_no_reuse(self):
        pool = Pool(reuse=False)
        pool.created("a")
        self.assertFalse(pool.give_back("a", 0.0))
        self.assertIsNone(pool.take(0.0))
        self.assertEqual(pool.live, 0)

    def test_reap_closes_only_sessions_idle_longer_than_timeout(self):
        pool = pool_with("abc", returns=[("a", 0.0), ("b", 10.0), ("c", 20.0)])
        self.assertEqual(pool.reap(30.0), [])  # exactly 30 s idle is not "longer"
        self.assertEqual(pool.reap(30.5), ["a"])
        self.assertEqual(pool.reap(45.0), ["b"])
        self.assertEqual(pool.idle_sessions(), ["c"])
        self.assertEqual(pool.live, 1)

    def test_reap_never_touches_busy_sessions(self):
        pool = pool_with(["a", "b"])
        self.assertEqual(pool.take(0.0), "b")
        self.assertEqual(pool.reap(1000.0), ["a"])
        self.assertEqual(pool.live, 1)
        self.assertTrue(pool.give_back("b", 1000.0))

    def test_min_idle_keeps_newest_expired(self):
        pool = pool_with(["a", "b", "c", "d"], min_idle_session=2)
        self.assertEqual(pool.reap(100.0), ["b", "a"])
        self.assertEqual(pool.idle_sessions(), ["d", "c"])
        # The kept ones' idle time restarted: at the next checks they are kept again.
        self.assertEqual(pool.reap(200.0), [])
        self.assertEqual(pool.idle_sessions(), ["d", "c"])

    def test_min_idle_quota_used_first_by_unexpired(self):
        # Walking newest first, fresh sessions count towards min_idle_session; so an expired
        # older session is closed even though fewer than n *expired* ones were kept.
        # "c" is the newest and still fresh at t=100.
        pool = pool_with("abc", returns=[("a", 0.0), ("b", 0.0), ("c", 90.0)], min_idle_session=2)
        self.assertEqual(pool.reap(100.0), ["a"])
        self.assertEqual(pool.idle_sessions(), ["c", "b"])

    def test_min_idle_keeps_newest_by_creation_even_if_fresher_older(self):
        # "c" is the newest by creation but has been idle longest.
        pool = pool_with("abc", returns=[("c", 0.0), ("a", 1.0), ("b", 2.0)], min_idle_session=1)
        self.assertEqual(pool.reap(100.0), ["b", "a"])
        self.assertEqual(pool.idle_sessions(), ["c"])

    def test_min_idle_does_not_open_sessions(self):
        pool = pool_with(["a"], min_idle_session=5)
        self.assertEqual(pool.reap(100.0), [])
        self.assertEqual(len(pool), 1)
        self.assertEqual(pool.take(100.0), "a")
        self.assertIsNone(pool.take(100.0))

    @settings(deadline=None, max_examples=150)
    @given(
        st.integers(min_value=0, max_value=3),
        st.lists(
            st.tuples(
                st.sampled_from(["new", "take", "back", "remove", "reap"]), st.integers(0, 7)
            ),
            max_size=60,
        ),
    )
    def test_matches_sing_anytls_model(self, min_idle, operations):
        """Random operations: the pool answers as a direct transcription of sing-anytls."""
        pool = Pool(min_idle_session=min_idle, idle_session_timeout=10)
        seq = {}  # live session -> creation number
        idle = {}  # idle session -> idle since
        busy = []
        now = 0.0
        for created, (op, n) in enumerate(operations):
            now += n
            if op == "new":
                name = f"s{created}"
                seq[name] = created
                pool.created(name)
                busy.append(name)
            elif op == "take":
                expected = max(idle, key=seq.__getitem__) if idle else None
                if expected is not None:
                    del idle[expected]
                    busy.append(expected)
                self.assertEqual(pool.take(now), expected)
            elif op == "back" and busy:
                name = busy.pop(n % len(busy))
                idle[name] = now
                self.assertTrue(pool.give_back(name, now))
            elif op == "remove" and seq:
                name = sorted(seq)[n % len(seq)]
                del seq[name]
                idle.pop(name, None)
                if name in busy:
                    busy.remove(name)
                pool.remove(name)
            elif op == "reap":
                kept, closed = 0, []
                for name in sorted(idle, key=seq.__getitem__, reverse=True):
                    if not idle[name] < now - 10:
                        kept += 1
                    elif kept < min_idle:
                        idle[name] = now
                        kept += 1
                    else:
                        closed.append(name)
                for name in closed:
                    del idle[name], seq[name]
                self.assertEqual(pool.reap(now), closed)
            self.assertEqual(pool.idle_sessions(), sorted(idle, key=seq.__getitem__)[::-1])
            self.assertEqual(pool.live, len(seq))


def watching(*streams, session="s", now=0.0):
    """A watchdog with ``streams`` just opened on ``session``."""
    dog = Watchdog()
    for stream in streams:
        dog.opened(stream, session, now)
    return dog


class WatchdogTests(SynchronousTestCase):
    def test_default_is_stock_three_seconds(self):
        self.assertEqual(Watchdog().timeout, 3.0)
        self.assertRaises(ValueError, Watchdog, 0)

    def test_nothing_before_the_deadline(self):
        dog = Watchdog()
        dog.opened(2, "s", 10.0)
        self.assertEqual(dog.next_deadline(), 13.0)
        self.assertEqual(dog.expired(12.9), [])
        self.assertEqual(len(dog), 1)

    def test_silent_session_closed(self):
        dog = Watchdog()
        dog.opened(2, "s", 10.0)
        dog.activity("other", 11.0)  # another session's life is no proof for this one
        self.assertEqual(dog.expired(13.0), [CloseSession("s", (2,))])
        self.assertEqual(dog.expired(100.0), [])
        self.assertEqual(len(dog), 0)
        self.assertIsNone(dog.next_deadline())

    def test_live_session_only_loses_the_stream(self):
        dog = Watchdog()
        dog.opened(2, "s", 10.0)
        dog.opened(3, "s", 10.5)
        dog.activity("s", 11.0)
        self.assertEqual(dog.expired(13.0), [ResetStream(2)])
        # Stream 3 was opened before that frame too: reset when its own deadline passes.
        self.assertEqual(dog.expired(13.5), [ResetStream(3)])
        self.assertEqual(len(dog), 0)

    def test_activity_before_the_open_is_no_proof(self):
        dog = Watchdog()
        dog.opened(2, "s", 0.0)
        dog.activity("s", 1.0)
        dog.opened(3, "s", 2.0)
        self.assertEqual(dog.expired(3.0), [ResetStream(2)])
        self.assertEqual(dog.expired(5.0), [CloseSession("s", (3,))])

    def test_activity_in_the_same_tick_counts(self):
        dog = Watchdog()
        dog.opened(2, "s", 5.0)
        dog.activity("s", 5.0)
        self.assertEqual(dog.expired(8.0), [ResetStream(2)])

    def test_acknowledgement_cancels(self):
        dog = watching(2, 3)
        dog.acknowledged(2)
        dog.acknowledged(2)  # idempotent
        dog.activity("s", 0.5)  # the SYNACK itself is a frame
        self.assertEqual(dog.expired(10.0), [ResetStream(3)])

    def test_acknowledgement_of_one_stream_does_not_cancel_another(self):
        dog = watching(2, 3)
        dog.acknowledged(3)
        self.assertEqual(dog.expired(3.0), [CloseSession("s", (2,))])

    def test_many_streams_on_silent_session_one_close(self):
        dog = Watchdog()
        dog.opened("elsewhere", "t", 0.0)
        for stream in range(2, 12):
            dog.opened(stream, "s", stream / 10)
        actions = dog.expired(3.25)  # "elsewhere" and streams 2 and 3 are due
        self.assertEqual(
            actions,
            [CloseSession("t", ("elsewhere",)), CloseSession("s", tuple(range(2, 12)))],
        )
        self.assertEqual(dog.expired(100.0), [])
        self.assertEqual(len(dog), 0)

    def test_session_closed_forgets_its_streams(self):
        dog = watching(2, 3)
        dog.opened(2.5, "t", 0.0)
        dog.session_closed("s")
        dog.session_closed("s")
        self.assertEqual(len(dog), 1)
        self.assertEqual(dog.expired(3.0), [CloseSession("t", (2.5,))])

    def test_stream_watched_twice_refused(self):
        dog = Watchdog()
        dog.opened(2, "s", 0.0)
        self.assertRaises(ValueError, dog.opened, 2, "s", 1.0)

    def test_bounded_by_watched_streams(self):
        dog = Watchdog()
        for i in range(1000):
            dog.activity(f"idle{i}", float(i))  # sessions without watched streams: nothing kept
            dog.opened(i, "s", float(i))
            dog.acknowledged(i)
        self.assertEqual(len(dog), 0)
        self.assertEqual(dog._sessions, {})

    @settings(deadline=None, max_examples=150)
    @given(
        st.lists(
            st.tuples(st.sampled_from(["open", "ack", "frame", "tick"]), st.integers(0, 4)),
            max_size=60,
        )
    )
    def test_every_stream_reported_at_most_once(self, operations):
        dog = Watchdog()
        now = 0.0
        opened = {}  # stream -> session
        answered, reported = set(), []
        for op, n in operations:
            session = f"s{n % 3}"
            if op == "open":
                stream = len(opened)
                opened[stream] = session
                dog.opened(stream, session, now)
            elif op == "ack" and opened:
                stream = n % len(opened)
                if stream not in reported:
                    answered.add(stream)
                dog.acknowledged(stream)
            elif op == "frame":
                dog.activity(session, now)
            else:
                now += n
            for action in dog.expired(now):
                if isinstance(action, ResetStream):
                    reported.append(action.stream)
                else:
                    for stream in action.streams:
                        self.assertEqual(opened[stream], action.session)
                    reported.extend(action.streams)
        self.assertEqual(len(reported), len(set(reported)))
        self.assertFalse(answered & set(reported))
        live = set(opened) - answered - set(reported)
        self.assertEqual(len(dog), len(live))
        self.assertLessEqual(len(dog._sessions), len(live))
