"""AnyTLS as a Twisted client endpoint: any Twisted program can reach ``host:port`` through an
AnyTLS server, e.g. ``clientFromString(reactor, "anytls:example.com:443:config=client.json")``.

:class:`AnyTLSClientEndpoint` opens one :class:`~.stream.ClientStream` per ``connect`` on a
:class:`~.sessions.SessionManager` and hands the application's protocol an
:class:`AnyTLSTransport` once the server's SYNACK accepted the stream, so a refused destination
fails the ``connect`` Deferred with the server's reason instead of "connected, then closed".

The manager is not the endpoint's: :func:`.shared.shared_sessions` keeps one per configuration
file and reactor, started when first asked for and stopped at reactor shutdown, so every endpoint made
from the same file shares its pooled sessions (one TLS connection for many sequential streams).
A file naming several servers uses them all, with failover, as ``twistd anytls-client`` does.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    NoProtocol,
)
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from ..logs import get_logger
from ..protocol.address import Destination, parse_ip
from .sessions import SessionManager
from .shared import SharedSessions, load_servers, shared_sessions
from .stream import ClientStream, LocalSide

__all__ = [
    "AnyTLSClientEndpoint",
    "AnyTLSConnectError",
    "AnyTLSTransport",
    "ServerUnreachable",
    "SharedSessions",
    "StreamAddress",
    "StreamRefused",
    "load_servers",
    "parse_destination",
    "parse_endpoint",
    "shared_sessions",
]

_log = get_logger("anytls_twisted.client.endpoint")

#: Stream end reasons that are a clean close (the server's FIN, or ours).
_CLEAN_ENDS = ("the server closed the stream", "the local connection closed")


class AnyTLSConnectError(ConnectError):
    """The stream could not be opened; ``str()`` is the one-line reason."""

    MESSAGE = "Cannot open an AnyTLS stream"

    def __init__(self, destination: Destination, reason: str) -> None:
        super().__init__(string=reason)  # type: ignore[no-untyped-call]
        self.destination = destination
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.destination}: {self.reason}"


class StreamRefused(AnyTLSConnectError):
    """The server refused the stream (its SYNACK carried an error); ``reason`` is its text."""

    MESSAGE = "The AnyTLS server refused the stream"

    def __str__(self) -> str:
        return f"{self.destination}: refused by the server: {self.reason}"


class ServerUnreachable(AnyTLSConnectError):
    """No session to the server could be dialled (TCP or TLS failed)."""

    MESSAGE = "Cannot reach the AnyTLS server"


def _connect_error(destination: Destination, error: str) -> AnyTLSConnectError:
    """The exception for a stream's failure text (see :meth:`.stream.ClientStream._refuse`)."""
    if error.startswith("remote: "):
        return StreamRefused(destination, error[len("remote: ") :])
    if error.startswith("cannot reach the server"):
        return ServerUnreachable(destination, error)
    return AnyTLSConnectError(destination, error)


@implementer(IAddress)
@attr.frozen
class StreamAddress:
    """The far end of an AnyTLS stream: the destination the server dialled, and which server.

    @ivar host: the destination's host, as sent to the server (a name or an IP literal).
    @ivar port: the destination's port.
    @ivar server: ``host:port`` of the AnyTLS server carrying the stream.
    """

    host: str
    port: int
    server: str = "?"


