"""``twistd anytls`` options and makeService; configuration errors as one line from twistd."""

import os
import socket
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anytls_twisted.protocol.padding import DEFAULT_SCHEME
from anytls_twisted.server import settings as defaults
from anytls_twisted.server.admission import AdmissionFactory, AdmittingProxyFactory
from anytls_twisted.server.load import load
from anytls_twisted.server.service import ReaperService
from anytls_twisted.server.tap import Options, makeService
from anytls_twisted.tls_transport import BulkTLSFactory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OptionsTests(SynchronousTestCase):
    def parse(self, *args):
        options = Options()
        options.parseOptions(["--state-dir", self.mktemp()] + list(args))
        return options

    def load(self, *args):
        """Parse, then load the settings (reading the files the options name)."""
        return load(self.parse(*args))

    def test_defaults(self):
        """Every default matches the documented one."""
        settings = self.load("--password", "PASS")
        config = settings.config
        self.assertEqual([port.description for port in settings.ports], ["ssl:8443"])
        self.assertEqual(settings.users, (("default", "PASS"),))
        self.assertEqual(config.auth_timeout, defaults.AUTH_TIMEOUT)
        self.assertEqual(config.connect_timeout, defaults.CONNECT_TIMEOUT)
        self.assertEqual(config.synack_guard, defaults.SYNACK_GUARD)
        self.assertEqual(config.idle_session_timeout, defaults.IDLE_SESSION_TIMEOUT)
        self.assertEqual(config.idle_session_check_interval, defaults.IDLE_SESSION_CHECK_INTERVAL)
        self.assertEqual(config.udp_timeout, defaults.UDP_TIMEOUT)
        self.assertEqual(config.heartbeat_interval, defaults.HEARTBEAT_INTERVAL)
        self.assertEqual(config.heartbeat_timeout, defaults.HEARTBEAT_TIMEOUT)
        self.assertEqual((defaults.HEARTBEAT_INTERVAL, defaults.HEARTBEAT_TIMEOUT), (60, 15))
        self.assertEqual(settings.client.server_name, "localhost")
        self.assertIs(config.padding, DEFAULT_SCHEME)
        self.assertFalse(config.policy.allow_private)
        self.assertEqual(settings.alpn, ())
        self.assertEqual(config.limits, defaults.Limits())
        self.assertEqual(
            (
                config.limits.connection_rate,
                config.limits.connection_burst,
                config.limits.max_sessions,
                config.limits.max_sessions_per_user,
                config.limits.max_streams,
            ),
            (20.0, 100, 0, 0, 0),
        )

    def test_limit_options(self):
        """The limit options set the limits; 0 turns a cap or the rate off."""
        limits = self.load(
            "--password",
            "x",
            "--connection-rate",
            "0.5",
            "--connection-burst",
            "3",
            "--max-sessions",
            "10",
            "--max-sessions-per-user",
            "0",
            "--max-streams",
            "20",
            "--max-streams-per-session",
            "4",
        ).config
        self.assertEqual(
            defaults.Limits(
                connection_rate=0.5,
                connection_burst=3,
                max_sessions=10,
                max_sessions_per_user=0,
                max_streams=20,
            ),
            limits.limits,
        )
        self.assertEqual(limits.max_streams, 4)

    def test_options_keep_only_what_was_given(self):
        """Parsing stores no derived value: the defaults that come from files are load's."""
        options = self.parse("--password", "PASS")
        self.assertEqual(options["port"], [])
        self.assertIsNone(options["server-name"])
        for derived in ("users", "padding", "port-specs", "tls-material", "worker-listen"):
            self.assertNotIn(derived, options)

    def test_number_errors_name_the_option(self):
        """A bad number is one line naming the option, the rule and the value given."""
        for args, expected in [
            (["--workers", "abc"], "--workers: must be a positive integer, got 'abc'"),
            (["--workers", "0"], "--workers: must be a positive integer, got '0'"),
            (["--auth-timeout", "-1"], "--auth-timeout: must be a positive number, got '-1'"),
            (["--udp-timeout", "nan"], "--udp-timeout: must be a positive number, got 'nan'"),
            (["--worker-index", "-2"], "--worker-index: must be a whole number, got '-2'"),
            (
                ["--heartbeat-interval", "-1"],
                "--heartbeat-interval: must be 0 (off) or a positive number, got '-1'",
            ),
            (
                ["--heartbeat-timeout", "0"],
                "--heartbeat-timeout: must be a positive number, got '0'",
            ),
            (
                ["--connection-rate", "-1"],
                "--connection-rate: must be a number, 0 or more, got '-1'",
            ),
            (
                ["--connection-burst", "0"],
                "--connection-burst: must be a positive integer, got '0'",
            ),
            (["--max-sessions", "1.5"], "--max-sessions: must be a whole number, got '1.5'"),
        ]:
            e = self.assertRaises(usage.UsageError, self.parse, "--password", "x", *args)
            self.assertEqual(str(e), expected)

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
            "--max-streams",
            "--max-sessions",
            "--max-sessions-per-user",
            "--connection-rate",
            "--connection-burst",
            "--config",
            "--certificate-check-interval",
            "--client-config-format",
            "--heartbeat-interval",
            "--heartbeat-timeout",
        ]:
            self.assertIn(name, text)
        for default in [
            "ssl:8443",
            "[default: 10.0]",
            "[default: 300.0]",
            "[default: 2.0]",
            "else localhost]",
            "heartbeat_interval, else 60]",
            "heartbeat_timeout, else 15]",
            "limits.connection_rate, else 20]",
            "limits.connection_burst, else 100]",
            "limits.max_sessions, else 0]",
        ]:
            self.assertIn(default, text)

    def test_heartbeat_options(self):
        config = self.load(
            "--password", "x", "--heartbeat-interval", "0", "--heartbeat-timeout", "2.5"
        ).config
        self.assertEqual((config.heartbeat_interval, config.heartbeat_timeout), (0, 2.5))

    def test_repeated_ports(self):
        options = self.parse(
            "--password", "x", "--port", "ssl:1:interface=127.0.0.1", "--port", "tcp:2"
        )
        self.assertEqual(options["port"], ["ssl:1:interface=127.0.0.1", "tcp:2"])
        self.assertEqual([p.spec.tls for p in load(options).ports], [True, False])

    def test_password_exactly_once(self):
        self.assertRaises(usage.UsageError, self.load)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("secret\n")
        self.assertRaises(usage.UsageError, self.load, "--password", "a", "--password-file", path)
        self.assertEqual(self.load("--password-file", path).users, (("default", "secret"),))

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
            self.assertRaises(usage.UsageError, self.load, *args)

    def test_print_client_config_needs_no_pidfile(self):
        """--print-client-config runs no server: another server's pid file must not stop it."""
        from twisted.scripts.twistd import ServerOptions

        config = ServerOptions()
        config.parseOptions(
            ["anytls", "--password", "x", "--state-dir", self.mktemp(), "--print-client-config"]
        )
        self.assertEqual(config["pidfile"], "")

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
        tls_port, plain_port = reactor.tcpServers[0][1], reactor.tcpServers[1][1]
        self.assertIs(type(tls_port), AdmissionFactory)
        self.assertTrue(tls_port.rate)  # a TLS port's peer is the client
        self.assertIs(type(tls_port.wrappedFactory), BulkTLSFactory)
        self.assertEqual(reactor.tcpServers[0][3], "127.0.0.1")
        self.assertIs(type(plain_port), AdmissionFactory)
        self.assertFalse(plain_port.rate)  # a plain port's peer is a TLS-terminating proxy
        self.assertIs(plain_port.wrappedFactory, top.factory)
        reapers = [s for s in top if isinstance(s, ReaperService)]
        self.assertEqual(len(reapers), 1)
        self.assertTrue(reapers[0].loop.running)
        self.assertTrue(os.path.exists(os.path.join(state, "self-signed-cert.pem")))

    def test_parts_are_the_services_own(self):
        """The service built its parts and exposes them: they are its children."""
        options = Options()
        options.parseOptions(["--password", "x", "--state-dir", self.mktemp(), "--port", "tcp:0"])
        top = makeService(options, reactor=MemoryReactorClock())
        children = list(top)
        for part in (top.reaper, top.reloader, *top.listeners):
            self.assertIn(part, children)
        self.assertIs(top.reloader.live, top.live)
        self.assertIs(top.factory.live, top.live)
        self.assertIs(top.registry.live, top.live)
        self.assertIsNone(top.supervisor)
        self.assertIsNone(top.metrics_listener)


