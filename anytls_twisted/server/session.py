"""One AnyTLS session per TLS connection: authentication, settings, the stream table.

The session is a thin Twisted ``Protocol`` around a small state machine:

``AUTH`` (collecting the preamble) -> ``SETTINGS`` (authenticated, no Settings yet)
-> ``OPEN`` (streams allowed) -> ``CLOSED``.

Frames come from the pure :class:`~anytls_twisted.protocol.codec.FrameDecoder`; the rules applied to each
command are those of anytls-protocol.md section 4.2, with the robustness recommendations of
section 12 (data on data-less commands is skipped, unknown commands are ignored).

It is also the streaming producer registered on its TLS transport: when the client is slow to
read, every origin of the session stops being read (docs/architecture.md).
"""

from __future__ import annotations

import enum
import itertools
from typing import Dict, Optional, Set

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import logs
from ..logs import get_logger
from ..protocol import codec
from ..protocol.address import MAX_ADDRESS_SIZE, AddressError, parse_socks_address
from ..protocol.auth import PreambleReader
from ..protocol.codec import Command, Frame
from .stream import no_delay

_log = get_logger("anytls_twisted.session")

ALERT_NO_SETTINGS = "client did not send its settings"
#: Seconds a closing session waits for the peer's close_notify before aborting.
CLOSE_GRACE = 5.0
_session_ids = itertools.count(1)


class State(enum.Enum):
    AUTH = "auth"
    SETTINGS = "settings"
    OPEN = "open"
    CLOSED = "closed"


class _PendingStream:
    """A stream whose destination address has not fully arrived yet (at most 259 bytes)."""

    kind = "pending"
    destination = None
    bytes_in = bytes_out = 0

    def __init__(self, session: SessionProtocol, sid: int) -> None:
        self.session = session
        self.sid = sid
        self.buffer = b""
        self.closed = False
        self.opened_at = session.clock.seconds()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.session.address_progress(self)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.session.stream_finished(self, reason, send_fin=False)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@implementer(IPushProducer)
