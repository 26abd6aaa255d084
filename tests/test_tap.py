"""``twistd anytls`` options and makeService; configuration errors as one line from twistd."""

import os
import socket
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anytls_twisted.protocol.padding import DEFAULT_SCHEME
from anytls_twisted.server import settings as defaults
from anytls_twisted.server.service import ReaperService
from anytls_twisted.server.tap import Options, makeService
from anytls_twisted.tls_transport import BulkTLSFactory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OptionsTests(SynchronousTestCase):
    def parse(self, *args):
        options = Options()
        options.parseOptions(["--state-dir", self.mktemp()] + list(args))
        return options

    def test_defaults(self):
        """Every default matches the documented one."""
        options = self.parse("--password", "PASS")
        self.assertEqual(options["port"], ["ssl:8443"])
        self.assertEqual(options["users"], (("default", "PASS"),))
        self.assertEqual(options["auth-timeout"], defaults.AUTH_TIMEOUT)
        self.assertEqual(options["connect-timeout"], defaults.CONNECT_TIMEOUT)
        self.assertEqual(options["synack-guard"], defaults.SYNACK_GUARD)
        self.assertEqual(options["idle-session-timeout"], defaults.IDLE_SESSION_TIMEOUT)
        self.assertEqual(
            options["idle-session-check-interval"], defaults.IDLE_SESSION_CHECK_INTERVAL
        )
        self.assertEqual(options["udp-timeout"], defaults.UDP_TIMEOUT)
        self.assertEqual(options["server-name"], "localhost")
        self.assertIs(options["padding"], DEFAULT_SCHEME)
        self.assertFalse(options["allow-private"])
        self.assertEqual(options["alpn-list"], ())

    def test_help_documents_every_option(self):
        """--help names every option, and each with a default shows it."""
        text = " ".join(str(Options()).split())
        for name in [
            "--port",
            "--password",
            "--password-file",
            "--state-dir",
            "--server-name",
            "--cert",
            "--key",
            "--alpn",
            "--padding-scheme",
            "--auth-timeout",
            "--connect-timeout",
            "--synack-guard",
            "--idle-session-timeout",
            "--idle-session-check-interval",
            "--udp-timeout",
            "--allow-private",
            "--log-level",
            "--shutdown-grace",
            "--max-streams-per-session",
            "--config",
            "--certificate-check-interval",
        ]:
            self.assertIn(name, text)
        for default in [
            "ssl:8443",
            "[default: 10.0]",
            "[default: 300.0]",
            "[default: 2.0]",
            "else localhost]",
        ]:
            self.assertIn(default, text)

    def test_repeated_ports(self):
        options = self.parse(
            "--password", "x", "--port", "ssl:1:interface=127.0.0.1", "--port", "tcp:2"
        )
        self.assertEqual(options["port"], ["ssl:1:interface=127.0.0.1", "tcp:2"])
        self.assertEqual([s.tls for s in options["port-specs"]], [True, False])

    def test_password_exactly_once(self):
        self.assertRaises(usage.UsageError, self.parse)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("secret\n")
        self.assertRaises(usage.UsageError, self.parse, "--password", "a", "--password-file", path)
        self.assertEqual(self.parse("--password-file", path)["users"], (("default", "secret"),))

    def test_bad_values(self):
        """Bad padding schemes, unreadable files and non-positive numbers are usage errors."""
        bad_scheme = self.mktemp()
        with open(bad_scheme, "wb") as f:
            f.write(b"0=30-30\n")
        cases = [
            ["--padding-scheme", bad_scheme],
            ["--padding-scheme", "/nonexistent/scheme"],
            ["--password-file", "/nonexistent/password"],
            ["--cert", "/nonexistent/cert.pem", "--key", "/nonexistent/key.pem"],
            ["--cert", "/nonexistent/cert.pem"],
            ["--auth-timeout", "0"],
            ["--log-level", "loud"],
            ["--port", "ssl:8443:sslmethod=TLSv1_METHOD"],
        ]
        for args in cases:
            if "--password-file" not in args:
                args = ["--password", "x"] + args
            self.assertRaises(usage.UsageError, self.parse, *args)

    def test_plugin_listed(self):
        """The dropin makes ``twistd anytls`` available."""
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("anytls", names)


