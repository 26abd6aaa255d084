"""One client stream: a local application's connection relayed over an AnyTLS session.

The local proxy shell (:mod:`.local`) owns the application's TCP connection and speaks SOCKS or
HTTP on it; once it knows the destination it makes a :class:`ClientStream` and asks the
:class:`~anytls_twisted.client.sessions.SessionManager` to open it. The stream then carries the
bytes both ways with the seam's vocabulary (:mod:`anytls_twisted.interfaces`): the session
pauses the stream when the server is backed up (the stream stops reading the application), and
the stream pauses the peer when the application is slow to read.

When to tell the application that the connection is open (the SOCKS success reply; the HTTP
``200`` or the forwarded request's answer): the stream waits for the server's SYNACK, so a
refused destination becomes a SOCKS error code or a ``502`` with the server's reason instead of
"success, then an empty close" (client-behaviour.md section 5). That costs one round trip per
stream. Servers that never send SYNACK (protocol version 1) are recognised: on a session known
to be v1 the stream is established at once; on a fresh session whose version is not known yet,
data from the server establishes it, and so does :data:`SYNACK_WAIT` seconds of silence when
the server has still not said it speaks v2.
"""

from __future__ import annotations

from typing import Any, List, Optional

from zope.interface import implementer

from ..interfaces import IStream, IStreamContext
from ..protocol.address import Destination
from ..session_shell import PeerProducer
from ..writethrough import write_through

#: Seconds a stream waits for its SYNACK before deciding (see the module docstring).
SYNACK_WAIT = 15.0
#: Bytes from the application held while no session carries the stream yet (the dial): past
#: this, the application's connection stops being read until the stream is on a session.
PENDING_LIMIT = 64 * 1024
#: Bytes sent before the server's first answer that are kept to open the stream again on
#: another session if this one dies first (:meth:`ClientStream.rewind`); past this, no retry.
REPLAY_LIMIT = 64 * 1024


class LocalSide:
    """What a stream needs from the local connection's shell (a base with no-op defaults)."""

    transport: Any = None

    def established(self) -> None:
        """The server accepted the stream: answer the application's request with success."""

    def refused(self, error: str) -> None:
        """The stream could not be opened (``error`` says why): answer with an error."""


