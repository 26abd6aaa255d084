"""The client's Twisted shells on fake transports: the session (preamble, padded Settings,
SYN, SYNACK, FIN, heartbeats, padding updates, flow control), the session manager (reuse
through the pool, reaping, the watchdog) and the local SOCKS5 / HTTP port."""

from __future__ import annotations

import struct
from typing import Any, List

import attr
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import directlyProvides

from anytls_twisted.client import httpproxy, socks
from anytls_twisted.client.local import LocalProxyFactory
from anytls_twisted.client.pool import Pool
from anytls_twisted.client.session import PREAMBLE_SIZE, UNANSWERED, ClientSessionProtocol
from anytls_twisted.client.sessions import SessionManager
from anytls_twisted.client.stream import PENDING_LIMIT, SYNACK_WAIT, ClientStream, LocalSide
from anytls_twisted.protocol import codec
from anytls_twisted.protocol.address import Destination, encode_socks_address, parse_socks_address
from anytls_twisted.protocol.auth import password_digest
from anytls_twisted.protocol.codec import Command
from anytls_twisted.protocol.padding import DEFAULT_SCHEME, PaddingScheme, PaddingWriter

from .helpers import capture_events

PASSWORD = "unit-secret"
LOW = lambda low, high: low  # noqa: E731  (the smallest size of every range: deterministic)


