"""``--config`` files in sing-box's inbound shape, and reloading without dropping sessions."""

import json
import os

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol.auth import encode_preamble
from anytls_twisted.protocol.padding import DEFAULT_SCHEME
from anytls_twisted.server import configfile
from anytls_twisted.server import settings as defaults
from anytls_twisted.server.load import load
from anytls_twisted.server.tap import Options, makeService

from .helpers import capture_events

INBOUND = {
    "type": "anytls",
    "tag": "anytls-in",
    "listen": "::",
    "listen_port": 8443,
    "users": [{"name": "alice", "password": "a-pass"}, {"name": "bob", "password": "b-pass"}],
    "padding_scheme": ["stop=2", "0=20-20", "1=100-200"],
    "tls": {"enabled": True, "server_name": "proxy.example", "alpn": ["h2", "http/1.1"]},
}


class ConfigFileTests(SynchronousTestCase):
    def write(self, document, name="config.json"):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(document if isinstance(document, str) else json.dumps(document))
        return path

    def test_singbox_inbound(self):
        """A pasted sing-box anytls inbound gives users, port, padding and TLS settings."""
        settings = configfile.load(self.write(INBOUND))
        self.assertEqual(settings.users, (("alice", "a-pass"), ("bob", "b-pass")))
        self.assertEqual(settings.port_description(), "ssl:8443:interface=\\:\\:")
        self.assertEqual(settings.padding.raw, b"stop=2\n0=20-20\n1=100-200")
        self.assertEqual(
            (settings.server_name, settings.alpn), ("proxy.example", ("h2", "http/1.1"))
        )
        self.assertEqual(settings.warnings, ())

    def test_whole_singbox_config(self):
        """A whole sing-box config: its first anytls inbound is used."""
        path = self.write({"log": {}, "inbounds": [{"type": "mixed"}, INBOUND]})
        self.assertEqual(len(configfile.load(path).users), 2)

    def test_unknown_fields_warned(self):
        """Fields we do not implement are named in warnings, not silently dropped."""
        document = dict(INBOUND, sniff=True, tls=dict(INBOUND["tls"], acme={"domain": ["x"]}))
        path = self.write(document)
        warnings = configfile.load(path).warnings
        self.assertEqual(len(warnings), 2)
        self.assertIn("'sniff'", warnings[0])
        self.assertIn("'tls.acme'", warnings[1])
        self.assertTrue(all(w.startswith(path) for w in warnings))

    def test_misspelt_fields_are_errors(self):
        """A typo is not a default: the error names the file, the field and the likely fix."""
        cases = [
            (
                dict(INBOUND, listen_prot=9443),
                "listen_prot: unknown field; did you mean 'listen_port'?",
            ),
            (
                dict(INBOUND, tls=dict(INBOUND["tls"], certficate_path="/c", key_path="/k")),
                "tls.certficate_path: unknown field; did you mean 'tls.certificate_path'?",
            ),
            (dict(INBOUND, zzz=1), "zzz: unknown field; known: "),
        ]
        for document, expected in cases:
            path = self.write(document)
            e = self.assertRaises(configfile.ConfigFileError, configfile.load, path)
            self.assertTrue(str(e).startswith(f"{path}: {expected}"), str(e))
            self.assertNotIn("\n", str(e))

    def test_singbox_fields_ignored_with_one_warning(self):
        """sing-box fields we do not implement are accepted, and named in one warning per
        object; type and tag are quiet."""
        document = dict(
            INBOUND,
            sniff=True,
            tcp_fast_open=True,
            domain_strategy="ipv4_only",
            tls=dict(INBOUND["tls"], min_version="1.3", reality={"enabled": False}),
        )
        path = self.write(document)
        warnings = configfile.load(path).warnings
        self.assertEqual(
            warnings,
            (
                f"{path}: sing-box fields 'sniff', 'tcp_fast_open', 'domain_strategy' are not "
                "supported by anytls-twisted and ignored",
                f"{path}: sing-box fields 'tls.min_version', 'tls.reality' are not supported by "
                "anytls-twisted and ignored",
            ),
        )

    def test_inline_certificate_refused(self):
        """Inline PEM would otherwise be ignored and a self-signed certificate served."""
        path = self.write(dict(INBOUND, tls=dict(INBOUND["tls"], certificate=["-----BEGIN"])))
        e = self.assertRaises(configfile.ConfigFileError, configfile.load, path)
        self.assertEqual(
            str(e),
            f"{path}: tls.certificate: inline PEM is not supported; use tls.certificate_path",
        )

    def test_no_tls_object_is_plain(self):
        document = {k: v for k, v in INBOUND.items() if k != "tls"}
        self.assertEqual(
            configfile.load(self.write(document)).port_description(), "tcp:8443:interface=\\:\\:"
        )

    def test_errors_name_file_field_reason(self):
        cases = [
            ("{not json", "not valid JSON"),
            (dict(INBOUND, type="vless"), "type"),
            (dict(INBOUND, users=[]), "users"),
            (dict(INBOUND, users=[{"name": "x"}]), "users[0].password"),
            (dict(INBOUND, listen_port=70000), "listen_port"),
            (dict(INBOUND, listen_port="8443"), "listen_port"),
            (dict(INBOUND, padding_scheme=["0=1-2"]), "padding_scheme"),
            (dict(INBOUND, tls={"enabled": True, "certificate_path": "/c"}), "key_path"),
            ({"inbounds": [{"type": "mixed"}]}, "no inbound of type anytls"),
        ]
        for document, field in cases:
            path = self.write(document)
            e = self.assertRaises(configfile.ConfigFileError, configfile.load, path)
            self.assertIn(path, str(e))
            self.assertIn(field, str(e))
        e = self.assertRaises(configfile.ConfigFileError, configfile.load, "/nonexistent/c.json")
        self.assertIn("/nonexistent/c.json", str(e))

    def test_deep_nesting(self):
        """JSON nested past Python's recursion limit made json raise RecursionError, a
        traceback instead of our one line (seen reviewing for fuzz/server_config.py)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[" * 100_000)
        e = self.assertRaises(configfile.ConfigFileError, configfile.load, path)
        self.assertEqual(str(e), f"{path}: not valid JSON: nested too deeply")


class LimitsFileTests(SynchronousTestCase):
    """The ``limits`` object (our own, not sing-box's) and the options of the same names."""

    LIMITS = {
        "connection_rate": 5.5,
        "connection_burst": 7,
        "max_sessions": 100,
        "max_sessions_per_user": 3,
        "max_streams": 0,
    }

    def parse(self, *args):
        return OptionsWithConfigTests.parse(self, *args)

    def config(self, limits):
        return ConfigFileTests.write(self, dict(INBOUND, limits=limits))

    def test_file_values_used(self):
        """If the file gives limits, then they are the server's."""
        limits = self.parse("--config", self.config(self.LIMITS)).config.limits
        self.assertEqual(
            (limits.connection_rate, limits.connection_burst, limits.max_sessions),
            (5.5, 7, 100),
        )
        self.assertEqual((limits.max_sessions_per_user, limits.max_streams), (3, 0))

    def test_command_line_wins_field_by_field(self):
        """If an option is given, then it beats the file's field of the same name, and the
        file's other fields still apply; fields the file omits take the defaults."""
        path = self.config({"connection_rate": 1, "max_sessions": 9})
        limits = self.parse("--config", path, "--connection-rate", "0", "--max-streams", "50")
        self.assertEqual(
            (limits.config.limits.connection_rate, limits.config.limits.max_sessions), (0.0, 9)
        )
        self.assertEqual(limits.config.limits.max_streams, 50)
        self.assertEqual(limits.config.limits.connection_burst, defaults.CONNECTION_BURST)

    def test_bad_fields_name_the_field(self):
        """If a limit is misspelt, negative, fractional where a count is wanted, or not a
        number, then the error names the file and the field."""
        for limits, field in [
            (
                {"max_session": 1},
                "limits.max_session: unknown field; did you mean 'limits.max_sessions'",
            ),
            ({"max_sessions": -1}, "limits.max_sessions: must be a whole number, at least 0"),
            ({"max_streams": 1.5}, "limits.max_streams: must be a whole number"),
            (
                {"connection_burst": 0},
                "limits.connection_burst: must be a whole number, at least 1",
            ),
            ({"connection_rate": "fast"}, "limits.connection_rate: must be a number"),
            ({"connection_rate": True}, "limits.connection_rate: must be a number"),
            ([], "limits: must be an object"),
        ]:
            path = self.config(limits)
            e = self.assertRaises(configfile.ConfigFileError, configfile.load, path)
            self.assertIn(f"{path}: {field}", str(e))

    def test_reload_changes_limits(self):
        """If the file's limits change, then a reload makes them current."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump(dict(INBOUND, listen="127.0.0.1", listen_port=0), f)
        options = Options()
        options.parseOptions(["--config", path, "--state-dir", os.path.abspath(self.mktemp())])
        top = makeService(options, reactor=MemoryReactorClock())
        self.assertEqual(top.factory.config.limits.max_sessions, 0)
        with open(path, "w") as f:
            json.dump(
                dict(INBOUND, listen="127.0.0.1", listen_port=0, limits={"max_sessions": 4}), f
            )
        self.assertTrue(top.reloader.reload("test"))
        self.assertEqual(top.admission.limits.max_sessions, 4)


class OptionsWithConfigTests(SynchronousTestCase):
    def parse(self, *args):
        """Parse, then load the settings (the config file is read by load)."""
        options = Options()
        options.parseOptions(["--state-dir", self.mktemp()] + list(args))
        return load(options)

    def config(self, document=INBOUND):
        return ConfigFileTests.write(self, document)

    def test_file_values_used(self):
        settings = self.parse("--config", self.config())
        self.assertEqual(settings.users, (("alice", "a-pass"), ("bob", "b-pass")))
        self.assertEqual([p.description for p in settings.ports], ["ssl:8443:interface=\\:\\:"])
        self.assertEqual(settings.client.server_name, "proxy.example")
        self.assertEqual(settings.alpn, ("h2", "http/1.1"))
        self.assertNotEqual(settings.config.padding, DEFAULT_SCHEME)

    def test_command_line_overrides(self):
        """--password, --port, --server-name, --alpn and --padding-scheme beat the file."""
        scheme = self.mktemp()
        with open(scheme, "wb") as f:
            f.write(DEFAULT_SCHEME.raw)
        settings = self.parse(
            "--config",
            self.config(),
            "--password",
            "cli",
            "--port",
            "ssl:9443",
            "--server-name",
            "other",
            "--alpn",
            "",
            "--padding-scheme",
            scheme,
        )
        self.assertEqual(settings.users, (("default", "cli"),))
        self.assertEqual([p.description for p in settings.ports], ["ssl:9443"])
        self.assertEqual(settings.client.server_name, "other")
        self.assertEqual(settings.alpn, ())
        self.assertEqual(settings.config.padding.raw, DEFAULT_SCHEME.raw)

    def test_heartbeat_fields(self):
        """heartbeat_interval/heartbeat_timeout (sing-box durations) set the heartbeats; the
        command line beats them; absent, the defaults apply."""
        path = self.config(dict(INBOUND, heartbeat_interval="25s", heartbeat_timeout="1m"))
        config = self.parse("--config", path).config
        self.assertEqual((config.heartbeat_interval, config.heartbeat_timeout), (25, 60))
        config = self.parse("--config", path, "--heartbeat-interval", "0").config
        self.assertEqual((config.heartbeat_interval, config.heartbeat_timeout), (0, 60))
        config = self.parse("--config", self.config(dict(INBOUND, heartbeat_interval="0s"))).config
        self.assertEqual((config.heartbeat_interval, config.heartbeat_timeout), (0, 15))
        config = self.parse("--config", self.config()).config
        self.assertEqual((config.heartbeat_interval, config.heartbeat_timeout), (60, 15))

    def test_invalid_file_is_usage_error(self):
        self.assertRaises(
            usage.UsageError, self.parse, "--config", self.config(dict(INBOUND, users="x"))
        )

    def test_no_users_anywhere(self):
        document = {k: v for k, v in INBOUND.items() if k != "users"}
        self.assertRaises(usage.UsageError, self.parse, "--config", self.config(document))


class ReloadTests(SynchronousTestCase):
    """Reload applied to a service built by makeService on a memory reactor."""

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.document = dict(INBOUND, listen="127.0.0.1", listen_port=0)
        self.save()
        options = Options()
        options.parseOptions(["--config", self.path, "--state-dir", os.path.abspath(self.mktemp())])
        self.reactor = MemoryReactorClock()
        self.top = makeService(options, reactor=self.reactor)
        self.factory = self.top.factory

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.document, f)

    def session(self, password):
        proto = self.factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode_preamble(password))
        return proto, transport

    def test_users_change(self):
        """Removed users' sessions close; others keep running; new users can log in."""
        alice, alice_transport = self.session("a-pass")
        bob, bob_transport = self.session("b-pass")
        self.assertEqual((alice.user, bob.user), ("alice", "bob"))
        self.document["users"] = [
            {"name": "alice", "password": "a-pass"},
            {"name": "carol", "password": "c-pass"},
        ]
        self.save()
        self.assertTrue(self.top.reloader.reload("test"))
        self.assertTrue(bob_transport.disconnecting)
        self.assertFalse(alice_transport.disconnecting)
        carol, _ = self.session("c-pass")
        self.assertEqual(carol.user, "carol")
        late_bob, late_transport = self.session("b-pass")
        self.assertIsNone(late_bob.user)
        self.assertTrue(late_transport.disconnecting)

    def test_password_change_closes_session(self):
        alice, transport = self.session("a-pass")
        self.document["users"] = [{"name": "alice", "password": "new"}]
        self.save()
        self.top.reloader.reload("test")
        self.assertTrue(transport.disconnecting)

    def test_padding_change_applies_to_new_settings(self):
        self.document["padding_scheme"] = ["stop=3", "0=10-10"]
        self.save()
        self.top.reloader.reload("test")
        self.assertEqual(self.factory.config.padding.raw, b"stop=3\n0=10-10")

    def test_reload_loads_the_saved_options(self):
        """A reload loads the settings from the options parsed at start; it parses no command
        line again."""

        def no_parsing(self, options=None):
            raise AssertionError("options parsed again")

        self.patch(Options, "parseOptions", no_parsing)
        self.document["users"] = [{"name": "dave", "password": "d-pass"}]
        self.save()
        self.assertTrue(self.top.reloader.reload("test"))
        self.assertEqual(self.session("d-pass")[0].user, "dave")

    def test_changed_ports_refused(self):
        """A file naming another port is not half applied: the reload fails as a whole,
        saying ports need a restart, and the users stay as they were."""
        alice, transport = self.session("a-pass")
        before = self.factory.config
        events = capture_events(self)
        self.document.update(listen_port=8443, users=[{"name": "x", "password": "x"}])
        self.save()
        self.assertFalse(self.top.reloader.reload("SIGHUP"))
        self.assertIs(self.factory.config, before)
        self.assertFalse(transport.disconnecting)
        [line] = [formatEvent(e) for e in events if e.get("log_namespace", "").endswith("reload")]
        self.assertIn("reload (SIGHUP) failed, keeping the current configuration", line)
        self.assertIn("ssl:8443:interface=127.0.0.1", line)
        self.assertIn("listening ports need a restart", line)

    def test_messages_count_in_words(self):
        """1 user, 2 users; closed 1 session, closed 0 sessions."""
        alice, _ = self.session("a-pass")
        bob, _ = self.session("b-pass")
        events = capture_events(self)
        self.document["users"] = [{"name": "alice", "password": "a-pass"}]
        self.save()
        self.assertTrue(self.top.reloader.reload("test"))
        bob.connectionLost(Failure(ConnectionDone()))  # the closed session goes
        self.document["users"].append({"name": "carol", "password": "c"})
        self.save()
        self.assertTrue(self.top.reloader.reload("test"))
        texts = [formatEvent(e) for e in events if "users" in e]
        self.assertIn(": 1 user, padding md5", texts[0])
        self.assertIn("; closed 1 session of removed users", texts[0])
        self.assertIn(": 2 users, padding md5", texts[1])
        self.assertIn("; closed 0 sessions of removed users", texts[1])

    def test_invalid_file_keeps_old_configuration(self):
        """A reload from a broken file fails, logs why, and changes nothing."""
        alice, transport = self.session("a-pass")
        before = self.factory.config
        with open(self.path, "w") as f:
            f.write("{broken")
        self.assertFalse(self.top.reloader.reload("test"))
        self.assertIs(self.factory.config, before)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.top.reloader.failures, 1)


