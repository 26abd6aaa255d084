"""End to end: our client with several servers, on loopback, every wait bounded (issue 10,
point 7). Real processes (``twistd -n anytls-client``, our ``twistd -n anytls``, sing-box 1.14's
``anytls`` inbound), real sockets, SOCKS5 applications and echo origins from
:mod:`tests.e2e_support`:

* a server killed (SIGKILL) in the middle of a 200-stream run: no stream lost, the server
  marked down once, then restarted on its port and back in use (ours killed, sing-box killed);
  and a kill with streams in flight: those end cleanly, every later one succeeds;
* every server down: a local connection fails at once (SOCKS error, HTTP 502), one log line
  each;
* a path that goes silent (a relay that black-holes its connections without closing them):
  an idle session is asked before reuse and replaced, a busy one is presumed dead and closed;
* pre-warmed sessions: the first stream costs no handshake;
* a v2ray-shaped config file with two servers: round robin reaches both.
"""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Dict, List, Optional, Tuple

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from .e2e_support import (
    PASSWORD,
    Harness,
    SingBoxServer,
    SocksError,
    TrackedProtocol,
    TwistdServer,
    e2e_test,
    free_port,
    label,
    payload_bytes,
    poll_until,
    within,
)
from .test_e2e_client import start_our_client

HOST = "127.0.0.1"
#: Streams of the failover runs, and how many run at once.
STREAMS = 200
PARALLEL = 10


def uri(port: int) -> str:
    return f"anytls://{PASSWORD}@{HOST}:{port}/?sni=localhost&insecure=1"


def name(port: int) -> str:
    """How the client names a server in its log, as a regular expression."""
    return re.escape(f"{HOST}:{port}")


def destinations(server) -> List[str]:
    """Stream destinations the server logged (ours at debug level, sing-box at info)."""
    pattern = r"stream \S+ open to (\S+)" if server.kind == "twistd" else SingBoxServer.DESTINATION
    regex = re.compile(pattern)
    found = (regex.search(line) for line in server.process.matching_lines(pattern))
    return [m.group(1) for m in found if m is not None]


def kill(server) -> defer.Deferred:
    """SIGKILL ``server``'s process (no goodbye to anyone); fires once it has been reaped."""
    proc = server.process
    proc.stop_requested = True  # an intended death: the harness's cleanup does not report it
    proc.transport.signalProcess("KILL")
    return within(proc.ended.wait(), 10.0, f"{proc.name} to die of SIGKILL")


class Outcomes:
    """What the streams of one run did: index -> "ok" or the error, with start times."""

    def __init__(self) -> None:
        self.results: Dict[int, str] = {}
        self.started: Dict[int, float] = {}

    @property
    def ok(self) -> List[int]:
        return sorted(i for i, r in self.results.items() if r == "ok")

    def failed(self) -> List[Tuple[int, str]]:
        return sorted((i, r) for i, r in self.results.items() if r != "ok")


@defer.inlineCallbacks
def one_stream(h: Harness, client, echo, index: int, outcomes: Outcomes, seconds: float = 15.0):
    """SOCKS5 CONNECT to the echo origin, a payload unique to ``index`` there and back, close.
    Records "ok", or how it failed (a hang is an E2ETimeout after ``seconds``)."""
    data = b"stream %d " % index + payload_bytes(label(f"fo{index}"), 500 + (index * 37) % 3000)
    outcomes.started[index] = reactor.seconds()
    try:
        yield h.echo_once(client, echo, data, seconds)
    except Exception as e:
        outcomes.results[index] = f"{type(e).__name__}: {e}"
    else:
        outcomes.results[index] = "ok"


@defer.inlineCallbacks
def run_streams(h: Harness, client, echo, indices, outcomes: Outcomes, parallel=PARALLEL):
    """The streams numbered ``indices``, ``parallel`` at a time (each worker takes the next
    number when its stream is done); fires when every worker is done."""
    numbers = iter(indices)

    @defer.inlineCallbacks
    def worker():
        for index in numbers:
            yield one_stream(h, client, echo, index, outcomes)

    yield defer.gatherResults([worker() for _ in range(parallel)])


