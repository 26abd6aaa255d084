"""End to end behind a real HAProxy: sing-box -> HAProxy (TCP mode, send-proxy-v2) -> our
server on a ``haproxy:ssl:`` port (PROXY header first, then our TLS, then AnyTLS).

HAProxy connects to our server from 127.0.0.2 (``source``), while sing-box reaches HAProxy from
127.0.0.1, so an address taken from the socket instead of the PROXY header cannot pass for the
client's. HAProxy logs each connection's client and its own outgoing address (``logasap``), and
the server's ``session N open from PEER`` line must name exactly that client.

Skipped when HAProxy is not installed (``scripts/test.sh`` installs Debian's package in CI).
"""

from __future__ import annotations

import os
import re
import shutil

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from .e2e_support import (
    Harness,
    ProcessGone,
    TrackedProtocol,
    e2e_test,
    free_port,
    label,
    payload_bytes,
    poll_until,
    wait_for_port,
    within,
)

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_SOURCE = "127.0.0.2"  # HAProxy's side of its connections to our server

#: One line per connection to HAProxy, written as soon as the server side is connected.
HAPROXY_LINE = re.compile(
    r"haproxy-conn client=(?P<client>[0-9.]+):(?P<client_port>\d+) "
    r"backend_source=(?P<source>[0-9.]+):(?P<source_port>\d+)"
)
SESSION_LINE = r"session (\S+) open from (?P<host>[0-9.]+):(?P<port>\d+) user"

HAPROXY_CONFIG = """\
global
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    option logasap
    log-format "haproxy-conn client=%ci:%cp backend_source=%bi:%bp"
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend anytls
    bind 127.0.0.1:{listen_port}
    default_backend servers
backend servers
    server s1 127.0.0.1:{server_port} send-proxy-v2 source {source}
"""


def haproxy_available() -> bool:
    return os.path.isfile(HAPROXY) and os.access(HAPROXY, os.X_OK)


class _Silent(TrackedProtocol):
    """Sends a few bytes on connect and records whether anything comes back."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)


class HAProxyEndToEndTests(unittest.TestCase):
    timeout = 180  # a backstop; every wait has its own deadline

    def setUp(self):
        if not haproxy_available():
            raise unittest.SkipTest(
                f"HAProxy is not installed ({HAPROXY}); apt-get install haproxy"
            )
        self.h = Harness(self)

    @defer.inlineCallbacks
    def start_haproxy(self, server_port: int):
        """HAProxy in the foreground (``-db``) in front of ``server_port``; returns
        ``(process, listen_port)`` once it accepts."""
        for attempt in range(3):
            listen_port = free_port("127.0.0.1")
            path = os.path.join(self.h.base, f"haproxy-{attempt}.cfg")
            with open(path, "w") as f:
                f.write(
                    HAPROXY_CONFIG.format(
                        listen_port=listen_port, server_port=server_port, source=HAPROXY_SOURCE
                    )
                )
            check = self.h.spawn("haproxy-check", HAPROXY, ["-c", "-f", path], short_lived=True)
            yield within(check.ended.wait(), 30.0, "haproxy -c")
            if check.exit_code != 0:
                raise AssertionError(f"haproxy -c rejected {path}:\n{check.tail()}")
            proc = self.h.spawn("haproxy", HAPROXY, ["-db", "-f", path])
            try:
                yield wait_for_port("127.0.0.1", listen_port, 30.0, proc)
                return proc, listen_port
            except ProcessGone:
                if attempt < 2 and "Address already in use" in proc.tail():
                    continue
                raise

    @staticmethod
    def connections(haproxy):
        return [
            m.groupdict()
            for m in map(HAPROXY_LINE.search, haproxy.matching_lines(HAPROXY_LINE.pattern))
            if m
        ]

    @e2e_test
    def test_sing_box_through_haproxy_send_proxy_v2(self):
        """The echo works through sing-box -> HAProxy -> haproxy:ssl:, and the session is logged
        with the client's address as HAProxy saw it, not HAProxy's own connection."""
        server = yield self.h.start_server(
            kind="twistd", ports=["haproxy:ssl:{port}:interface=127.0.0.1"]
        )
        yield server.process.wait_for_line(
            r"listening on haproxy:ssl:\d+:interface=127\.0\.0\.1 with TLS",
            10.0,
            what="the TLS listening line",
        )
        haproxy, haproxy_port = yield self.start_haproxy(server.port)
        client = yield self.h.start_client(server, server_port=haproxy_port)
        echo = self.h.tcp_echo()
        data = payload_bytes(label("through haproxy"), 100_000)
        yield self.h.echo_once(client, echo, data)
        self.assertEqual(echo.accepted, 1)

        match = yield server.process.wait_for_line(SESSION_LINE, 10.0, what="the session open line")
        peer = (match.group("host"), match.group("port"))
        self.assertNotEqual(
            peer[0],
            HAPROXY_SOURCE,
            f"the session names HAProxy's own connection ({match.group(0)}), not the client",
        )
        # HAProxy logs the connection once its side to us is up, i.e. before our session opens.
        seen = yield poll_until(
            lambda: [c for c in self.connections(haproxy) if c["client_port"] == peer[1]],
            10.0,
            f"HAProxy's log line for the client port {peer[1]}",
        )
        [conn] = seen
        self.assertEqual(conn["client"], "127.0.0.1")
        self.assertEqual(conn["source"], HAPROXY_SOURCE)
        self.assertEqual(peer, (conn["client"], conn["client_port"]))
        # Nothing the server logged names HAProxy's side of the connection.
        self.assertEqual(server.process.matching_lines(re.escape(HAPROXY_SOURCE)), [])
        # And that port is sing-box's: its session (kept in its pool after the stream) is still
        # connected to HAProxy from there.
        self.assertIn(int(peer[1]), client_source_ports(client.process.pid, haproxy_port))
        self.h.assert_alive(server.process)
        self.h.assert_alive(haproxy)

    @e2e_test
    def test_no_proxy_header_is_dropped(self):
        """A client that reaches a haproxy:ssl: port directly (no PROXY header, just a TLS
        ClientHello) is disconnected without a byte: the header is required."""
        server = yield self.h.start_server(
            kind="twistd", ports=["haproxy:ssl:{port}:interface=127.0.0.1"]
        )
        conn = _Silent(bytes.fromhex("16030100c4010000c00303") + b"\x00" * 40)
        conn.registry = self.h.registry
        factory = protocol.ClientFactory.forProtocol(lambda: conn)
        reactor.connectTCP("127.0.0.1", server.port, factory, timeout=10)
        yield within(
            conn.lost.wait(), 10.0, "the server to drop a connection without a PROXY header"
        )
        self.assertEqual(conn.received, 0)
        self.assertEqual(server.process.matching_lines(SESSION_LINE), [])
        self.h.assert_alive(server.process)


def client_source_ports(pid: int, remote_port: int) -> set:
    """Local ports of process ``pid``'s TCP connections to ``remote_port`` (from /proc)."""
    from .e2e_support import _proc_tcp_rows, socket_inodes

    inodes = socket_inodes(pid) or set()
    return {
        lport
        for _, lport, _, rport, _, inode in _proc_tcp_rows()
        if rport == remote_port and inode in inodes
    }
