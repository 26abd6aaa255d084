"""Session behaviour on fake transports and a memory reactor: auth, settings, streams, bad input."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import readsize
from anytls_twisted.protocol import codec
from anytls_twisted.protocol.auth import encode_preamble
from anytls_twisted.protocol.codec import Command, Frame
from anytls_twisted.protocol.padding import PaddingScheme

from .helpers import PASSWORD, SETTINGS_V2, Server, unhex
from .test_codec import V5, V10_ERR, V10_OK, V12

ADDR_V4 = b"\x01\x7f\x00\x00\x01\x1f\x90"  # 127.0.0.1:8080
ADDR_PUBLIC = b"\x01\x08\x08\x08\x08\x00\x50"  # 8.8.8.8:80


def open_stream(client, sid=1, address=ADDR_V4, data=b""):
    client.frame(Command.SYN, sid)
    client.frame(Command.PSH, sid, address + data)


class AuthTests(SynchronousTestCase):
    def test_preamble_split_then_settings(self):
        """A preamble fed byte by byte, then Settings, gets exactly ServerSettings v=2 (V5)."""
        server = Server()
        client = server.connect()
        wire = encode_preamble(PASSWORD, 30) + codec.encode_frame(Command.SETTINGS, 0, SETTINGS_V2)
        for i in range(len(wire)):
            client.send(wire[i : i + 1])
        self.assertEqual(client.transport.value(), V5)
        self.assertEqual(client.proto.user, "alice")

    def test_nothing_sent_before_settings(self):
        """After a good preamble the server stays silent until Settings arrives."""
        client = Server().connect()
        client.auth(settings=None)
        self.assertEqual(client.transport.value(), b"")
        self.assertFalse(client.closed)

    def test_wrong_password_closed_silently(self):
        """A wrong digest closes the connection without a single byte sent."""
        server = Server()
        client = server.connect()
        client.send(
            encode_preamble("wrong", 30) + codec.encode_frame(Command.SETTINGS, 0, SETTINGS_V2)
        )
        self.assertTrue(client.closed)
        self.assertEqual(client.transport.value(), b"")
        self.assertIsNone(client.proto.user)

    def test_close_unregisters_producer(self):
        """Closing unregisters the session as producer: TLS only shuts down without one."""
        client = Server().connect()
        self.assertIs(client.transport.producer, client.proto)
        client.send(encode_preamble("wrong", 30))
        self.assertIsNone(client.transport.producer)
        self.assertTrue(client.transport.disconnecting)

    def test_close_aborts_silent_peer(self):
        """A peer that never completes the TLS close is aborted after the close grace."""
        from anytls_twisted.server.session import CLOSE_GRACE

        server = Server()
        client = server.connect()
        client.auth()
        client.proto.close("test")
        server.reactor.advance(CLOSE_GRACE - 0.1)
        self.assertFalse(client.transport.disconnected)
        server.reactor.advance(0.2)
        self.assertTrue(client.transport.disconnected)

    def test_close_resumes_paused_reading(self):
        """A session closed while reading is paused reads again, to see the close_notify."""
        server = Server()
        client = server.connect()
        client.auth()
        open_stream(client)
        _, origin = server.origin_connect()
        origin.producer.pauseProducing()
        self.assertEqual(client.transport.producerState, "paused")
        client.proto.close("test")
        self.assertEqual(client.transport.producerState, "producing")

    def test_second_user(self):
        client = Server().connect()
        client.auth(password="other")
        self.assertEqual(client.proto.user, "bob")

    def test_auth_timeout(self):
        """A peer that has not finished auth within --auth-timeout is dropped."""
        server = Server(auth_timeout=10)
        client = server.connect()
        client.send(encode_preamble(PASSWORD, 30)[:20])
        server.reactor.advance(9.9)
        self.assertFalse(client.closed)
        server.reactor.advance(0.2)
        self.assertTrue(client.transport.disconnected or client.transport.disconnecting)
        self.assertEqual(client.transport.value(), b"")

    def test_random_bytes_decided_at_32(self):
        """Random bytes are closed as soon as 32 are in (whatever padding length bytes 33-34
        announce), and fewer than 32 at the auth timeout: nothing can be decided before."""
        random = bytes(range(256)) * 300  # bytes 33-34 announce 8226 bytes of padding
        for size in (1, 31, 32, 33, 100, 70000):
            server = Server(auth_timeout=10)
            client = server.connect()
            client.send(random[:size])
            if size >= 32:
                self.assertTrue(client.transport.disconnecting, f"{size} bytes kept open")
            else:
                self.assertFalse(client.closed, f"{size} bytes closed before the timeout")
                server.reactor.advance(9.9)
                self.assertFalse(client.closed)
                server.reactor.advance(0.2)
                self.assertTrue(client.closed, f"{size} bytes not closed at the auth timeout")
            self.assertEqual(client.transport.value(), b"")
            self.assertIsNone(client.proto.user)

    def test_random_bytes_split_decided_at_32nd(self):
        """The decision falls on the read that brings the 32nd byte, not later."""
        server = Server()
        client = server.connect()
        client.send(b"\x16" * 31)
        self.assertFalse(client.closed)
        client.send(b"\x16\xff\xff")
        self.assertTrue(client.transport.disconnecting)

    def test_auth_in_time_cancels_timer(self):
        server = Server(auth_timeout=10)
        client = server.connect()
        client.auth()
        server.reactor.advance(60)
        self.assertFalse(client.closed)


class SettingsTests(SynchronousTestCase):
    def test_padding_update_when_md5_differs(self):
        """A different padding-md5 gets UpdatePaddingScheme with our exact bytes, then v=2."""
        scheme = PaddingScheme.parse(b"stop=2\n0=10-10\n1=50-60")
        client = Server(padding=scheme).connect()
        client.auth()
        self.assertEqual(
            client.received(),
            [
                Frame(Command.UPDATE_PADDING_SCHEME, 0, scheme.raw),
                Frame(Command.SERVER_SETTINGS, 0, b"v=2"),
            ],
        )

    def test_v1_client_gets_no_v2_frames(self):
        """A client without v>=2 gets no ServerSettings, no SYNACK, no heartbeat reply."""
        server = Server()
        client = server.connect()
        client.auth(settings=b"client=old\npadding-md5=75cff2ad89aadf5e257059ee571ebe11")
        open_stream(client)
        client.frame(Command.HEART_REQUEST, 0)
        server.origin_fail()
        self.assertEqual(client.received(), [Frame(Command.FIN, 1)])

    def test_empty_settings_do_not_count(self):
        """An empty Settings frame is ignored, so a following SYN still gets the alert."""
        client = Server().connect()
        client.auth(settings=b"")
        client.frame(Command.SYN, 1)
        self.assertEqual(client.transport.value(), V12)
        self.assertTrue(client.closed)

    def test_syn_before_settings(self):
        """SYN before Settings: Alert V12 exactly, then the session closes."""
        client = Server().connect()
        client.auth(settings=None)
        client.frame(Command.SYN, 1)
        client.frame(Command.HEART_REQUEST, 0)
        self.assertEqual(client.transport.value(), V12)
        self.assertTrue(client.closed)


class StreamTests(SynchronousTestCase):
    def setUp(self):
        self.server = Server()
        self.client = self.server.connect()
        self.client.auth()
        self.client.received()

    def test_connect_relay_and_origin_close(self):
        """Dial, SYNACK after connect (V10), data both ways, FIN on origin EOF; session stays."""
        open_stream(self.client, data=b"hello")
        host, port = self.server.reactor.tcpClients[0][:2]
        self.assertEqual((host, port), ("127.0.0.1", 8080))
        self.assertEqual(self.client.transport.value(), b"")  # no SYNACK before the connect
        origin, transport = self.server.origin_connect()
        self.assertEqual(self.client.transport.value(), V10_OK)
        self.client.received()
        self.assertEqual(transport.value(), b"hello")
        self.client.frame(Command.PSH, 1, b" world")
        self.assertEqual(transport.value(), b"hello world")
        origin.dataReceived(b"response")
        self.assertEqual(self.client.received(), [Frame(Command.PSH, 1, b"response")])
        origin.connectionLost(error.ConnectionDone())
        self.assertEqual(self.client.received(), [Frame(Command.FIN, 1)])
        self.assertFalse(self.client.closed)
        self.assertEqual(self.client.proto.streams, {})

    def test_nagle_off_both_sides(self):
        """TCP_NODELAY on the client's connection and the origin's: small writes go at once."""
        open_stream(self.client)
        _, transport = self.server.origin_connect()
        self.assertTrue(self.client.transport.no_delay)
        self.assertTrue(transport.no_delay)

    def test_origin_reads_four_frames_at_a_time(self):
        """Origins are read four whole frames at a time (see readsize.READ_SIZE), and a
        full read reaches the client as four frames in one write."""
        open_stream(self.client)
        _, transport = self.server.origin_connect()
        self.assertEqual(transport.bufferSize, readsize.READ_SIZE)
        self.assertEqual(readsize.READ_SIZE, 4 * codec.MAX_DATA)

    def test_connect_failure(self):
        """A refused connect gets SYNACK with Go's error text (V10), then FIN."""
        open_stream(self.client)
        self.server.origin_fail(error.ConnectionRefusedError())
        self.assertEqual(
            self.client.transport.value(), V10_ERR + codec.encode_frame(Command.FIN, 1)
        )
        self.assertFalse(self.client.closed)

    def test_synack_guard(self):
        """A connect still pending after the guard gets an empty SYNACK; a later failure, FIN."""
        open_stream(self.client, sid=2)
        self.server.reactor.advance(1.9)
        self.assertEqual(self.client.received(), [])
        self.server.reactor.advance(0.2)
        self.assertEqual(self.client.received(), [Frame(Command.SYNACK, 2)])
        self.server.origin_fail()
        self.assertEqual(self.client.received(), [Frame(Command.FIN, 2)])

    def test_connect_timeout(self):
        """A connect that never completes ends at --connect-timeout with FIN."""
        open_stream(self.client)
        self.server.reactor.advance(5.1)
        self.assertEqual([f.cmd for f in self.client.received()], [Command.SYNACK, Command.FIN])

    def test_client_fin_closes_origin_without_reply(self):
        """A client FIN closes the origin fully and is never answered with FIN."""
        open_stream(self.client)
        origin, transport = self.server.origin_connect()
        self.client.received()
        self.client.frame(Command.FIN, 1)
        self.assertTrue(transport.disconnecting)
        origin.connectionLost(error.ConnectionDone())
        self.assertEqual(self.client.received(), [])

    def test_fin_and_psh_for_unknown_streams_ignored(self):
        """FIN and PSH for unknown ids change nothing; the session goes on."""
        self.client.frame(Command.FIN, 7)
        self.client.frame(Command.PSH, 7, b"data")
        self.client.frame(Command.HEART_REQUEST, 5)
        self.assertEqual(self.client.received(), [Frame(Command.HEART_RESPONSE, 5)])

    def test_duplicate_syn_ignored(self):
        open_stream(self.client)
        self.client.frame(Command.SYN, 1)
        self.assertEqual(len(self.server.reactor.tcpClients), 1)

    def test_large_origin_read_split(self):
        """A 65536-byte origin read goes out as frames of at most 65535 bytes."""
        open_stream(self.client)
        origin, _ = self.server.origin_connect()
        self.client.received()
        origin.dataReceived(b"x" * 65536)
        self.assertEqual([len(f.data) for f in self.client.received()], [65535, 1])

    def test_private_destination_refused(self):
        """Without --allow-private, loopback is refused with SYNACK error and FIN, no dial."""
        server = Server(allow_private=False)
        client = server.connect()
        client.auth()
        client.received()
        open_stream(client)
        frames = client.received()
        self.assertEqual([f.cmd for f in frames], [Command.SYNACK, Command.FIN])
        self.assertIn(b"not a public address", frames[0].data)
        self.assertEqual(server.reactor.tcpClients, [])

    def test_domain_checked_after_resolution(self):
        """A name resolving to a private address is refused; a public one is dialled by IP."""
        server = Server(
            allow_private=False, names={"evil.test": ["10.0.0.1"], "good.test": ["93.184.216.34"]}
        )
        client = server.connect()
        client.auth()
        client.received()
        open_stream(client, 1, b"\x03\x09evil.test\x00\x50")
        self.assertEqual([f.cmd for f in client.received()], [Command.SYNACK, Command.FIN])
        open_stream(client, 2, b"\x03\x09good.test\x00\x50")
        self.assertEqual(server.reactor.tcpClients[0][:2], ("93.184.216.34", 80))

    def test_unknown_host(self):
        open_stream(self.client, 1, b"\x03\x0cnowhere.test\x00\x50")
        frames = self.client.received()
        self.assertEqual(frames[0], Frame(Command.SYNACK, 1, b"lookup nowhere.test: no such host"))

    def test_bad_address_type(self):
        """An unknown address type fails only that stream (SYNACK error, FIN)."""
        open_stream(self.client, address=b"\x09\x00\x00")
        frames = self.client.received()
        self.assertEqual([f.cmd for f in frames], [Command.SYNACK, Command.FIN])
        self.assertIn(b"bad destination address", frames[0].data)
        self.client.frame(Command.HEART_REQUEST, 0)
        self.assertEqual(self.client.received(), [Frame(Command.HEART_RESPONSE, 0)])

    def test_address_split_across_frames(self):
        """A destination split over several PSH frames, followed by data, is assembled."""
        self.client.frame(Command.SYN, 1)
        wire = b"\x03\x0bexample.com\x00\x50GET"
        server = self.server
        server.resolver.names["example.com"] = ["93.184.216.34"]
        for i in range(len(wire)):
            self.client.frame(Command.PSH, 1, wire[i : i + 1])
        self.assertEqual(server.reactor.tcpClients[0][:2], ("93.184.216.34", 80))
        _, transport = server.origin_connect()
        self.assertEqual(transport.value(), b"GET")

    def test_session_close_closes_streams_without_fin(self):
        open_stream(self.client)
        _, transport = self.server.origin_connect()
        self.client.received()
        self.client.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.received(), [])

    def test_stream_limit(self):
        server = Server(max_streams=2)
        client = server.connect()
        client.auth()
        client.received()
        for sid in (1, 2, 3):
            open_stream(client, sid)
        frames = client.received()
        self.assertEqual([(f.cmd, f.sid) for f in frames], [(Command.SYNACK, 3), (Command.FIN, 3)])
        self.assertEqual(len(server.reactor.tcpClients), 2)