class Transport(StringTransport):
    """A StringTransport that remembers each write and its producer's pauses."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        self.writes: List[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class Server:
    """The far end of a client session: reads its preamble and frames, sends frames."""

    def __init__(self, session: ClientSessionProtocol, transport: Transport) -> None:
        self.session = session
        self.transport = transport
        self.decoder = codec.FrameDecoder()
        self.preamble = b""

    def frames(self, waste: bool = False) -> List[codec.Frame]:
        data = self.transport.value()
        self.transport.clear()
        if not self.preamble:
            padding = struct.unpack(">H", data[32:34])[0]
            self.preamble, data = data[: PREAMBLE_SIZE + padding], data[PREAMBLE_SIZE + padding :]
        frames = self.decoder.feed(data)
        return [f for f in frames if waste or f.cmd != Command.WASTE]

    def send(self, cmd: int, sid: int = 0, data: bytes = b"") -> None:
        self.session.dataReceived(codec.encode_frame(cmd, sid, data))


class Local(LocalSide):
    def __init__(self) -> None:
        self.transport = Transport()
        self.events: List[Any] = []

    def established(self) -> None:
        self.events.append("established")

    def refused(self, error: str) -> None:
        self.events.append(("refused", error))


def connected_session(clock=None, owner=None, randrange=LOW):
    clock = clock or MemoryReactorClock()
    session = ClientSessionProtocol(PASSWORD, DEFAULT_SCHEME, clock, owner, "unit", randrange)
    transport = Transport()
    session.makeConnection(transport)
    return session, Server(session, transport), clock


EXAMPLE = Destination("example.com", 443)


def open_stream(session, clock, destination=EXAMPLE):
    local = Local()
    stream = ClientStream(local, destination, clock)
    session.open(stream)
    return stream, local


class ClientSessionTests(unittest.TestCase):
    def test_preamble_alone_then_settings_held_until_the_first_syn(self):
        session, server, clock = connected_session()
        # The preamble (packet 0, padded by 0=30-30) is written; Settings waits for a SYN.
        self.assertEqual(
            server.transport.writes, [password_digest(PASSWORD) + b"\0\x1e" + bytes(30)]
        )
        open_stream(session, clock)
        frames = server.frames()
        self.assertEqual(server.preamble[:32], password_digest(PASSWORD))
        self.assertEqual([f.cmd for f in frames], [Command.SETTINGS, Command.SYN, Command.PSH])
        settings = codec.parse_settings(frames[0].data)
        self.assertEqual(settings["v"], "2")
        self.assertEqual(settings["client"], "unit")
        self.assertEqual(settings["padding-md5"], DEFAULT_SCHEME.md5)
        self.assertEqual(frames[1].sid, 1)
        self.assertEqual(parse_socks_address(frames[2].data)[0], Destination("example.com", 443))

    def test_packet_one_is_padded_as_the_writer_says(self):
        session, server, clock = connected_session()
        open_stream(session, clock, Destination("a.io", 443))
        # Settings + SYN + PSH(address) are packet 1: under 100 bytes here, so they are
        # padded with Waste to 100 (1=100-400, the low end), exactly as the writer does it.
        writes = server.transport.writes[1:]
        payload = b"".join(codec.encode_frame(*f) for f in server.frames())
        self.assertEqual(writes, PaddingWriter(DEFAULT_SCHEME, LOW, buffering=False).write(payload))
        self.assertEqual([len(w) for w in writes], [100])

    def test_a_long_packet_one_is_cut_at_the_planned_size(self):
        session, server, clock = connected_session()
        open_stream(session, clock, Destination("x" * 100 + ".example", 443))
        self.assertEqual(len(server.transport.writes[1]), 100)
        self.assertEqual(len(server.transport.writes), 3)
        self.assertEqual(
            [f.cmd for f in server.frames()], [Command.SETTINGS, Command.SYN, Command.PSH]
        )

    def test_synack_success_and_data_both_ways(self):
        session, server, clock = connected_session()
        stream, local = open_stream(session, clock)
        server.frames()
        stream.send(b"hello")
        self.assertEqual([(f.cmd, f.data) for f in server.frames()], [(Command.PSH, b"hello")])
        self.assertEqual(local.events, [])
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, 1)
        self.assertEqual(local.events, ["established"])
        server.send(Command.PSH, 1, b"world")
        self.assertEqual(local.transport.value(), b"world")

    def test_synack_error_refuses_the_local_side_and_sends_fin(self):
        ended = []

        class Owner:
            def __getattr__(self, name):
                return lambda *args: ended.append(name) if name == "stream_ended" else None

        session, server, clock = connected_session(owner=Owner())
        stream, local = open_stream(session, clock)
        server.frames()
        server.send(Command.SYNACK, 1, b"dial tcp: connection refused")
        self.assertEqual(local.events, [("refused", "remote: dial tcp: connection refused")])
        self.assertEqual([(f.cmd, f.sid) for f in server.frames()], [(Command.FIN, 1)])
        self.assertTrue(local.transport.disconnecting)
        self.assertEqual(session.streams, {})
        self.assertEqual(ended, ["stream_ended"])

    def test_fin_from_the_server_closes_the_local_connection_without_a_fin_back(self):
        session, server, clock = connected_session()
        stream, local = open_stream(session, clock)
        server.frames()
        server.send(Command.SYNACK, 1)
        server.send(Command.PSH, 1, b"bye")
        server.send(Command.FIN, 1)
        self.assertEqual(local.transport.value(), b"bye")
        self.assertTrue(local.transport.disconnecting)
        self.assertEqual(server.frames(), [])
        stream.local_closed()  # the application's close that follows sends nothing either
        self.assertEqual(server.frames(), [])

    def test_local_close_sends_fin(self):
        session, server, clock = connected_session()
        stream, local = open_stream(session, clock)
        server.frames()
        stream.local_closed()
        self.assertEqual([(f.cmd, f.sid) for f in server.frames()], [(Command.FIN, 1)])

    def test_heartbeat_answered_for_v2_servers(self):
        session, server, clock = connected_session()
        open_stream(session, clock)
        server.frames()
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.HEART_REQUEST, 7)
        self.assertEqual([(f.cmd, f.sid) for f in server.frames()], [(Command.HEART_RESPONSE, 7)])

    def test_padding_update_applies_to_the_next_packets(self):
        session, server, clock = connected_session()
        open_stream(session, clock)
        scheme = b"stop=3\n0=30-30\n1=100-100\n2=300-300"
        server.send(Command.UPDATE_PADDING_SCHEME, 0, scheme)
        self.assertEqual(session.writer.scheme, PaddingScheme.parse(scheme))
        server.transport.writes.clear()
        session.write_frames(codec.encode_frame(Command.PSH, 1, b"x"))
        self.assertEqual([len(w) for w in server.transport.writes], [300])  # packet 2

    def test_session_close_ends_every_stream(self):
        session, server, clock = connected_session()
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        stream, local = open_stream(session, clock)
        session.connectionLost(Failure(ConnectionError("reset")))
        self.assertEqual(local.events, [("refused", "session closed: reset")])
        self.assertTrue(local.transport.disconnecting)
        self.assertTrue(session.closed)

    def test_alert_closes_the_session(self):
        session, server, clock = connected_session()
        open_stream(session, clock)
        server.send(Command.ALERT, 0, b"go away")
        self.assertTrue(server.transport.disconnecting)

    def test_v1_server_data_establishes_and_the_wait_gives_up_on_silence(self):
        session, server, clock = connected_session()
        stream, local = open_stream(session, clock)
        server.send(Command.PSH, 1, b"banner")
        self.assertEqual(local.events, ["established"])
        # A v1 session is known now: the next stream is established at once.
        stream.local_closed()
        second, local2 = open_stream(session, clock)
        self.assertEqual(local2.events, ["established"])

    def test_v2_server_silent_past_the_wait_refuses(self):
        session, server, clock = connected_session()
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        stream, local = open_stream(session, clock)
        clock.advance(SYNACK_WAIT)
        self.assertEqual(local.events[0][0], "refused")
        self.assertIn("timed out", local.events[0][1])
        self.assertEqual(
            socks.reply_code_for_error(local.events[0][1]), socks.Reply.HOST_UNREACHABLE
        )

    def test_flow_control_both_ways(self):
        session, server, clock = connected_session()
        stream, local = open_stream(session, clock)
        server.send(Command.SYNACK, 1)
        # The server is backed up: streams stop reading their applications.
        session.pauseProducing()
        self.assertEqual(local.transport.producerState, "paused")
        session.resumeProducing()
        self.assertEqual(local.transport.producerState, "producing")
        # The application is backed up: the session stops reading the server.
        local.transport.producer.pauseProducing()
        self.assertEqual(server.transport.producerState, "paused")
        local.transport.producer.resumeProducing()
        self.assertEqual(server.transport.producerState, "producing")


class UnansweredSessionTests(unittest.TestCase):
    """A server that closes the session after the handshake without sending a byte has refused
    it (AnyTLS servers close silently on a wrong password): one warning naming the server and
    the likely cause, and the stream's application gets that reason."""

    def setUp(self):
        self.events = capture_events(self)

    def warnings(self):
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]

    def test_closed_before_any_byte_is_reported_as_a_probable_wrong_password(self):
        session, server, clock = connected_session()
        stream, local = open_stream(session, clock)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(local.events, [("refused", f"session closed: {UNANSWERED}")])
        self.assertEqual(
            socks.reply_code_for_error(local.events[0][1]), socks.Reply.GENERAL_FAILURE
        )
        self.assertTrue(local.transport.disconnecting)
        [line] = self.warnings()
        self.assertIn("the server 127.0.0.1:5555 closed session", line)
        self.assertIn("password is probably wrong", line)

    def test_server_settings_first_is_an_answer(self):
        session, server, clock = connected_session()
        stream, local = open_stream(session, clock)
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            local.events, [("refused", "session closed: Connection was closed cleanly.")]
        )
        self.assertEqual(self.warnings(), [])

    def test_a_synack_first_is_an_answer(self):
        """A server that skips ServerSettings: the stream's SYNACK is its first byte."""
        session, server, clock = connected_session()
        stream, local = open_stream(session, clock)
        server.send(Command.SYNACK, stream.sid)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(local.events, ["established"])
        self.assertEqual(self.warnings(), [])

    def test_a_failed_tls_handshake_is_not_blamed_on_the_password(self):
        session = ClientSessionProtocol(PASSWORD, DEFAULT_SCHEME, MemoryReactorClock())
        transport = Transport()
        directlyProvides(transport, ISSLTransport)
        session.makeConnection(transport)
        self.assertFalse(session.handshake_done)
        stream, local = open_stream(session, session.clock)
        session.connectionLost(Failure(ValueError("certificate pin mismatch")))
        self.assertEqual(local.events, [("refused", "session closed: certificate pin mismatch")])
        self.assertEqual(self.warnings(), [])

    def test_after_the_tls_handshake_silence_is_blamed(self):
        session = ClientSessionProtocol(PASSWORD, DEFAULT_SCHEME, MemoryReactorClock())
        transport = Transport()
        directlyProvides(transport, ISSLTransport)
        session.makeConnection(transport)
        session.handshakeCompleted()
        stream, local = open_stream(session, session.clock)
        session.connectionLost(Failure(ConnectionLost("reset")))
        self.assertEqual(local.events, [("refused", f"session closed: {UNANSWERED}")])
        self.assertEqual(len(self.warnings()), 1)

    def test_closed_by_the_client_is_not_blamed(self):
        session, server, clock = connected_session()
        session.close("the client is stopping")
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.warnings(), [])

    def test_the_manager_does_not_redial_for_the_failed_stream(self):
        """One local attempt, one connection to the server: no retry storm."""
        m, endpoint, clock = manager()
        local = Local()
        m.open(ClientStream(local, EXAMPLE, clock))
        endpoint.sessions[0].session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(local.events, [("refused", f"session closed: {UNANSWERED}")])
        clock.advance(60)
        self.assertEqual((m.dials, len(endpoint.sessions), len(m.pool)), (1, 1, 0))
        self.assertEqual(len(self.warnings()), 1)


