"""``twistd anytls-client`` options, loading and the service: one error line for bad input,
the start-up line (never the password), and the dropin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.client.connect import server_endpoint, tls_creator
from anytls_twisted.client.options import DEFAULT_LISTEN, Options
from anytls_twisted.client.tap import ClientService, ConfigError, load, makeService

from .helpers import capture_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URI = "anytls://s3cret@proxy.example:8443/?sni=front.example"


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        options = parse("--server", URI)
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        (config,) = load(options)
        self.assertEqual((config.server, config.server_port), ("proxy.example", 8443))
        self.assertEqual(config.server_name, "front.example")
        self.assertFalse(config.insecure)
        self.assertEqual(
            (config.idle_session_check_interval, config.idle_session_timeout), (30.0, 30.0)
        )
        self.assertEqual(config.min_idle_session, 0)

    def test_overrides(self):
        options = parse(
            "--server",
            URI,
            "--insecure",
            "--idle-session-timeout",
            "60",
            "--idle-session-check-interval",
            "20",
            "--min-idle-session",
            "2",
            "--listen",
            "tcp:1081",
            "--listen",
            "tcp:1082",
        )
        (config,) = load(options)
        self.assertTrue(config.insecure)
        self.assertEqual(config.idle_session_timeout, 60.0)
        self.assertEqual(config.idle_session_check_interval, 20.0)
        self.assertEqual(config.min_idle_session, 2)
        self.assertEqual(options["listen"], ["tcp:1081", "tcp:1082"])

    def test_several_servers_config_files_first(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("anytls://p1@one.example:1\nanytls://p2@two.example:2\n")
        options = parse("--server", URI, "--config", path, "--strategy", "first", "--prewarm", "2")
        self.assertEqual(
            [(c.server, c.server_port) for c in load(options)],
            [("one.example", 1), ("two.example", 2), ("proxy.example", 8443)],
        )
        self.assertEqual((options["strategy"], options["prewarm"]), ("first", 2))

    def test_the_same_server_twice_is_refused(self):
        with self.assertRaises(ConfigError) as caught:
            load(parse("--server", URI, "--server", URI.replace("s3cret", "other")))
        self.assertEqual(str(caught.exception), "server proxy.example:8443 is given twice")

    def test_a_server_is_needed_and_strategies_are_known(self):
        with self.assertRaises(usage.UsageError):
            parse()
        with self.assertRaises(usage.UsageError) as caught:
            parse("--server", URI, "--strategy", "fastest")
        self.assertIn("round-robin, first, least-latency", str(caught.exception))

    def test_bad_uri_is_one_line_without_the_password(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("--server", "anytls://s3cret@host/?insecur=1")
        message = str(caught.exception)
        self.assertIn("insecure", message)
        self.assertNotIn("s3cret", message)
        self.assertNotIn("\n", message)

    def test_bad_numbers(self):
        with self.assertRaises(usage.UsageError):
            parse("--server", URI, "--idle-session-timeout", "-1")
        with self.assertRaises(usage.UsageError):
            parse("--server", URI, "--min-idle-session", "x")

    def test_password_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("  from-file \nignored\n")
        (config,) = load(parse("--server", "anytls://@h:1", "--password-file", path))
        self.assertEqual(config.password, "from-file")
        with self.assertRaises(ConfigError):
            load(parse("--server", "anytls://@h:1", "--password-file", path + ".missing"))

    def test_config_file(self):
        path = self.mktemp()
        outbound = {
            "type": "anytls",
            "server": "192.0.2.1",
            "server_port": 443,
            "password": "pw",
            "idle_session_timeout": "45s",
            "tls": {"enabled": True, "server_name": "sni.example", "insecure": True},
        }
        with open(path, "w") as f:
            json.dump({"outbounds": [outbound]}, f)
        (config,) = load(parse("--config", path))
        self.assertEqual((config.server, config.server_name), ("192.0.2.1", "sni.example"))
        self.assertEqual(config.idle_session_timeout, 45.0)
        self.assertFalse(tls_creator(config)._verify_chain)  # insecure: nothing verified
        with open(path, "w") as f:
            f.write("{")
        with self.assertRaises(ConfigError):
            load(parse("--config", path))

    def test_help_lists_every_option(self):
        text = str(Options())
        for name in (
            "listen",
            "server",
            "password-file",
            "config",
            "insecure",
            "idle-session-check-interval",
            "idle-session-timeout",
            "min-idle-session",
            "client-metadata",
        ):
            self.assertIn(f"--{name}", text)
        self.assertIn(DEFAULT_LISTEN, text)


class TLSSettingsTests(SynchronousTestCase):
    def test_pins_with_a_certificate_refused_at_load(self):
        """sing-box refuses a pin next to a certificate; so does load, in one line."""
        cert = self.mktemp()
        with open(cert, "w") as f:
            f.write("not used")
        path = self.mktemp()
        outbound = {
            "type": "anytls",
            "server": "192.0.2.1",
            "server_port": 443,
            "password": "pw",
            "tls": {
                "enabled": True,
                "server_name": "sni.example",
                "certificate_path": cert,
                "certificate_public_key_sha256": ["A" * 43 + "="],
            },
        }
        with open(path, "w") as f:
            json.dump(outbound, f)
        e = self.assertRaises(ConfigError, load, parse("--config", path))
        self.assertNotIn("\n", str(e))
        self.assertIn("certificate", str(e))


class ServiceTests(SynchronousTestCase):
    def test_service_and_startup_line(self):
        events = capture_events(self)
        reactor = MemoryReactorClock()
        service = makeService(parse("--server", URI, "--listen", "tcp:0"), reactor)
        self.assertIsInstance(service, ClientService)
        self.assertEqual(service.manager.pool.idle_session_timeout, 30.0)
        service.startService()
        self.addCleanup(service.stopService)
        lines = [formatEvent(e) for e in events]
        startup = [line for line in lines if "anytls-client: proxy" in line]
        self.assertEqual(len(startup), 1, lines)
        self.assertIn("tcp:0", startup[0])
        self.assertIn("proxy.example:8443", startup[0])
        self.assertIn("certificate verified", startup[0])
        self.assertFalse(any("s3cret" in line for line in lines))

    def test_healthy_while_running_and_a_server_is_up(self):
        service = makeService(
            parse(
                "--server", URI, "--server", URI.replace("proxy.", "other."), "--listen", "tcp:0"
            ),
            MemoryReactorClock(),
        )
        self.assertFalse(service.healthy())
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.healthy())
        servers = service.manager.servers
        servers.dial_failed(servers.servers[0], 0.0)
        self.assertTrue(service.healthy())
        servers.dial_failed(servers.servers[1], 0.0)
        self.assertFalse(service.healthy())

    def test_endpoint(self):
        (config,) = load(parse("--server", URI))
        self.assertIsNotNone(server_endpoint(MemoryReactorClock(), config))

    def test_dropin(self):
        import twisted.plugins

        names = [p.tapname for p in getPlugins(IServiceMaker, twisted.plugins)]
        self.assertIn("anytls-client", names)

    def test_twistd_error_is_one_line(self):
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n"]
            + ["--pidfile=", "anytls-client", "--server", "anytls://pw@host", "--server", "x://"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.assertEqual(result.returncode, 2)
        self.assertEqual(
            result.stderr.strip().splitlines(),
            [
                "twistd anytls-client: error: --server: anytls URI: scheme: must start with "
                "anytls:// (see twistd anytls-client --help)"
            ],
        )
