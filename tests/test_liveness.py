"""The liveness rule both sides use (protocol/liveness.py), without a reactor: times are
plain numbers."""

from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol.liveness import Liveness


class LivenessTests(SynchronousTestCase):
    def test_ask_after_silence_then_dead_without_answer(self):
        rule = Liveness(check_after=60, answer_timeout=15)
        rule.heard("s", 0)
        self.assertEqual(rule.tick(59.9, ["s"]), ([], []))
        self.assertEqual(rule.tick(60, ["s"]), (["s"], []))
        rule.asked("s", 60)
        self.assertEqual(rule.tick(74.9, ["s"]), ([], []), "asked: not asked again, not dead yet")
        self.assertEqual(rule.tick(75, ["s"]), ([], ["s"]))

    def test_an_answer_starts_the_silence_again(self):
        rule = Liveness(check_after=60, answer_timeout=15)
        rule.heard("s", 0)
        rule.asked("s", 60)
        self.assertTrue(rule.heard("s", 61), "something heard after the question answers it")
        self.assertIsNone(rule.asked_at("s"))
        self.assertEqual(rule.tick(120, ["s"]), ([], []))
        self.assertEqual(rule.tick(121, ["s"]), (["s"], []))

    def test_heard_in_the_past_does_not_answer_a_later_question(self):
        """The server passes the time of a session's last frame at every check: a frame from
        before the question must not count as its answer, nor move the silence backwards."""
        rule = Liveness(check_after=60, answer_timeout=15)
        rule.heard("s", 10)
        rule.asked("s", 70)
        self.assertFalse(rule.heard("s", 10))
        self.assertEqual(rule.asked_at("s"), 70)
        self.assertFalse(rule.heard("s", 5))
        self.assertEqual(rule.tick(85, ["s"]), ([], ["s"]))

    def test_first_sight_is_not_silence(self):
        """A session the rule has not seen starts its silence at the tick that first sees it."""
        rule = Liveness(check_after=60, answer_timeout=15)
        self.assertEqual(rule.tick(1000, ["s"]), ([], []))
        self.assertEqual(rule.tick(1059, ["s"]), ([], []))
        self.assertEqual(rule.tick(1060, ["s"]), (["s"], []))

    def test_forget_and_unwatched_sessions(self):
        rule = Liveness(check_after=1, answer_timeout=1)
        rule.heard("a", 0)
        rule.heard("b", 0)
        rule.asked("b", 1)
        self.assertEqual(rule.tick(5, ["a"]), (["a"], []), "b is not watched now: left alone")
        rule.forget("b")
        self.assertEqual(len(rule), 1)
        self.assertIsNone(rule.asked_at("b"))

    def test_attributes_may_change_between_calls(self):
        """The server's reload changes the interval and timeout of a running rule."""
        rule = Liveness(check_after=60, answer_timeout=15)
        rule.heard("s", 0)
        rule.check_after = 10
        self.assertEqual(rule.tick(10, ["s"]), (["s"], []))
        rule.asked("s", 10)
        rule.answer_timeout = 2
        self.assertEqual(rule.tick(12, ["s"]), ([], ["s"]))

    def test_positive_times_required(self):
        self.assertRaises(ValueError, Liveness, 0, 1)
        self.assertRaises(ValueError, Liveness, 1, 0)


class AnsweredTests(SynchronousTestCase):
    def test_round_trip_of_the_answered_question(self):
        rule = Liveness(10, 5)
        self.assertIsNone(rule.answered("s", 0))  # first heard: nothing asked
        rule.asked("s", 20)
        self.assertIsNone(rule.answered("s", 19))  # heard before the question
        self.assertEqual(rule.answered("s", 21.5), 1.5)
        self.assertIsNone(rule.answered("s", 22))  # answered once only