class BadInputTests(SynchronousTestCase):
    def setUp(self):
        self.server = Server()
        self.client = self.server.connect()
        self.client.auth()
        self.client.received()

    def test_data_on_dataless_commands_skipped(self):
        """Data on SYN/FIN/heartbeat and unknown commands is skipped without losing sync."""
        for cmd in (Command.SYN, Command.FIN, Command.HEART_RESPONSE, 42, 255, Command.WASTE):
            self.client.frame(cmd, 9, b"\x08\x00\x00\x00\x00\x00\x00")
        self.client.frame(Command.HEART_REQUEST, 3, b"junk")
        self.assertEqual(self.client.received(), [Frame(Command.HEART_RESPONSE, 3)])

    def test_client_only_commands_ignored(self):
        for cmd in (Command.SYNACK, Command.SERVER_SETTINGS, Command.UPDATE_PADDING_SCHEME):
            self.client.frame(cmd, 0, b"v=9")
        self.client.frame(Command.ALERT, 0, b"")
        self.assertFalse(self.client.closed)
        self.assertEqual(self.client.received(), [])

    def test_alert_from_client_closes(self):
        self.client.frame(Command.ALERT, 0, b"bye")
        self.assertTrue(self.client.closed)

    def test_garbage_never_raises(self):
        """Arbitrary bytes after auth never raise out of dataReceived."""
        import random

        rng = random.Random(7)
        for _ in range(50):
            self.client.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))

    def test_other_sessions_unaffected(self):
        """A session killed for bad input leaves another session working."""
        other = self.server.connect(("198.51.100.8", 1))
        other.auth()
        other.received()
        self.client.frame(Command.ALERT, 0, b"x")
        self.assertTrue(self.client.closed)
        other.frame(Command.HEART_REQUEST, 1)
        self.assertEqual(other.received(), [Frame(Command.HEART_RESPONSE, 1)])


