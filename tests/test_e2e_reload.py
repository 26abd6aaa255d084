"""End to end: reloading users and the certificate while real sing-box clients keep going."""

from __future__ import annotations

import json
import os
import shutil

from twisted.trial import unittest

from .e2e_support import SERVER_KIND, Harness, e2e_test, make_self_signed, spki_pin, within

ALICE, BOB, CAROL = "alice-password", "bob-password", "carol-password"


def next_line(process) -> int:
    """The number the process's next log line will get (to wait for lines after now)."""
    return process.lines[-1][0] + 1 if process.lines else 0


class ReloadEndToEndTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        if SERVER_KIND == "singbox":
            raise unittest.SkipTest("reload is our server's feature")
        self.h = Harness(self)

    def write_config(self, users, path=None):
        document = {
            "type": "anytls",
            "tag": "anytls-in",
            "users": [{"name": name, "password": password} for name, password in users],
            "tls": {
                "enabled": True,
                "server_name": "localhost",
                "certificate_path": self.cert,
                "key_path": self.key,
            },
        }
        with open(self.config, "w") as f:
            json.dump(document, f)

    def install_certificate(self, directory):
        """Make a certificate and copy it over the live files (key first, as an operator would)."""
        os.makedirs(directory)
        cert, key = make_self_signed(directory)
        shutil.copyfile(key, self.key)
        shutil.copyfile(cert, self.cert)

    @e2e_test
    def test_reload_keeps_sessions_and_applies_users_and_certificate(self):
        """SIGHUP swaps users (removed user's session closed, new user admitted) and a changed
        certificate file is picked up, while a stream opened before both keeps echoing."""
        h = self.h
        state = os.path.join(h.base, "server-state")
        os.makedirs(state)
        # The harness trusts <state>/self-signed-cert.pem; use those paths as operator files.
        self.cert = os.path.join(state, "self-signed-cert.pem")
        self.key = os.path.join(state, "self-signed-key.pem")
        self.install_certificate(os.path.join(h.base, "cert-1"))
        self.config = os.path.join(h.base, "anytls.json")
        self.write_config([("alice", ALICE), ("bob", BOB)])

        server = yield h.start_server(
            password_args=["--config", self.config],
            extra_args=["--certificate-check-interval", "1"],
        )
        log = server.process
        echo = h.tcp_echo()
        alice = yield h.start_client(server, password=ALICE)
        bob = yield h.start_client(server, password=BOB)

        long_lived = yield h.socks_connect(alice, echo.host, echo.port)
        long_lived.write(b"before reload\n")
        self.assertEqual(
            (yield within(long_lived.read(14), 15, "echo before reload")), b"before reload\n"
        )
        bob_stream = yield h.socks_connect(bob, echo.host, echo.port)
        bob_stream.write(b"bob here\n")
        self.assertEqual((yield within(bob_stream.read(9), 15, "bob's echo")), b"bob here\n")

        # 1. Users: bob removed, carol added.
        mark = next_line(log)
        self.write_config([("alice", ALICE), ("carol", CAROL)])
        log.transport.signalProcess("HUP")
        yield log.wait_for_line(r"reloaded \(SIGHUP\): 2 users", 15, since=mark)
        yield within(bob_stream.lost.wait(), 15, "bob's stream to be closed by the reload")
        yield log.wait_for_line(
            r"closed: user removed or password changed by reload", 15, since=mark
        )
        long_lived.write(b"after users\n")
        self.assertEqual(
            (yield within(long_lived.read(12), 15, "echo after reload")), b"after users\n"
        )
        carol = yield h.start_client(server, password=CAROL)
        yield h.echo_once(carol, echo, b"carol is in\n")
        late_bob = yield h.start_client(server, password=BOB)
        yield h.expect_refused(late_bob, echo.host, echo.port)

        # 2. A broken file: the reload fails and nothing changes.
        mark = next_line(log)
        with open(self.config, "w") as f:
            f.write("{not json")
        log.transport.signalProcess("HUP")
        yield log.wait_for_line(
            r"reload \(SIGHUP\) failed, keeping the current configuration", 15, since=mark
        )
        yield h.echo_once(carol, echo, b"still fine\n")

        # 3. A new certificate on disk is noticed without a signal.
        self.write_config([("alice", ALICE), ("carol", CAROL)])
        mark = next_line(log)
        self.install_certificate(os.path.join(h.base, "cert-2"))
        new_pin = spki_pin(self.cert)
        self.assertNotEqual(new_pin, server.pin)
        yield log.wait_for_line(
            r"reloaded \(certificate file changed\).*" + new_pin.replace("+", r"\+"), 15, since=mark
        )
        long_lived.write(b"after certificate\n")
        self.assertEqual(
            (yield within(long_lived.read(18), 15, "echo after new certificate")),
            b"after certificate\n",
        )
        server.pin = new_pin  # clients started now trust the new file
        fresh = yield h.start_client(server, password=ALICE, use_pin=True)
        yield h.echo_once(fresh, echo, b"new certificate works\n")
        h.assert_alive(server.process)
