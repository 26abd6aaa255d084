"""The sans-IO session machine, driven without a reactor, a transport or a stream class.

Server rules against the vectors of anytls-protocol.md section 14; a client machine and a server
machine talking to each other through nothing but bytes; flow-control bookkeeping.
"""

from __future__ import annotations

from typing import List

import attr
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol import session as m
from anytls_twisted.protocol.auth import UserTable, encode_preamble
from anytls_twisted.protocol.codec import Command, Frame, FrameDecoder, encode_frame
from anytls_twisted.protocol.padding import DEFAULT_SCHEME, DEFAULT_SCHEME_BYTES, PaddingScheme

from .helpers import PASSWORD, SETTINGS_V2
from .test_codec import V5, V10_ERR_TEXT, V11, V12


@attr.s(auto_attribs=True)
class Limits:
    padding: PaddingScheme = DEFAULT_SCHEME
    max_streams: int = 8


USERS = UserTable([("alice", PASSWORD)])


def server(limits: Limits | None = None) -> m.ServerSession[str]:
    limits = limits or Limits()
    return m.ServerSession(USERS.lookup, lambda: limits)


def feed(machine: m.SessionMachine[str], data: bytes) -> List[object]:
    """Run the machine over ``data`` as a shell would: attach a stream for each SYN."""
    events: List[object] = []
    for event in machine.receive(data):
        if isinstance(event, m.StreamOpened):
            machine.attach(event.sid, f"stream-{event.sid}")
        events.append(event)
    return events


def sent(events: List[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, m.Send))


def opened_server() -> m.ServerSession[str]:
    machine = server()
    feed(machine, encode_preamble(PASSWORD, 30) + encode_frame(Command.SETTINGS, 0, SETTINGS_V2))
    return machine


