"""End to end: our ``twistd anytls`` server with a real sing-box client, over loopback.

Each test starts its own server (``ANYTLS_E2E_SERVER=singbox`` swaps in sing-box's own anytls
inbound, to compare against the reference) and one or more sing-box clients, and talks to
loopback origins through the clients' SOCKS5 inbound. See ``tests/e2e_support.py``.

Throughout: a SOCKS success reply proves nothing, so every check is on bytes that came back.
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet import defer, reactor
from twisted.python import log
from twisted.trial import unittest

from .e2e_support import (
    PASSWORD,
    SERVER_KIND,
    Harness,
    MiB,
    TwistdServer,
    client_config,
    connections_to,
    e2e_test,
    free_port,
    ipv6_available,
    label,
    make_self_signed,
    payload_bytes,
    poll_until,
    run_to_completion,
    singbox_binary,
    spki_pin,
    within,
)

#: Datagram sizes for the UDP checks: tiny, around common MTUs, and a few large ones. The
#: sing-box client's SOCKS UDP relay reads at most 8192 bytes per datagram, SOCKS header included
#: (larger ones come back silently truncated, with sing-box's own server too), so stay below.
UDP_SIZES = [
    4,
    5,
    17,
    64,
    100,
    333,
    512,
    999,
    1024,
    1200,
    1350,
    1400,
    1452,
    1472,
    1500,
    2048,
    4000,
    6000,
    7000,
    8000,
]


def udp_sizes(count: int = 50):
    return [UDP_SIZES[i % len(UDP_SIZES)] for i in range(count)]


class EndToEndTests(unittest.TestCase):
    # A backstop only: every wait inside a test has its own, shorter deadline.
    timeout = 240

    def setUp(self):
        self.h = Harness(self)

    # 1 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_tcp_64mib_download_and_upload(self):
        """64 MiB each way through one client, checked by sha256 on the receiving side."""
        server = yield self.h.start_server()
        client = yield self.h.start_client(server)
        source, sink = self.h.tcp_source(), self.h.tcp_sink()
        size = 64 * MiB
        down = yield self.h.download(client, source, size, label("download-64"))
        up = yield self.h.upload(client, sink, size, label("upload-64"))
        self.assertEqual((source.accepted, sink.accepted), (1, 1))
        self.assertEqual(sink.bytes_in, 8 + size)
        self.h.assert_alive(server.process)
        log.msg(
            f"e2e: 64 MiB down {down:.2f}s ({64 / down:.0f} MiB/s), up {up:.2f}s ({64 / up:.0f} MiB/s)"
        )

    # 2 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_sequential_then_parallel_streams(self):
        """20 sequential echo streams reuse sessions; then 50 streams live at once all work."""
        server = yield self.h.start_server()
        client = yield self.h.start_client(server)
        echo = self.h.tcp_echo()
        for i in range(20):
            yield self.h.echo_once(
                client, echo, b"sequential %d " % i + payload_bytes(label(f"seq{i}"), 200 + i * 37)
            )
        self.assertEqual(echo.accepted, 20)
        # Sessions are reused: with no reuse there would be 20 TLS connections.
        live = connections_to(server.port)
        self.assertLessEqual(
            live, 4, f"{live} TLS connections to the server after 20 sequential streams"
        )
        self.assertGreaterEqual(
            live, 1, "no live TLS connection to the server: sessions are not kept"
        )
        opened = server.sessions_opened()
        if opened is not None:
            self.assertLessEqual(
                opened, 4, f"the server authenticated {opened} sessions for 20 sequential streams"
            )

        count = 50
        streams = yield defer.gatherResults(
            [self.h.socks_connect(client, echo.host, echo.port) for _ in range(count)],
            consumeErrors=True,
        )
        payloads = [
            b"parallel %d " % i + payload_bytes(label(f"par{i}"), 1000 + 97 * i)
            for i in range(count)
        ]
        for stream, data in zip(streams, payloads):
            stream.write(data)
        replies = yield within(
            defer.gatherResults(
                [s.read(len(p)) for s, p in zip(streams, payloads)], consumeErrors=True
            ),
            30.0,
            f"{count} parallel echoes",
        )
        for i, (got, data) in enumerate(zip(replies, payloads)):
            self.assertEqual(got, data, f"parallel stream {i}: echo mismatch")
        # All 50 were open at the same moment, each with its own origin connection.
        self.assertEqual(echo.accepted, 20 + count)
        self.assertGreaterEqual(echo.max_concurrent, count)
        yield within(
            defer.gatherResults([s.close() for s in streams], consumeErrors=True),
            15.0,
            "streams to close",
        )
        self.h.assert_alive(server.process)

    # 3 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_udp_ipv4(self):
        """50 datagrams of varied sizes to a 127.0.0.1 UDP echo, each echoed intact."""
        server = yield self.h.start_server()
        client = yield self.h.start_client(server)
        echo = self.h.udp_echo("127.0.0.1")
        assoc = yield self.h.udp_associate(client)
        resends = yield assoc.exchange(echo.host, echo.port, udp_sizes(50), label("udp4"))
        self.assertEqual(assoc.errors, [])
        self.assertGreaterEqual(echo.received, 50)
        self.assertLessEqual(resends, 10, f"{resends} resends for 50 datagrams on loopback")

    @e2e_test
    def test_udp_ipv6_and_server_over_ipv6(self):
        """A client reaching the server on [::1]: UDP to a ::1 echo and TCP to a ::1 echo."""
        if not ipv6_available():
            raise unittest.SkipTest("::1 is not available on this host")
        server = yield self.h.start_server(ipv6=True)
        client = yield self.h.start_client(server, server_host="::1")
        udp = self.h.udp_echo("::1")
        tcp = self.h.tcp_echo("::1")
        assoc = yield self.h.udp_associate(client)
        resends = yield assoc.exchange("::1", udp.port, udp_sizes(50), label("udp6"))
        self.assertEqual(assoc.errors, [])
        self.assertLessEqual(resends, 10)
        self.assertTrue(all(src[0] == "::1" for src in udp.sources), udp.sources)
        yield self.h.echo_once(client, tcp, b"over ipv6 " + payload_bytes(label("tcp6"), 5000))
        self.assertEqual(tcp.accepted, 1)
        self.assertGreaterEqual(
            connections_to(server.port6), 1, "the client is not connected to the server's ::1 port"
        )
        self.assertEqual(connections_to(server.port), 0, "the client used the IPv4 port")

    # 4 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_closed_port_fails_cleanly_then_next_stream_works(self):
        server = yield self.h.start_server()
        client = yield self.h.start_client(server)
        echo = self.h.tcp_echo()
        yield self.h.echo_once(client, echo, b"warm up the session")
        closed = free_port("127.0.0.1")
        yield self.h.expect_refused(client, "127.0.0.1", closed)
        for i in range(3):
            yield self.h.echo_once(client, echo, b"after the failure %d" % i)
        self.assertEqual(echo.accepted, 4)
        self.h.assert_alive(server.process)

    # 5 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_private_destinations_refused_by_default(self):
        """Without --allow-private: loopback by address and by name gets nothing; the server
        stays up and keeps serving the same client."""
        server = yield self.h.start_server(allow_private=False)
        client = yield self.h.start_client(server)
        echo = self.h.tcp_echo("127.0.0.1")
        destinations = [("127.0.0.1", echo.port), ("localhost", echo.port)]
        if ipv6_available():
            echo6 = self.h.tcp_echo("::1")
            destinations.append(("::1", echo6.port))
        else:
            echo6 = None
        for host, port in destinations:
            yield self.h.expect_refused(client, host, port)
        self.assertEqual(echo.accepted, 0, "the server connected to a loopback origin")
        if echo6 is not None:
            self.assertEqual(echo6.accepted, 0, "the server connected to a ::1 origin")
        self.h.assert_alive(server.process)
        # The server still accepts and authenticates this client (a new stream on a session).
        yield self.h.expect_refused(client, "127.0.0.1", echo.port)
        self.assertEqual(echo.accepted, 0)
        self.h.assert_alive(server.process)

    # 6 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_wrong_password_gets_no_service(self):
        server = yield self.h.start_server()
        bad = yield self.h.start_client(server, password="not-the-password")
        echo = self.h.tcp_echo()
        for _ in range(2):
            yield self.h.expect_refused(bad, echo.host, echo.port)
        self.assertEqual(echo.accepted, 0, "the server relayed for a client with a wrong password")
        if server.sessions_opened() is not None:
            self.assertEqual(server.sessions_opened(), 0)
        # A good client on the same server works: the failure was the password.
        good = yield self.h.start_client(server)
        yield self.h.echo_once(good, echo, b"right password")
        self.assertEqual(echo.accepted, 1)
        self.h.assert_alive(server.process)

    # 7 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_idle_session_reaped_and_client_recovers(self):
        """The server closes a session idle past --idle-session-timeout; the client (whose own
        timeout is 300 s) drops it and opens a new one for the next stream."""
        server = yield self.h.start_server(idle_session_timeout=2, idle_session_check_interval=1)
        client = yield self.h.start_client(
            server, idle_session_timeout=300, idle_session_check_interval=60
        )
        echo = self.h.tcp_echo()
        mark = server.process.line_count
        yield self.h.echo_once(client, echo, b"before the reaper")
        closed_at = reactor.seconds()
        self.assertEqual(
            connections_to(server.port), 1, "expected one pooled session after one stream"
        )
        yield server.process.wait_for_line(
            TwistdServer.IDLE_CLOSE,
            15.0,
            since=mark,
            what="the server to log closing the idle session",
        )
        idle_for = reactor.seconds() - closed_at
        self.assertGreaterEqual(
            idle_for, 1.5, f"the session was reaped {idle_for:.2f}s after its last stream"
        )
        # The client sees the close and drops the session: no TLS connection is left.
        yield poll_until(
            lambda: connections_to(server.port) == 0, 10.0, "the client to drop the reaped session"
        )
        yield self.h.echo_once(client, echo, b"after the reaper")
        self.assertEqual(echo.accepted, 2)
        self.assertEqual(connections_to(server.port), 1, "expected one new session")
        self.assertEqual(
            server.sessions_opened(), 2, "expected the client to open exactly one new session"
        )
        self.h.assert_alive(server.process)

    # 8 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_singbox_112_client(self):
        """A sing-box 1.12 client: 16 MiB down and up, and UDP to a 127.0.0.1 echo."""
        server = yield self.h.start_server()
        client = yield self.h.start_client(server, version="1.12")
        version = yield self._version_of(client)
        self.assertTrue(version.startswith("1.12."), f"the 1.12 client binary says it is {version}")
        source, sink = self.h.tcp_source(), self.h.tcp_sink()
        yield self.h.download(client, source, 16 * MiB, label("download-112"))
        yield self.h.upload(client, sink, 16 * MiB, label("upload-112"))
        udp = self.h.udp_echo("127.0.0.1")
        assoc = yield self.h.udp_associate(client)
        resends = yield assoc.exchange(udp.host, udp.port, udp_sizes(50), label("udp-112"))
        self.assertEqual(assoc.errors, [])
        self.assertLessEqual(resends, 10)

    @defer.inlineCallbacks
    def _version_of(self, client):
        proc = yield run_to_completion(self.h, "version", client.process.command[0], ["version"])
        match = re.search(r"sing-box version (\S+)", proc.tail())
        return match.group(1) if match else "unknown"

    # 9 ----------------------------------------------------------------------------------------

    @e2e_test
    def test_alpn_client_and_pinned_client(self):
        """A client offering ALPN h2/http1.1 and a client trusting by public-key pin both work."""
        server = yield self.h.start_server()
        if SERVER_KIND == "twistd":
            self.assertEqual(
                server.logged_pin, server.pin, "the logged pin is not the certificate's SPKI sha256"
            )
        alpn = yield self.h.start_client(server, alpn=["h2", "http/1.1"])
        pinned = yield self.h.start_client(server, use_pin=True)
        echo, source = self.h.tcp_echo(), self.h.tcp_source()
        for client in (alpn, pinned):
            yield self.h.echo_once(client, echo, b"hello from " + client.name.encode())
            yield self.h.download(client, source, 4 * MiB, label(client.name))
        self.assertEqual((echo.accepted, source.accepted), (2, 2))
        self.h.assert_alive(server.process)

    # configs -----------------------------------------------------------------------------------

    @e2e_test
    def test_client_configs_accepted_by_both_versions(self):
        """Every client config variant the tests use passes ``sing-box check`` in 1.12 and 1.14
        (the public-key pin exists from 1.13 on, so 1.12 must refuse it)."""
        cert, _ = make_self_signed(self.h.base)
        variants = {
            "plain": {},
            "alpn": {"alpn": ["h2", "http/1.1"]},
            "idle": {"idle_session_timeout": 300, "idle_session_check_interval": 60},
            "ipv6-server": {"server_host": "::1"},
        }
        for version in ("1.14", "1.12"):
            binary = singbox_binary(version)
            for name, extra in variants.items():
                extra = dict(extra)
                config = client_config(
                    free_port(),
                    extra.pop("server_host", "127.0.0.1"),
                    443,
                    PASSWORD,
                    cert_path=cert,
                    **extra,
                )
                path = os.path.join(self.h.base, f"{version}-{name}.json")
                with open(path, "w") as f:
                    json.dump(config, f)
                yield self.h.check_config(binary, path, f"check-{version}-{name}")
            pinned = client_config(free_port(), "127.0.0.1", 443, PASSWORD, pin=spki_pin(cert))
            path = os.path.join(self.h.base, f"{version}-pin.json")
            with open(path, "w") as f:
                json.dump(pinned, f)
            proc = yield run_to_completion(
                self.h, f"check-{version}-pin", binary, ["check", "-c", path]
            )
            if version == "1.14":
                self.assertEqual(proc.exit_code, 0, proc.tail())
            else:
                self.assertNotEqual(
                    proc.exit_code, 0, "sing-box 1.12 accepted certificate_public_key_sha256"
                )
