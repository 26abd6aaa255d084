"""Streams: one proxied TCP connection per AnyTLS stream, plus what every stream kind shares.

Every stream provides :class:`~anytls_twisted.interfaces.IStream` and talks to its session only
through its :class:`~anytls_twisted.interfaces.IStreamContext` (docs/architecture.md has the
vocabulary). Flow control: origin -> client, the session pauses every stream (they stop reading
their origins) while its TLS transport is backed up. Client -> origin, a stream whose origin
transport is backed up (or whose pre-connect buffer is over its high-water mark) asks the
context to pause the peer, and the session stops reading TLS until no stream needs that.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import logs
from ..interfaces import IStream
from ..logs import get_logger
from ..protocol.address import Destination
from ..readsize import read_frames_at_once
from ..session_shell import PeerProducer
from ..writethrough import write_through
from .dialer import DialError

_log = get_logger("anytls_twisted.stream")


@implementer(IStream)
class BaseStream:
    """State and bookkeeping common to TCP and UDP streams.

    @ivar context: the session's :class:`~anytls_twisted.interfaces.IStreamContext`.
    @ivar sid: the stream id.
    @ivar destination: where the client asked to go.
    @ivar bytes_in: client -> origin bytes.
    @ivar bytes_out: origin -> client bytes.
    @ivar closed: set once the stream has ended (``connectionLost`` ran).
    @ivar opened_at: when the SYN arrived (clock seconds), for SYNACK latency and logs.
    """

    kind = "tcp"

    def __init__(self, context: Any, sid: int, destination: Destination, opened_at: float) -> None:
        self.context = context
        self.sid = sid
        self.destination = destination
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self.opened_at = opened_at

    def relay(self, data: bytes) -> None:
        """Origin bytes to the client."""
        if not self.closed and data:
            self.bytes_out += len(data)
            self.context.write(self, data)

    def end(self, reason: str, error: Optional[str] = None) -> None:
        """End the stream from our side (``error``: the SYNACK text if none went out yet)."""
        if not self.closed:
            self.context.end(self, reason, error)

    # IStream.
    def start(self, data: bytes = b"") -> None:
        raise NotImplementedError

    def dataReceived(self, data: bytes) -> None:
        raise NotImplementedError

    def connectionLost(self, reason: str) -> None:
        self.closed = True

    def pauseProducing(self) -> None:
        """The client is backed up: stop reading from the origin."""

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def no_delay(transport: Any) -> None:
    """Turn off Nagle's algorithm where the transport is TCP: a relay forwards small writes
    (SYNACK, a request, the first bytes of a reply) that must not wait for a delayed ACK."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


class _OriginProtocol(Protocol):
    """The origin end of a TCP stream: a thin shell that forwards to the stream."""

    transport: Any  # a TCP transport: ITCPTransport and IPushProducer

    def __init__(self, stream: TCPStream) -> None:
        self.stream = stream

    def connectionMade(self) -> None:
        no_delay(self.transport)
        read_frames_at_once(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.stream.relay(data)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.stream.origin = None
        self.stream.end("origin closed")


class _OriginFactory(Factory):
    noisy = False

    def __init__(self, stream: TCPStream) -> None:
        self.stream = stream

    def buildProtocol(self, addr: Any) -> _OriginProtocol:
        return _OriginProtocol(self.stream)


class TCPStream(BaseStream):
    """A stream relayed to a TCP origin.

    @ivar origin: the connected origin protocol, None before the connect and after the close.
    @ivar peer_paused: whether this stream holds the client's reads paused.
    """

    def __init__(self, context: Any, sid: int, destination: Destination, opened_at: float) -> None:
        super().__init__(context, sid, destination, opened_at)
        self.origin: Optional[_OriginProtocol] = None
        self.peer_paused = False
        self._pending: List[bytes] = []
        self._pending_size = 0
        self._guard: Any = None
        self._dialing: Optional[defer.Deferred[Any]] = None

    def start(self, data: bytes = b"") -> None:
        """Begin the origin connect; ``data`` is what followed the address."""
        context = self.context
        config = context.config
        self._guard = context.clock.callLater(config.synack_guard, self._guard_fired)
        dialing = context.dialer.dial(self.destination, _OriginFactory(self), config.policy)
        if not dialing.called:
            self._dialing = dialing
        dialing.addCallbacks(self._connected, self._dial_failed)
        if data:
            self.dataReceived(data)

    # IStream.
    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.bytes_in += len(data)
        if self.origin is not None:
            write_through(self.origin.transport, (data,))
            return
        self._pending.append(data)
        self._pending_size += len(data)
        high_water = self.context.config.pending_high_water
        if self._pending_size > high_water * 4:
            self.end("too much data before the origin connected", "buffer limit exceeded")
        elif self._pending_size > high_water:
            self.pause_peer(True)

    def pauseProducing(self) -> None:
        if self.origin is not None:
            self.origin.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.origin is not None:
            self.origin.transport.resumeProducing()

    def connectionLost(self, reason: str) -> None:
        super().connectionLost(reason)
        self._cancel_guard()
        self._pending = []
        self.pause_peer(False)
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
        if self.origin is not None:
            self.origin.transport.loseConnection()

    def pause_peer(self, paused: bool) -> None:
        """Hold the client's reads paused for this stream, or release them."""
        if paused != self.peer_paused:
            self.peer_paused = paused
            if paused:
                self.context.pausePeer(self)
            else:
                self.context.resumePeer(self)

    # Dial outcomes.
    def _guard_fired(self) -> None:
        """Beat the client's 3-second SYNACK watchdog on reused sessions (protocol 7.4)."""
        self._guard = None
        if not self.closed:
            self.context.acknowledge(self)

    def _cancel_guard(self) -> None:
        if self._guard is not None and self._guard.active():
            self._guard.cancel()
        self._guard = None

    def _connected(self, origin: _OriginProtocol) -> None:
        self._dialing = None
        if self.closed:
            origin.transport.loseConnection()
            return
        self._cancel_guard()
        self.origin = origin
        origin.transport.registerProducer(PeerProducer(self), True)
        self.context.acknowledge(self)
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            origin.transport.writeSequence(pending)
        self.pause_peer(False)
        if self.context.write_paused:
            origin.transport.pauseProducing()
        if logs.DEBUG:  # skip building an event the filter drops
            _log.debug(
                "stream {session_id}/{stream_id} connected to {destination}",
                session_id=self.context.session_id,
                stream_id=self.sid,
                destination=str(self.destination),
            )

    def _dial_failed(self, failure: Failure) -> None:
        self._dialing = None
        if self.closed:
            return
        error = failure.value
        assert isinstance(error, DialError)  # the dialer fails with nothing else
        self.context.metrics.connect_failed(error.reason)
        if error.reason == "policy":
            self.context.policy_refused("tcp", str(error))
        self.end("connect failed: " + str(error), str(error))
