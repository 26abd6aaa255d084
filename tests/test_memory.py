"""Giving memory back at rest (anytls_twisted/memory.py)."""

from __future__ import annotations

import gc

from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import memory


class Cycle:
    def __init__(self) -> None:
        self.me = self


class ReleaseTests(SynchronousTestCase):
    def test_collects_cycles_then_trims(self):
        calls = []
        self.patch(memory, "_malloc_trim", lambda pad: calls.append(("trim", pad)))
        gc.collect()
        for _ in range(10):
            Cycle()
        self.assertGreaterEqual(memory.release(), 10)
        self.assertEqual(calls, [("trim", 0)])

    def test_without_glibc_only_collects(self):
        self.patch(memory, "_malloc_trim", None)
        Cycle()
        self.assertGreaterEqual(memory.release(), 1)

    def test_glibc_found_here(self):
        """This machine (Debian, glibc) has malloc_trim; elsewhere it may be None."""
        import platform

        if platform.libc_ver()[0] != "glibc":
            self.skipTest("not glibc")
        self.assertIsNotNone(memory._malloc_trim)
