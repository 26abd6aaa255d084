"""A short run of every fuzz harness (fuzz/, docs/fuzzing.md): each runs for a couple of
seconds from its committed seeds, so a contract the code no longer keeps, or a harness that no
longer starts, fails the suite. The long runs that look for new bugs are run by hand.

Each harness runs in its own process: libFuzzer runs once per process. Skipped without
atheris (``pip install atheris``, in the test extras)."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from .e2e_support import REPO_ROOT

try:
    import atheris  # noqa: F401
except ImportError:
    atheris = None

FUZZ = os.path.join(REPO_ROOT, "fuzz")
HARNESSES = (
    "address",
    "client_config",
    "codec",
    "httpproxy",
    "padding",
    "server_config",
    "session",
    "socks",
    "uot",
)
#: Seconds each harness fuzzes; with start-up, about 3 s per harness.
SECONDS = 2


class HarnessTests(SynchronousTestCase):
    if atheris is None:
        skip = "atheris is not installed (pip install atheris; it is in the test extras)"

    def fuzz(self, name: str) -> None:
        scratch = os.path.abspath(self.mktemp())
        os.makedirs(scratch)
        result = subprocess.run(
            [
                sys.executable,
                f"{name}.py",
                f"-max_total_time={SECONDS}",
                "-timeout=20",
                f"-artifact_prefix={scratch}{os.sep}",
                scratch,
                os.path.join("corpus", name),
            ],
            cwd=FUZZ,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = result.stderr + result.stdout
        if result.returncode != 0:
            crashes = [os.path.join(scratch, f) for f in os.listdir(scratch) if "-" in f]
            self.fail(
                f"fuzz/{name}.py failed (exit {result.returncode}); reproduce with "
                f"'cd fuzz && python {name}.py CRASH_FILE' ({', '.join(crashes) or 'no file'}):"
                f"\n{output[-4000:]}"
            )
        self.assertIn("Done ", output[-1000:], output[-2000:])  # "Done N runs in S second(s)"

    def test_address(self):
        self.fuzz("address")

    def test_client_config(self):
        self.fuzz("client_config")

    def test_codec(self):
        self.fuzz("codec")

    def test_httpproxy(self):
        self.fuzz("httpproxy")

    def test_padding(self):
        self.fuzz("padding")

    def test_server_config(self):
        self.fuzz("server_config")

    def test_session(self):
        self.fuzz("session")

    def test_socks(self):
        self.fuzz("socks")

    def test_uot(self):
        self.fuzz("uot")

    def test_every_harness_is_tested(self):
        """A new harness gets a test above (and a line in docs/fuzzing.md)."""
        found = sorted(f[:-3] for f in os.listdir(FUZZ) if f.endswith(".py") and f[0] != "_")
        found.remove("make_corpus")
        self.assertEqual(tuple(found), HARNESSES)
        for name in HARNESSES:
            self.assertTrue(hasattr(self, f"test_{name}"), name)
            self.assertTrue(os.listdir(os.path.join(FUZZ, "corpus", name)), name)