class Relay:
    """A loopback TCP relay to ``target_port`` that can be told to go silent: ``blackhole()``
    makes every connection it carries drop what arrives from either side, without closing
    anything (a dead NAT mapping, a laptop's lost Wi-Fi); connections made afterwards are
    relayed normally."""

    def __init__(self, h: Harness, target_port: int) -> None:
        self.h = h
        self.target_port = target_port
        self.pairs: List[Tuple[_RelayHalf, _RelayHalf]] = []
        self.dropped = 0
        factory = protocol.Factory.forProtocol(lambda: _RelayHalf(self, inbound=True))
        self.listener = reactor.listenTCP(0, factory, interface=HOST)
        h.registry.ports.append(self.listener)
        self.port = self.listener.getHost().port

    @property
    def accepted(self) -> int:
        return len(self.pairs)

    def blackhole(self) -> int:
        """Silence every connection relayed so far; returns how many."""
        for inbound, outbound in self.pairs:
            inbound.silent = outbound.silent = True
        return len(self.pairs)


class _RelayHalf(TrackedProtocol):
    def __init__(self, relay: Relay, inbound: bool) -> None:
        super().__init__()
        self.relay = relay
        self.inbound = inbound
        self.registry = relay.h.registry
        self.peer: Optional[_RelayHalf] = None
        self.silent = False
        self._early: List[bytes] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        if not self.inbound:
            return
        self.transport.pauseProducing()
        outbound = _RelayHalf(self.relay, inbound=False)
        self.relay.pairs.append((self, outbound))
        d = connectProtocol(TCP4ClientEndpoint(reactor, HOST, self.relay.target_port), outbound)

        def linked(_):
            self.peer, outbound.peer = outbound, self
            self.transport.resumeProducing()

        d.addCallbacks(linked, lambda _: self.transport.loseConnection())

    def dataReceived(self, data: bytes) -> None:
        if self.silent:
            self.relay.dropped += len(data)
        elif self.peer is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        if self.peer is not None and not self.silent:
            self.peer.transport.loseConnection()


