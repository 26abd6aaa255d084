"""One AnyTLS session to the server: the client's Twisted shell around the session machine.

:class:`~anytls_twisted.protocol.session.ClientSession` decides everything about frames and
the stream table; :class:`ClientSessionProtocol` writes what it produces through the session's
:class:`~anytls_twisted.protocol.padding.PaddingWriter` (only clients pad: anytls-protocol.md
section 6.4), feeds it what it reads, and carries out its events. Streams reach the session
only through its :class:`ClientSessionContext`
(:class:`~anytls_twisted.interfaces.IStreamContext`), as on the server.

The session is the streaming producer registered on its TLS transport: when the server is slow
to read, every stream stops reading its application; a stream whose application is slow to
read stops the session reading TLS (docs/architecture.md, "one vocabulary").

Note on padding: each write the padding writer returns is handed to the TLS transport as its
own ``write``; Twisted may still put several into one TLS record within one reactor turn, so
record sizes on the wire follow the scheme only approximately.
"""

from __future__ import annotations

import itertools
import random
import socket
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.interfaces import IHandshakeListener, IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import logs
from ..interfaces import IStream, IStreamContext
from ..logs import get_logger
from ..nullmetrics import NullMetrics
from ..protocol import session as machine
from ..protocol.address import encode_socks_address
from ..protocol.padding import CHECK_MARK, PaddingScheme, PaddingWriter
from ..session_shell import CLOSE_GRACE, ContextShell, SessionShell, describe

_log = get_logger("anytls_twisted.client.session")

_session_ids = itertools.count(1)
#: Seconds of silence before TCP keepalive probes (mihomo's default, honk PR #114).
KEEPALIVE_IDLE = 15.0
#: The auth preamble without its padding: a SHA-256 digest and a two-byte padding length.
PREAMBLE_SIZE = 34
#: Why a session ended that the server closed after the TLS handshake without sending a byte.
#: Servers answer the client's Settings at once (ServerSettings, protocol version 2), or at the
#: latest with the first stream's SYNACK or data; one that closes first has refused the
#: session: AnyTLS servers (ours and sing-box alike) close silently on a wrong password.
UNANSWERED = (
    "the server closed the session before answering: wrong password, or not an AnyTLS server"
)


class SessionOwner:
    """What a session tells its owner (the session manager); a base with no-op defaults."""

    def padding_updated(self, scheme: PaddingScheme) -> None:
        """The server sent a new padding scheme: use it for new sessions too."""

    def frame_arrived(self, session: ClientSessionProtocol) -> None:
        """Bytes arrived on ``session``: proof of life (for the SYNACK watchdog)."""

    def synack_arrived(
        self, session: ClientSessionProtocol, stream: IStream, error: str = ""
    ) -> None:
        """``stream``'s SYNACK arrived: success (empty ``error``) or the server's refusal."""

    def stream_ended(self, session: ClientSessionProtocol, stream: IStream) -> None:
        """``stream`` left ``session``'s table; its FIN, if one was due, is written."""

    def rescue(self, session: ClientSessionProtocol, stream: IStream) -> bool:
        """``session`` is gone with ``stream`` still in its table: True if the owner takes
        the stream over (to open it elsewhere), else it ends with the session."""
        return False

    def session_closed(
        self, session: ClientSessionProtocol, reason: Optional[Failure] = None
    ) -> None:
        """``session``'s connection is gone (``reason``: what ``connectionLost`` was given)."""


@implementer(IStreamContext)
class ClientSessionContext(ContextShell):
    """What the client's streams ask of their session (see
    :class:`~anytls_twisted.interfaces.IStreamContext`). A client never sends SYNACK, so
    :meth:`acknowledge` does nothing, and streams are never replaced."""

    config = None

    def __init__(self, session: ClientSessionProtocol) -> None:
        self._session = session
        self.clock = session.clock
        self.metrics = NullMetrics()
        self.session_id = session.session_id

    @property
    def peer_version(self) -> int:
        return self._session.machine.peer_version

    @property
    def local_address(self) -> Any:
        """The local end of the session's connection (a stream transport's ``getHost``)."""
        transport = self._session.transport
        return transport.getHost() if transport is not None else None

    def acknowledge(self, stream: IStream, error: str = "") -> None:
        """Only servers acknowledge streams."""

    def write(self, stream: IStream, data: bytes) -> None:
        frames = self._session.machine.data(stream.sid, data)
        if frames:
            self._session.write_frames(b"".join(frames))

    def end(self, stream: IStream, reason: str, error: Optional[str] = None) -> None:
        session = self._session
        if not session.machine.detach(stream.sid, stream):
            return
        session.write_frames(session.machine.fin(stream.sid))
        session.stream_ended(stream, reason)

    def replace(self, old: IStream, new: IStream) -> None:
        raise NotImplementedError("client streams are never replaced")