class ServerRulesTests(SynchronousTestCase):
    def test_auth_then_settings(self):
        """Preamble, then Settings: Authenticated, ServerSettings v=2 (V5), state OPEN."""
        machine = server()
        events = feed(machine, encode_preamble(PASSWORD, 30))
        self.assertEqual(events, [m.Authenticated("alice")])
        self.assertIs(machine.state, m.State.SETTINGS)
        events = feed(machine, encode_frame(Command.SETTINGS, 0, SETTINGS_V2))
        self.assertEqual(sent(events), V5)
        self.assertIn(m.SettingsReceived(2, "sing-anytls/0.0.11"), events)
        self.assertIs(machine.state, m.State.OPEN)
        self.assertEqual(machine.bytes_in, 34 + 30 + 7 + len(SETTINGS_V2))

    def test_wrong_password(self):
        machine = server()
        wire = encode_preamble("wrong") + encode_frame(Command.SETTINGS, 0, b"v=2")
        events = feed(machine, wire)
        self.assertEqual(events, [m.AuthenticationFailed(wire)])
        self.assertTrue(machine.closed)
        self.assertEqual(feed(machine, b"anything"), [])

    def test_mismatch_decided_at_32_bytes(self):
        """Bytes whose first 32 match no digest fail at the 32nd byte, though their bytes 33-34
        announce 65535 bytes of padding; the event carries every byte read, in order."""
        for first, second in (
            (b"\xff" * 31, b"\xff"),
            (b"\xff" * 20, b"\xff" * 50),
            (b"", b"\xff" * 100),
        ):
            machine = server()
            self.assertEqual(feed(machine, first), [])
            self.assertFalse(machine.closed)
            self.assertEqual(feed(machine, second), [m.AuthenticationFailed(first + second)])
            self.assertTrue(machine.closed)

    def test_fewer_than_32_bytes_decide_nothing(self):
        """31 bytes, even ones that are no user's digest prefix, leave the machine waiting
        (an early close would tell a prober the digest byte by byte); abandon() gives them back
        for a fallback."""
        machine = server()
        self.assertEqual(feed(machine, b"GET / HTTP/1.0\r\n\r\n"), [])
        self.assertFalse(machine.closed)
        self.assertEqual(machine.abandon(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(machine.closed)
        self.assertEqual(feed(machine, b"x" * 40), [])

    def test_known_digest_waits_for_its_padding(self):
        """A user's digest is accepted at 32 bytes but authenticates only with its padding;
        abandoning it then hands nothing to a fallback (it was judged, and is a user's)."""
        wire = encode_preamble(PASSWORD, 1000)
        machine = server()
        self.assertEqual(feed(machine, wire[:40]), [])
        self.assertFalse(machine.closed)
        self.assertIsNone(machine.user)
        self.assertEqual(feed(machine, wire[40:]), [m.Authenticated("alice")])
        other = server()
        feed(other, wire[:40])
        self.assertEqual(other.abandon(), b"")

    def test_padding_update_uses_live_scheme(self):
        """The scheme is read when Settings arrives, so a reload applies to the next session."""
        limits = Limits()
        machine = server(limits)
        other = PaddingScheme.parse(b"stop=1\n0=10-20")
        limits.padding = other
        events = feed(
            machine, encode_preamble(PASSWORD) + encode_frame(Command.SETTINGS, 0, SETTINGS_V2)
        )
        frames = FrameDecoder().feed(sent(events))
        self.assertEqual(frames[0], Frame(Command.UPDATE_PADDING_SCHEME, 0, other.raw))

    def test_no_update_when_md5_matches(self):
        """SETTINGS_V2 offers the default scheme's md5: only ServerSettings comes back."""
        machine = server()
        events = feed(
            machine, encode_preamble(PASSWORD) + encode_frame(Command.SETTINGS, 0, SETTINGS_V2)
        )
        self.assertNotIn(DEFAULT_SCHEME_BYTES, sent(events))
        self.assertEqual(sent(events), V5)

    def test_syn_before_settings(self):
        """V12: Alert, then the session fails; nothing after it is handled."""
        machine = server()
        feed(machine, encode_preamble(PASSWORD))
        events = feed(machine, encode_frame(Command.SYN, 1) + encode_frame(Command.SYN, 3))
        self.assertEqual(sent(events), V12)
        self.assertEqual(
            events[-1], m.SessionFailed("client opened a stream before sending its settings")
        )
        self.assertEqual(machine.streams, {})

    def test_stream_open_data_fin(self):
        machine = opened_server()
        events = feed(
            machine,
            encode_frame(Command.SYN, 1)
            + encode_frame(Command.PSH, 1, b"abc")
            + encode_frame(Command.FIN, 1)
            + encode_frame(Command.PSH, 1, b"late"),
        )
        self.assertEqual(
            events,
            [
                m.StreamOpened(1),
                m.StreamData("stream-1", b"abc"),
                m.StreamClosedByPeer("stream-1"),
            ],
        )
        self.assertEqual(machine.streams, {})
        self.assertEqual(machine.streams_opened, 1)

    def test_stream_limit(self):
        machine = m.ServerSession(USERS.lookup, lambda: Limits(max_streams=1))
        feed(machine, encode_preamble(PASSWORD) + encode_frame(Command.SETTINGS, 0, SETTINGS_V2))
        events = feed(machine, encode_frame(Command.SYN, 1) + encode_frame(Command.SYN, 3))
        self.assertEqual(events[0], m.StreamOpened(1))
        frames = FrameDecoder().feed(sent(events))
        self.assertEqual(
            frames,
            [Frame(Command.SYNACK, 3, b"too many streams (limit 1)"), Frame(Command.FIN, 3)],
        )
        self.assertEqual(events[-1], m.StreamRefused(3, 1))

    def test_server_wide_stream_gate(self):
        """If the server-wide gate has no slot, then the SYN gets a SYNACK error and FIN and
        a StreamRefused for the server's limit; the gate is asked only for SYNs that pass the
        session's own limit, and a granted slot opens the stream."""
        slots = [None, 7]  # one slot granted, then the server-wide limit (7) is full
        asked = []

        def take():
            asked.append(1)
            return slots.pop(0)

        machine = m.ServerSession(USERS.lookup, lambda: Limits(max_streams=2), take)
        feed(machine, encode_preamble(PASSWORD) + encode_frame(Command.SETTINGS, 0, SETTINGS_V2))
        events = feed(machine, encode_frame(Command.SYN, 1) + encode_frame(Command.SYN, 3))
        self.assertEqual(events[0], m.StreamOpened(1))
        self.assertEqual(
            FrameDecoder().feed(sent(events)),
            [Frame(Command.SYNACK, 3, b"server busy: too many streams"), Frame(Command.FIN, 3)],
        )
        self.assertEqual(events[-1], m.StreamRefused(3, 7, server=True))
        self.assertEqual((set(machine.streams), machine.streams_opened), ({1}, 1))
        slots.append(None)
        feed(machine, encode_frame(Command.SYN, 5))  # the session's limit (2) refuses first
        events = feed(machine, encode_frame(Command.SYN, 7))
        self.assertEqual(events[-1], m.StreamRefused(7, 2))
        self.assertEqual(len(asked), 3)

    def test_alert_ends_the_session(self):
        """An Alert frame carries the text, and the session takes no more frames."""
        machine = opened_server()
        frame = machine.alert("too many sessions for this user")
        self.assertEqual(
            FrameDecoder().feed(frame),
            [Frame(Command.ALERT, 0, b"too many sessions for this user")],
        )
        self.assertTrue(machine.closed)
        self.assertEqual(feed(machine, encode_frame(Command.SYN, 1)), [])
        self.assertEqual(machine.alert("again"), b"")

    def test_duplicate_syn_ignored(self):
        machine = opened_server()
        events = feed(machine, encode_frame(Command.SYN, 1) + encode_frame(Command.SYN, 1))
        self.assertEqual(events, [m.StreamOpened(1)])

    def test_heartbeat_answered_with_same_sid(self):
        machine = opened_server()
        events = feed(machine, V11[1])
        self.assertEqual(sent(events), V11[2])

    def test_v1_client_gets_no_v2_frames(self):
        machine = server()
        feed(machine, encode_preamble(PASSWORD) + encode_frame(Command.SETTINGS, 0, b"v=1"))
        self.assertEqual(feed(machine, V11[1]), [])
        self.assertEqual(machine.synack(1, "x"), b"")
        self.assertEqual(machine.heartbeat(), b"")

    def test_alert_from_client(self):
        machine = opened_server()
        events = feed(machine, encode_frame(Command.ALERT, 0, b"bye"))
        self.assertEqual(events, [m.SessionFailed("alert from client: 'bye'")])
        self.assertTrue(machine.closed)

    def test_unknown_and_server_only_commands(self):
        machine = opened_server()
        events = feed(
            machine,
            encode_frame(200, 0, b"xyz")
            + encode_frame(Command.SYNACK, 1, b"x")
            + encode_frame(Command.SERVER_SETTINGS, 0, b"v=9")
            + encode_frame(Command.WASTE, 0, b"\0" * 5),
        )
        self.assertEqual(events, [m.UnknownCommand(200, 3)])
        self.assertEqual(machine.peer_version, 2)

    def test_synack_and_data_frames(self):
        machine = opened_server()
        feed(machine, encode_frame(Command.SYN, 1))
        before = machine.bytes_out
        frame = machine.synack(1, V10_ERR_TEXT.decode())
        self.assertEqual(FrameDecoder().feed(frame), [Frame(Command.SYNACK, 1, V10_ERR_TEXT)])
        pieces = machine.data(1, b"x" * 70000)
        decoded = FrameDecoder().feed(b"".join(pieces))  # two frames: 65535 + 4465 bytes
        self.assertEqual([len(f.data) for f in decoded], [65535, 4465])
        self.assertEqual(machine.bytes_out - before, len(frame) + 70000 + 14)
        before = machine.bytes_out
        machine.data(1, b"y" * 100)
        self.assertEqual(machine.bytes_out - before, 100 + 7)
        self.assertEqual(machine.fin(1), V11[0])

    def test_reload_check(self):
        machine = opened_server()
        self.assertTrue(machine.still_authorised(USERS.lookup))
        self.assertFalse(machine.still_authorised(UserTable([("alice", "new")]).lookup))

    def test_filler_counts_waste_and_heartbeat_answers_only(self):
        """``filler_in``: the bytes of whole Waste and HeartResponse frames, which are not the
        peer doing anything (the server's idle reaper ignores reads made only of them)."""
        machine = opened_server()
        feed(machine, encode_frame(Command.HEART_REQUEST, 0) + encode_frame(Command.SYN, 1))
        feed(machine, encode_frame(Command.PSH, 1, b"data") + encode_frame(Command.FIN, 1))
        self.assertEqual(machine.filler_in, 0)
        answer = encode_frame(Command.HEART_RESPONSE, 0)
        waste = encode_frame(Command.WASTE, 0, b"\0" * 30)
        self.assertEqual(feed(machine, answer + waste), [m.HeartbeatAnswered(0)])
        self.assertEqual(machine.filler_in, len(answer) + len(waste))

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=300), max_size=6))
    def test_any_split_same_events(self, cuts):
        """Events do not depend on how the bytes are cut."""
        wire = (
            encode_preamble(PASSWORD, 30)
            + encode_frame(Command.SETTINGS, 0, SETTINGS_V2)
            + encode_frame(Command.SYN, 1)
            + encode_frame(Command.PSH, 1, b"hello")
            + encode_frame(Command.HEART_REQUEST, 0)
            + encode_frame(Command.FIN, 1)
        )
        whole = feed(server(), wire)
        machine, pieces, start = server(), [], 0
        for cut in sorted(set(cuts)):
            pieces.append(wire[start:cut])
            start = cut
        pieces.append(wire[start:])
        events = [e for piece in pieces for e in feed(machine, piece)]
        self.assertEqual(events, whole)


