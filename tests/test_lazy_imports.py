"""Idle memory: what a server or client without ``--metrics`` must not import.

prometheus_client and twisted.web cost RSS at idle (docs/performance.md, "Idle memory"), so
they are imported only when ``--metrics`` is given. Each case builds the service through its
twistd plugin in a fresh interpreter and reports the modules loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Build the service named by argv[1] from the rest of argv (as twistd would), start it, print
#: the loaded top-level packages of interest, stop it.
PROBE = """
import json, sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
maker = [p for p in getPlugins(IServiceMaker) if p.tapname == sys.argv[1]][0]
options = maker.options()
options.parseOptions(sys.argv[2:])
service = maker.makeService(options)
service.startService()
loaded = sorted(m for m in sys.modules if m.startswith(("prometheus_client", "twisted.web")))
service.stopService()
print(json.dumps(loaded))
"""

URI = "anytls://s3cret@127.0.0.1:1/?sni=localhost"


class LazyMetricsImportTests(SynchronousTestCase):
    def loaded(self, *args: str):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, *args],
            cwd=self.state,
            env=env,
            capture_output=True,
            timeout=120,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr.decode("utf-8", "replace"))
        return json.loads(proc.stdout.decode().strip().splitlines()[-1])

    def setUp(self):
        self.state = tempfile.mkdtemp(prefix="anytls-lazy-")

    def server(self, *extra: str):
        return self.loaded(
            "anytls",
            "--port",
            "ssl:0:interface=127.0.0.1",
            "--password",
            "s3cret",
            "--state-dir",
            self.state,
            "--log-level",
            "warn",
            *extra,
        )

    def client(self, *extra: str):
        return self.loaded(
            "anytls-client",
            "--server",
            URI,
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--log-level",
            "warn",
            *extra,
        )

    def test_server_without_metrics(self):
        self.assertEqual(self.server(), [])

    def test_server_with_metrics(self):
        loaded = self.server("--metrics", "tcp:0:interface=127.0.0.1")
        self.assertIn("prometheus_client", loaded)
        self.assertIn("twisted.web.resource", loaded)

    def test_client_without_metrics(self):
        self.assertEqual(self.client(), [])

    def test_client_with_metrics(self):
        loaded = self.client("--metrics", "tcp:0:interface=127.0.0.1")
        self.assertIn("prometheus_client", loaded)
        self.assertIn("twisted.web.resource", loaded)
