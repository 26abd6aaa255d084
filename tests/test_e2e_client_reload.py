"""End to end: SIGHUP moves our client to another server without cutting a live stream."""

from __future__ import annotations

import json
import os

from twisted.trial import unittest

from .e2e_support import PASSWORD, Harness, e2e_test, within
from .test_e2e_client import start_our_client
from .test_e2e_reload import next_line


class ClientReloadEndToEndTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.h = Harness(self)

    def write_outbound(self, path, server):
        outbound = {
            "type": "anytls",
            "server": "127.0.0.1",
            "server_port": server.port,
            "password": PASSWORD,
            "tls": {"enabled": True, "server_name": "localhost", "insecure": True},
        }
        with open(path, "w") as f:
            json.dump(outbound, f)

    @e2e_test
    def test_sighup_switches_server_and_keeps_the_live_stream(self):
        """A stream open through server A keeps echoing across a SIGHUP that points the client
        at server B; the next stream goes to B; A's session closes when its stream ends; a
        broken file then fails the reload and changes nothing."""
        h = self.h
        first = yield h.start_server(kind="twistd")
        second = yield h.start_server(kind="twistd")
        config = os.path.join(h.base, "outbound.json")
        self.write_outbound(config, first)
        client = yield start_our_client(h, ["--config", config])
        log = client.process
        echo = h.tcp_echo()

        live = yield h.socks_connect(client, echo.host, echo.port)
        live.write(b"before reload\n")
        self.assertEqual((yield within(live.read(14), 15, "echo before")), b"before reload\n")
        self.assertEqual(first.sessions_opened(), 1)

        mark = next_line(log)
        self.write_outbound(config, second)
        log.transport.signalProcess("HUP")
        yield log.wait_for_line(
            rf"reloaded \(SIGHUP\): server 127\.0\.0\.1:{second.port} .*changed: closed 0 idle "
            r"sessions, 1 busy session closing after their stream",
            15,
            since=mark,
        )
        live.write(b"after reload\n")
        self.assertEqual((yield within(live.read(13), 15, "echo after")), b"after reload\n")

        yield h.echo_once(client, echo, b"to the second server\n")
        self.assertEqual((first.sessions_opened(), second.sessions_opened()), (1, 1))

        mark = next_line(log)
        yield within(live.close(), 15, "the live stream to close")
        yield log.wait_for_line(r"closed: the server changed \(reload\)", 15, since=mark)
        yield h.echo_once(client, echo, b"second server again\n")
        self.assertEqual((first.sessions_opened(), second.sessions_opened()), (1, 1))

        mark = next_line(log)
        with open(config, "w") as f:
            f.write('{"type": "anytls", "server": "127.0.0.1", "sever_port": 1}')
        log.transport.signalProcess("HUP")
        match = yield log.wait_for_line(
            r"reload \(SIGHUP\) failed, keeping the current configuration: .*sever_port",
            15,
            since=mark,
        )
        self.assertIn("server_port", match.string)  # the did-you-mean hint
        yield h.echo_once(client, echo, b"still the second server\n")
        self.assertEqual(second.sessions_opened(), 1)
        h.assert_alive(client.process)
