"""Streams: one proxied TCP connection per AnyTLS stream, plus what every stream kind shares.

A stream talks to its session through a few calls (``send_synack``, ``send_data``,
``stream_finished``, ``set_stream_blocked``) and is driven by the session through
``data_received``, ``close``, ``pause_reading`` and ``resume_reading``.

Flow control (docs/architecture.md): origin -> client, the session pauses every origin's reads
while its TLS transport is backed up. Client -> origin, a stream whose origin transport is backed
up (or whose pre-connect buffer is over its high-water mark) marks itself blocked, and the session
stops reading its TLS transport until no stream is blocked.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import logs
from ..logs import get_logger
from ..protocol.address import Destination
from .dialer import DialError

_log = get_logger("anytls_twisted.stream")


class BaseStream:
    """State and bookkeeping common to TCP and UDP streams."""

    kind = "tcp"

    def __init__(self, session, sid: int, destination: Destination) -> None:
        self.session = session
        self.sid = sid
        self.destination = destination
        self.bytes_in = 0  # client -> origin
        self.bytes_out = 0  # origin -> client
        self.reported = False
        self.closed = False
        self.opened_at = session.clock.seconds()

    def report(self, error: str = "") -> None:
        """Send this stream's one SYNACK (empty for success), if not sent already."""
        if not self.reported:
            self.reported = True
            self.session.send_synack(self.sid, error)
            self.session.metrics.synack_sent(self, error)

    def send(self, data: bytes) -> None:
        """Relay origin bytes to the client."""
        if not self.closed and data:
            self.bytes_out += len(data)
            self.session.send_data(self.sid, data)

    def finish(self, reason: str, error: Optional[str] = None) -> None:
        """We end the stream: report ``error`` if no SYNACK went out yet, then send FIN."""
        if self.closed:
            return
        if error is not None:
            self.report(error)
        self._end(reason, send_fin=True)

    def close(self, reason: str) -> None:
        """The client (FIN) or the session ended the stream: tear down, send nothing."""
        if not self.closed:
            self._end(reason, send_fin=False)

    def _end(self, reason: str, send_fin: bool) -> None:
        self.closed = True
        self.teardown()
        self.session.stream_finished(self, reason, send_fin)

    # Hooks for subclasses.
    def start(self, data: bytes = b"") -> None:
        """Begin work once registered with the session; ``data`` followed the address."""
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        """Release the origin side; called once."""

    def pause_reading(self) -> None:
        """The client side is backed up: stop reading from the origin."""

    def resume_reading(self) -> None:
        pass


def no_delay(transport) -> None:
    """Turn off Nagle's algorithm where the transport is TCP.

    A relay forwards small writes (SYNACK, a request, the first bytes of a reply) that must not
    wait for the peer's delayed ACK: with Nagle on, every new stream paid about 40 ms
    (measured by benches/: new-stream p50 43.5 ms against 0.8 ms for sing-box).
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


#: Bytes per origin read. Twisted reads 65536 (one more than a frame holds: every full read
#: became two frames, 65535 + 1 bytes, and a copy). One frame's worth, 65535, was still too
#: much: Twisted pauses a transport's producer once more than 65536 bytes wait to be sent, and
#: a 65535-byte frame plus its TLS records' overhead (22 to 29 bytes per 16 KiB record) is
#: about 65650, so every full read paused and resumed every origin of the session (four
#: ``epoll_ctl`` calls, seen in benches/profile.py). 65280 bytes leave room for the frame
#: header and the records: the session pauses only when two reads wait unsent.
ORIGIN_READ_SIZE = 65536 - 256


class _OriginProtocol(Protocol):
    """The origin end of a TCP stream: a thin shell that forwards to the stream."""

    def __init__(self, stream: TCPStream) -> None:
        self.stream = stream

    def connectionMade(self) -> None:
        no_delay(self.transport)
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = ORIGIN_READ_SIZE

    def dataReceived(self, data: bytes) -> None:
        self.stream.send(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.stream.origin_lost(reason)


class _OriginFactory(Factory):
    noisy = False

    def __init__(self, stream: TCPStream) -> None:
        self.stream = stream

    def buildProtocol(self, addr):
        return _OriginProtocol(self.stream)


@implementer(IPushProducer)
class TCPStream(BaseStream):
    """A stream relayed to a TCP origin.

    It is the streaming producer registered on its origin transport, so the origin's write
    buffer tells it when the client is sending faster than the origin takes.
    """

    def __init__(self, session, sid: int, destination: Destination) -> None:
        super().__init__(session, sid, destination)
        self._origin: Optional[_OriginProtocol] = None
        self._pending: List[bytes] = []
        self._pending_size = 0
        self._blocked = False
        self._hard_limit = session.config.pending_high_water * 4
        self._guard = None
        self._dialing: Optional[defer.Deferred] = None

    def start(self, data: bytes = b"") -> None:
        """Begin the origin connect; ``data`` is what followed the address."""
        self._guard = self.session.clock.callLater(
            self.session.config.synack_guard, self._guard_fired
        )
        dialing = self.session.dialer.dial(self.destination, _OriginFactory(self))
        if not dialing.called:
            self._dialing = dialing
        dialing.addCallbacks(self._connected, self._dial_failed)
        if data:
            self.data_received(data)

    # From the session.
    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.bytes_in += len(data)
        if self._origin is not None:
            self._origin.transport.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._hard_limit:
            self.finish("too much data before the origin connected", "buffer limit exceeded")
        elif self._pending_size > self.session.config.pending_high_water:
            self._set_blocked(True)

    def pause_reading(self) -> None:
        if self._origin is not None:
            self._origin.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self._origin is not None:
            self._origin.transport.resumeProducing()

    def teardown(self) -> None:
        self._cancel_guard()
        self._pending = []
        self._set_blocked(False)
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
        if self._origin is not None:
            self._origin.transport.loseConnection()

    # IPushProducer, called by the origin transport about its write buffer.
    def pauseProducing(self) -> None:
        self._set_blocked(True)

    def resumeProducing(self) -> None:
        self._set_blocked(False)

    def stopProducing(self) -> None:
        self._set_blocked(False)

    # Dial outcomes.
    def _guard_fired(self) -> None:
        """Beat the client's 3-second SYNACK watchdog on reused sessions (protocol 7.4)."""
        self._guard = None
        if not self.closed:
            self.report()

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
        self._origin = origin
        origin.transport.registerProducer(self, True)
        self.report()
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            origin.transport.writeSequence(pending)
        if self._blocked:
            self._set_blocked(False)
        if self.session.paused:
            origin.transport.pauseProducing()
        if logs.DEBUG:  # skip building an event the filter drops
            _log.debug(
                "stream {session_id}/{stream_id} connected to {destination}",
                session_id=self.session.session_id,
                stream_id=self.sid,
                destination=str(self.destination),
            )

    def _dial_failed(self, failure: Failure) -> None:
        self._dialing = None
        if self.closed:
            return
        text = (
            str(failure.value)
            if failure.check(DialError)
            else f"dial tcp {self.destination}: {failure.getErrorMessage()}"
        )
        self.session.metrics.connect_failed(
            failure.value.reason if failure.check(DialError) else "other"
        )
        self.finish("connect failed: " + text, text)

    def origin_lost(self, reason: Failure) -> None:
        self._origin = None
        self.finish("origin closed")

    def _set_blocked(self, blocked: bool) -> None:
        if blocked != self._blocked:
            self._blocked = blocked
            self.session.set_stream_blocked(self, blocked)