class SplitTests(SynchronousTestCase):
    FLIGHT = (
        encode_preamble(PASSWORD, 30)
        + codec.encode_frame(Command.SETTINGS, 0, SETTINGS_V2)
        + codec.encode_frame(Command.SYN, 1)
        + codec.encode_frame(Command.PSH, 1, ADDR_V4)
        + codec.encode_frame(Command.WASTE, 0, bytes(83))
        + codec.encode_frame(Command.PSH, 1, b"request")
        + codec.encode_frame(Command.HEART_REQUEST, 4)
    )

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=len(FLIGHT) - 1), max_size=12))
    def test_any_split_same_result(self, cuts):
        """A stock first flight cut anywhere gives the same replies and origin bytes."""
        server = Server()
        client = server.connect()
        points = sorted(set(cuts))
        for start, stop in zip([0] + points, points + [len(self.FLIGHT)]):
            client.send(self.FLIGHT[start:stop])
        self.assertEqual(
            client.received(),
            [Frame(Command.SERVER_SETTINGS, 0, b"v=2"), Frame(Command.HEART_RESPONSE, 4)],
        )
        _, transport = server.origin_connect()
        self.assertEqual(transport.value(), b"request")


class FirstFlightVectorTests(SynchronousTestCase):
    """V3 + V14: a stock client's whole first flight, padded to 200 bytes or cut at 105."""

    V14_PAYLOAD = unhex(
        """04 00 00 00 00 00 4a 76 3d 32 0a 63 6c 69 65 6e 74 3d 73 69 6e 67 2d 61 6e 79 74 6c 73 2f
        30 2e 30 2e 31 31 0a 70 61 64 64 69 6e 67 2d 6d 64 35 3d 37 35 63 66 66 32 61 64 38 39 61
        61 64 66 35 65 32 35 37 30 35 39 65 65 35 37 31 65 62 65 31 31 01 00 00 00 01 00 00 02 00
        00 00 01 00 0f 03 0b 65 78 61 6d 70 6c 65 2e 63 6f 6d 01 bb"""
    )
    V3 = encode_preamble(PASSWORD, 30)

    def check(self, *writes):
        server = Server(names={"example.com": ["93.184.216.34"]})
        client = server.connect()
        for data in writes:
            client.send(data)
        self.assertEqual(client.transport.value(), V5)
        self.assertEqual(server.reactor.tcpClients[0][:2], ("93.184.216.34", 443))

    def test_padded_to_200(self):
        waste = unhex("00 00 00 00 00 00 53") + bytes(83)
        self.assertEqual(len(self.V14_PAYLOAD) + len(waste), 200)
        self.check(self.V3, self.V14_PAYLOAD + waste)

    def test_cut_at_105(self):
        self.check(self.V3, self.V14_PAYLOAD[:105], self.V14_PAYLOAD[105:])