class _HttpConnect(TrackedProtocol):
    """An application asking the client's HTTP proxy for a CONNECT; keeps what comes back."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.data = b""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(
            f"CONNECT {self.target} HTTP/1.1\r\nHost: {self.target}\r\n\r\n".encode("ascii")
        )

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class ClientFailoverTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.h = Harness(self)

    @defer.inlineCallbacks
    def two_servers(self, first: str, second: str):
        """Two servers of the given kinds ("twistd" or "singbox"), started side by side."""
        servers = yield defer.gatherResults(
            [
                self.h.start_server(kind=kind, log_level="debug" if kind == "twistd" else None)
                for kind in (first, second)
            ]
        )
        return servers

    @defer.inlineCallbacks
    def kill_between_streams(self, killed_kind: str):
        """The 200-stream run of :meth:`test_our_server_killed_between_streams` with the server
        of ``killed_kind`` killed; the other kind survives."""
        other = "singbox" if killed_kind == "twistd" else "twistd"
        killed, survivor = yield self.two_servers(killed_kind, other)
        client = yield start_our_client(
            self.h, ["--server", uri(killed.port), "--server", uri(survivor.port)]
        )
        echo = self.h.tcp_echo()
        outcomes = Outcomes()
        half = STREAMS // 2
        yield run_streams(self.h, client, echo, range(half), outcomes)
        self.assertEqual(outcomes.failed(), [])
        # Both servers carried streams before the kill (round robin), so the client holds
        # pooled sessions to the one about to die.
        self.assertIn(f"{HOST}:{echo.port}", destinations(killed))
        self.assertIn(f"{HOST}:{echo.port}", destinations(survivor))

        # The barrier: every worker has finished its stream; none is in flight.
        yield kill(killed)
        self.assertEqual(killed.process.exit_signal, signal.SIGKILL)
        mark = client.process.line_count
        down = rf"server {name(killed.port)} is down: "
        second_half = run_streams(self.h, client, echo, range(half, STREAMS), outcomes)
        # While they run: once the client has seen it down, the server comes back on its port.
        yield client.process.wait_for_line(down, 15.0, since=mark, what="the server marked down")
        yield self.h.restart_server(killed)
        yield within(second_half, 60.0, "the second 100 streams")

        self.assertEqual(outcomes.failed(), [])
        self.assertEqual(outcomes.ok, list(range(STREAMS)))
        self.assertEqual(echo.accepted, STREAMS)
        self.assertEqual(len(client.process.matching_lines(down)), 1)
        self.assertEqual(
            client.process.matching_lines(rf"server {name(survivor.port)} is down"), []
        )
        # Back up: probed in the background (a backoff of at most a few seconds by now).
        yield client.process.wait_for_line(
            rf"server {name(killed.port)} is up again", 40.0, since=mark, what="the server back up"
        )
        # New streams reach it again: 10 at once need 10 sessions, which round robin spreads
        # over both servers (and the probe's session is the newest idle one).
        before = len(destinations(killed))  # the restarted process's own log
        extra = Outcomes()
        yield run_streams(self.h, client, echo, range(STREAMS, STREAMS + PARALLEL), extra)
        self.assertEqual(extra.failed(), [])
        self.assertGreater(len(destinations(killed)), before)
        self.assertEqual(len(client.process.matching_lines(down)), 1)
        self.h.assert_alive(client.process)
        self.h.assert_alive(survivor.process)
        self.h.assert_alive(killed.process)

    @e2e_test
    def test_our_server_killed_between_streams(self):
        """Our server and sing-box's behind one client (round robin); 200 streams, 10 at a
        time, each a unique payload echoed back. After 100, with every worker between two
        streams, our server is killed (SIGKILL): the client's pooled sessions to it are dead,
        and the next 100 streams must all succeed anyway (dead sessions dropped or their
        streams moved, the failed dial retried on sing-box). The client logs "is down" for our
        server exactly once (never for sing-box); restarted on its port, the server is probed
        back ("is up again") and carries new streams."""
        yield self.kill_between_streams("twistd")

    @e2e_test
    def test_singbox_killed_between_streams(self):
        """The same with sing-box's server killed and ours surviving."""
        yield self.kill_between_streams("singbox")

    @e2e_test
    def test_streams_in_flight_when_a_server_dies(self):
        """No barrier: our server is killed while 10 streams run. Streams it carried end
        cleanly (a SOCKS error or a closed connection, within their deadline: none hangs), and
        every stream started after the kill succeeds."""
        killed, survivor = yield self.two_servers("twistd", "singbox")
        client = yield start_our_client(
            self.h, ["--server", uri(killed.port), "--server", uri(survivor.port)]
        )
        echo = self.h.tcp_echo()
        outcomes = Outcomes()
        run = run_streams(self.h, client, echo, range(STREAMS), outcomes)
        yield poll_until(lambda: len(outcomes.results) >= 50, 30.0, "50 streams done")
        yield kill(killed)
        killed_at = reactor.seconds()
        yield within(run, 60.0, f"the {STREAMS} streams")
        self.assertEqual(len(outcomes.results), STREAMS)
        hung = [(i, r) for i, r in outcomes.failed() if "timed out" in r]
        self.assertEqual(hung, [])
        for _index, result in outcomes.failed():
            self.assertRegex(result, r"^(SocksError|StreamClosed): ")
        after = [i for i, t in outcomes.started.items() if t > killed_at]
        self.assertGreater(len(after), 50)
        self.assertEqual([(i, outcomes.results[i]) for i in after if i not in outcomes.ok], [])
        self.assertLessEqual(len(outcomes.failed()), PARALLEL)
        self.h.assert_alive(client.process)

    @e2e_test
    def test_every_server_down_fails_at_once(self):
        """Two servers, neither listening: each local connection fails in under 2 s, SOCKS5
        with an error reply, HTTP CONNECT with 502, and the client logs one line for each."""
        ports = [free_port(HOST), free_port(HOST)]
        client = yield start_our_client(
            self.h, ["--server", uri(ports[0]), "--server", uri(ports[1])]
        )
        echo = self.h.tcp_echo()
        for attempt in range(3):
            started = reactor.seconds()
            with self.assertRaises(SocksError) as caught:
                yield self.h.socks_connect(client, HOST, echo.port, 10.0)
            elapsed = reactor.seconds() - started
            self.assertLess(elapsed, 2.0, f"attempt {attempt}")
            self.assertIn("reply code", str(caught.exception))
        for port in ports:
            self.assertEqual(
                len(client.process.matching_lines(rf"server {name(port)} is down: ")), 1
            )
        self.assertTrue(client.process.matching_lines(r"failed: every server is down"))

        started = reactor.seconds()
        app = _HttpConnect(f"{HOST}:{echo.port}")
        app.registry = self.h.registry
        yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, client.socks_port), app)
        yield within(app.lost.wait(), 10.0, "the HTTP proxy to answer and close")
        elapsed = reactor.seconds() - started
        self.assertLess(elapsed, 2.0)
        self.assertTrue(app.data.startswith(b"HTTP/1.1 502 "), app.data[:200])

        failed = rf"to {name(echo.port)} failed: "
        yield poll_until(
            lambda: len(client.process.matching_lines(failed)) >= 4, 5.0, "four failure lines"
        )
        self.assertEqual(len(client.process.matching_lines(failed)), 4)
        self.assertEqual(echo.accepted, 0)
        self.h.assert_alive(client.process)

    @e2e_test
    def test_a_silent_path_is_detected(self):
        """The client reaches our server through a relay that, when told, goes silent on the
        connections it carries (nothing forwarded, nothing closed); new connections still go
        through. With --heartbeat-idle 1 --heartbeat-timeout 1: the idle session, silent past
        1 s, is asked before reuse, gets no answer and is closed; the stream that waited goes on
        a new session and succeeds. The busy session (a stream open and idle) is asked by the
        liveness check, presumed dead, closed, and its application sees the connection close."""
        server = yield self.h.start_server(kind="twistd", log_level="debug")
        relay = Relay(self.h, server.port)
        client = yield start_our_client(
            self.h,
            ["--server", uri(relay.port), "--heartbeat-idle", "1", "--heartbeat-timeout", "1"],
        )
        echo = self.h.tcp_echo()
        busy = yield self.h.socks_connect(client, HOST, echo.port)
        busy.write(b"held open")
        got = yield within(busy.read(9), 10.0, "the busy stream's echo")
        self.assertEqual(got, b"held open")
        yield self.h.echo_once(client, echo, b"leaves an idle session")
        self.assertEqual(relay.accepted, 2)

        mark = client.process.line_count
        self.assertEqual(relay.blackhole(), 2)
        silenced = reactor.seconds()
        yield task.deferLater(reactor, 1.2, lambda: None)  # silent past --heartbeat-idle
        started = reactor.seconds()
        yield self.h.echo_once(client, echo, b"after the silence", 10.0)
        took = reactor.seconds() - started
        self.assertEqual(relay.accepted, 3)  # a new session, through a live path
        self.assertGreaterEqual(took, 0.9)  # it waited for the heartbeat's answer first
        self.assertLess(took, 5.0)
        self.assertEqual(
            len(
                client.process.matching_lines(
                    r"to the server closed: no answer to a heartbeat in 1s before reuse", mark
                )
            ),
            1,
        )
        # The busy session: asked once silent for 1 s, aborted 1 s later (liveness ticks as
        # often as the heartbeat settings need).
        yield within(busy.lost.wait(), 10.0, "the busy stream's application to be closed")
        closed_after = reactor.seconds() - silenced
        yield client.process.wait_for_line(
            r"to the server closed: no answer to a heartbeat in 1s \(presumed dead\)",
            5.0,
            since=mark,
            what="the busy session presumed dead",
        )
        self.assertGreater(relay.dropped, 0)
        self.assertEqual(relay.accepted, 3)
        self.assertLess(closed_after, 5.0)
        self.h.assert_alive(client.process)

    @e2e_test
    def test_prewarmed_session_carries_the_first_stream(self):
        """--prewarm 1 against our server: a session is opened and answered at start-up; after
        a quiet moment the first stream goes on it (the server's first session), dialling
        nothing for it; while that stream is open a new pre-warmed session replaces the one
        taken."""
        server = yield self.h.start_server(kind="twistd", log_level="debug")
        client = yield start_our_client(self.h, ["--server", uri(server.port), "--prewarm", "1"])
        warmed = r"session \d+ to the server open \(\S+, ready, pre-warmed\)"
        yield client.process.wait_for_line(warmed, 10.0, what="the pre-warmed session")
        yield poll_until(lambda: server.sessions_opened() == 1, 10.0, "the server's session")
        (line,) = server.process.matching_lines(TwistdServer.SESSION_OPEN)
        warm_id = re.search(r"session (\S+) open from", line).group(1)
        yield task.deferLater(reactor, 0.3, lambda: None)  # a quiet moment
        self.assertEqual(server.sessions_opened(), 1)
        echo = self.h.tcp_echo()
        held = yield self.h.socks_connect(client, HOST, echo.port)
        held.write(b"on a warm session")
        got = yield within(held.read(17), 10.0, "the held stream's echo")
        self.assertEqual(got, b"on a warm session")
        # The stream ran on the session pre-warmed before it (the server's numbers).
        yield poll_until(
            lambda: f"{HOST}:{echo.port}" in destinations(server), 5.0, "the stream's log line"
        )
        (line,) = server.process.matching_lines(rf"open to {name(echo.port)}")
        self.assertIn(f"stream {warm_id}/1 open to", line)
        # With that session still busy, a replacement is pre-warmed (a moment later, so that
        # its handshake does not delay the stream); the client dialled no session for it.
        yield poll_until(
            lambda: len(client.process.matching_lines(warmed)) == 2, 10.0, "the next warm one"
        )
        opened = client.process.matching_lines(r"session \d+ to the server open")
        self.assertEqual(len(opened), 2)
        self.assertEqual(server.sessions_opened(), 2)
        self.h.assert_alive(client.process)

    @e2e_test
    def test_v2ray_config_with_two_servers(self):
        """A v2ray-shaped outbound with two servers (ours and sing-box's), allowInsecure and
        serverName localhost: two streams at once take two sessions, one on each server."""
        ours, singbox = yield self.two_servers("twistd", "singbox")
        outbound = {
            "protocol": "anytls",
            "settings": {
                "servers": [
                    {"address": HOST, "port": ours.port, "password": PASSWORD},
                    {"address": HOST, "port": singbox.port, "password": PASSWORD},
                ]
            },
            "streamSettings": {
                "security": "tls",
                "tlsSettings": {"serverName": "localhost", "allowInsecure": True},
            },
        }
        path = os.path.join(self.h.base, "v2ray.json")
        with open(path, "w") as f:
            json.dump({"outbounds": [outbound]}, f)
        client = yield start_our_client(self.h, ["--config", path])
        echo = self.h.tcp_echo()
        streams = yield defer.gatherResults(
            [self.h.socks_connect(client, HOST, echo.port) for _ in range(2)]
        )
        for i, stream in enumerate(streams):
            stream.write(b"v2ray %d" % i)
        got = yield within(defer.gatherResults([s.read(7) for s in streams]), 10.0, "two echoes")
        self.assertEqual(got, [b"v2ray 0", b"v2ray 1"])
        yield within(defer.gatherResults([s.close() for s in streams]), 10.0, "the closes")
        for server in (ours, singbox):
            yield poll_until(
                lambda s=server: f"{HOST}:{echo.port}" in destinations(s),
                5.0,
                f"a stream on {server.kind}",
            )
        self.assertEqual(ours.sessions_opened(), 1)
        self.h.assert_alive(client.process)