class HAProxyPortTests(SynchronousTestCase):
    def test_haproxy_ssl_layers(self):
        """haproxy:ssl: listens on TCP with our PROXY header reader outside the limits'
        factory, outside our TLS factory."""
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
        self.assertIs(type(factory), AdmittingProxyFactory)
        self.assertIsInstance(factory, HAProxyWrappingFactory)
        self.assertIs(type(factory.wrappedFactory), AdmissionFactory)
        self.assertIs(type(factory.wrappedFactory.wrappedFactory), BulkTLSFactory)
        # The port's log line and the factories' quiet start are as before the limits.
        self.assertEqual(factory.logPrefix(), "AnyTLSFactory (TLS) (PROXY)")
        self.assertFalse(factory.noisy or factory.wrappedFactory.noisy)


class TwistdErrorTests(TestCase):
    """Bad configuration ends a real ``twistd anytls`` with a non-zero status and one line."""

    def twistd(self, *args, twistd_args=("-n", "--pidfile=")):
        env = dict(os.environ, PYTHONPATH=ROOT)
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            *twistd_args,
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

    def test_port_in_use_logs_nothing_about_the_ports(self):
        """The ports are bound before the banner is logged: a busy port gives its one error
        line and none of the lines about ports, certificate or client config."""
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        for extra in ([], ["--workers", "2"]):
            args = ["--password", "x", "--port", f"ssl:{port}:interface=127.0.0.1", *extra]
            self.assertOneLineError(args, f"cannot listen on 127.0.0.1:{port}")
            code, output = self.twistd(*args)
            ours = [line for line in output.splitlines() if "[anytls_twisted." in line]
            self.assertEqual(ours, [], output)
            for banner in ("listening on", "client config", "certificate", "worker"):
                self.assertNotIn(banner, output)

    def test_config_file_typo(self):
        """A misspelt field in --config is one line naming the file, the field and the fix,
        also for --print-client-config (which loads the same way)."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('{"listen_prot": 9443, "users": [{"name": "a", "password": "b"}]}')
        expected = f"{path}: listen_prot: unknown field; did you mean 'listen_port'?"
        self.assertOneLineError(["--config", path], expected)
        self.assertOneLineError(["--config", path, "--print-client-config"], expected)

    def test_json_logs_need_nodaemon(self):
        """--log-format json without -n (twistd would daemonize and lose every line) is
        refused with one line, before anything starts."""
        pidfile = os.path.abspath(self.mktemp())
        self.addCleanup(_kill_daemon, pidfile)  # should this ever start one
        code, output = self.twistd(
            "--password",
            "x",
            "--port",
            "ssl:0",
            "--log-format",
            "json",
            twistd_args=(f"--pidfile={pidfile}",),
        )
        self.assertEqual(code, 2, output)
        self.assertEqual(
            output.strip().splitlines(),
            [
                "twistd anytls: error: --log-format json writes to stdout, which a daemon does "
                "not have; add twistd's -n (--nodaemon) (see twistd anytls --help)"
            ],
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


def _kill_daemon(pidfile):
    try:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), 9)
    except (OSError, ValueError):
        pass
