"""End to end: our ``twistd -n anytls-client`` against our server and against sing-box's
``anytls`` inbound (1.14 and 1.12), on loopback, every wait bounded. An application (the
harness's SOCKS5 clients, or the real ``curl`` through the HTTP proxy) speaks to the client's
local port; loopback origins check the bytes.

:class:`ClientEndToEndMixin` holds the checks run against every server (a subclass per server:
:class:`OurServerTests`, :class:`SingBox114Tests`, :class:`SingBox112Tests`), grouped so that
each server and client process is started once per group."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import urllib.parse
from typing import List

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from .e2e_support import (
    PASSWORD,
    REPO_ROOT,
    Harness,
    MiB,
    SingBoxServer,
    SocksError,
    TwistdServer,
    connections_to,
    e2e_test,
    free_port,
    ipv6_available,
    label,
    payload_bytes,
    poll_until,
    retry_port_clash,
    run_to_completion,
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


WRONG_PASSWORD = (
    r"the server \S+ closed session \d+ before answering: the password is probably wrong"
)
CLIENT_SESSION_CLOSED = r"session \d+ to the server closed"
SIZE = 64 * MiB


def server_uri(server, password: str = PASSWORD) -> str:
    return (
        f"anytls://{urllib.parse.quote(password)}@127.0.0.1:{server.port}/?sni=localhost&insecure=1"
    )


@defer.inlineCallbacks
def sequential_echoes(case, client, count=20):
    """``count`` streams one after another to one echo origin, each checked."""
    echo = case.h.tcp_echo()
    for i in range(count):
        data = b"sequential %d " % i + payload_bytes(label(f"cseq{i}"), 200 + i * 37)
        yield case.h.echo_once(client, echo, data)
    case.assertEqual(echo.accepted, count)


class ClientEndToEndMixin:
    """Our client against one kind of server (``kind``, and ``singbox_version`` for sing-box),
    each check on a real loopback origin; a subclass per server."""

    kind = "twistd"
    singbox_version = "1.14"
    timeout = 300
    h: Harness

    def setUp(self):
        self.h = Harness(self)

    def start_server(self, **options):
        if self.kind == "twistd":
            options.setdefault("log_level", "debug")  # stream destinations are debug lines
        return self.h.start_server(kind=self.kind, singbox_version=self.singbox_version, **options)

    def destinations(self, server) -> List[str]:
        """The stream destinations the server logged (ours at debug level, sing-box at info)."""
        pattern = (
            r"stream \S+ open to (\S+)" if self.kind == "twistd" else SingBoxServer.DESTINATION
        )
        regex = re.compile(pattern)
        return [regex.search(line).group(1) for line in server.process.matching_lines(pattern)]

    def assert_one_session(self, client, server) -> None:
        self.assertEqual(client.sessions_dialled(), 1)
        self.assertEqual(connections_to(server.port), 1)
        if server.sessions_opened() is not None:
            self.assertEqual(server.sessions_opened(), 1)

    @defer.inlineCallbacks
    def socks_refusal(self, client, host, port):
        """The SOCKS5 reply code of a CONNECT that must be refused (our client waits for the
        server's SYNACK, so a refusal is a reply code, never success then a close)."""
        try:
            stream = yield self.h.socks_connect(client, host, port, 20.0)
        except SocksError as e:
            match = re.search(r"reply code (\d+)", str(e))
            if match is None:
                raise
            return int(match.group(1))
        stream.transport.abortConnection()
        self.fail(f"SOCKS success for {host}:{port}, where a refusal was expected")

    @defer.inlineCallbacks
    def echo_to(self, client, host, port, data, seconds=15.0):
        """One stream to ``host`` (an address or a name, sent as such): ``data`` echoed."""
        stream = yield self.h.socks_connect(client, host, port, seconds)
        stream.write(data)
        got = yield within(stream.read(len(data)), seconds, f"{len(data)} bytes echoed by {host}")
        self.assertEqual(got, data)
        yield within(stream.close(), seconds, "the stream to close")

    @defer.inlineCallbacks
    def parallel_echoes(self, client, count=50):
        echo = self.h.tcp_echo()
        streams = yield defer.gatherResults(
            [self.h.socks_connect(client, echo.host, echo.port, 30.0) for _ in range(count)]
        )
        sent = [payload_bytes(label(f"cpar{i}"), 4096 + 512 * i) for i in range(count)]
        for stream, data in zip(streams, sent):
            stream.write(data)
        got = yield within(
            defer.gatherResults([s.read(len(d)) for s, d in zip(streams, sent)]),
            60.0,
            f"{count} parallel echoes",
        )
        self.assertEqual(got, sent)
        self.assertEqual(echo.max_concurrent, count)
        yield within(defer.gatherResults([s.close() for s in streams]), 15.0, "streams to close")

    @defer.inlineCallbacks
    def curl(self, client, url: str, tunnel: bool, ok: bool = True):
        """``curl`` through the client's HTTP proxy (CONNECT with ``tunnel``, else the absolute
        URI); returns the body and curl's ``http_code http_connect``. curl must succeed, or
        with ``ok`` false fail."""
        binary = shutil.which("curl")
        if binary is None:
            raise unittest.SkipTest("curl is not installed (scripts/test.sh installs it)")
        fd, out = tempfile.mkstemp(suffix=".out", prefix="curl-", dir=self.h.base)
        os.close(fd)
        args = [
            "-sS",
            "--max-time",
            "30",
            "--noproxy",
            "",
            "-o",
            out,
            "-w",
            "%{http_code} %{http_connect}",
        ]
        args += ["-x", f"http://127.0.0.1:{client.socks_port}"] + (["-p"] if tunnel else []) + [url]
        proc = yield run_to_completion(self.h, "curl", binary, args, seconds=45.0)
        self.assertEqual(proc.exit_code == 0, ok, f"curl {' '.join(args)}: {proc.tail()}")
        with open(out, "rb") as f:
            return f.read(), proc.tail().strip()

    @defer.inlineCallbacks
    def curl_two_on_one_connection(self, client):
        """Two plain GETs in one curl run to an origin that answers keep-alive even to
        ``close``: the client's response says ``Connection: close``, so curl opens a second
        proxy connection for the second request instead of sending it down the first one."""
        binary = shutil.which("curl")
        if binary is None:
            raise unittest.SkipTest("curl is not installed (scripts/test.sh installs it)")
        origin = self.h.http_origin(b"kept alive", keep_alive=True)
        outs = [os.path.join(self.h.base, f"curl-ka-{i}.out") for i in (1, 2)]
        args = ["-sS", "--max-time", "30", "--noproxy", "", "-w", "%{num_connects} "]
        args += ["-x", f"http://127.0.0.1:{client.socks_port}"]
        for i, out in enumerate(outs, 1):
            args += ["-o", out, f"http://127.0.0.1:{origin.port}/{i}"]
        proc = yield run_to_completion(self.h, "curl", binary, args, seconds=45.0)
        self.assertEqual(proc.exit_code, 0, proc.tail())
        for out in outs:
            with open(out, "rb") as f:
                self.assertEqual(f.read(), b"kept alive")
        self.assertEqual(proc.tail().split(), ["1", "1"])  # a new proxy connection each
        self.assertEqual(origin.requests, ["GET /1 HTTP/1.1", "GET /2 HTTP/1.1"])

    @e2e_test
    def test_relays(self):
        """SOCKS5 and HTTP through our client: 20 sequential streams on one session; a closed
        port answered with a SOCKS error on that same session, which carries the next stream;
        a ``localhost`` destination the server sees as a name (the client resolved nothing);
        a ::1 destination; 50 parallel streams; 64 MiB down and up (sha256); curl through the
        HTTP proxy (CONNECT and an absolute-URI GET); then the server restarted on its port: the
        next stream works on a new session."""
        server = yield self.start_server()
        client = yield start_our_client(self.h, ["--server", server_uri(server)])
        yield sequential_echoes(self, client)
        self.assert_one_session(client, server)

        closed = free_port("127.0.0.1")
        code = yield self.socks_refusal(client, "127.0.0.1", closed)
        self.assertEqual(code, 5)  # connection refused
        echo = self.h.tcp_echo()
        yield self.echo_to(client, "localhost", echo.port, b"by name")
        self.assert_one_session(client, server)  # the refusal did not cost the session
        yield poll_until(
            lambda: f"localhost:{echo.port}" in self.destinations(server),
            10.0,
            "the server to log the destination localhost",
        )
        self.assertNotIn(f"127.0.0.1:{echo.port}", self.destinations(server))
        if ipv6_available():
            echo6 = self.h.tcp_echo("::1")
            yield self.echo_to(client, "::1", echo6.port, b"over IPv6")
            self.assertEqual(echo6.accepted, 1)

        yield self.parallel_echoes(client)

        yield self.h.download(client, self.h.tcp_source(), SIZE, label("cdown"))
        yield self.h.upload(client, self.h.tcp_sink(), SIZE, label("cup"))

        body = payload_bytes(label("curl-body"), 300_000)
        origin = self.h.http_origin(body)
        url = f"http://127.0.0.1:{origin.port}/blob?x=1"
        got, codes = yield self.curl(client, url, tunnel=True)
        self.assertEqual((len(got), got == body, codes), (len(body), True, "200 200"))
        got, codes = yield self.curl(client, url, tunnel=False)
        self.assertEqual((len(got), got == body, codes), (len(body), True, "200 000"))
        self.assertEqual(origin.requests, ["GET /blob?x=1 HTTP/1.1"] * 2)
        yield self.curl_two_on_one_connection(client)

        # The server restarts on the same port: the pooled sessions die, the next stream dials.
        dialled = client.sessions_dialled()
        yield self.h.restart_server(server)
        yield poll_until(
            lambda: len(client.process.matching_lines(CLIENT_SESSION_CLOSED)) == dialled,
            15.0,
            "the client to see its sessions closed",
        )
        yield self.h.echo_once(client, echo, b"after the restart")
        self.assertEqual(client.sessions_dialled(), dialled + 1)
        if server.sessions_opened() is not None:
            self.assertEqual(server.sessions_opened(), 1)
        self.h.assert_alive(client.process)
        self.h.assert_alive(server.process)

    @e2e_test
    def test_heartbeat_before_reuse(self):
        """The server answers a heartbeat: an idle session silent for longer than
        ``--heartbeat-idle`` is asked before reuse and, answered, carries the next stream (no
        new session, no "no answer" line)."""
        server = yield self.start_server()
        client = yield start_our_client(
            self.h,
            ["--server", server_uri(server), "--heartbeat-idle", "0.5", "--log-level", "debug"],
        )
        echo = self.h.tcp_echo()
        yield self.h.echo_once(client, echo, b"first")
        yield deferLater(reactor, 0.7, lambda: None)  # the session stays quiet past 0.5 s
        yield self.h.echo_once(client, echo, b"after a quiet while")
        self.assertEqual(len(client.process.matching_lines(r"asking it with a heartbeat")), 1)
        self.assertEqual(client.process.matching_lines(r"no answer to a heartbeat"), [])
        self.assertEqual(client.sessions_dialled(), 1)

    @e2e_test
    def test_prewarmed_session_carries_the_first_stream(self):
        """``--prewarm 1``: a session is dialled at start and announces itself without a stream
        (Settings alone); the server answers it, and the first stream then uses it; while that
        stream is open another is pre-warmed."""
        server = yield self.start_server()
        client = yield start_our_client(
            self.h, ["--server", server_uri(server), "--prewarm", "1", "--log-level", "debug"]
        )
        match = yield client.process.wait_for_line(
            r"session (\d+) to the server open \(\S+, ready, pre-warmed\)", 15.0
        )
        warm = match.group(1)
        echo = self.h.tcp_echo()
        held = yield self.h.socks_connect(client, "127.0.0.1", echo.port)
        held.write(b"no handshake for me")
        got = yield within(held.read(19), 10.0, "the echo on the warm session")
        self.assertEqual(got, b"no handshake for me")
        self.assertTrue(client.process.matching_lines(rf"stream {warm}/1 open to "))
        # Taking it (the stream still open) made the client warm another one, also answered.
        yield poll_until(
            lambda: len(client.process.matching_lines(r"ready, pre-warmed")) == 2,
            15.0,
            "a second pre-warmed session",
        )

    @e2e_test
    def test_udp_associate(self):
        """SOCKS5 UDP ASSOCIATE (UoT v2, non-connect): 30 datagrams to a 127.0.0.1 echo and
        (when available) 30 to a ::1 echo, each echoed intact."""
        server = yield self.start_server()
        client = yield start_our_client(self.h, ["--server", server_uri(server)])
        assoc = yield self.h.udp_associate(client)
        tag = f"cudp-{self.kind}-{self.singbox_version}"
        echo4 = self.h.udp_echo("127.0.0.1")
        yield assoc.exchange(echo4.host, echo4.port, udp_sizes(30), label(tag + "4"))
        self.assertEqual(assoc.errors, [])
        self.assertGreaterEqual(echo4.received, 30)
        if ipv6_available():
            echo6 = self.h.udp_echo("::1")
            yield assoc.exchange("::1", echo6.port, udp_sizes(30), label(tag + "6"), first_id=30)
            self.assertEqual(assoc.errors, [])
            self.assertGreaterEqual(echo6.received, 30)
        self.h.assert_alive(client.process)
        self.h.assert_alive(server.process)

    @e2e_test
    def test_wrong_password(self):
        """A client with a wrong password: the first local attempt is one connection the
        server refuses, one warning line in the client's log and a SOCKS error; the server is
        then marked down, so the next attempts fail at once (SOCKS error, HTTP 502) without
        reaching it, and only the background probes (a growing backoff) knock again: fewer
        connections than attempts, no retry storm. A client with the right password on the
        same server then gets answers (ours runs without --allow-private: a policy refusal,
        twice on one session)."""
        ours = self.kind == "twistd"
        server = yield self.start_server(allow_private=not ours)
        bad = yield start_our_client(self.h, ["--server", server_uri(server, "not-the-password")])
        echo = self.h.tcp_echo()
        code = yield self.socks_refusal(bad, echo.host, echo.port)
        self.assertEqual(code, 1)  # general failure
        yield bad.process.wait_for_line(WRONG_PASSWORD, 10.0, what="the warning")
        yield bad.process.wait_for_line(r"server \S+ is down: ", 10.0, what="the server down")
        attempts = 1
        for _ in range(5):
            code = yield self.socks_refusal(bad, echo.host, echo.port)
            self.assertEqual(code, 1)
            attempts += 1
        self.assertTrue(bad.process.matching_lines(r"failed: every server is down"))
        # Through the HTTP proxy: CONNECT answered 502.
        _, codes = yield self.curl(bad, f"http://{echo.host}:{echo.port}/", tunnel=True, ok=False)
        self.assertEqual(codes.split()[-1], "502", codes)
        attempts += 1
        self.assertEqual(echo.accepted, 0)
        # Every connection the server refused is one warning in the client's log (the first
        # attempt's, then one per probe), and there are fewer of them than attempts.
        warned = len(bad.process.matching_lines(WRONG_PASSWORD))
        self.assertGreaterEqual(warned, 1)
        self.assertLess(warned, attempts)
        refused = yield self.server_saw_bad_sessions(server, warned)
        self.assertLessEqual(refused, warned + 1)  # at most one probe not yet logged
        self.assertLess(refused, attempts)

        good = yield start_our_client(self.h, ["--server", server_uri(server)])
        if ours:
            for _ in range(2):
                code = yield self.socks_refusal(good, echo.host, echo.port)
                self.assertEqual(code, 2)  # not allowed by the server's policy
            self.assertEqual(server.sessions_opened(), 1)
            self.assertEqual(good.sessions_dialled(), 1)
            self.assertTrue(
                server.process.matching_lines(r"destination refused: .*--allow-private")
            )
            self.assertEqual(good.process.matching_lines(WRONG_PASSWORD), [])
        else:
            yield self.h.echo_once(good, echo, b"right password")
        self.h.assert_alive(server.process)

    @defer.inlineCallbacks
    def server_saw_bad_sessions(self, server, count):
        """The server's own count of refused connections, once it is at least ``count``."""
        if self.kind == "twistd":
            pattern = r"closed before authentication: authentication failed"
        else:
            pattern = SingBoxServer.AUTH_FAILED
        yield poll_until(
            lambda: len(server.process.matching_lines(pattern)) >= count,
            10.0,
            f"the server to log {count} refused connections",
        )
        return len(server.process.matching_lines(pattern))


class OurServerTests(ClientEndToEndMixin, unittest.TestCase):
    kind = "twistd"

    @e2e_test
    def test_session_reaped_by_the_server(self):
        """Our server closes a session idle past --idle-session-timeout; the client drops it,
        and the next stream works on a new session."""
        server = yield self.start_server(idle_session_timeout=2, idle_session_check_interval=1)
        client = yield start_our_client(self.h, ["--server", server_uri(server)])
        echo = self.h.tcp_echo()
        yield self.h.echo_once(client, echo, b"before the reaper")
        mark = client.process.line_count
        yield server.process.wait_for_line(TwistdServer.IDLE_CLOSE, 15.0, what="the reaper")
        yield client.process.wait_for_line(
            r"session 1 to the server closed", 10.0, since=mark, what="the client to see it"
        )
        yield self.h.echo_once(client, echo, b"after the reaper")
        self.assertEqual(client.sessions_dialled(), 2)
        self.assertEqual(server.sessions_opened(), 2)
        self.h.assert_alive(client.process)


class SingBox114Tests(ClientEndToEndMixin, unittest.TestCase):
    kind = "singbox"
    singbox_version = "1.14"


class SingBox112Tests(ClientEndToEndMixin, unittest.TestCase):
    kind = "singbox"
    singbox_version = "1.12"


class ClientEndToEndTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        self.h = Harness(self)

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
        yield sequential_echoes(self, client)
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
        yield sequential_echoes(self, pinned, count=3)
        wrong_pin = base64.b64encode(b"\x00" * 32).decode("ascii")
        uri = f"anytls://{urllib.parse.quote(PASSWORD)}@127.0.0.1:{server.port}/?sni=localhost"
        wrong = yield start_our_client(self.h, ["--server", uri, "--certificate-pin", wrong_pin])
        echo = self.h.tcp_echo()
        how = yield self.h.expect_refused(wrong, "127.0.0.1", echo.port)
        self.assertIn(how, ("socks-error", "closed"))
        self.assertEqual(echo.accepted, 0)
        yield wrong.process.wait_for_line(r"certificate pin mismatch", 10.0, what="the pin error")
        self.assertEqual(wrong.process.matching_lines(WRONG_PASSWORD), [])  # not blamed on it
        self.assertEqual(server.sessions_opened(), 1)  # only the pinned client's session
        self.h.assert_alive(wrong.process)
