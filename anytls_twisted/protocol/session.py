"""The AnyTLS session as a sans-IO machine: bytes in, events and frames out.

One :class:`SessionMachine` holds what both sides share (anytls-protocol.md sections 4, 7-9
and 12): the frame decoder, the states ``AUTH -> SETTINGS -> OPEN -> CLOSED``, the stream
table and its limit, SYN/SYNACK/FIN, heartbeats, Waste, alerts, unknown commands, byte counts
and the flow-control bookkeeping. :class:`ServerSession` and :class:`ClientSession` add only
the rules of their side.

The machine never touches a transport. :meth:`SessionMachine.receive` yields events in the
order they happen; frames the machine wants written come as :class:`Send` events among
them, so a shell that handles the events in order writes exactly what the rules say, when
they say it. Calls the shell makes (a SYNACK, data, a FIN) return the bytes to write.
Stream objects are opaque here: the shell attaches whatever it uses, and events carry it back.
"""

from __future__ import annotations

import enum
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Set,
    TypeVar,
    Union,
)

from .auth import DIGEST_SIZE, PreambleReader, encode_preamble
from .codec import (
    HEADER_SIZE,
    MAX_DATA,
    Command,
    Frame,
    FrameDecoder,
    data_frames,
    encode_frame,
    format_settings,
    parse_settings,
)
from .padding import PaddingScheme

S = TypeVar("S")

#: The Alert text the reference servers send when a SYN comes before Settings.
ALERT_NO_SETTINGS = "client did not send its settings"
#: The protocol version both sides speak (SYNACK, heartbeats, ServerSettings).
VERSION = 2
#: Longest client name kept from Settings (``client=``): it only goes to logs.
MAX_CLIENT_NAME = 64
#: Characters of a peer's Alert kept for the log.
MAX_ALERT_TEXT = 200


class State(enum.Enum):
    AUTH = "auth"
    SETTINGS = "settings"
    OPEN = "open"
    CLOSED = "closed"


# Events. Each is a small named tuple: one is built per frame on the data path.
class Send(NamedTuple):
    """Write ``data`` (one or more whole frames) to the peer, now."""

    data: bytes


class Authenticated(NamedTuple):
    """Server: the preamble named a known user."""

    user: str


class AuthenticationFailed(NamedTuple):
    """Server: the first 32 bytes match no user's digest; decided as soon as they are in,
    whatever padding length follows. Close without a word, or hand ``received`` (every byte
    read so far, in order) to a fallback."""

    received: bytes = b""


class SettingsReceived(NamedTuple):
    """Server: the client's Settings arrived; streams may open now."""

    version: int
    client: str


class StreamOpened(NamedTuple):
    """Server: the peer opened stream ``sid``; attach a stream object with :meth:`attach`."""

    sid: int


class StreamRefused(NamedTuple):
    """Server: a SYN over a stream limit; the SYNACK error and FIN are already sent.
    ``server`` is True for the server-wide limit, False for the session's own."""

    sid: int
    limit: int
    server: bool = False


class StreamData(NamedTuple):
    """Bytes from the peer for an attached stream."""

    stream: Any
    data: bytes


class StreamClosedByPeer(NamedTuple):
    """The peer sent FIN for an attached stream; it is already out of the table."""

    stream: Any


class StreamAcknowledged(NamedTuple):
    """Client: the server's SYNACK for a stream; ``error`` is empty on success."""

    stream: Any
    error: str


class PaddingSchemeUpdated(NamedTuple):
    """Client: the server sent its padding scheme (already validated)."""

    scheme: PaddingScheme


class HeartbeatAnswered(NamedTuple):
    """A HeartResponse arrived: the peer is alive."""

    sid: int


class UnknownCommand(NamedTuple):
    """A command this version does not know; ignored (section 12)."""

    cmd: int
    length: int


class SessionFailed(NamedTuple):
    """The session must end: ``reason`` says why (for the log). Any Alert is already sent."""

    reason: str


