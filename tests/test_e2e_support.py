"""The end-to-end harness's own logic that can be checked without starting processes."""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from .e2e_support import START_ATTEMPTS, ProcessGone, retry_port_clash


class _Ended:
    def __init__(self, log: str) -> None:
        self.log = log

    def tail(self) -> str:
        return self.log


class RetryPortClashTests(SynchronousTestCase):
    def test_started_again_when_the_port_was_taken(self):
        """A process that ended because its freshly picked port was taken is started again."""
        tries = []

        def start(attempt):
            tries.append(attempt)
            if attempt < START_ATTEMPTS - 1:
                return defer.fail(ProcessGone("gone", _Ended("listen tcp: Address already in use")))
            return defer.succeed("listening")

        self.assertEqual(self.successResultOf(retry_port_clash(start)), "listening")
        self.assertEqual(tries, list(range(START_ATTEMPTS)))

    def test_other_failures_and_the_last_clash_propagate(self):
        """Any other end fails at once; a clash on the last attempt fails too."""
        tries = []

        def crash(attempt):
            tries.append(attempt)
            return defer.fail(ProcessGone("gone", _Ended("Traceback: ImportError")))

        self.failureResultOf(retry_port_clash(crash), ProcessGone)
        self.assertEqual(tries, [0])

        def always_taken(attempt):
            return defer.fail(ProcessGone("gone", _Ended("address already in use")))

        self.failureResultOf(retry_port_clash(always_taken), ProcessGone)