class _EndpointStream(ClientStream):
    """A :class:`~.stream.ClientStream` that remembers why it ended, so the protocol hears
    ConnectionDone for a FIN and ConnectionLost for a lost session."""

    end_reason: Optional[str] = None

    def connectionLost(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        super().connectionLost(reason)


@implementer(ITransport, IConsumer, IPushProducer)
class AnyTLSTransport:
    """The transport an endpoint's protocol gets: writes become the stream's data, the server's
    data is delivered to ``dataReceived``, and pauses travel both ways.

    As a producer (``pauseProducing``) it stops the session reading the server for this stream
    (the application is slow to read); as a consumer, the application's registered producer is
    paused while the session says the server is backed up.

    @ivar protocol: the application's protocol, once connected.
    @ivar producer: the application's registered producer, or None.
    """

    disconnecting = False
    disconnected = False

    def __init__(self, stream: _EndpointStream, peer: StreamAddress, clock: Any) -> None:
        self._stream = stream
        self._peer = peer
        self._clock = clock
        self.protocol: Optional[IProtocol] = None
        self.producer: Any = None
        self.streaming = False
        self._session_paused = False  # the server is backed up: our producer stays paused
        self._reading_paused = False  # the application paused us
        self._inbound: List[bytes] = []  # data that arrived while the application paused us
        self._aborted = False
        self._ending = False
        self._host: Optional[IAddress] = None
        self._pull: Any = None

    # ITransport.
    def write(self, data: bytes) -> None:
        if self.disconnecting or self.disconnected or not data:
            return
        self._stream.send(data)
        if self.producer is not None and not self.streaming:
            self._schedule_pull()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """End the stream: a FIN to the server; ``connectionLost`` follows on a later turn."""
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        self._stream.local_closed()

    def abortConnection(self) -> None:
        """As :meth:`loseConnection` (nothing is buffered here); the reason is
        ConnectionAborted."""
        if self.disconnected:
            return
        self._aborted = True
        self.disconnecting = False
        self.loseConnection()

    def getPeer(self) -> StreamAddress:
        return self._peer

    def getHost(self) -> IAddress:
        """The local end of the session's connection to the server (the stream's own end has
        no address of its own)."""
        if self._host is None:
            context = self._stream.context
            host = getattr(context, "local_address", None) if context is not None else None
            self._host = host if host is not None else StreamAddress("", 0, self._peer.server)
        return self._host

    # IConsumer: the application writes through a producer.
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"a producer is already registered: {self.producer!r}")
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer, self.streaming = producer, streaming
        if streaming:
            if self._session_paused:
                producer.pauseProducing()
        else:
            self._schedule_pull()

    def unregisterProducer(self) -> None:
        self.producer = None
        self._cancel_pull()

    # IPushProducer: the application is slow to read what the server sends.
    def pauseProducing(self) -> None:
        if self._reading_paused or self.disconnected:
            return
        self._reading_paused = True
        self._stream.pause_peer(True)

    def resumeProducing(self) -> None:
        if not self._reading_paused or self.disconnected:
            return
        self._reading_paused = False
        self._flush_inbound()
        if not self._reading_paused:
            self._stream.pause_peer(False)

    def stopProducing(self) -> None:
        self.loseConnection()

    # What the stream does to the application (through :class:`_StreamFacing`).
    def _deliver(self, data: bytes) -> None:
        if self.protocol is None or self.disconnected:
            return
        if self._reading_paused or self._inbound:
            self._inbound.append(data)
            return
        self.protocol.dataReceived(data)

    def _flush_inbound(self) -> None:
        while self._inbound and not self._reading_paused and self.protocol is not None:
            self.protocol.dataReceived(self._inbound.pop(0))

    def _pause_application(self, paused: bool) -> None:
        if paused == self._session_paused:
            return
        self._session_paused = paused
        if self.producer is None:
            return
        if self.streaming:
            if paused:
                self.producer.pauseProducing()
            else:
                self.producer.resumeProducing()
        elif not paused:
            self._schedule_pull()

    def _stream_ended(self) -> None:
        """The stream is gone: ``connectionLost`` on the next turn, as TCP transports do."""
        if self._ending or self.disconnected:
            return
        self._ending = True
        self.disconnecting = True
        self._cancel_pull()
        if self.protocol is not None:
            self._clock.callLater(0, self._connection_lost)

    def _connection_lost(self) -> None:
        reason = self._stream.end_reason or ""
        error: Exception
        if self._aborted:
            error = ConnectionAborted()
        elif reason in _CLEAN_ENDS:
            error = ConnectionDone()
        else:
            error = ConnectionLost(reason)
        self._reading_paused = False
        self._flush_inbound()  # everything that arrived, then the end
        self.disconnected = True
        self.disconnecting = False
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        if self.protocol is not None:
            self.protocol.connectionLost(Failure(error))  # type: ignore[no-untyped-call]

    # Pull producers: asked for more on the turn after they registered or wrote, unless the
    # server is backed up (then once it drains).
    def _schedule_pull(self) -> None:
        if self._pull is None and not self._session_paused and not self.disconnected:
            self._pull = self._clock.callLater(0, self._pull_once)

    def _pull_once(self) -> None:
        self._pull = None
        if self.producer is not None and not self.streaming and not self._session_paused:
            self.producer.resumeProducing()

    def _cancel_pull(self) -> None:
        if self._pull is not None and self._pull.active():
            self._pull.cancel()
        self._pull = None


class _StreamFacing:
    """The application's end as the stream sees it (``LocalSide.transport``): what the stream
    writes goes to the protocol, its pauses to the application's producer."""

    def __init__(self, transport: AnyTLSTransport) -> None:
        self._transport = transport
        self.peer_producer: Any = None

    def write(self, data: bytes) -> None:
        self._transport._deliver(data)

    def pauseProducing(self) -> None:
        self._transport._pause_application(True)

    def resumeProducing(self) -> None:
        self._transport._pause_application(False)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.peer_producer = producer

    def unregisterProducer(self) -> None:
        self.peer_producer = None

    def loseConnection(self) -> None:
        self._transport._stream_ended()