class LoggingTests(SynchronousTestCase):
    def setUp(self):
        from twisted.logger import globalLogPublisher

        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self):
        from twisted.logger import formatEvent

        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace", "").startswith("anytls_twisted")
        ]

    def test_bad_peer_one_line_and_no_secrets(self):
        """A misbehaving session is closed with one line carrying the fields; no secret is logged."""
        from anytls_twisted.protocol.auth import password_digest

        server = Server()
        client = server.connect()
        client.auth()
        client.frame(Command.ALERT, 0, b"garbage")
        client.proto.connectionLost(Failure(error.ConnectionDone()))
        closing = [
            e
            for e in self.events
            if e.get("log_format", "").startswith("session {session_id} closed")
        ]
        self.assertEqual(len(closing), 1)
        event = closing[0]
        for field in (
            "session_id",
            "peer",
            "user",
            "duration",
            "bytes_in",
            "bytes_out",
            "streams",
            "reason",
        ):
            self.assertIn(field, event)
        self.assertEqual(event["user"], "alice")
        self.assertIn("alert from client", event["reason"])
        everything = repr(self.events)
        self.assertNotIn(PASSWORD, everything)
        self.assertNotIn(password_digest(PASSWORD).hex(), everything)

    def test_stream_events_quiet_by_default(self):
        """Per-stream events are debug: filtered out at the default level."""
        server = Server()
        client = server.connect()
        client.auth()
        open_stream(client)
        server.origin_fail()
        self.assertFalse([t for t in self.texts() if t.startswith("stream ")])


