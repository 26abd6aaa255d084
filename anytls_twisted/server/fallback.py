"""The fallback relay: a TLS connection that is not an AnyTLS client, relayed byte for byte to
a decoy site (``--fallback``, ``fallback``/``fallback_for_alpn`` in the config file).

The session machine decides that a connection is not AnyTLS and which bytes it has read; the
routes (:mod:`anytls_twisted.protocol.fallback`) decide where it goes; this module only moves
bytes, as Twisted's ``portforward`` does: the client connection is not read until the fallback
is connected, the bytes already read go first, and then each transport pauses the other while
its own write buffer is full. Both sides end together.

Bounds: what the client sends while the fallback connects (one TLS read, since reading is
paused) up to :data:`CONNECT_BUFFER_LIMIT`; the connect within ``--connect-timeout``; a relay
with no byte either way for ``--idle-session-timeout`` is closed.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IFallback, IFallbackDialer
from ..logs import get_logger
from .stream import no_delay

_log = get_logger("anytls_twisted.fallback")

#: Bytes held from the client while the fallback connects; past this the connection is closed.
CONNECT_BUFFER_LIMIT = 1 << 20


def check_endpoint(endpoint: str) -> None:
    """Parse ``endpoint`` as a Twisted client endpoint string without connecting; a
    ``ValueError`` with one line if Twisted cannot use it."""
    try:
        clientFromString(None, endpoint)  # parsers only store the reactor
    except Exception as e:
        raise ValueError(f"Twisted cannot use client endpoint {endpoint!r}: {e}") from None


@implementer(IFallbackDialer)
class FallbackDialer:
    """Connects to fallback endpoints (Twisted client endpoint strings) with a deadline."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connect(self, endpoint: str, factory: Any, timeout: float) -> defer.Deferred:
        d = clientFromString(self.reactor, endpoint).connect(factory)
        return d.addTimeout(timeout, self.reactor)


@implementer(IPushProducer)
class _Reading:
    """Reading one side, registered as the producer on the other side's transport. Its
    ``stopProducing`` does nothing: the relay ends both sides itself, politely (a transport
    stopping its producer would drop the TLS records still to be written)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class _FallbackProtocol(Protocol):
    """The connection to the fallback: hands what it reads and its end to the relay."""

    def __init__(self, relay: FallbackRelay) -> None:
        self.relay = relay

    def dataReceived(self, data: bytes) -> None:
        self.relay.from_fallback(data)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.relay.fallback_lost(reason)


class _FallbackFactory(ClientFactory):
    noisy = False

    def __init__(self, relay: FallbackRelay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: Any) -> _FallbackProtocol:
        return _FallbackProtocol(self.relay)


@implementer(IFallback)
class FallbackRelay:
    """One client connection relayed to one fallback endpoint.

    @ivar client: the client's (TLS) transport.
    @ivar endpoint: the fallback's endpoint string.
    @ivar bytes_in: bytes from the client (the ones read before the hand-over included).
    @ivar bytes_out: bytes from the fallback to the client.
    @ivar target: the fallback's transport, once connected.
    """

    def __init__(
        self,
        client: Any,
        close: Callable[[str], None],
        endpoint: str,
        received: bytes,
        dialer: Any,
        clock: Any,
        connect_timeout: float,
        idle_timeout: float,
    ) -> None:
        """Start relaying: stop reading ``client`` until ``endpoint`` is connected, then send
        it ``received`` first. ``close(reason)`` ends the client's connection."""
        self.client = client
        self._close = close
        self.endpoint = endpoint
        self.bytes_in = len(received)
        self.bytes_out = 0
        self.target: Any = None
        self._pending: List[bytes] = [received] if received else []
        self._held = len(received)
        self._ended = False
        self._relaying = False  # the client's reading is registered on the target
        self._idle_timeout = idle_timeout
        client.pauseProducing()
        self._idle = clock.callLater(idle_timeout, self._idle_out)
        self._connecting: Optional[defer.Deferred] = dialer.connect(
            endpoint, _FallbackFactory(self), connect_timeout
        )
        self._connecting.addCallbacks(self._connected, self._failed)

    # The fallback's side.
    def _connected(self, protocol: _FallbackProtocol) -> None:
        self._connecting = None
        target: Any = protocol.transport
        if self._ended:
            target.loseConnection()
            return
        self.target = target
        no_delay(target)
        pending, self._pending = self._pending, []
        if pending:
            target.writeSequence(pending)
        target.registerProducer(_Reading(self.client), True)
        self._relaying = True
        self.client.unregisterProducer()  # the session, a producer of nothing since the hand-over
        self.client.registerProducer(_Reading(target), True)
        self.client.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._ended:
            return
        error = failure.getErrorMessage() or getattr(failure.type, "__name__", "error")
        if failure.check(defer.TimeoutError, defer.CancelledError, ConnectingCancelledError):
            error = "connect timed out"
        _log.warn("fallback {endpoint} unreachable: {error}", endpoint=self.endpoint, error=error)
        self._end(f"fallback {self.endpoint} unreachable: {error}")

    def from_fallback(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._active()
        self.client.write(data)

    def fallback_lost(self, reason: Optional[Failure]) -> None:
        self._end("the fallback closed the connection")

    # The client's side (IFallback).
    def dataReceived(self, data: bytes) -> None:
        if self._ended:
            return  # read only to see the client's close_notify
        self.bytes_in += len(data)
        self._active()
        if self.target is not None:
            self.target.write(data)
            return
        self._pending.append(data)
        self._held += len(data)
        if self._held > CONNECT_BUFFER_LIMIT:
            self._end(f"more than {CONNECT_BUFFER_LIMIT} bytes before the fallback connected")

    def closing(self) -> None:
        """The client's connection is being closed: stop relaying into it, and read it again
        (TLS must see the client's close_notify)."""
        self._stop_relaying()
        self.client.resumeProducing()

    def connectionLost(self, reason: str) -> None:
        self._ended = True
        if self._idle.active():
            self._idle.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        self._stop_relaying()
        if self.target is not None:
            self.target.loseConnection()

    # Both.
    def _stop_relaying(self) -> None:
        """Stop the target pausing the client (once): the client connection is ending."""
        if self._relaying:
            self._relaying = False
            self.target.unregisterProducer()

    def _active(self) -> None:
        if self._idle.active():
            self._idle.reset(self._idle_timeout)

    def _idle_out(self) -> None:
        self._end(f"no bytes either way for {self._idle_timeout:g}s")

    def _end(self, reason: str) -> None:
        """End both sides: the client politely (its session closes TLS), then the fallback."""
        if self._ended:
            return
        self._ended = True
        if self._idle.active():
            self._idle.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        self._close(reason)  # calls closing(), then connectionLost() once TLS is down
        self._stop_relaying()
        if self.target is not None:
            self.target.loseConnection()