class _Connecting(LocalSide):
    """One ``connect()``: the stream's local side until the server answered; then the protocol
    is built and connected, or the Deferred fails with why."""

    def __init__(
        self,
        factory: IProtocolFactory,
        destination: Destination,
        manager: SessionManager,
        clock: Any,
    ) -> None:
        self.factory = factory
        self.destination = destination
        self.stream = _EndpointStream(self, destination, clock)
        self.address = StreamAddress(destination.host, destination.port, manager.server)
        self.app = AnyTLSTransport(self.stream, self.address, clock)
        self.transport = _StreamFacing(self.app)
        self.deferred: Deferred[IProtocol] = Deferred(self._cancel)
        self._cancelled = False

    def established(self) -> None:
        if self.deferred.called:
            return
        try:
            protocol = self.factory.buildProtocol(self.address)
            if protocol is None:
                raise NoProtocol()
        except Exception as e:
            self.app.loseConnection()
            self.deferred.errback(e)
            return
        self.app.protocol = protocol
        protocol.makeConnection(self.app)
        self.deferred.callback(protocol)

    def refused(self, error: str) -> None:
        if self._cancelled or self.deferred.called:
            return
        self.deferred.errback(_connect_error(self.destination, error))

    def _cancel(self, d: Deferred[IProtocol]) -> None:
        """Cancelled before the SYNACK: end the stream (a FIN once it is on a session)."""
        self._cancelled = True
        self.stream.local_closed()
        d.errback(ConnectingCancelledError(self.address))  # type: ignore[no-untyped-call]


@implementer(IStreamClientEndpoint)
class AnyTLSClientEndpoint:
    """A TCP connection to ``host:port`` made by an AnyTLS server, on a session of
    ``manager`` (shared: the endpoint neither starts nor stops it).

    The name is sent to the server unresolved; ``connect`` fires once the server accepted
    the stream (SYNACK), or fails with :class:`StreamRefused` (the server's reason),
    :class:`ServerUnreachable`, or :class:`AnyTLSConnectError`.
    """

    def __init__(self, reactor: Any, host: str, port: int, manager: SessionManager) -> None:
        self._reactor = reactor
        self.destination = parse_destination(host, port)
        self.manager = manager

    @classmethod
    def from_config_file(
        cls, reactor: Any, host: str, port: int, config_path: str
    ) -> AnyTLSClientEndpoint:
        """An endpoint on the shared sessions of ``config_path`` (:func:`shared_sessions`);
        a file that cannot be used raises ``ValueError`` with one line."""
        return cls(reactor, host, port, shared_sessions(reactor).manager(config_path))

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = _Connecting(protocolFactory, self.destination, self.manager, self._reactor)
        self.manager.open(connecting.stream)
        return connecting.deferred

    def __repr__(self) -> str:
        return f"<AnyTLSClientEndpoint {self.destination} via {self.manager.server}>"


def parse_destination(host: str, port: Any) -> Destination:
    """``host`` (a name, an IP literal, IPv6 with or without brackets) and ``port`` as the
    stream's destination; ``ValueError`` with one line when they cannot be sent."""
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"anytls endpoint: the port must be a number, not {port!r}") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"anytls endpoint: the port must be 1 to 65535, not {number}")
    ip = parse_ip(host)
    if ip is not None:
        return Destination(str(ip), number)
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"anytls endpoint: {host!r} is not a valid host name") from None
    if not 0 < len(name) <= 255 or any(c in name for c in ":/[] "):
        raise ValueError(f"anytls endpoint: {host!r} is not a valid host name")
    return Destination(name, number)


def parse_endpoint(reactor: Any, *args: str, **kwargs: str) -> AnyTLSClientEndpoint:
    """The ``anytls:`` endpoint string's arguments (``HOST:PORT:config=FILE``, or ``host=``
    and ``port=``) -> an endpoint on the file's shared sessions; ``ValueError`` (one line)."""
    options = dict(kwargs)
    positional = list(args)
    for name in ("host", "port"):
        if name not in options and positional:
            options[name] = positional.pop(0)
    if positional:
        raise ValueError(
            f"anytls endpoint: unexpected argument {positional[0]!r} "
            "(expected anytls:HOST:PORT:config=FILE)"
        )
    path = options.pop("config", None)
    host = options.pop("host", None)
    port = options.pop("port", None)
    if options:
        raise ValueError(
            f"anytls endpoint: unknown option {sorted(options)[0]}= (known: host, port, config)"
        )
    if not host or port is None:
        raise ValueError("anytls endpoint: a host and a port are needed (anytls:HOST:PORT:...)")
    if not path:
        raise ValueError(
            "anytls endpoint: config=FILE is needed (a sing-box or v2ray JSON outbound, or "
            "anytls:// URIs)"
        )
    target = parse_destination(host, port)
    return AnyTLSClientEndpoint.from_config_file(reactor, target.host, target.port, path)
