"""Twisted's TLS transport, with one write to the TCP transport per application write.

Twisted's ``TLSMemoryBIOProtocol._write`` cuts every write into 16 KiB slices (copying each),
and for each slice calls pyOpenSSL's ``send`` (``SSL_write``), ``bio_read`` and the TCP
transport's ``write``. :class:`BulkTLSProtocol` keeps the one ``SSL_write`` per 16 KiB record,
slices with a memoryview instead of copying, and hands the records of one application write to
the TCP transport in a single ``writeSequence``. The bytes on the wire are the same records.

It takes less server CPU per GiB downloaded than Twisted's transport (figures in
docs/performance.md, "Why the code is shaped this way").

Tried and not kept: more than one record per ``SSL_write`` (clearing pyOpenSSL's
``SSL_MODE_ENABLE_PARTIAL_WRITE``). OpenSSL's memory BIO never gives memory back, so every
session would keep a buffer as large as its largest write, for no CPU gain in the server.

This overrides two private methods of Twisted's ``TLSMemoryBIOProtocol`` and uses four private
attributes (:data:`TWISTED_INTERNALS`); tests/test_tls_transport.py checks that they still exist
and behave, so a Twisted release that changes them fails the tests rather than the server.
"""

from __future__ import annotations

from typing import List

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .writethrough import write_through

#: Plaintext bytes per ``SSL_write``: one TLS record (the module docstring says why not more).
MAX_SSL_WRITE = 16 * 1024

#: Bytes read from the BIO at a time: one record and its overhead fit.
BIO_READ_SIZE = 32 * 1024

#: The private parts of ``twisted.protocols.tls.TLSMemoryBIOProtocol`` this module relies on.
TWISTED_INTERNALS = (
    "_write",
    "_flushSendBIO",
    "_bufferedWrite",
    "_tlsShutdownFinished",
    "_tlsConnection",
    "_lostTLSConnection",
)


class BulkTLSProtocol(BufferingTLSTransport):
    """``BufferingTLSTransport`` (small writes still aggregated per reactor turn) whose records
    leave for the TCP transport in one ``writeSequence`` per write.

    Attributes are Twisted's (:data:`TWISTED_INTERNALS` lists the private ones used here).

    @ivar transport: The TCP transport the records go to; set on connection, before any write.
    """

    transport: ITransport

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        view = memoryview(data)
        records: List[bytes] = []
        done = 0
        while done < len(view):
            try:
                done += connection.send(view[done : done + MAX_SSL_WRITE])
            except SSL.WantReadError:
                # OpenSSL needs the peer first (a renegotiation); Twisted retries the rest later.
                self._bufferedWrite(bytes(view[done:]))
                self._drain(records)
                break
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return
            self._drain(records)
        if records:
            write_through(self.transport, records)

    def _drain(self, into: List[bytes]) -> None:
        """Move every byte waiting in the send BIO to ``into``."""
        connection = self._tlsConnection
        while True:
            try:
                chunk = connection.bio_read(BIO_READ_SIZE)
            except SSL.WantReadError:
                return
            into.append(chunk)
            if len(chunk) < BIO_READ_SIZE:
                return

    def _flushSendBIO(self) -> None:
        records: List[bytes] = []
        self._drain(records)
        if records:
            write_through(self.transport, records)


class BulkTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` building :class:`BulkTLSProtocol` connections.

    @cvar protocol: The connection class, :class:`BulkTLSProtocol`.
    """

    protocol = BulkTLSProtocol


@implementer(IStreamClientEndpoint)
class ClientTLSEndpoint:
    """Twisted's ``wrapClientTLS``, with :class:`BulkTLSProtocol` connections: the client's
    records leave as the server's do.

    @ivar creator: The TLS client connection creator.
    @ivar endpoint: The TCP endpoint to the server.
    """

    def __init__(
        self, creator: IOpenSSLClientConnectionCreator, endpoint: IStreamClientEndpoint
    ) -> None:
        self.creator = creator
        self.endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        wrapped = self.endpoint.connect(BulkTLSFactory(self.creator, True, factory))
        return wrapped.addCallback(_wrapped_protocol)


def _wrapped_protocol(tls: IProtocol) -> IProtocol:
    """The application's protocol inside a connected TLS one."""
    wrapped: IProtocol = tls.wrappedProtocol  # type: ignore[attr-defined]
    return wrapped
