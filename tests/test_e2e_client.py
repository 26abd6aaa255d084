"""End to end: our ``twistd -n anytls-client`` against our server and against sing-box's
``anytls`` inbound (1.14), on loopback, every wait bounded. An application speaks SOCKS5 or
HTTP CONNECT to the client's local port; loopback origins check the bytes."""

from __future__ import annotations

import base64
import json
import os
import urllib.parse

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from .e2e_support import (
    PASSWORD,
    REPO_ROOT,
    Harness,
    MiB,
    _OneShotFactory,
    connections_to,
    e2e_test,
    free_port,
    ipv6_available,
    label,
    payload_bytes,
    retry_port_clash,
    twistd_executable,
    wait_for_port,
    within,
)
from .test_e2e import udp_sizes


class OurClient:
    """What the harness's SOCKS helpers need of a client: a name and the local port."""

    SESSION_OPEN = r"session \d+ to the server open"

    def __init__(self, process, socks_port: int) -> None:
        self.process = process
        self.name = process.name
        self.socks_port = socks_port

    def sessions_dialled(self) -> int:
        return len(self.process.matching_lines(self.SESSION_OPEN))


@defer.inlineCallbacks
def start_our_client(h: Harness, server_args):
    """``twistd -n anytls-client`` on a free loopback port; ``server_args`` say which server
    (``--server URI`` or ``--config FILE``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env["PYTHONUNBUFFERED"] = "1"
    command = twistd_executable()

    @defer.inlineCallbacks
    def start(attempt):
        port = free_port("127.0.0.1")
        args = ["-n", "--pidfile=", "anytls-client", "--listen", f"tcp:{port}:interface=127.0.0.1"]
        process = h.spawn(
            "anytls-client", command[0], command[1:] + args + server_args, env=env, cwd=REPO_ROOT
        )
        yield wait_for_port("127.0.0.1", port, 60.0, process)
        return OurClient(process, port)

    client = yield retry_port_clash(start)
    yield client.process.wait_for_line(r"anytls-client: proxy", 10.0, what="the start-up line")
    return client


class _HTTPConnect(protocol.Protocol):
    """An HTTP CONNECT client: sends the request, then ``payload``; collects what comes back."""

    def __init__(self, target: str, payload: bytes) -> None:
        self.target = target
        self.payload = payload
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.expected = 0

    def connectionMade(self) -> None:
        self.transport.write(
            f"CONNECT {self.target} HTTP/1.1\r\nHost: {self.target}\r\n\r\n".encode()
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        head, sep, rest = self.received.partition(b"\r\n\r\n")
        if sep and not self.expected:
            self.expected = len(self.payload)
            self.transport.write(self.payload)
        if sep and len(rest) >= self.expected and not self.done.called:
            self.transport.loseConnection()
            self.done.callback(self.received)


class ClientEndToEndTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        self.h = Harness(self)

    @defer.inlineCallbacks
    def sequential_echoes(self, client, count=20):
        echo = self.h.tcp_echo()
        for i in range(count):
            data = b"sequential %d " % i + payload_bytes(label(f"cseq{i}"), 200 + i * 37)
            yield self.h.echo_once(client, echo, data)
        self.assertEqual(echo.accepted, count)

    @e2e_test
    def test_our_client_with_our_server(self):
        """SOCKS5 CONNECT through our client to our server: 20 sequential echoes on one reused
        session, 8 MiB each way checked by sha256, an HTTP CONNECT, and a refused destination
        reported as a SOCKS error (the client waits for the SYNACK)."""
        server = yield self.h.start_server(kind="twistd")
        uri = f"anytls://{urllib.parse.quote(PASSWORD)}@127.0.0.1:{server.port}/?sni=localhost&insecure=1"
        client = yield start_our_client(self.h, ["--server", uri])
        yield self.sequential_echoes(client)
        self.assertEqual(client.sessions_dialled(), 1)
        self.assertEqual(server.sessions_opened(), 1)
        self.assertEqual(connections_to(server.port), 1)

        source, sink = self.h.tcp_source(), self.h.tcp_sink()
        yield self.h.download(client, source, 8 * MiB, label("cdown"))
        yield self.h.upload(client, sink, 8 * MiB, label("cup"))

        echo = self.h.tcp_echo()
        probe = _HTTPConnect(f"127.0.0.1:{echo.port}", b"through HTTP CONNECT")
        reactor.connectTCP("127.0.0.1", client.socks_port, _OneShotFactory(probe), timeout=10)
        got = yield within(probe.done, 15.0, "an HTTP CONNECT echo")
        self.assertTrue(got.startswith(b"HTTP/1.1 200 "), got[:60])
        self.assertTrue(got.endswith(b"through HTTP CONNECT"), got[-60:])

        closed = free_port("127.0.0.1")
        how = yield self.h.expect_refused(client, "127.0.0.1", closed)
        self.assertEqual(how, "socks-error")
        self.h.assert_alive(client.process)
        self.h.assert_alive(server.process)

    @defer.inlineCallbacks
    def udp_echoes(self, client, tag):
        """UDP ASSOCIATE through our client: 30 datagrams to a 127.0.0.1 echo and (when
        available) 30 to a ::1 echo, each echoed intact."""
        assoc = yield self.h.udp_associate(client)
        echo4 = self.h.udp_echo("127.0.0.1")
        yield assoc.exchange(echo4.host, echo4.port, udp_sizes(30), label(tag + "4"))
        self.assertEqual(assoc.errors, [])
        self.assertGreaterEqual(echo4.received, 30)
        if ipv6_available():
            echo6 = self.h.udp_echo("::1")
            yield assoc.exchange("::1", echo6.port, udp_sizes(30), label(tag + "6"), first_id=30)
            self.assertEqual(assoc.errors, [])
            self.assertGreaterEqual(echo6.received, 30)

    @e2e_test
    def test_our_client_udp_associate_with_our_server(self):
        """SOCKS5 UDP ASSOCIATE through our client to our server (UoT v2, non-connect)."""
        server = yield self.h.start_server(kind="twistd")
        uri = f"anytls://{urllib.parse.quote(PASSWORD)}@127.0.0.1:{server.port}/?sni=localhost&insecure=1"
        client = yield start_our_client(self.h, ["--server", uri])
        yield self.udp_echoes(client, "cudp-ours")
        self.h.assert_alive(client.process)
        self.h.assert_alive(server.process)

    @e2e_test
    def test_our_client_udp_associate_with_singbox_server(self):
        """SOCKS5 UDP ASSOCIATE through our client to sing-box 1.14's anytls inbound."""
        server = yield self.h.start_server(kind="singbox")
        uri = f"anytls://{urllib.parse.quote(PASSWORD)}@127.0.0.1:{server.port}/?sni=localhost&insecure=1"
        client = yield start_our_client(self.h, ["--server", uri])
        yield self.udp_echoes(client, "cudp-sb")
        self.h.assert_alive(client.process)
        self.h.assert_alive(server.process)

    @e2e_test
    def test_our_client_with_singbox_server(self):
        """Against sing-box 1.14's anytls inbound, from a sing-box outbound file that verifies
        the server's certificate: 20 sequential echoes reusing a session, 4 MiB down."""
        server = yield self.h.start_server(kind="singbox")
        outbound = {
            "type": "anytls",
            "tag": "e2e",
            "server": "127.0.0.1",
            "server_port": server.port,
            "password": PASSWORD,
            "tls": {
                "enabled": True,
                "server_name": "localhost",
                "certificate_path": server.cert_path,
            },
        }
        path = os.path.join(self.h.base, "outbound.json")
        with open(path, "w") as f:
            json.dump({"outbounds": [outbound]}, f)
        client = yield start_our_client(self.h, ["--config", path])
        yield self.sequential_echoes(client)
        self.assertEqual(client.sessions_dialled(), 1)
        self.assertEqual(connections_to(server.port), 1)
        source = self.h.tcp_source()
        yield self.h.download(client, source, 4 * MiB, label("cdown-sb"))
        self.h.assert_alive(client.process)
        self.h.assert_alive(server.process)

    @e2e_test
    def test_our_client_pins_the_certificate(self):
        """A sing-box outbound with the server's public-key pin: the pinned client relays; a URI
        with another pin (``--certificate-pin``) never reaches the server's application layer,
        the local connection fails, and the client logs the mismatch in one line."""
        server = yield self.h.start_server(kind="twistd")

        def outbound_file(name, pin):
            outbound = {
                "type": "anytls",
                "server": "127.0.0.1",
                "server_port": server.port,
                "password": PASSWORD,
                "tls": {
                    "enabled": True,
                    "server_name": "localhost",
                    "certificate_public_key_sha256": [pin],
                },
            }
            path = os.path.join(self.h.base, name)
            with open(path, "w") as f:
                json.dump(outbound, f)
            return path

        pinned = yield start_our_client(
            self.h, ["--config", outbound_file("pinned.json", server.pin)]
        )
        yield self.sequential_echoes(pinned, count=3)
        wrong_pin = base64.b64encode(b"\x00" * 32).decode("ascii")
        uri = f"anytls://{urllib.parse.quote(PASSWORD)}@127.0.0.1:{server.port}/?sni=localhost"
        wrong = yield start_our_client(self.h, ["--server", uri, "--certificate-pin", wrong_pin])
        echo = self.h.tcp_echo()
        how = yield self.h.expect_refused(wrong, "127.0.0.1", echo.port)
        self.assertIn(how, ("socks-error", "closed"))
        self.assertEqual(echo.accepted, 0)
        yield wrong.process.wait_for_line(r"certificate pin mismatch", 10.0, what="the pin error")
        self.assertEqual(server.sessions_opened(), 1)  # only the pinned client's session
        self.h.assert_alive(wrong.process)