class CertificateReloadTests(SynchronousTestCase):
    def test_changed_certificate_file_reloads(self):
        """Replacing the certificate files is noticed at the next check; new handshakes use it."""
        from anytls_twisted import certs

        first = os.path.abspath(self.mktemp())
        second = os.path.abspath(self.mktemp())
        cert, key = certs.ensure_self_signed(first, "one.example")
        cert2, key2 = certs.ensure_self_signed(second, "two.example")
        live_cert, live_key = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        for src, dst in ((cert, live_cert), (key, live_key)):
            with open(src, "rb") as a, open(dst, "wb") as b:
                b.write(a.read())
        options = Options()
        options.parseOptions(
            [
                "--password",
                "x",
                "--port",
                "ssl:0",
                "--cert",
                live_cert,
                "--key",
                live_key,
                "--certificate-check-interval",
                "10",
            ]
        )
        reactor = MemoryReactorClock()
        top = makeService(options, reactor=reactor)
        top.startService()
        self.addCleanup(top.stopService)
        old_options = top.live.tls_options("ssl:0")
        for src, dst in ((key2, live_key), (cert2, live_cert)):
            with open(src, "rb") as a, open(dst, "wb") as b:
                b.write(a.read())
        os.utime(live_cert, (1, 1))  # make the change visible even within one mtime tick
        reactor.advance(10)
        self.assertIsNot(top.live.tls_options("ssl:0"), old_options)
        self.assertEqual(top.reloader.reloads, 1)
        reactor.advance(10)
        self.assertEqual(top.reloader.reloads, 1)  # no change, no reload