class FakeEndpoint:
    """Connects to a fresh fake transport at once (or fails); records each session. With
    ``tls``, the transport says it is TLS (its handshake then completes only when a test calls
    ``handshakeCompleted``)."""

    def __init__(self, tls: bool = False) -> None:
        self.sessions: List[Server] = []
        self.fail = False
        self.tls = tls

    def connect(self, factory):
        if self.fail:
            return defer.fail(ConnectionRefusedError("refused"))
        session = factory.buildProtocol(None)
        transport = Transport()
        if self.tls:
            directlyProvides(transport, ISSLTransport)
        session.makeConnection(transport)
        self.sessions.append(Server(session, transport))
        return defer.succeed(session)


def set_endpoint(m, endpoint):
    """Make ``m``'s (first) server dial through ``endpoint`` (a callable) from now on."""
    health = m.servers.servers[0]
    health.config = attr.evolve(health.config, endpoint=endpoint)


def manager(**pool):
    clock = MemoryReactorClock()
    endpoint = FakeEndpoint()
    m = SessionManager(lambda: endpoint, PASSWORD, clock, Pool(**pool), randrange=LOW)
    return m, endpoint, clock


class SessionManagerTests(unittest.TestCase):
    def stream(self, m, clock):
        local = Local()
        s = ClientStream(local, Destination("example.com", 80), clock)
        m.open(s)
        return s, local

    def test_sequential_streams_reuse_one_session(self):
        m, endpoint, clock = manager()
        for _ in range(20):
            s, local = self.stream(m, clock)
            server = endpoint.sessions[0]
            server.send(Command.SERVER_SETTINGS, 0, b"v=2")
            server.send(Command.SYNACK, s.sid)
            self.assertEqual(local.events, ["established"])
            s.local_closed()
        self.assertEqual((len(endpoint.sessions), m.dials), (1, 1))
        frames = endpoint.sessions[0].frames()
        self.assertEqual([f.sid for f in frames if f.cmd == Command.SYN], list(range(1, 21)))
        self.assertEqual(len(m.pool), 1)

    def test_concurrent_streams_get_their_own_sessions(self):
        m, endpoint, clock = manager()
        self.stream(m, clock)
        self.stream(m, clock)
        self.assertEqual(len(endpoint.sessions), 2)

    def test_dial_failure_refuses_the_stream(self):
        m, endpoint, clock = manager()
        endpoint.fail = True
        s, local = self.stream(m, clock)
        self.assertEqual(local.events[0][0], "refused")
        self.assertIn("cannot reach the server", local.events[0][1])
        self.assertTrue(local.transport.disconnecting)

    def test_idle_sessions_reaped(self):
        m, endpoint, clock = manager(idle_session_check_interval=10, idle_session_timeout=10)
        m.startService()
        s, local = self.stream(m, clock)
        s.local_closed()
        clock.advance(10)
        self.assertFalse(endpoint.sessions[0].transport.disconnecting)
        clock.advance(10)
        self.assertTrue(endpoint.sessions[0].transport.disconnecting)
        endpoint.sessions[0].session.connectionLost(Failure(ConnectionError("closed")))
        self.assertEqual((m.pool.live, len(m.sessions)), (0, 0))
        m.stopService()

    def test_closed_idle_session_is_not_reused(self):
        m, endpoint, clock = manager()
        s, local = self.stream(m, clock)
        s.local_closed()
        endpoint.sessions[0].session.connectionLost(Failure(ConnectionError("closed")))
        self.stream(m, clock)
        self.assertEqual(len(endpoint.sessions), 2)

    def test_padding_update_reaches_new_sessions(self):
        m, endpoint, clock = manager()
        self.stream(m, clock)
        scheme = b"stop=2\n0=10-10\n1=50-50"
        endpoint.sessions[0].send(Command.UPDATE_PADDING_SCHEME, 0, scheme)
        self.stream(m, clock)
        self.assertEqual(endpoint.sessions[1].session.machine.padding.raw, scheme)
        self.assertEqual(len(endpoint.sessions[1].transport.writes[0]), PREAMBLE_SIZE + 10)

    def reused(self):
        """A v2 session whose first stream was answered and ended, and a second stream on it
        (reused: watched) that gets no SYNACK."""
        m, endpoint, clock = manager()
        s, local = self.stream(m, clock)
        server = endpoint.sessions[0]
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, 1)
        s.local_closed()
        s2, local2 = self.stream(m, clock)
        return server, clock, local2

    def test_watchdog_resets_an_unanswered_stream_on_a_live_session(self):
        server, clock, local2 = self.reused()
        server.send(Command.PSH, 99, b"")  # a frame: the session is alive
        clock.advance(3)
        self.assertEqual(local2.events[0][0], "refused")
        self.assertFalse(server.transport.disconnecting)

    def test_watchdog_closes_a_silent_session(self):
        server, clock, local2 = self.reused()
        clock.advance(3)
        self.assertTrue(server.transport.disconnecting)

    def test_stop_closes_every_session(self):
        m, endpoint, clock = manager()
        m.startService()
        self.stream(m, clock)
        m.stopService()
        self.assertTrue(endpoint.sessions[0].transport.aborted)