class MakeServiceTests(SynchronousTestCase):
    def test_shape(self):
        """makeService: a listener per port (TLS ones as tcp: wrapped in TLS) plus the reaper."""
        state = self.mktemp()
        options = Options()
        options.parseOptions(
            [
                "--password",
                "x",
                "--state-dir",
                state,
                "--port",
                "ssl:0:interface=127.0.0.1",
                "--port",
                "tcp:0",
            ]
        )
        reactor = MemoryReactorClock()
        top = makeService(options, reactor=reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(len(reactor.tcpServers), 2)
        tls_factory = reactor.tcpServers[0][1]
        self.assertIs(type(tls_factory), BulkTLSFactory)
        self.assertEqual(reactor.tcpServers[0][3], "127.0.0.1")
        self.assertIs(reactor.tcpServers[1][1], top.factory)
        reapers = [s for s in top if isinstance(s, ReaperService)]
        self.assertEqual(len(reapers), 1)
        self.assertTrue(reapers[0].loop.running)
        self.assertTrue(os.path.exists(os.path.join(state, "self-signed-cert.pem")))


class HAProxyPortTests(SynchronousTestCase):
    def test_haproxy_ssl_layers(self):
        """haproxy:ssl: listens on TCP with the PROXY wrapper outside our TLS factory."""
        options = Options()
        options.parseOptions(
            [
                "--password",
                "x",
                "--state-dir",
                self.mktemp(),
                "--port",
                "haproxy:ssl:0:interface=127.0.0.1",
            ]
        )
        reactor = MemoryReactorClock()
        top = makeService(options, reactor=reactor)
        top.startService()
        self.addCleanup(top.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        self.assertEqual(type(factory).__name__, "HAProxyWrappingFactory")
        self.assertIs(type(factory.wrappedFactory), BulkTLSFactory)


class TwistdErrorTests(TestCase):
    """Bad configuration ends a real ``twistd anytls`` with a non-zero status and one line."""

    def twistd(self, *args):
        env = dict(os.environ, PYTHONPATH=ROOT)
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "anytls",
            "--state-dir",
            os.path.abspath(self.mktemp()),
        ] + list(args)
        result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=60, text=True)
        return result.returncode, result.stdout + result.stderr

    def assertOneLineError(self, args, expected):
        code, output = self.twistd(*args)
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "error" in line.lower()]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(expected, lines[0])

    def test_no_password(self):
        self.assertOneLineError([], "exactly one of --password or --password-file")

    def test_unreadable_certificate(self):
        self.assertOneLineError(
            ["--password", "x", "--cert", "/nonexistent/c.pem", "--key", "/nonexistent/k.pem"],
            "/nonexistent/c.pem",
        )

    def test_invalid_padding_scheme(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"1=10-20\n")
        self.assertOneLineError(
            ["--password", "x", "--padding-scheme", path], "invalid padding scheme"
        )

    def test_port_in_use(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        self.assertOneLineError(
            ["--password", "x", "--port", f"ssl:{port}:interface=127.0.0.1"],
            f"cannot listen on 127.0.0.1:{port}",
        )

    def test_port_twisted_cannot_use(self):
        """A --port Twisted cannot parse, or a systemd socket that was not passed, is one line
        at start (it used to be a traceback from makeService)."""
        self.assertOneLineError(
            ["--password", "x", "--port", "nosuch:8443"], "Unknown endpoint type"
        )
        self.assertOneLineError(
            ["--password", "x", "--port", "tls:systemd:domain=INET:index=0"],
            "systemd passed no socket matching systemd:domain=INET:index=0",
        )
