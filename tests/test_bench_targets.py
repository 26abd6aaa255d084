"""The bench's targets (benches/bench.py, docs/performance.md): a side's summary in, one
met/missed row per target out, with no process started."""

from __future__ import annotations

import os
import sys

from twisted.trial import unittest

from tests.e2e_support import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "benches"))
import bench  # noqa: E402


def run(**figures) -> dict:
    """One run's results with the figures the rows read, by dotted path."""
    res: dict = {}
    for dotted, value in figures.items():
        *parents, leaf = dotted.split("__")
        node = res
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return res


class EvaluateTests(unittest.TestCase):
    def judged(self, targets, results, quiet=None):
        summary = bench.summarize(results, {}, bench.CLIENT_ROWS)
        return {t["target"]: t for t in bench.evaluate(targets, summary, quiet)}

    def test_bounds_both_ways(self):
        """A ">=" target is met at or above its bound, a "<=" target at or below it."""
        ours = run(download__mib_s=90.0, upload__mib_s=70.0, latency__p50_ms=1.5)
        anchor = run(download__mib_s=100.0, upload__mib_s=100.0, latency__p50_ms=1.0)
        out = self.judged(bench.CLIENT_TARGETS, {"ours": [ours], "anchor": [anchor]})
        self.assertEqual(out["download"]["status"], "met")
        self.assertAlmostEqual(out["download"]["ratio"], 0.9)
        self.assertEqual(out["upload"]["status"], "missed")
        self.assertEqual(out["new-stream p50"]["status"], "met")
        self.assertEqual(out["UDP RTT p50"]["status"], "no data")

    def test_worst_of_several_rows(self):
        """With several rows the worst ratio counts; an ``info`` target is shown, not judged."""
        ours = run(download__client_cpu_s_per_gib=1.0, upload__client_cpu_s_per_gib=3.0)
        anchor = run(download__client_cpu_s_per_gib=1.0, upload__client_cpu_s_per_gib=1.0)
        out = self.judged(bench.CLIENT_TARGETS, {"ours": [ours], "anchor": [anchor]})
        worst = out["client CPU per GiB, worst of download and upload"]
        self.assertEqual((worst["ratio"], worst["status"]), (3.0, "info"))

    def test_quiet_target(self):
        """The prewarm target reads the quiet phase: first-after-quiet p50 / pooled p50."""
        quiet = {"clients": {"ours --prewarm 1": {"ratio_p50": 1.1}}}
        out = self.judged(bench.CLIENT_TARGETS, {}, quiet)
        prewarm = out["prewarm: first stream after quiet / pooled, p50"]
        self.assertEqual((prewarm["ratio"], prewarm["status"]), (1.1, "met"))

    def test_every_worker_count(self):
        """The 100-stream target gets a row per worker count of our server."""
        results = {
            "ours-w1": [run(parallel__mib_s=80.0)],
            "ours-w2": [run(parallel__mib_s=95.0)],
            "anchor": [run(parallel__mib_s=100.0)],
        }
        summary = bench.summarize(results, {})
        rows = [t for t in bench.evaluate(bench.SERVER_TARGETS, summary) if "100" in t["target"]]
        got = [(t["subject"], t["status"]) for t in rows]
        self.assertEqual(got, [("ours, 1 worker", "missed"), ("ours, 2 workers", "met")])
        one = bench.summarize({"ours": results["ours-w1"], "anchor": results["anchor"]}, {})
        rows = [t for t in bench.evaluate(bench.SERVER_TARGETS, one) if "100" in t["target"]]
        self.assertEqual([t["subject"] for t in rows], ["ours, 1 worker"])

    def test_rss_per_session(self):
        """(after - idle) / sessions open, for the server and the client; None without
        sessions."""
        res = run(rss_idle_mib=40.0, rss_after_100_sessions_mib=60.0, sessions_open=100)
        self.assertAlmostEqual(bench.per_session(res, ""), 0.2)
        self.assertIsNone(bench.per_session(res, "client_"))
        self.assertIsNone(bench.per_session(dict(res, sessions_open=0), ""))