@implementer(IPushProducer, IHandshakeListener)
class ClientSessionProtocol(SessionShell, Protocol):
    """The client side of one AnyTLS session (one TLS connection to the server).

    @ivar machine: the protocol rules (:class:`~anytls_twisted.protocol.session.ClientSession`).
    @ivar writer: pads the session's writes (:class:`~anytls_twisted.protocol.padding.PaddingWriter`).
    @ivar context: what this session's streams use (:class:`ClientSessionContext`).
    @ivar frames_seen: whether anything arrived from the server yet (after which a server that
        did not announce version 2 is taken to be version 1).
    @ivar handshake_done: whether the TLS handshake completed (at once on a plain transport).
    @ivar server: the server's address as ``host:port``, for logs.
    """

    transport: Any
    #: ``host:port`` of the server, for the log (set by the session manager).
    server = "?"

    def __init__(
        self,
        password: str,
        padding: PaddingScheme,
        clock: Any,
        owner: Optional[SessionOwner] = None,
        client_name: str = "",
        randrange: Optional[Callable[[int, int], int]] = None,
    ) -> None:
        self.session_id = next(_session_ids)
        self.clock = clock
        self.owner = owner or SessionOwner()
        self.machine: machine.ClientSession[IStream] = machine.ClientSession(padding, client_name)
        self._randrange = randrange or random.SystemRandom().randrange
        self.writer = PaddingWriter(padding, self._randrange)
        self.context = ClientSessionContext(self)
        self.frames_seen = False
        self.handshake_done = False
        self.connected = False
        self.opened_at = clock.seconds()
        self._password = password

    @property
    def closed(self) -> bool:
        return self._close_reason is not None or self.machine.closed

    @property
    def streams(self) -> Dict[int, IStream]:
        return self.machine.streams

    # Protocol.
    def connectionMade(self) -> None:
        self.connected = True
        if self.server == "?":  # not set by a session manager: name the peer
            peer = self.transport.getPeer()
            self.server = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}".rstrip(":")
        if not ISSLTransport.providedBy(self.transport):
            self.handshake_done = True  # plain TCP (a sing-box outbound without tls)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            try:
                no_delay(True)
            except OSError:
                pass
        tcp_keepalive(self.transport, KEEPALIVE_IDLE)
        self.transport.registerProducer(self, True)
        # The preamble is packet 0: padded by the scheme's first size for packet 0, and written
        # apart from the writer, which holds Settings back until the first SYN (packet 1).
        padding = preamble_padding(self.machine.padding, self._randrange)
        start = self.machine.start(self._password, padding)
        cut = PREAMBLE_SIZE + padding
        self.transport.write(start[:cut])
        self.write_frames(start[cut:])

    def dataReceived(self, data: bytes) -> None:
        self.frames_seen = True
        self.owner.frame_arrived(self)
        event: Any
        for event in self.machine.receive(data):
            kind = type(event)
            if kind is machine.StreamData:
                event.stream.dataReceived(event.data)
            elif kind is machine.Send:
                self.write_frames(event.data)
            elif kind is machine.StreamAcknowledged:
                self.owner.synack_arrived(self, event.stream, event.error)
                event.stream.synack(event.error)
            elif kind is machine.StreamClosedByPeer:
                self.stream_ended(event.stream, "the server closed the stream")
            elif kind is machine.PaddingSchemeUpdated:
                self.writer.update_scheme(event.scheme)
                self.owner.padding_updated(event.scheme)
            elif kind is machine.SessionFailed:
                self.close(event.reason)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        # Closed by the server (not by us) after the handshake, before it sent anything.
        unanswered = self._close_reason is None and self.handshake_done and not self.frames_seen
        reason_text = UNANSWERED if unanswered else self._close_reason or describe(reason)
        self._cancel_close_timer()
        self._close_reason = reason_text
        for stream in self.machine.close():
            if not self.owner.rescue(self, stream):
                self.stream_ended(stream, f"session closed: {reason_text}")
        self.owner.session_closed(self, reason)
        if unanswered:
            _log.warn(
                "the server {server} closed session {session_id} before answering: the "
                "password is probably wrong (or {server} is not an AnyTLS server)",
                server=self.server,
                session_id=self.session_id,
            )
            return
        _log.info(
            "session {session_id} to the server closed: {reason} ({server}, {duration}s, "
            "{streams} streams, {bytes_in} bytes in, {bytes_out} bytes out)",
            session_id=self.session_id,
            server=self.server,
            duration=round(self.clock.seconds() - self.opened_at, 3),
            reason=reason_text,
            streams=self.machine.streams_opened,
            bytes_in=self.machine.bytes_in,
            bytes_out=self.machine.bytes_out,
        )

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake with the server succeeded."""
        self.handshake_done = True

    @property
    def close_reason(self) -> Optional[str]:
        """Why the session closed or is closing, else None."""
        return self._close_reason

    # What the manager asks.
    def announce(self) -> None:
        """Send the Settings now, without a stream (a probe or a pre-warmed session): a v2
        server answers them at once, which proves the password and the path."""
        for chunk in self.writer.flush():
            self.transport.write(chunk)

    def heartbeat(self) -> None:
        """Send a HeartRequest (nothing for a server that does not speak version 2)."""
        self.write_frames(self.machine.heartbeat())

    def open(self, stream: Any) -> None:
        """Open ``stream`` (a :class:`~anytls_twisted.client.stream.ClientStream`): SYN and its
        destination, then tell the stream which id it has."""
        known_v1 = self.frames_seen and self.machine.peer_version < 2
        address = encode_socks_address(stream.destination)
        self.write_frames(self.machine.open(stream, address))
        sid = self.machine.sid_of(stream)
        assert sid is not None
        if logs.DEBUG:
            _log.debug(
                "stream {session_id}/{stream_id} open to {destination} ({kind})",
                session_id=self.session_id,
                stream_id=sid,
                destination=str(stream.destination),
                kind=stream.kind,
            )
        if self.machine.write_paused:
            stream.pauseProducing()
        stream.opened(self.context, sid, known_v1)

    def _closing(self) -> bool:
        return bool(self.connected)

    # For the context.
    def write_frames(self, frames: bytes) -> None:
        """Write whole frames through the padding writer."""
        if not frames:
            return
        for chunk in self.writer.write(frames):
            self.transport.write(chunk)

    def stream_ended(self, stream: IStream, reason: str) -> None:
        """A stream left the table: release its application connection, tell the owner."""
        if logs.DEBUG:
            _log.debug(
                "stream {session_id}/{stream_id} closed: {reason} ({destination}, {duration}s, "
                "{bytes_in} bytes in, {bytes_out} bytes out)",
                session_id=self.session_id,
                stream_id=stream.sid,
                reason=reason,
                destination=str(stream.destination),
                duration=round(self.clock.seconds() - getattr(stream, "opened_at", 0.0), 3),
                bytes_in=stream.bytes_in,
                bytes_out=stream.bytes_out,
            )
        stream.connectionLost(reason)
        self.set_reading(self.machine.update_reading())
        self.owner.stream_ended(self, stream)


def tcp_keepalive(transport: Any, idle: float) -> None:
    """TCP keepalive probes after ``idle`` seconds of silence, on the socket under
    ``transport`` (TLS wrappers are walked down), so that NATs keep an idle session's mapping
    (client-behaviour.md section 4). Best effort: transports without a socket are left alone."""
    seen = 0
    while transport is not None and seen < 4:
        handle = getattr(transport, "getHandle", None)
        sock = handle() if handle is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                seconds = max(1, int(idle))
                for name, value in (("TCP_KEEPIDLE", seconds), ("TCP_KEEPINTVL", seconds)):
                    option = getattr(socket, name, None)
                    if option is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:
                pass
            return
        transport = getattr(transport, "transport", None)
        seen += 1


def preamble_padding(scheme: PaddingScheme, randrange: Callable[[int, int], int]) -> int:
    """The preamble's padding length: the first size of the scheme's packet 0 (sing-anytls)."""
    for low, high in scheme.plans.get(0, ()):
        if low == CHECK_MARK:
            continue
        return low if low == high else randrange(low, high)
    return 0


__all__: List[str] = [
    "CLOSE_GRACE",
    "ClientSessionContext",
    "ClientSessionProtocol",
    "SessionOwner",
    "UNANSWERED",
]
