"""Twisted's TLS transport, with one send to the socket per application write.

Twisted's ``TLSMemoryBIOProtocol._write`` cuts every write into 16 KiB slices (copying each),
and for each slice calls pyOpenSSL's ``send`` (``SSL_write``), ``bio_read`` and the TCP
transport's ``write``, which sends on the reactor's next turn. :class:`BulkTLSProtocol` keeps
the one ``SSL_write`` per 16 KiB record, but:

* calls ``SSL_write``, ``BIO_read`` and ``SSL_read`` through pyOpenSSL's own cffi bindings,
  without its per-call wrappers (a fresh buffer per call, a copy of it, error checks that only
  matter on failure, which still goes through pyOpenSSL's ``_raise_ssl_error``);
* gathers the records of one write in a scratch buffer and sends them at once
  (:func:`.writethrough.write_through_copy`: no reactor turn, no ``epoll_ctl``).

The bytes on the wire are the same records. Each step's measured effect is in
docs/performance.md ("Why the code is shaped this way").

Tried and not kept: more than one record per ``SSL_write`` (clearing pyOpenSSL's
``SSL_MODE_ENABLE_PARTIAL_WRITE``). OpenSSL's memory BIO never gives memory back, so every
session would keep a buffer as large as its largest write, for no CPU gain in the server.
Cutting records straight from a frame's header and payload instead of joining them first: no
gain measured (docs/performance.md).

This overrides private methods of Twisted's ``TLSMemoryBIOProtocol`` and uses private
attributes of it and of pyOpenSSL's ``Connection`` (:data:`TWISTED_INTERNALS`,
:data:`PYOPENSSL_INTERNALS`); tests/test_tls_transport.py checks that they still exist and
behave, so a release that changes them fails the tests rather than the server.
"""

from __future__ import annotations

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .writethrough import write_through_copy

#: Plaintext bytes per ``SSL_write``: one TLS record (the module docstring says why not more).
MAX_SSL_WRITE = 16 * 1024

#: The scratch buffer the records of a write are gathered in before they are sent: those of a
#: 64 KiB frame fit. One for the process: the reactor's thread is the only one using it, and
#: nothing is left in it between calls (what the socket does not take at once is copied).
SCRATCH_SIZE = 128 * 1024
_OUT = _ffi.new("char[]", SCRATCH_SIZE)

#: Room for one record: 16 KiB of plaintext and the most a cipher suite adds.
RECORD_ROOM = 16 * 1024 + 2048 + 5

#: Plaintext bytes per ``SSL_read`` (a record holds at most 16 KiB), read into one scratch buffer.
SCRATCH_IN_SIZE = 32 * 1024
_IN = _ffi.new("char[]", SCRATCH_IN_SIZE)

#: The private parts of ``twisted.protocols.tls.TLSMemoryBIOProtocol`` this module relies on.
TWISTED_INTERNALS = (
    "_write",
    "_flushSendBIO",
    "_flushReceiveBIO",
    "_bufferedWrite",
    "_tlsShutdownFinished",
    "_shutdownTLS",
    "_tlsConnection",
    "_lostTLSConnection",
    "_aborted",
    "_aggregator",
)

#: The private parts of pyOpenSSL's ``SSL.Connection`` used here (with its cffi bindings,
#: ``OpenSSL._util.ffi`` and ``lib``).
PYOPENSSL_INTERNALS = ("_ssl", "_from_ssl", "_raise_ssl_error")


class BulkTLSProtocol(BufferingTLSTransport):
    """``BufferingTLSTransport`` (small writes still aggregated per reactor turn) whose records
    are gathered in a scratch buffer and sent at once (the module docstring says how).

    Attributes are Twisted's (:data:`TWISTED_INTERNALS` lists the private ones used here).

    @ivar transport: The TCP transport the records go to; set on connection, before any write.
    """

    transport: ITransport

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        ssl, total = connection._ssl, len(data)
        done = filled = 0
        with _ffi.from_buffer(data) as source:
            while done < total:
                written = _lib.SSL_write(ssl, source + done, min(MAX_SSL_WRITE, total - done))
                if written <= 0:
                    break
                done += written
                filled = self._gather(filled)
        if filled:
            self._send(filled)
        if done < total:
            try:
                connection._raise_ssl_error(ssl, written)
            except SSL.WantReadError:
                # OpenSSL needs the peer first (a renegotiation); Twisted retries the rest later.
                self._bufferedWrite(data[done:])
                self._flushSendBIO()
            except SSL.Error:
                self._tlsShutdownFinished(Failure())

    def flush_aggregated(self) -> None:
        """Encrypt and send the small writes held for the reactor's next turn now."""
        self._aggregator.flush()

    def _gather(self, filled: int) -> int:
        """Move the records waiting in the send BIO into the scratch buffer after its first
        ``filled`` bytes (sending the buffer first when it has no room for a record);
        returns how full it is."""
        bio = self._tlsConnection._from_ssl
        while True:
            if SCRATCH_SIZE - filled < RECORD_ROOM:
                self._send(filled)
                filled = 0
            room = SCRATCH_SIZE - filled
            got = _lib.BIO_read(bio, _OUT + filled, room)
            if got <= 0:
                return filled
            filled += got
            if got < room:
                return filled

    def _send(self, filled: int) -> None:
        write_through_copy(self.transport, _ffi.buffer(_OUT, filled))

    def _flushSendBIO(self) -> None:
        filled = self._gather(0)
        if filled:
            self._send(filled)

    def _flushReceiveBIO(self) -> None:
        # Twisted's loop, with SSL_read into one scratch buffer instead of pyOpenSSL's recv
        # (a fresh buffer and its error checks per record).
        connection = self._tlsConnection
        ssl = connection._ssl
        while not self._lostTLSConnection:
            got = _lib.SSL_read(ssl, _IN, SCRATCH_IN_SIZE)
            if got > 0:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, _ffi.buffer(_IN, got)[:])
                continue
            try:
                connection._raise_ssl_error(ssl, got)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                break
        self._flushSendBIO()


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
