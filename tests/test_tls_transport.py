"""The server's TLS transport (anytls_twisted.tls_transport): Twisted's internals it relies on
are still there, large writes arrive intact with one transport call per write, and one full
origin read stays under Twisted's pause threshold."""

from __future__ import annotations

import os

from OpenSSL import SSL, _util
from twisted.internet import protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import certs, readsize, tls, tls_transport
from anytls_twisted.protocol import codec
from anytls_twisted.server import stream

from .test_tls import Peer


class _Sender(protocol.Protocol):
    """Server side: writes what it is told to; counts nothing itself."""

    def __init__(self) -> None:
        self.lost = None

    def connectionLost(self, reason) -> None:
        self.lost = reason


class _Pair:
    """Our server TLS (BulkTLSProtocol) and Twisted's client TLS, joined in memory. Every write
    the server's TLS layer makes to its transport is recorded, as byte counts."""

    def __init__(self, case: SynchronousTestCase) -> None:
        cert_path, key_path = certs.ensure_self_signed(case.mktemp(), "localhost")
        with open(cert_path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        material = certs.load_certificate_files(cert_path, key_path)
        self.server = _Sender()
        self.client = Peer(echo=False)
        server_app, client_app = protocol.Factory(), protocol.Factory()
        server_app.protocol, client_app.protocol = (lambda: self.server), (lambda: self.client)
        self.clock = Clock()
        server_factory = tls.wrap_tls(
            server_app, tls.server_tls_options(material), clock=self.clock
        )
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS("localhost", trustRoot=trust), True, client_app, clock=self.clock
        )
        self.client_tls, self.server_tls, self.pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            clock=self.clock,
        )
        self.pump.flush()
        case.assertTrue(self.client.handshake_done)
        self.writes: list = []
        tcp = self.server_tls.transport
        original_write = tcp.write
        tcp.write = lambda data: (self.writes.append([len(data)]), original_write(data))[1]
        tcp.writeSequence = lambda seq: (
            self.writes.append([len(d) for d in seq]),
            original_write(b"".join(seq)),
        )[1]


class TwistedInternalsTests(SynchronousTestCase):
    def test_private_parts_exist(self) -> None:
        """Every private method and attribute of TLSMemoryBIOProtocol we use is still there
        (a Twisted release that renames one fails here, not in production)."""
        pair = _Pair(self)
        for name in tls_transport.TWISTED_INTERNALS:
            self.assertTrue(hasattr(pair.server_tls, name), name)
        self.assertIsInstance(pair.server_tls, tls_transport.BulkTLSProtocol)
        self.assertIsInstance(pair.server_tls._tlsConnection, SSL.Connection)
        self.assertIs(pair.server_tls._lostTLSConnection, False)
        for name in (
            "_write",
            "_flushSendBIO",
            "_flushReceiveBIO",
            "_bufferedWrite",
            "_tlsShutdownFinished",
            "_shutdownTLS",
        ):
            self.assertTrue(callable(getattr(TLSMemoryBIOProtocol, name)), name)
        for name in tls_transport.PYOPENSSL_INTERNALS:
            self.assertTrue(hasattr(pair.server_tls._tlsConnection, name), name)
        for name in ("SSL_write", "SSL_read", "BIO_read"):
            self.assertTrue(callable(getattr(_util.lib, name)), name)


class BulkWriteTests(SynchronousTestCase):
    def test_large_writes_arrive_intact(self) -> None:
        """4 MiB in writes of every awkward size arrive byte for byte, in order."""
        pair = _Pair(self)
        payload = os.urandom(4 << 20)
        sizes = [1, 7, 16383, 16384, 16385, 32767, 32768, 32769, 65535, 65542, 100000, 262144]
        pos, turn = 0, 0
        while pos < len(payload):
            size = sizes[turn % len(sizes)]
            pair.server_tls.write(payload[pos : pos + size])
            pos += size
            turn += 1
            pair.clock.advance(0)  # the small-write aggregator flushes on the next turn
            pair.pump.flush()
        self.assertEqual(len(pair.client.received), len(payload))
        self.assertEqual(pair.client.received, payload)
        self.assertIsNone(pair.client.lost)

    def test_one_write_one_transport_call(self) -> None:
        """A 64 KiB application write reaches the TCP transport as one write holding its five
        records (Twisted's own transport made one write per 16 KiB record)."""
        pair = _Pair(self)
        pair.server_tls.write(b"x" * 65542)
        self.assertEqual(len(pair.writes), 1)
        (size,) = pair.writes[0]
        overhead = size - 65542
        # 4 x 16 KiB + 6 bytes of plaintext: 5 records of 22 (TLS 1.3) to 29 bytes' overhead.
        self.assertTrue(5 * 22 <= overhead <= 5 * 29, overhead)
        pair.pump.flush()
        self.assertEqual(pair.client.received, b"x" * 65542)

    def test_full_origin_read_is_one_tls_write(self) -> None:
        """One full origin read (four frames) reaches the TLS layer as one piece, and its
        records leave in as few writes as the scratch buffer allows, intact."""
        pair = _Pair(self)
        payload = os.urandom(readsize.READ_SIZE)
        frames = codec.data_frames(1, payload)
        self.assertEqual(len(frames), 1)
        pair.server_tls.writeSequence(frames)
        records = -(-len(frames[0]) // tls_transport.MAX_SSL_WRITE)
        per_send = tls_transport.SCRATCH_SIZE // tls_transport.RECORD_ROOM
        self.assertEqual(len(pair.writes), -(-records // per_send))
        pair.pump.flush()
        decoded = codec.FrameDecoder().feed(pair.client.received)
        self.assertEqual(b"".join(f.data for f in decoded), payload)

    def test_connection_lost_mid_stream(self) -> None:
        """After the TLS connection is lost, writes are dropped instead of raising."""
        pair = _Pair(self)
        pair.server_tls._lostTLSConnection = True
        pair.server_tls._write(b"z" * 100000)
        self.assertEqual(pair.writes, [])


class OriginBufferTests(SynchronousTestCase):
    """Origins are read four frames at a time, but what waits to be written to one still
    pauses the client's session at Twisted's usual 64 KiB."""

    def test_read_size_and_write_high_water(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.abstract import FileDescriptor

        class Transport(FileDescriptor):
            def setTcpNoDelay(self, enabled: bool) -> None:
                pass

        transport = Transport(reactor)
        origin = stream._OriginProtocol(None)  # type: ignore[arg-type]
        origin.makeConnection(transport)
        self.assertEqual(transport.bufferSize, 4 * codec.MAX_DATA)
        for name in readsize.TWISTED_INTERNALS:
            self.assertTrue(hasattr(transport, name), name)
        transport._tempDataLen = readsize.WRITE_HIGH_WATER
        self.assertFalse(transport._isSendBufferFull())
        transport._tempDataLen += 1
        self.assertTrue(transport._isSendBufferFull())


class OriginBufferCycleTests(SynchronousTestCase):
    def test_no_reference_cycle(self) -> None:
        """The transport's own high-water check does not keep it alive: freed by refcount."""
        import gc
        import weakref

        from twisted.internet import reactor
        from twisted.internet.abstract import FileDescriptor

        transport = FileDescriptor(reactor)
        readsize.read_frames_at_once(transport)
        self.assertFalse(transport._isSendBufferFull())
        ref = weakref.ref(transport)
        gc.disable()
        try:
            del transport
            self.assertIsNone(ref())
        finally:
            gc.enable()