class FlowControlTests(SynchronousTestCase):
    def test_write_pause_lists_streams_once(self):
        machine = opened_server()
        feed(machine, encode_frame(Command.SYN, 1) + encode_frame(Command.SYN, 3))
        self.assertEqual(machine.pause_writing(), ["stream-1", "stream-3"])
        self.assertEqual(machine.pause_writing(), [])
        self.assertEqual(machine.resume_writing(), ["stream-1", "stream-3"])
        self.assertEqual(machine.resume_writing(), [])

    def test_reading_paused_while_any_stream_blocked(self):
        machine = opened_server()
        feed(machine, encode_frame(Command.SYN, 1) + encode_frame(Command.SYN, 3))
        self.assertIs(machine.set_blocked(1, True), True)
        self.assertIsNone(machine.set_blocked(3, True))
        self.assertIsNone(machine.set_blocked(1, False))
        self.assertIs(machine.set_blocked(3, False), False)

    def test_ended_stream_releases_reading(self):
        machine = opened_server()
        feed(machine, encode_frame(Command.SYN, 1))
        machine.set_blocked(1, True)
        feed(machine, encode_frame(Command.FIN, 1))
        self.assertIs(machine.update_reading(), False)

    def test_unknown_stream_cannot_block(self):
        machine = opened_server()
        self.assertIsNone(machine.set_blocked(5, True))
        self.assertFalse(machine.read_paused)


