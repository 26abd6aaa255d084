"""What the installed distribution carries: the files a wheel built from setup.cfg must ship.

``scripts/test.sh`` installs the project into .venv as a real (non-editable) wheel, while the
tests import the working tree (it comes first on ``sys.path``, and so does the
``anytls_twisted.egg-info`` that the build leaves in it). These tests therefore look for the
distribution in the virtualenv's site-packages only, and skip where it is not installed.
"""

from __future__ import annotations

import sysconfig
from importlib import metadata

from twisted.trial.unittest import SkipTest, SynchronousTestCase


def installed() -> metadata.Distribution:
    """The anytls-twisted distribution installed in site-packages (not the checkout's)."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in metadata.distributions(name="anytls-twisted", path=paths):
        return dist
    raise SkipTest("anytls-twisted is not installed in site-packages (./scripts/test.sh does it)")


def shipped(dist: metadata.Distribution, name: str) -> bool:
    """Whether the distribution's RECORD lists ``name`` and the file is on disk."""
    for path in dist.files or ():
        if str(path) == name:
            return dist.locate_file(path).is_file()
    return False


class WheelContentsTests(SynchronousTestCase):
    def test_py_typed(self):
        """The PEP 561 marker is installed, so type checkers of projects that import ours use
        our annotations (setup.cfg ``package_data``)."""
        self.assertTrue(shipped(installed(), "anytls_twisted/py.typed"))

    def test_license(self):
        """The MIT licence text is installed with the metadata and named by it."""
        dist = installed()
        self.assertEqual(dist.metadata["License"], "MIT")
        self.assertIn("LICENSE", dist.metadata.get_all("License-File") or [])
        texts = [p for p in dist.files or () if p.name == "LICENSE" and ".dist-info" in str(p)]
        self.assertEqual(len(texts), 1, texts)
        self.assertIn("MIT License", dist.locate_file(texts[0]).read_text(encoding="utf-8"))

    def test_twistd_plugin(self):
        """The dropin that makes ``twistd anytls`` exist is installed."""
        self.assertTrue(shipped(installed(), "twisted/plugins/anytls_twisted_plugin.py"))

    def test_endpoint_plugin(self):
        """The dropin that makes ``anytls:`` endpoint strings work in any Twisted program is
        installed next to it."""
        self.assertTrue(shipped(installed(), "twisted/plugins/anytls_endpoint_plugin.py"))