class DebugLoggingTests(SynchronousTestCase):
    """Per-stream debug events appear when the level is debug, and only then."""

    def setUp(self):
        from twisted.logger import globalLogPublisher

        from anytls_twisted import logs

        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(logs.set_level, "info")

    def stream_lines(self, level):
        from twisted.logger import formatEvent

        from anytls_twisted import logs

        logs.set_level(level)
        del self.events[:]
        server = Server()
        client = server.connect()
        client.auth()
        open_stream(client)
        server.origin_connect()
        client.frame(Command.FIN, 1)
        return [formatEvent(e) for e in self.events if formatEvent(e).startswith("stream ")]

    def test_debug_level_logs_stream_events(self):
        from anytls_twisted import logs

        lines = self.stream_lines("debug")
        self.assertTrue(logs.DEBUG)
        self.assertTrue(any("connected to" in line for line in lines), lines)
        self.assertTrue(any("closed" in line for line in lines), lines)

    def test_info_level_builds_none(self):
        from anytls_twisted import logs

        self.assertEqual(self.stream_lines("info"), [])
        self.assertFalse(logs.DEBUG)


class PolicyLoggingTests(SynchronousTestCase):
    """A refused destination is visible at the default level, names --allow-private, and is
    rate-limited per session."""

    setUp = LoggingTests.setUp
    texts = LoggingTests.texts

    def refusals(self):
        return [t for t in self.texts() if "destination refused" in t]

    def test_tcp_refusal_logged_once_per_interval(self):
        from anytls_twisted.server.session import POLICY_LOG_INTERVAL

        server = Server(allow_private=False)
        client = server.connect()
        client.auth()
        for sid in (1, 3, 5):
            open_stream(client, sid)
        [line] = self.refusals()
        self.assertIn("--allow-private", line)
        self.assertIn("127.0.0.1", line)
        self.assertIn("tcp", line)
        info = [e for e in self.events if "destination refused" in str(e.get("log_format"))]
        self.assertEqual(info[0]["log_level"].name, "info")
        server.reactor.advance(POLICY_LOG_INTERVAL)
        open_stream(client, 7)
        self.assertEqual(len(self.refusals()), 2)
        # Another session has its own allowance.
        other = server.connect()
        other.auth()
        open_stream(other, 1)
        self.assertEqual(len(self.refusals()), 3)

    def test_udp_refusal_logged(self):
        from anytls_twisted.protocol.address import Destination, encode_socks_address
        from anytls_twisted.protocol.uot import MAGIC_V2

        server = Server(allow_private=False)
        client = server.connect()
        client.auth()
        header = b"\x01" + encode_socks_address(Destination("10.1.2.3", 53))
        open_stream(client, 1, encode_socks_address(Destination(MAGIC_V2, 0)), header)
        [line] = self.refusals()
        self.assertIn("udp", line)
        self.assertIn("10.1.2.3", line)
        self.assertIn("--allow-private", line)