@implementer(IStream)
class ClientStream:
    """A stream from the local application to ``destination``, through the server.

    @ivar context: the session's :class:`~anytls_twisted.interfaces.IStreamContext` once the
        stream is open on a session, else None.
    @ivar state: ``"opening"`` (no session or no answer yet), ``"open"`` (established),
        ``"refused"`` (the application was told it failed), ``"closed"``.
    @ivar attempts: the dial attempt that gave the stream its session (0: the first).
    """

    kind = "tcp"
    #: Rewrites what the server sends before the application sees it (``feed(data) -> bytes``
    #: and ``end() -> bytes``), or None: the HTTP proxy's forwarded requests use one.
    response_filter: Any = None

    def __init__(self, local: LocalSide, destination: Destination, clock: Any) -> None:
        self.local = local
        self.destination = destination
        self.clock = clock
        self.sid = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened_at = clock.seconds()
        self.context: Optional[IStreamContext] = None
        self.state = "opening"
        self.peer_paused = False
        self.attempts = 0
        # What was sent before the server's first answer, while it fits REPLAY_LIMIT.
        self._replay: Optional[List[bytes]] = []
        self._replay_size = 0
        self._pending: List[bytes] = []
        self._pending_size = 0
        self._paused_local = False  # paused by us: too much pending before a session
        self._held = False  # paused by the session (backpressure)
        self._timer: Any = None

    @property
    def queued(self) -> int:
        """Writes held until the stream is on a session."""
        return len(self._pending)

    # The session side.
    def opened(self, context: IStreamContext, sid: int, known_v1: bool) -> None:
        """The SYN went out on a session: flush what the application sent meanwhile."""
        self.context, self.sid = context, sid
        if self.state == "closed":  # the application left while the session was dialled
            context.end(self, "the local connection closed")
            return
        pending, self._pending, self._pending_size = self._pending, [], 0
        for data in pending:
            self.send(data)
        if self._paused_local:
            self._paused_local = False
            transport = self.local.transport
            if transport is not None and not self._held:
                transport.resumeProducing()
        if known_v1:
            self._establish()
        else:
            self._timer = self.clock.callLater(SYNACK_WAIT, self._synack_overdue)

    def start(self, data: bytes) -> None:
        """Unused on the client: the client's streams are opened by :meth:`opened`."""

    def synack(self, error: str) -> None:
        """The server's SYNACK: success (empty ``error``) or the reason it refused."""
        if error:
            self._refuse(f"remote: {error}")
        else:
            self._establish()

    def failed(self, error: str) -> None:
        """No session could carry the stream (the server could not be reached)."""
        self._refuse(error)
        self._release()

    def reset(self, error: str) -> None:
        """Give the stream up (the SYNACK watchdog): the application gets ``error`` if it was
        not answered yet, the server a FIN."""
        if self.state == "opening":
            self._refuse(error)
        elif self.context is not None:
            self.context.end(self, error)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "opening":
            self._establish()  # a v1 server, or data overtaking nothing: it is open
        self._replay = None
        self.bytes_in += len(data)
        if self.response_filter is not None:
            data = self.response_filter.feed(data)
        transport = self.local.transport
        if transport is not None and data:
            write_through(transport, (data,))

    def connectionLost(self, reason: str) -> None:
        if self.state == "opening":
            self.local.refused(reason)
        self._release()

    def pauseProducing(self) -> None:
        """The session is backed up: stop reading the application."""
        self._held = True
        transport = self.local.transport
        if transport is not None:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._held = False
        transport = self.local.transport
        if transport is not None and not self._paused_local:
            transport.resumeProducing()

    def stopProducing(self) -> None:
        """The session is going away; ``connectionLost`` follows."""

    # The local side.
    def send(self, data: bytes) -> None:
        """Bytes from the application for the destination."""
        if self.state in ("closed", "refused") or not data:
            return
        if self.context is None:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > PENDING_LIMIT and not self._paused_local:
                self._paused_local = True  # resumed once the stream is on a session
                transport = self.local.transport
                if transport is not None:
                    transport.pauseProducing()
            return
        self.bytes_out += len(data)
        if self._replay is not None:
            self._replay_size += len(data)
            if self._replay_size > REPLAY_LIMIT:
                self._replay = None
            else:
                self._replay.append(data)
        self.context.write(self, data)

    def local_closed(self) -> None:
        """The application closed its connection: end the stream (FIN to the server)."""
        if self.state == "closed":
            return
        if self.context is None:
            self.state = "closed"  # opened() ends it once a session exists
            self._cancel_timer()
            return
        self.context.end(self, "the local connection closed")

    def rewind(self) -> bool:
        """Its session died before the server answered this stream: become a stream that no
        session carries yet, holding again what it had sent, so it can be opened elsewhere.
        False when that is not possible (answered, closed, or too much sent)."""
        if self.state != "opening" or self._replay is None:
            return False
        self._cancel_timer()
        self.context, self.sid = None, 0
        self._pending = self._replay
        self._pending_size = self._replay_size
        self._replay, self._replay_size = [], 0
        self.bytes_out = 0
        self.peer_paused = False
        return True

    def pause_peer(self, paused: bool) -> None:
        if paused == self.peer_paused or self.context is None:
            return
        self.peer_paused = paused
        if paused:
            self.context.pausePeer(self)
        else:
            self.context.resumePeer(self)

    # Helpers.
    def _establish(self) -> None:
        if self.state != "opening":
            return
        self.state = "open"
        self._replay = None
        self._cancel_timer()
        transport = self.local.transport
        if transport is not None:
            transport.registerProducer(PeerProducer(self), True)
        self.local.established()

    def _refuse(self, error: str) -> None:
        if self.state != "opening":
            return
        self.state = "refused"
        self.local.refused(error)
        if self.context is not None:
            self.context.end(self, f"refused: {error}")

    def _synack_overdue(self) -> None:
        self._timer = None
        if self.state != "opening" or self.context is None:
            return
        if getattr(self.context, "peer_version", 0) >= 2:
            self._refuse(f"no answer from the server in {SYNACK_WAIT:g} seconds (timed out)")
        else:
            self._establish()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _release(self) -> None:
        """Once, whoever ended the stream: close the application's connection."""
        self.state = "closed"
        self._cancel_timer()
        self._pending = []
        transport = self.local.transport
        if transport is not None:
            if self.response_filter is not None:
                held = self.response_filter.end()
                if held:
                    transport.write(held)
            try:
                transport.unregisterProducer()
            except RuntimeError:
                pass
            transport.loseConnection()
