"""Fuzz the server's preamble reader and session machine (protocol/auth.py, protocol/session.py).

Arbitrary bytes go to a :class:`ServerSession` whose only user has the password ``PASS`` (the
protocol document's vectors). The first input byte picks a mode; odd modes put a valid preamble
(with a padding length from the input) in front, so the fuzzer spends its time on frames.

Contract:

* ``receive`` never raises, and yields only the documented event types.
* Split invariance: the events do not depend on how the bytes are cut into reads.
* Bounded: while authenticating, the preamble reader holds less than 34 + 65535 bytes; the frame
  decoder holds less than one frame.
* Rules: nothing after AuthenticationFailed or SessionFailed, which close the session; every
  ``Send`` is whole frames; SYNACK, heartbeat requests and ServerSettings (commands 7, 8, 10)
  only to a client that announced ``v >= 2``; a HeartResponse (9) only then or before Settings;
  UpdatePaddingScheme carries our scheme; a SYN before Settings is answered with the Alert.
* Byte counts: ``bytes_in`` is every byte fed until the session closed.
"""

from __future__ import annotations

import sys

import _fuzzlib
from _fuzzlib import check, splits

with _fuzzlib.instrumented():
    from anytls_twisted.protocol import session as machine
    from anytls_twisted.protocol.auth import PREAMBLE_FIXED, encode_preamble, password_digest
    from anytls_twisted.protocol.codec import MAX_DATA, Command, FrameDecoder
    from anytls_twisted.protocol.padding import DEFAULT_SCHEME

DIGEST = password_digest("PASS")
EVENTS = (
    machine.Send,
    machine.Authenticated,
    machine.AuthenticationFailed,
    machine.SettingsReceived,
    machine.StreamOpened,
    machine.StreamRefused,
    machine.StreamData,
    machine.StreamClosedByPeer,
    machine.HeartbeatAnswered,
    machine.UnknownCommand,
    machine.SessionFailed,
)


class Limits:
    padding = DEFAULT_SCHEME

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams


def run(chunks: list, max_streams: int) -> list:
    limits = Limits(max_streams)
    session: machine.ServerSession = machine.ServerSession(
        lambda digest: "user" if digest == DIGEST else None, lambda: limits
    )
    out: list = []
    fed = 0
    read = b""
    settings_seen = False
    for chunk in chunks:
        was_closed = session.closed
        if not was_closed:
            fed += len(chunk)
            read += chunk
        # Handled as they come: attaching a stream is in force for the next frame.
        for event in session.receive(chunk):
            check(not was_closed, "events after the session closed")
            check(isinstance(event, EVENTS), f"unexpected event {event!r}")
            check(
                not out
                or not isinstance(out[-1], (machine.SessionFailed, machine.AuthenticationFailed)),
                "an event after the session failed",
            )
            if isinstance(event, machine.AuthenticationFailed):
                # Every byte read so far, for a fallback: how many depends on how the reads
                # were cut, so only that is checked, and the event compared without them.
                check(event.received == read, "AuthenticationFailed lost or added bytes")
                check(session.closed, "failed but not closed")
                event = machine.AuthenticationFailed()
            elif isinstance(event, machine.SessionFailed):
                check(session.closed, "failed but not closed")
            elif isinstance(event, machine.StreamOpened):
                check(len(session.streams) < max_streams, "a stream over the limit")
                session.attach(event.sid, event.sid)
            elif isinstance(event, machine.StreamRefused):
                check(len(session.streams) >= max_streams, "refused under the limit")
            elif isinstance(event, machine.StreamData):
                check(event.data and len(event.data) <= MAX_DATA, "bad stream data")
            elif isinstance(event, machine.SettingsReceived):
                settings_seen = True
            elif isinstance(event, machine.Send):
                decoder = FrameDecoder()
                frames = decoder.feed(event.data)
                check(frames and decoder.pending == 0, "Send is not whole frames")
                for frame in frames:
                    if frame.cmd in (
                        Command.SYNACK,
                        Command.HEART_REQUEST,
                        Command.SERVER_SETTINGS,
                    ):
                        check(session.peer_version >= 2, f"command {frame.cmd} to a v1 client")
                    if frame.cmd == Command.HEART_RESPONSE:
                        check(session.peer_version >= 2 or not settings_seen, "v1 heartbeat")
                    if frame.cmd == Command.UPDATE_PADDING_SCHEME:
                        check(frame.data == DEFAULT_SCHEME.raw, "not our padding scheme")
                    if frame.cmd == Command.ALERT:
                        check(not settings_seen, "an Alert after Settings")
            out.append(event)
        if session.state is machine.State.AUTH:
            reader = session._preamble
            check(
                reader is not None and len(reader._buffer) < PREAMBLE_FIXED + MAX_DATA,
                "the preamble reader holds too much",
            )
        check(session._decoder.pending < 7 + MAX_DATA, "the decoder holds too much")
    check(session.bytes_in == fed, f"bytes_in {session.bytes_in}, fed {fed}")
    return out


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, max_streams = data[0], data[1] % 5
    stream = data[2:]
    if mode & 1:
        padding = int.from_bytes(data[2:4], "big") % 600
        stream = encode_preamble("PASS", padding) + stream[2:]
    whole = run([stream], max_streams)
    cut = run(splits(data[-16:], stream, 12), max_streams)
    check(cut == whole, "events depend on how the bytes are cut")


if __name__ == "__main__":
    _fuzzlib.main("session", test_one_input, sys.argv)
