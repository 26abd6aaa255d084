"""Twisted's TLS transport, with fewer trips between Python and OpenSSL per byte.

Profiling the relay (``benches/profile.py``, docs/performance.md) showed the download path
spending more time in the Python around OpenSSL than in OpenSSL itself: Twisted's
``TLSMemoryBIOProtocol._write`` cuts every write into 16 KiB slices and, for each slice, calls
pyOpenSSL's ``send`` (``SSL_write``), ``bio_read`` and the TCP transport's ``write``. pyOpenSSL
contexts are created in ``SSL_MODE_ENABLE_PARTIAL_WRITE``, so even a whole buffer handed to
``SSL_write`` comes back one record at a time.

Here the server's contexts leave partial writes off (:func:`whole_writes`) and
:class:`BulkTLSProtocol` hands OpenSSL up to :data:`MAX_SSL_WRITE` bytes per ``SSL_write``
(which cuts them into records in C), drains the memory BIO after each, and passes all the
records of one write to the TCP transport in one ``writeSequence``. The bytes on the wire are
the same records. Measured in-process (encrypting 512 MiB in 64 KiB writes): about 0.43 s/GiB
Twisted's way, 0.22 s/GiB this way.

Why not one ``SSL_write`` per application write: OpenSSL's memory BIO never gives memory back,
so each session keeps a buffer as large as the most ciphertext it ever held at once. Twisted's
way holds one record (16 KiB); a whole 64 KiB write would keep 64 KiB per session that ever
downloaded in bulk (measured: 57 KiB more per session), for about 0.01 s/GiB less than 32 KiB.

This overrides two private methods of Twisted's ``TLSMemoryBIOProtocol`` and uses four private
attributes (:data:`TWISTED_INTERNALS`); tests/test_tls_transport.py checks that they still exist
and behave, so a Twisted release that changes them fails the tests rather than the server.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

#: OpenSSL's ``SSL_MODE_ENABLE_PARTIAL_WRITE`` (a stable ABI constant; pyOpenSSL sets it on
#: every context but does not export it).
SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1

#: Plaintext bytes per ``SSL_write``: two records (the module docstring says why not more).
MAX_SSL_WRITE = 32 * 1024

#: Bytes read from the BIO at a time: the records of one ``SSL_write`` fit.
BIO_READ_SIZE = 64 * 1024

#: The private parts of ``twisted.protocols.tls.TLSMemoryBIOProtocol`` this module relies on.
TWISTED_INTERNALS = ("_write", "_flushSendBIO", "_bufferedWrite", "_tlsShutdownFinished",
                     "_tlsConnection", "_lostTLSConnection")


def whole_writes(context: SSL.Context) -> None:
    """Let ``SSL_write`` take several records at once. With a memory BIO nothing blocks, so
    the only effect of partial-write mode is one return (one Python round trip) per record."""
    clear_mode = getattr(context, "clear_mode", None)  # pyOpenSSL 24.3 and later
    if clear_mode is not None:
        clear_mode(SSL_MODE_ENABLE_PARTIAL_WRITE)


class BulkTLSProtocol(BufferingTLSTransport):
    """``BufferingTLSTransport`` (small writes still aggregated per reactor turn) whose writes
    reach OpenSSL 32 KiB at a time and whose records leave in one ``writeSequence``."""

    def _write(self, data) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        view = memoryview(data)
        records = []
        done = 0
        while done < len(view):
            try:
                # With partial writes off this takes the whole slice; contexts made elsewhere
                # may still have them on, and then it takes one record.
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
            self.transport.writeSequence(records)

    def _drain(self, into: list) -> None:
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
        records: list = []
        self._drain(records)
        if records:
            self.transport.writeSequence(records)


class BulkTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` building :class:`BulkTLSProtocol` connections."""

    protocol = BulkTLSProtocol