class ClientServerTests(SynchronousTestCase):
    """A ClientSession and a ServerSession exchange bytes: the same core on both sides."""

    def test_round_trip(self):
        client: m.ClientSession[str] = m.ClientSession(DEFAULT_SCHEME, "test/1")
        srv = server()
        first = client.start(PASSWORD) + client.open("local-1", b"\x01\x08\x08\x08\x08\x00\x50")
        events = feed(srv, first)
        self.assertEqual(events[0], m.Authenticated("alice"))
        self.assertIn(m.SettingsReceived(2, "test/1"), events)
        address = b"\x01\x08\x08\x08\x08\x00\x50"
        self.assertEqual(events[-2:], [m.StreamOpened(1), m.StreamData("stream-1", address)])
        # The server's replies (ServerSettings, then a SYNACK) go back to the client.
        back = sent(events) + srv.synack(1) + b"".join(srv.data(1, b"pong"))
        client_events = list(client.receive(back))
        self.assertEqual(client.peer_version, 2)
        self.assertEqual(
            client_events,
            [m.StreamAcknowledged("local-1", ""), m.StreamData("local-1", b"pong")],
        )

    def test_client_applies_new_padding_scheme(self):
        client: m.ClientSession[str] = m.ClientSession(DEFAULT_SCHEME)
        client.start(PASSWORD)
        other = PaddingScheme.parse(b"stop=2\n0=10-20")
        events = list(client.receive(encode_frame(Command.UPDATE_PADDING_SCHEME, 0, other.raw)))
        self.assertEqual(events, [m.PaddingSchemeUpdated(other)])
        self.assertEqual(client.padding, other)
        bad = encode_frame(Command.UPDATE_PADDING_SCHEME, 0, b"no stop line")
        self.assertEqual(list(client.receive(bad)), [])
        self.assertEqual(client.padding, other)

    def test_client_answers_heartbeat_and_sees_answers(self):
        client: m.ClientSession[str] = m.ClientSession(DEFAULT_SCHEME)
        client.start(PASSWORD)
        list(client.receive(encode_frame(Command.SERVER_SETTINGS, 0, b"v=2")))
        events = list(client.receive(V11[1] + V11[2]))
        self.assertEqual(events, [m.Send(V11[2]), m.HeartbeatAnswered(0)])
        self.assertEqual(client.heartbeat(), V11[1])

    def test_sid_of(self):
        client: m.ClientSession[str] = m.ClientSession(DEFAULT_SCHEME)
        client.start(PASSWORD)
        client.open("a", b"")
        client.open("b", b"")
        self.assertEqual((client.sid_of("a"), client.sid_of("b"), client.sid_of("c")), (1, 2, None))
