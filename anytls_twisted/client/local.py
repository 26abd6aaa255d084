"""The local proxy port: SOCKS5/4a and HTTP on one port, told apart by the first byte.

:class:`LocalProxyProtocol` is one application connection. It drives the sans-IO parsers
(:class:`~.socks.SocksServer`, :class:`~.httpproxy.RequestParser`), and once it knows the
destination it opens a :class:`~.stream.ClientStream` through the
:class:`~.sessions.SessionManager`. Destination names are sent to the server as names: nothing
is resolved locally.

The answer to the application (SOCKS success, ``200 Connection established``) waits for the
server's SYNACK (see :mod:`.stream`), so a refused destination is reported with a SOCKS reply
code (:func:`~.socks.reply_code_for_error`) or a ``502`` carrying the server's reason.
A forwarded plain HTTP request is written upstream at once; only its failure is answered here.

SOCKS5 UDP ASSOCIATE is carried as UDP over TCP v2 by a :class:`~.udp.UdpAssociation`
(success is replied at once, with its UDP port); BIND is refused by the parser ("command not
supported", 07).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from ..logs import get_logger
from ..protocol.address import Destination
from ..readsize import read_frames_at_once
from . import httpproxy, socks
from .sessions import SessionManager
from .stream import ClientStream, LocalSide
from .udp import UdpAssociation

_log = get_logger("anytls_twisted.client.local")


class LocalProxyProtocol(Protocol, LocalSide):
    """One local application connection on the mixed port.

    @ivar dialect: ``"socks5"``, ``"socks4"`` or ``"http"`` once the first byte arrived.
    @ivar stream: the stream carrying this connection, once the destination is known.
    """

    factory: LocalProxyFactory
    transport: Any

    def __init__(self) -> None:
        self.dialect: Optional[str] = None
        self.stream: Optional[ClientStream] = None
        self.association: Optional[UdpAssociation] = None
        self._socks: Optional[socks.SocksServer] = None
        self._http: Optional[httpproxy.RequestParser] = None
        self._http_connect = False

    def connectionMade(self) -> None:
        read_frames_at_once(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.stream is not None and self._socks is None and self._http is None:
            self.stream.send(data)
            return
        if self.dialect is None:
            self.dialect = socks.sniff(data[0]) or "http"
            if self.dialect == "http":
                self._http = httpproxy.RequestParser(users=self.factory.users)
            else:
                self._socks = socks.SocksServer(self.factory.users)
        if self._socks is not None:
            self._socks_data(data)
        elif self._http is not None:
            self._http_data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.transport = None
        if self.association is not None:
            self.association.close("the control connection closed")
        if self.stream is not None:
            self.stream.local_closed()

    # SOCKS.
    def _socks_data(self, data: bytes) -> None:
        assert self._socks is not None
        for event in self._socks.receive(data):
            if isinstance(event, socks.Send):
                self.transport.write(event.data)
            elif isinstance(event, socks.Failed):
                _log.debug("local SOCKS connection refused: {reason}", reason=event.reason)
                self.factory.manager.metrics.local_refused("socks")
                self.transport.loseConnection()
            elif isinstance(event, socks.ConnectRequest):
                self._open(event.destination)
            elif isinstance(event, socks.UdpAssociateRequest):
                self._associate(event.destination)
            elif isinstance(event, socks.Data):
                if self.stream is not None:
                    self.stream.send(event.data)

    def _associate(self, request: Destination) -> None:
        assert self._socks is not None
        try:
            self.association = UdpAssociation(
                self.transport, request, self.factory.manager, self.factory.clock
            )
        except CannotListenError as e:
            _log.info("UDP ASSOCIATE: cannot bind a UDP port: {error}", error=e)
            self.transport.write(self._socks.reply(socks.Reply.GENERAL_FAILURE))
            self.transport.loseConnection()
            return
        self.transport.write(self._socks.reply(socks.Reply.SUCCEEDED, self.association.bound))

    # HTTP.
    def _http_data(self, data: bytes) -> None:
        assert self._http is not None
        result = self._http.feed(data)
        if result is None:
            return
        self._http = None
        if isinstance(result, httpproxy.Refusal):
            self.factory.manager.metrics.local_refused("http")
            self.transport.write(result.response())
            self.transport.loseConnection()
        elif isinstance(result, httpproxy.Connect):
            self._http_connect = True
            self._open(result.destination)
            self._pending_send(result.rest)
        else:
            self._open(result.destination, httpproxy.ResponseCloser())
            self._pending_send(result.head + result.rest)

    def _pending_send(self, data: bytes) -> None:
        if self.stream is not None and data:
            self.stream.send(data)

    # The stream.
    def _open(self, destination: Destination, response_filter: Any = None) -> None:
        self.stream = ClientStream(self, destination, self.factory.clock)
        self.stream.response_filter = response_filter
        self.factory.manager.open(self.stream)

    def established(self) -> None:
        if self.transport is None:
            return
        if self._socks is not None:
            self.transport.write(self._socks.reply(socks.Reply.SUCCEEDED))
            self._socks = None  # from now on every byte is relayed
        elif self._http_connect:
            self.transport.write(httpproxy.connection_established())

    def refused(self, error: str) -> None:
        if self.transport is None:
            return
        stream = self.stream
        _log.info(
            "stream {session_id}/{stream_id} to {destination} failed: {error}",
            session_id=getattr(stream.context, "session_id", "-") if stream else "-",
            stream_id=stream.sid if stream and stream.sid else "-",
            destination=str(stream.destination) if stream else "?",
            error=error,
        )
        if self.dialect != "http":
            if self._socks is not None:
                self.transport.write(self._socks.reply(socks.reply_code_for_error(error)))
                self._socks = None
        elif "timed out" in error:
            self.transport.write(httpproxy.gateway_timeout(error))
        else:
            self.transport.write(httpproxy.bad_gateway(error))
        self.transport.loseConnection()


class LocalProxyFactory(Factory):
    """The local mixed port: every connection opens its streams through ``manager``."""

    noisy = False

    def __init__(
        self,
        manager: SessionManager,
        clock: Any,
        users: Optional[Callable[[str, str], bool]] = None,
    ) -> None:
        self.manager = manager
        self.clock = clock
        self.users = users  # None: no authentication

    def buildProtocol(self, addr: Any) -> Any:
        protocol = LocalProxyProtocol()
        protocol.factory = self
        return protocol


__all__ = ["LocalProxyFactory", "LocalProxyProtocol"]
