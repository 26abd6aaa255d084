"""The example sing-box client configs in examples/singbox/ pass ``sing-box check``: every one
with 1.14; with 1.12, the ones without ``certificate_public_key_sha256`` (a 1.13 field that
1.12 refuses), and the pinned ones once the pin is swapped for ``insecure``, which shows every
other field they use is 1.12-valid."""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from .e2e_support import REPO_ROOT, singbox_binary

EXAMPLES = os.path.join(REPO_ROOT, "examples", "singbox")
NAMES = ("client-pinned.json", "client-insecure.json", "client-udp.json")


def load(name: str) -> dict:
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
        return json.load(f)


def anytls_outbound(config: dict) -> dict:
    [outbound] = [o for o in config["outbounds"] if o["type"] == "anytls"]
    return outbound


class ExampleTests(SynchronousTestCase):
    def check(self, version: str, config: dict, name: str):
        binary = singbox_binary(version)
        path = os.path.join(os.path.abspath(self.mktemp()) + "-" + name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)
        return subprocess.run(
            [binary, "check", "-c", path], capture_output=True, text=True, timeout=60
        )

    def test_shape(self):
        """If a user copies an example, then it has a mixed inbound on 127.0.0.1:1080 and an
        anytls outbound with TLS on, whose placeholders are the banner's."""
        for name in NAMES:
            config = load(name)
            [inbound] = config["inbounds"]
            self.assertEqual(
                (inbound["type"], inbound["listen"], inbound["listen_port"]),
                ("mixed", "127.0.0.1", 1080),
                name,
            )
            outbound = anytls_outbound(config)
            self.assertEqual(
                (outbound["server"], outbound["password"]),
                ("YOUR_SERVER_ADDRESS", "<password>"),
                name,
            )
            self.assertTrue(outbound["tls"]["enabled"], name)
            for pin in outbound["tls"].get("certificate_public_key_sha256", []):
                self.assertEqual(len(base64.b64decode(pin, validate=True)), 32, name)
        self.assertIn(
            "certificate_public_key_sha256", anytls_outbound(load("client-pinned.json"))["tls"]
        )
        self.assertTrue(anytls_outbound(load("client-insecure.json"))["tls"]["insecure"])

    def test_singbox_114_accepts_all(self):
        for name in NAMES:
            result = self.check("1.14", load(name), name)
            self.assertEqual(result.returncode, 0, f"{name}: {result.stderr}")

    def test_singbox_112(self):
        for name in NAMES:
            config = load(name)
            tls = anytls_outbound(config)["tls"]
            result = self.check("1.12", config, name)
            if "certificate_public_key_sha256" not in tls:
                self.assertEqual(result.returncode, 0, f"{name}: {result.stderr}")
                continue
            self.assertNotEqual(result.returncode, 0, f"sing-box 1.12 accepted the pin in {name}")
            self.assertIn("certificate_public_key_sha256", result.stderr)
            swapped = copy.deepcopy(config)
            swapped_tls = anytls_outbound(swapped)["tls"]
            del swapped_tls["certificate_public_key_sha256"]
            swapped_tls["insecure"] = True
            result = self.check("1.12", swapped, "112-" + name)
            self.assertEqual(result.returncode, 0, f"{name} without its pin: {result.stderr}")