class SessionProtocol(Protocol):
    """The server side of one AnyTLS session.

    ``factory`` supplies ``config``, ``clock``, ``dialer``, ``open_stream`` (destination ->
    stream object) and ``registry`` (live sessions, for the reaper and shutdown).
    """

    def __init__(self) -> None:
        self.state = State.AUTH
        self.session_id = next(_session_ids)
        self.user: Optional[str] = None
        self.peer = "?"
        self.peer_version = 0
        self.streams: Dict[int, object] = {}
        self.streams_opened = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.paused = False
        self.reading_paused = False
        self.client_name = ""
        self._blocked: Set[object] = set()
        self._preamble = PreambleReader()
        self._decoder = codec.FrameDecoder()
        self._auth_timer = None
        self._digest = b""  # kept to re-check the user after a reload; never logged
        self._close_timer = None
        self._close_reason: Optional[str] = None
        self.opened_at = 0.0
        self.last_activity = 0.0

    # Shortcuts to the shared server context.
    @property
    def config(self):
        return self.factory.config

    @property
    def clock(self):
        return self.factory.clock

    @property
    def dialer(self):
        return self.factory.dialer

    @property
    def metrics(self):
        return self.factory.metrics

    # Protocol.
    def _note_peer(self) -> None:
        """Read the client's address. Called again once data arrives (and at a close before
        authentication): behind ``haproxy:`` ports, ``getPeer()`` gives the address from the
        PROXY header only after the header has been read, which is after ``connectionMade``."""
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}".rstrip(":")

    def connectionMade(self) -> None:
        no_delay(self.transport)  # TLS wrappers pass it on to the TCP transport beneath
        self._note_peer()
        self.opened_at = self.last_activity = self.clock.seconds()
        self._auth_timer = self.clock.callLater(self.config.auth_timeout, self._auth_timed_out)
        self.transport.registerProducer(self, True)
        self.factory.registry.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self.bytes_in += len(data)
        if self.state is State.AUTH:
            self._note_peer()
            result = self._preamble.feed(data)
            if result is None:
                return
            digest, data = result
            self.user = self.factory.config.users.lookup(digest)
            if self.user is None:
                self.metrics.auth_failed("wrong_password")
                self.close("authentication failed")
                return
            self._cancel_auth_timer()
            self._digest = digest
            self.state = State.SETTINGS
            self.metrics.session_opened(self)
            _log.info(
                "session {session_id} open from {peer} user {user}",
                session_id=self.session_id,
                peer=self.peer,
                user=self.user,
            )
            if not data:
                return
        self.last_activity = self.clock.seconds()
        for frame in self._decoder.feed(data):
            self._handle(frame)
            if self.state is State.CLOSED:
                return

    def connectionLost(self, reason: Failure = None) -> None:
        reason_text = self._close_reason or _describe(reason)
        self.state = State.CLOSED
        self._cancel_auth_timer()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        for stream in list(self.streams.values()):
            stream.close("session closed")
        self.factory.registry.discard(self)
        self.metrics.session_closed(self)
        if self.user is None:
            self._note_peer()
            _log.info(
                "connection from {peer} closed before authentication: {reason}",
                peer=self.peer,
                reason=reason_text,
            )
            return
        _log.info(
            "session {session_id} closed: {reason} (user {user}, peer {peer}, {duration:.1f}s, "
            "{bytes_in} bytes in, {bytes_out} bytes out, {streams} streams, client {client})",
            session_id=self.session_id,
            client=self.client_name or "?",
            peer=self.peer,
            user=self.user,
            duration=self.clock.seconds() - self.opened_at,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            streams=self.streams_opened,
            reason=reason_text,
        )

    def close(self, reason: str, abort: bool = False) -> None:
        """End the session (once): streams are closed without FIN, then the TLS connection.

        A polite close sends close_notify and waits for the peer's; a peer that never answers
        is aborted after ``CLOSE_GRACE`` seconds.
        """
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._close_reason = reason
        self._cancel_auth_timer()
        # TLS only shuts down once no producer is registered; and it must read to see the
        # peer's close_notify.
        self.transport.unregisterProducer()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()
        if abort:
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        self._close_timer = self.clock.callLater(CLOSE_GRACE, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        self.transport.abortConnection()

    # IPushProducer: our TLS transport's write buffer is full / drained.
    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            for stream in list(self.streams.values()):
                stream.pause_reading()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            for stream in list(self.streams.values()):
                stream.resume_reading()

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` follows and cleans up."""

    # Frame handling.
    def _handle(self, frame: Frame) -> None:
        cmd = frame.cmd
        if cmd == Command.PSH:
            stream = self.streams.get(frame.sid)
            if stream is not None and frame.data:
                stream.data_received(frame.data)
        elif cmd == Command.SYN:
            self._syn(frame.sid)
        elif cmd == Command.FIN:
            stream = self.streams.get(frame.sid)
            if stream is not None:
                stream.close("client closed the stream")
        elif cmd == Command.WASTE:
            pass
        elif cmd == Command.SETTINGS:
            if frame.data:
                self._settings(frame.data)
        elif cmd == Command.HEART_REQUEST:
            if self.peer_version >= 2 or self.state is State.SETTINGS:
                self._write(Command.HEART_RESPONSE, frame.sid)
        elif cmd == Command.ALERT:
            if frame.data:
                text = frame.data[:200].decode("utf-8", "replace")
                self.close(f"alert from client: {text!r}")
        elif cmd in (
            Command.SYNACK,
            Command.UPDATE_PADDING_SCHEME,
            Command.SERVER_SETTINGS,
            Command.HEART_RESPONSE,
        ):
            pass
        elif logs.DEBUG:  # skip building an event the filter drops
            _log.debug(
                "session {session_id}: ignoring unknown command {cmd} ({length} bytes)",
                session_id=self.session_id,
                cmd=cmd,
                length=len(frame.data),
            )

    def _settings(self, data: bytes) -> None:
        settings = codec.parse_settings(data)
        self.state = State.OPEN
        scheme = self.config.padding
        if settings.get("padding-md5", "") != scheme.md5:
            self._write(Command.UPDATE_PADDING_SCHEME, 0, scheme.raw)
        try:
            version = int(settings.get("v", ""))
        except ValueError:
            version = 0
        if version >= 2:
            self.peer_version = max(self.peer_version, version)
            self._write(Command.SERVER_SETTINGS, 0, b"v=2")
        self.client_name = settings.get("client", "")[:64]

    def _syn(self, sid: int) -> None:
        if self.state is not State.OPEN:
            self._write(Command.ALERT, 0, ALERT_NO_SETTINGS.encode())
            self.close("client opened a stream before sending its settings")
            return
        if sid in self.streams:
            return
        if len(self.streams) >= self.config.max_streams:
            self.send_synack(sid, f"too many streams (limit {self.config.max_streams})")
            self._write(Command.FIN, sid)
            _log.warn(
                "session {session_id}: refused stream {stream_id}, limit {limit} reached",
                session_id=self.session_id,
                stream_id=sid,
                limit=self.config.max_streams,
            )
            return
        self.streams_opened += 1
        self.streams[sid] = _PendingStream(self, sid)
        if self.paused:
            self.streams[sid].pause_reading()

    def address_progress(self, pending: _PendingStream) -> None:
        """More bytes for a stream still reading its destination address."""
        try:
            parsed = parse_socks_address(pending.buffer)
        except AddressError as e:
            self._refuse_pending(pending, f"bad destination address: {e}")
            return
        if parsed is None:
            if len(pending.buffer) >= MAX_ADDRESS_SIZE:  # pragma: no cover - parser bounds this
                self._refuse_pending(pending, "bad destination address")
            return
        destination, end = parsed
        rest = pending.buffer[end:]
        stream = self.factory.open_stream(self, pending.sid, destination)
        self.streams[pending.sid] = stream
        self.metrics.stream_opened(stream)
        if logs.DEBUG:  # skip building an event the filter drops
            _log.debug(
                "stream {session_id}/{stream_id} open to {destination} ({kind})",
                session_id=self.session_id,
                stream_id=pending.sid,
                destination=str(destination),
                kind=stream.kind,
            )
        if self.paused:
            stream.pause_reading()
        stream.start(rest)

    def _refuse_pending(self, pending: _PendingStream, reason: str) -> None:
        pending.closed = True
        self.send_synack(pending.sid, reason)
        self.stream_finished(pending, reason, send_fin=True)

    # Calls from streams.
    def send_synack(self, sid: int, error: str = "") -> None:
        """SYNACK exists only in protocol v2; v1 clients never see it."""
        if self.peer_version >= 2:
            self._write(Command.SYNACK, sid, error.encode("utf-8")[: codec.MAX_DATA])

    def send_data(self, sid: int, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        frames = codec.data_frames(sid, data)
        self.bytes_out += len(data) + codec.HEADER_SIZE * (len(frames) // 2)
        self.transport.writeSequence(frames)

    def stream_finished(self, stream, reason: str, send_fin: bool) -> None:
        """A stream ended; drop it from the table and tell the client if we ended it."""
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
        self.metrics.stream_closed(stream)
        self._blocked.discard(stream)
        self._update_reading()
        self.last_activity = self.clock.seconds()
        if send_fin:
            self._write(Command.FIN, stream.sid)
        if logs.DEBUG:  # skip building an event the filter drops
            _log.debug(
                "stream {session_id}/{stream_id} closed: {reason} ({destination}, {duration:.1f}s, "
                "{bytes_in} bytes in, {bytes_out} bytes out)",
                session_id=self.session_id,
                duration=self.clock.seconds() - stream.opened_at,
                stream_id=stream.sid,
                destination=str(stream.destination),
                bytes_in=stream.bytes_in,
                bytes_out=stream.bytes_out,
                reason=reason,
            )

    def set_stream_blocked(self, stream, blocked: bool) -> None:
        """A stream cannot take more client data (or can again): stop or resume reading TLS."""
        if blocked and stream in self.streams.values():
            self._blocked.add(stream)
        else:
            self._blocked.discard(stream)
        self._update_reading()

    def _update_reading(self) -> None:
        want_paused = bool(self._blocked)
        if self.state is State.CLOSED or want_paused == self.reading_paused:
            return
        self.reading_paused = want_paused
        if want_paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # Internals.
    def _write(self, cmd: int, sid: int, data: bytes = b"") -> None:
        if self.state is State.CLOSED:
            return
        frame = codec.encode_frame(cmd, sid, data)
        self.bytes_out += len(frame)
        self.transport.write(frame)

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        self.metrics.auth_failed("timeout")
        self.close("handshake and authentication not finished in time", abort=True)

    def _cancel_auth_timer(self) -> None:
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None

    def still_authorised(self, users) -> bool:
        """Whether this session's password still maps to its user in ``users`` (reloads)."""
        return users.lookup(self._digest) == self.user

    @property
    def idle(self) -> bool:
        return not self.streams


def _describe(reason: Optional[Failure]) -> str:
    if reason is None:
        return "connection lost"
    return reason.getErrorMessage() or reason.type.__name__
