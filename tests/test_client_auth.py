"""Authentication on the client's local port (``--proxy-user-file``) and the warning for a port
other machines can reach without it."""

from __future__ import annotations

import base64

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.trial import unittest

from anytls_twisted.client.local import LocalProxyFactory
from anytls_twisted.client.localauth import ProxyUsers, ProxyUsersError
from anytls_twisted.client.tap import ConfigError, makeService

from .helpers import capture_events
from .test_client_session import Transport, manager
from .test_client_tap import URI, parse


def write(case: unittest.TestCase, text: str) -> str:
    path = case.mktemp()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class ProxyUsersTests(unittest.TestCase):
    def test_file(self):
        users = ProxyUsers.from_file(write(self, "# users\nalice:pa:ss\n\nbob:x\n"))
        self.assertTrue(users("alice", "pa:ss"))  # the first colon splits
        self.assertTrue(users("bob", "x"))
        self.assertFalse(users("bob", "y"))
        self.assertFalse(users("carol", "x"))
        self.assertEqual(users.names, ("alice", "bob"))

    def test_bad_files_one_line(self):
        for text, expected in (
            ("alice\n", ":1: expected user:password"),
            ("# nobody\n", "no users"),
            ("a:" + "p" * 256 + "\n", "at most 255 bytes"),
        ):
            e = self.assertRaises(ProxyUsersError, ProxyUsers.from_file, write(self, text))
            self.assertIn(expected, str(e))
            self.assertNotIn("\n", str(e))
        e = self.assertRaises(ProxyUsersError, ProxyUsers.from_file, "/nonexistent/users")
        self.assertIn("cannot read proxy user file", str(e))

    def test_bad_file_is_a_config_error(self):
        options = parse("--server", URI, "--proxy-user-file", write(self, "nocolon\n"))
        self.assertRaises(ConfigError, makeService, options, MemoryReactorClock())


class LocalAuthTests(unittest.TestCase):
    def setUp(self):
        self.m, self.endpoint, self.clock = manager()
        users = ProxyUsers([("alice", "secret")])
        self.factory = LocalProxyFactory(self.m, self.clock, users)
        self.local = self.factory.buildProtocol(None)
        self.transport = Transport()
        self.local.makeConnection(self.transport)

    def test_socks5_asks_for_the_password(self):
        self.local.dataReceived(b"\x05\x01\x00")  # offers "no authentication" only
        self.assertEqual(self.transport.value(), b"\x05\xff")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.endpoint.sessions, [])

    def test_socks5_good_and_bad_passwords(self):
        self.local.dataReceived(b"\x05\x01\x02\x01\x05alice\x06secret")
        self.assertEqual(self.transport.value(), b"\x05\x02\x01\x00")
        other = self.factory.buildProtocol(None)
        transport = Transport()
        other.makeConnection(transport)
        other.dataReceived(b"\x05\x01\x02\x01\x05alice\x05wrong")
        self.assertEqual(transport.value(), b"\x05\x02\x01\x01")
        self.assertTrue(transport.disconnecting)

    def test_http_407_then_accepted(self):
        self.local.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 407 "))
        self.assertIn(b"Proxy-Authenticate: Basic", self.transport.value())
        self.assertEqual(self.endpoint.sessions, [])
        other = self.factory.buildProtocol(None)
        transport = Transport()
        other.makeConnection(transport)
        token = base64.b64encode(b"alice:secret").decode()
        other.dataReceived(
            b"CONNECT example.com:443 HTTP/1.1\r\nProxy-Authorization: Basic "
            + token.encode()
            + b"\r\n\r\n"
        )
        self.assertEqual(len(self.endpoint.sessions), 1)  # a stream is being opened


class ExposedPortWarningTests(unittest.TestCase):
    def warnings(self, *args):
        events = capture_events(self)
        service = makeService(parse("--server", URI, *args), MemoryReactorClock())
        service.startService()
        self.addCleanup(service.stopService)
        return [formatEvent(e) for e in events if "reachable from other machines" in formatEvent(e)]

    def test_wildcard_without_users_warns(self):
        [line] = self.warnings("--listen", "tcp:0")
        self.assertIn("--proxy-user-file", line)

    def test_loopback_is_quiet(self):
        self.assertEqual(self.warnings("--listen", "tcp:0:interface=127.0.0.1"), [])
        self.assertEqual(self.warnings("--listen", r"tcp6:0:interface=\:\:1"), [])

    def test_users_make_it_quiet(self):
        users = write(self, "alice:secret\n")
        self.assertEqual(self.warnings("--listen", "tcp:0", "--proxy-user-file", users), [])


class LogFormatTests(unittest.TestCase):
    def test_json_needs_a_known_format(self):
        from twisted.python import usage

        self.assertRaises(usage.UsageError, parse, "--server", URI, "--log-format", "xml")
        self.assertEqual(parse("--server", URI, "--log-format", "json")["log-format"], "json")


class TLSOptionTests(unittest.TestCase):
    PIN = base64.b64encode(bytes(range(32))).decode()

    def test_pins_replace_the_config_certificate(self):
        from anytls_twisted.client.tap import load

        (config,) = load(
            parse("--server", URI, "--certificate-pin", self.PIN, "--alpn", "h2, http/1.1")
        )
        self.assertEqual(config.certificate_pins, (self.PIN,))
        self.assertEqual(config.alpn, ("h2", "http/1.1"))

    def test_bad_pin_names_the_option(self):
        from twisted.python import usage

        e = self.assertRaises(usage.UsageError, parse, "--server", URI, "--certificate-pin", "abc")
        self.assertIn("--certificate-pin 'abc'", str(e))

    def test_certificate_file(self):
        from anytls_twisted.client.tap import load

        e = self.assertRaises(
            ConfigError, load, parse("--server", URI, "--certificate", "/nonexistent/c.pem")
        )
        self.assertIn("/nonexistent/c.pem", str(e))