class LocalProxyTests(unittest.TestCase):
    def setUp(self):
        self.m, self.endpoint, self.clock = manager()
        self.factory = LocalProxyFactory(self.m, self.clock)
        self.local = self.factory.buildProtocol(None)
        self.transport = Transport()
        self.local.makeConnection(self.transport)

    def server(self):
        server = self.endpoint.sessions[0]
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        return server

    def socks_connect(self, host=b"example.com", port=443):
        self.local.dataReceived(b"\x05\x01\x00")
        self.assertEqual(self.transport.value(), b"\x05\x00")
        self.transport.clear()
        request = b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack(">H", port)
        self.local.dataReceived(request)

    def test_socks5_connect_waits_for_synack_then_relays(self):
        self.socks_connect()
        self.assertEqual(self.transport.value(), b"")  # no reply before the SYNACK
        server = self.server()
        frames = server.frames()
        # The domain goes to the server unresolved.
        self.assertEqual(frames[-1].data, encode_socks_address(Destination("example.com", 443)))
        server.send(Command.SYNACK, 1)
        self.assertEqual(self.transport.value()[:2], b"\x05\x00")
        self.transport.clear()
        self.local.dataReceived(b"GET /")
        self.assertEqual([f.data for f in server.frames()], [b"GET /"])
        server.send(Command.PSH, 1, b"200 OK")
        self.assertEqual(self.transport.value(), b"200 OK")
        self.local.connectionLost(Failure(ConnectionError("done")))
        self.assertEqual([f.cmd for f in server.frames()], [Command.FIN])

    def test_socks4a_connect_with_a_name(self):
        self.local.dataReceived(b"\x04\x01\x01\xbb\x00\x00\x00\x01user\x00example.com\x00")
        server = self.server()
        frames = server.frames()
        self.assertEqual(frames[2].data, encode_socks_address(Destination("example.com", 443)))
        server.send(Command.SYNACK, 1)
        self.assertEqual(self.transport.value()[:2], b"\x00\x5a")

    def test_socks5_synack_error_becomes_a_reply_code(self):
        self.socks_connect()
        server = self.server()
        server.send(Command.SYNACK, 1, b"dial tcp 10.0.0.1:80: connect: connection refused")
        self.assertEqual(self.transport.value()[:2], b"\x05\x05")
        self.assertTrue(self.transport.disconnecting)

    def test_socks5_bind_refused(self):
        self.local.dataReceived(b"\x05\x01\x00\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
        self.assertEqual(self.transport.value()[-10:-8], b"\x05\x07")
        self.assertTrue(self.transport.disconnecting)

    def test_http_connect(self):
        self.local.dataReceived(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\nHELLO"
        )
        server = self.server()
        frames = server.frames()
        self.assertEqual(frames[2].data, encode_socks_address(Destination("example.com", 443)))
        self.assertEqual(frames[3].data, b"HELLO")
        server.send(Command.SYNACK, 1)
        self.assertEqual(self.transport.value(), httpproxy.connection_established())

    def test_http_forward_sends_the_rewritten_head(self):
        """The request goes upstream in origin form; the response reaches the application
        saying ``Connection: close`` (the origin's keep-alive removed), body untouched."""
        self.local.dataReceived(b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n")
        server = self.server()
        frames = server.frames()
        self.assertEqual(frames[2].data, encode_socks_address(Destination("example.com", 80)))
        self.assertTrue(frames[3].data.startswith(b"GET /x HTTP/1.1\r\n"))
        server.send(Command.SYNACK, 1)
        server.send(Command.PSH, 1, b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n")
        self.assertEqual(self.transport.value(), b"")
        server.send(Command.PSH, 1, b"Content-Length: 2\r\n\r\nok")
        self.assertEqual(
            self.transport.value(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        )

    def test_http_refused_stream_is_a_502(self):
        self.local.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        server = self.server()
        server.send(Command.SYNACK, 1, b"lookup example.com: no such host")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"no such host", self.transport.value())

    def test_http_bad_request(self):
        self.local.dataReceived(b"GET /relative HTTP/1.1\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(self.transport.disconnecting)


class PendingBoundTests(unittest.TestCase):
    """What the application sends while the session is being dialled is bounded: past
    PENDING_LIMIT its connection stops being read, and is read again once the stream is on a
    session (unless that session is itself backed up)."""

    def setUp(self):
        from .test_client_reload import PendingEndpoint

        self.clock = MemoryReactorClock()
        self.endpoint = PendingEndpoint()
        self.m = SessionManager(lambda: self.endpoint, PASSWORD, self.clock, Pool(), randrange=LOW)
        self.local = Local()
        self.stream = ClientStream(self.local, Destination("example.com", 80), self.clock)
        self.m.open(self.stream)

    def test_paused_past_the_limit_then_resumed_and_nothing_lost(self):
        chunk = b"x" * 16384
        sent = 0
        while self.local.transport.producerState == "producing":
            self.stream.send(chunk)
            sent += len(chunk)
            self.assertLessEqual(sent, PENDING_LIMIT + len(chunk))
        self.assertGreater(sent, PENDING_LIMIT)
        session = self.endpoint.finish()
        self.assertEqual(self.local.transport.producerState, "producing")
        server = Server(session, session.transport)
        payload = b"".join(f.data for f in server.frames() if f.cmd == Command.PSH)
        address = encode_socks_address(Destination("example.com", 80))
        self.assertEqual(payload, address + chunk * (sent // len(chunk)))

    def test_stays_paused_when_the_session_is_backed_up(self):
        for _ in range(5):
            self.stream.send(b"y" * 16384)
        self.assertEqual(self.local.transport.producerState, "paused")
        self.stream.pauseProducing()  # the session says: backed up
        self.stream.opened(_IdleContext(), 1, False)
        self.assertEqual(self.local.transport.producerState, "paused")
        self.stream.resumeProducing()
        self.assertEqual(self.local.transport.producerState, "producing")


class _IdleContext:
    """A stream context that accepts writes and does nothing."""

    session_id = 0
    peer_version = 2

    def write(self, stream, data):
        pass

    def end(self, stream, reason, error=None):
        pass