Event = Union[
    Send,
    Authenticated,
    AuthenticationFailed,
    SettingsReceived,
    StreamOpened,
    StreamRefused,
    StreamData,
    StreamClosedByPeer,
    StreamAcknowledged,
    PaddingSchemeUpdated,
    HeartbeatAnswered,
    UnknownCommand,
    SessionFailed,
]


_CLOSED = State.CLOSED
_AUTH = State.AUTH
_PSH = int(Command.PSH)
#: Builds a named tuple without its Python-level ``__new__``: one event per data frame.
_new_tuple = tuple.__new__


class SessionMachine(Generic[S]):
    """Frame handling, the stream table and flow control, common to both sides.

    @ivar state: where the session is in ``AUTH -> SETTINGS -> OPEN -> CLOSED``.
    @ivar peer_version: the protocol version the peer announced (0 until it does).
    @ivar streams: the stream table, stream id to the shell's stream object.
    @ivar streams_opened: streams ever opened on this session.
    @ivar bytes_in: bytes received, preamble included.
    @ivar filler_in: bytes of whole Waste and HeartResponse frames received: frames that are
        not the peer doing anything (the server's idle reaper does not count a read made only
        of them, so answering our heartbeats does not keep an idle session forever).
    @ivar bytes_out: bytes of frames produced for the peer, headers included.
    @ivar write_paused: the peer is backed up (our transport's buffer is full); streams must
        stop reading their targets.
    @ivar read_paused: some stream's target is backed up, so we stop reading the peer.
    """

    def __init__(self) -> None:
        self.state = State.AUTH
        self.peer_version = 0
        self.streams: Dict[int, S] = {}
        self.streams_opened = 0
        self.bytes_in = 0
        self.filler_in = 0
        self.bytes_out = 0
        self.write_paused = False
        self.read_paused = False
        self._blocked: Set[int] = set()
        self._decoder = FrameDecoder()

    # Input.
    def receive(self, data: bytes) -> Iterator[Event]:
        """Feed bytes from the peer; yield what happened, in order.

        Frames are handled one at a time as the caller consumes the events, so what the caller
        does about one event (attach a stream, close the session) is in force for the next
        frame. Once the session is closed, nothing more is yielded.
        """
        state = self.state
        if state is _CLOSED:
            return
        self.bytes_in += len(data)
        if state is _AUTH:
            events: List[Event] = []
            data = self._receive_preamble(data, events)
            yield from events
            if not data or self.state is _CLOSED:
                return
        streams = self.streams
        for frame in self._decoder.feed(data):
            if self.state is _CLOSED:
                return
            if frame[0] == _PSH:  # the data path: no list, no method call
                stream = streams.get(frame[1])
                if stream is not None and frame[2]:
                    yield _new_tuple(StreamData, (stream, frame[2]))
                continue
            events = []
            self._frame(frame, events)
            yield from events

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def _frame(self, frame: Frame, events: List[Event]) -> None:
        cmd = frame.cmd
        if cmd == Command.PSH:
            stream = self.streams.get(frame.sid)
            if stream is not None and frame.data:
                events.append(StreamData(stream, frame.data))
        elif cmd == Command.SYN:
            self._on_syn(frame.sid, events)
        elif cmd == Command.FIN:
            stream = self.streams.pop(frame.sid, None)
            if stream is not None:
                self._blocked.discard(frame.sid)
                events.append(StreamClosedByPeer(stream))
        elif cmd == Command.WASTE:
            self.filler_in += HEADER_SIZE + len(frame.data)
        elif cmd == Command.HEART_REQUEST:
            if self._answers_heartbeats():
                events.append(Send(self._encode(Command.HEART_RESPONSE, frame.sid)))
        elif cmd == Command.HEART_RESPONSE:
            self.filler_in += HEADER_SIZE + len(frame.data)
            events.append(HeartbeatAnswered(frame.sid))
        elif cmd == Command.ALERT:
            if frame.data:
                text = frame.data[:MAX_ALERT_TEXT].decode("utf-8", "replace")
                self.state = State.CLOSED
                events.append(SessionFailed(f"alert from {self.peer_name}: {text!r}"))
        elif cmd in _KNOWN_COMMANDS:
            self._on_side_command(frame, events)
        else:
            events.append(UnknownCommand(cmd, len(frame.data)))

    # Side-specific rules.
    peer_name = "peer"

    def _receive_preamble(self, data: bytes, events: List[Event]) -> bytes:
        """Consume what precedes the frames; return the bytes left for the decoder."""
        self.state = State.SETTINGS
        return data

    def _on_syn(self, sid: int, events: List[Event]) -> None:
        """A SYN from the peer: only clients open streams, so by default it is ignored."""

    def _on_side_command(self, frame: Frame, events: List[Event]) -> None:
        """Settings, SYNACK, UpdatePaddingScheme, ServerSettings: meaning depends on the side."""

    def _answers_heartbeats(self) -> bool:
        return self.peer_version >= 2

    # The stream table.
    def attach(self, sid: int, stream: S) -> None:
        """Put ``stream`` in the table under ``sid`` (a new stream or its replacement)."""
        self.streams[sid] = stream

    def detach(self, sid: int, stream: S) -> bool:
        """Take ``stream`` out of the table; False if it was not there (already gone)."""
        if self.streams.get(sid) is not stream:
            return False
        del self.streams[sid]
        self._blocked.discard(sid)
        return True

    def close(self) -> List[S]:
        """The session ends: return the streams still open, emptying the table."""
        self.state = State.CLOSED
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        return streams

    # Output.
    def _encode(self, cmd: int, sid: int, data: bytes = b"") -> bytes:
        frame = encode_frame(cmd, sid, data)
        self.bytes_out += len(frame)
        return frame

    def data(self, sid: int, data: bytes) -> List[bytes]:
        """PSH frames carrying ``data``, as a list for ``writeSequence``; empty once closed."""
        if self.state is State.CLOSED:
            return []
        frames = data_frames(sid, data)
        self.bytes_out += len(data) + HEADER_SIZE * -(-len(data) // MAX_DATA)
        return frames

    def fin(self, sid: int) -> bytes:
        """The FIN that ends ``sid`` from our side."""
        return b"" if self.state is State.CLOSED else self._encode(Command.FIN, sid)

    def heartbeat(self, sid: int = 0) -> bytes:
        """A HeartRequest, for a peer that speaks version 2."""
        if self.state is State.CLOSED or self.peer_version < 2:
            return b""
        return self._encode(Command.HEART_REQUEST, sid)

    # Flow control.
    def pause_writing(self) -> List[S]:
        """The peer is backed up: return the streams that must stop reading their targets."""
        if self.write_paused:
            return []
        self.write_paused = True
        return list(self.streams.values())

    def resume_writing(self) -> List[S]:
        """The peer drained: return the streams that may read their targets again."""
        if not self.write_paused:
            return []
        self.write_paused = False
        return list(self.streams.values())

    def set_blocked(self, sid: int, blocked: bool) -> Optional[bool]:
        """Stream ``sid``'s target is backed up (or drained). Return the new ``read_paused``
        when reading the peer must stop or restart, else None."""
        if blocked and sid in self.streams:
            self._blocked.add(sid)
        else:
            self._blocked.discard(sid)
        return self.update_reading()

    def update_reading(self) -> Optional[bool]:
        """Re-check ``read_paused`` after the table changed; the new value if it changed."""
        want = bool(self._blocked)
        if self.state is State.CLOSED or want == self.read_paused:
            return None
        self.read_paused = want
        return want


_KNOWN_COMMANDS = frozenset(
    {
        Command.SETTINGS,
        Command.SYNACK,
        Command.UPDATE_PADDING_SCHEME,
        Command.SERVER_SETTINGS,
    }
)


class ServerLimits(Protocol):
    """What the server side reads from its live configuration, at the moment it needs it."""

    @property
    def padding(self) -> PaddingScheme: ...

    @property
    def max_streams(self) -> int: ...


class ServerSession(SessionMachine[S]):
    """The server's rules (sections 3, 5, 7 and 12).

    ``lookup`` maps a password digest to a user (or None); ``limits`` returns the live
    configuration, so a reload's padding scheme and limits apply to the next frame.
    ``take_stream``, if given, is asked before each new stream for a server-wide slot: it
    returns None when it gave one (the shell gives it back when the stream ends), else the
    server-wide limit that is full, and the stream is refused.

    @ivar user: the authenticated user, None before (or without) authentication.
    @ivar client_name: the ``client=`` value of the Settings, cut to 64 characters.
    """

    peer_name = "client"

    def __init__(
        self,
        lookup: Callable[[bytes], Optional[str]],
        limits: Callable[[], ServerLimits],
        take_stream: Optional[Callable[[], Optional[int]]] = None,
    ) -> None:
        super().__init__()
        self._lookup = lookup
        self._limits = limits
        self._take_stream = take_stream
        self._preamble: Optional[PreambleReader] = PreambleReader()
        self._known: Optional[str] = None  # the digest's user, before the padding is in
        self.digest = b""  # kept to re-check the user after a reload; never logged
        self.user: Optional[str] = None
        self.client_name = ""

    def _receive_preamble(self, data: bytes, events: List[Event]) -> bytes:
        """Judge the digest as soon as its 32 bytes are in: a mismatch is final there, so
        random bytes do not hold the connection while waiting for the padding length they
        seem to announce (up to 65535 bytes). Fewer than 32 bytes decide nothing: any prefix
        may be some user's, and ending early on a non-prefix would tell a prober the digest
        byte by byte."""
        reader = self._preamble
        assert reader is not None
        if self._known is None:
            held = reader.buffered
            if len(held) + len(data) < DIGEST_SIZE:
                reader.feed(data)
                return b""
            digest = (held + data[:DIGEST_SIZE])[:DIGEST_SIZE]
            user = self._lookup(digest)
            if user is None:
                self._preamble = None
                self.state = State.CLOSED
                events.append(AuthenticationFailed(held + data))
                return b""
            self._known = user
        result = reader.feed(data)
        if result is None:
            return b""
        digest, rest = result
        self._preamble = None
        self.digest, self.user = digest, self._known
        self.state = State.SETTINGS
        events.append(Authenticated(self._known))
        return rest

    def abandon(self) -> bytes:
        """Authentication did not finish in time: the session ends. Return the bytes read so
        far if none of them was judged (fewer than 32: a fallback may have them), else b""."""
        reader, self._preamble = self._preamble, None
        self.state = State.CLOSED
        if reader is None or self._known is not None:
            return b""
        return reader.buffered

    def _answers_heartbeats(self) -> bool:
        # A v1 client never sends one; a request before Settings is answered as v2 clients expect.
        return self.peer_version >= 2 or self.state is State.SETTINGS

    def _on_side_command(self, frame: Frame, events: List[Event]) -> None:
        if frame.cmd == Command.SETTINGS and frame.data:
            self._on_settings(frame.data, events)
        # SYNACK, UpdatePaddingScheme and ServerSettings are the server's own: ignored.

    def _on_settings(self, data: bytes, events: List[Event]) -> None:
        settings = parse_settings(data)
        self.state = State.OPEN
        scheme = self._limits().padding
        if settings.get("padding-md5", "") != scheme.md5:
            events.append(Send(self._encode(Command.UPDATE_PADDING_SCHEME, 0, scheme.raw)))
        try:
            version = int(settings.get("v", ""))
        except ValueError:
            version = 0
        if version >= 2:
            self.peer_version = max(self.peer_version, version)
            events.append(Send(self._encode(Command.SERVER_SETTINGS, 0, b"v=2")))
        self.client_name = settings.get("client", "")[:MAX_CLIENT_NAME]
        events.append(SettingsReceived(version, self.client_name))

    def _on_syn(self, sid: int, events: List[Event]) -> None:
        if self.state is not State.OPEN:
            events.append(Send(self._encode(Command.ALERT, 0, ALERT_NO_SETTINGS.encode())))
            self.state = State.CLOSED
            events.append(SessionFailed("client opened a stream before sending its settings"))
            return
        if sid in self.streams:
            return
        limit = self._limits().max_streams
        if len(self.streams) >= limit:
            refusal = self.synack(sid, f"too many streams (limit {limit})")
            events.append(Send(refusal + self._encode(Command.FIN, sid)))
            events.append(StreamRefused(sid, limit))
            return
        full = self._take_stream() if self._take_stream is not None else None
        if full is not None:
            refusal = self.synack(sid, "server busy: too many streams")
            events.append(Send(refusal + self._encode(Command.FIN, sid)))
            events.append(StreamRefused(sid, full, server=True))
            return
        self.streams_opened += 1
        events.append(StreamOpened(sid))

    def alert(self, text: str) -> bytes:
        """An Alert carrying ``text`` (the peer shows it and closes); ends the session."""
        if self.state is State.CLOSED:
            return b""
        frame = self._encode(Command.ALERT, 0, text.encode("utf-8")[:MAX_DATA])
        self.state = State.CLOSED
        return frame

    def synack(self, sid: int, error: str = "") -> bytes:
        """The SYNACK for ``sid`` (``error`` empty for success); nothing for v1 clients."""
        if self.state is State.CLOSED or self.peer_version < 2:
            return b""
        return self._encode(Command.SYNACK, sid, error.encode("utf-8")[:MAX_DATA])

    def still_authorised(self, lookup: Callable[[bytes], Optional[str]]) -> bool:
        """Whether this session's password still maps to its user (after a reload)."""
        return self.user is not None and lookup(self.digest) == self.user


class ClientSession(SessionMachine[S]):
    """The client's rules (sections 3, 5, 7.3 and 9): it authenticates, sends Settings and
    opens streams; the server answers SYNACKs and may replace the padding scheme.

    @ivar padding: the scheme in force (the default until the server sends one).
    @ivar client_name: what ``client=`` says in Settings (empty by default: servers can use it
        to single clients out).
    """

    peer_name = "server"

    def __init__(self, padding: PaddingScheme, client_name: str = "") -> None:
        super().__init__()
        self.padding = padding
        self.client_name = client_name
        self._next_sid = 1

    def start(self, password: str, padding_length: int = 0) -> bytes:
        """The session's first bytes: the preamble, then Settings."""
        self.state = State.OPEN
        settings = {"v": str(VERSION), "client": self.client_name, "padding-md5": self.padding.md5}
        preamble = encode_preamble(password, padding_length)
        self.bytes_out += len(preamble)
        return preamble + self._encode(Command.SETTINGS, 0, format_settings(settings))

    def _receive_preamble(self, data: bytes, events: List[Event]) -> bytes:
        return data  # the server sends no preamble; start() moved us past AUTH already

    def open(self, stream: S, address: bytes) -> bytes:
        """Open a stream: SYN plus the destination address, to write in one go."""
        sid = self._next_sid
        self._next_sid += 1
        self.streams_opened += 1
        self.attach(sid, stream)
        return self._encode(Command.SYN, sid) + self._encode(Command.PSH, sid, address)

    def sid_of(self, stream: S) -> Optional[int]:
        for sid, candidate in self.streams.items():
            if candidate is stream:
                return sid
        return None

    def _on_side_command(self, frame: Frame, events: List[Event]) -> None:
        cmd = frame.cmd
        if cmd == Command.SYNACK:
            stream = self.streams.get(frame.sid)
            if stream is not None:
                error = frame.data.decode("utf-8", "replace")
                events.append(StreamAcknowledged(stream, error))
        elif cmd == Command.UPDATE_PADDING_SCHEME:
            try:
                scheme = PaddingScheme.parse(frame.data)
            except ValueError:
                return  # clients keep their scheme when the server's does not parse
            self.padding = scheme
            events.append(PaddingSchemeUpdated(scheme))
        elif cmd == Command.SERVER_SETTINGS:
            try:
                version = int(parse_settings(frame.data).get("v", ""))
            except ValueError:
                version = 0
            self.peer_version = max(self.peer_version, version)
        # Settings from a server means nothing: ignored.
