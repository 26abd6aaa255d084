"""anytls_twisted.writethrough: bytes leave at once when nothing is queued, in order behind
anything that is, and whatever the kernel does not take goes through Twisted's own buffer
(with its producer pausing). Real TCP connections on 127.0.0.1."""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anytls_twisted import writethrough
from anytls_twisted.writethrough import write_through


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.want = 0
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.want and not self.done.called:
            self.done.callback(bytes(self.data))


class _Hold(protocol.Protocol):
    """The server side: it only keeps its transport."""

    def connectionMade(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.factory.connected.callback(self)

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class InternalsTests(SynchronousTestCase):
    def test_twisted_still_has_them(self) -> None:
        """A Twisted release that renames what write_through reads fails here, not in use."""
        descriptor = FileDescriptor(reactor)
        for name in writethrough.TWISTED_INTERNALS + ("dataBuffer", "connected"):
            self.assertTrue(hasattr(descriptor, name), name)

    def test_other_transports_get_write_sequence(self) -> None:
        transport = StringTransport()
        write_through(transport, [b"ab", b"cd"])
        self.assertEqual(transport.value(), b"abcd")

    def test_after(self) -> None:
        chunks = [b"abc", b"de", b"fgh"]
        self.assertEqual(writethrough._after(chunks, 0), chunks)
        self.assertEqual(writethrough._after(chunks, 2), [b"c", b"de", b"fgh"])
        self.assertEqual(writethrough._after(chunks, 3), [b"de", b"fgh"])
        self.assertEqual(writethrough._after(chunks, 7), [b"h"])


class LoopbackTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def _connect(self, rcvbuf: int = 0):
        """A server transport (Twisted's tcp.Server) and the client's collecting protocol."""
        factory = protocol.Factory.forProtocol(_Hold)
        factory.connected = defer.Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Collect()
        creator = protocol.ClientCreator(reactor, lambda: client)
        yield creator.connectTCP("127.0.0.1", port.getHost().port)
        client_transport = client.transport
        if rcvbuf:
            client_transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        server = yield factory.connected

        def close():
            client_transport.abortConnection()
            server.transport.abortConnection()
            return defer.gatherResults([client.lost, server.lost])

        self.addCleanup(close)
        return server.transport, client_transport, client

    @defer.inlineCallbacks
    def test_sent_at_once(self) -> None:
        """Nothing queued: the kernel has the bytes on return, and the reactor was not asked to
        watch for writability."""
        server, _, client = yield self._connect()
        self.assertIsInstance(server, tcp.Connection)
        client.want = 5
        write_through(server, [b"he", b"llo"])
        self.assertEqual(server._tempDataBuffer, [])
        self.assertNotIn(server, reactor.getWriters())
        data = yield client.done
        self.assertEqual(data, b"hello")

    @defer.inlineCallbacks
    def test_queued_bytes_keep_their_place(self) -> None:
        """Bytes already in Twisted's buffer go first: the new ones queue behind them."""
        server, _, client = yield self._connect()
        client.want = 6
        server.write(b"abc")
        write_through(server, [b"def"])
        self.assertEqual(server._tempDataBuffer, [b"abc", b"def"])
        data = yield client.done
        self.assertEqual(data, b"abcdef")

    @defer.inlineCallbacks
    def test_what_the_kernel_refuses_is_buffered_in_order(self) -> None:
        """A peer that does not read: the kernel takes part, Twisted's buffer the rest (pausing
        a registered producer), and everything arrives in order once the peer reads."""
        server, client_transport, client = yield self._connect(rcvbuf=4096)
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client_transport.pauseProducing()

        paused = []

        class Producer:
            def pauseProducing(self) -> None:
                paused.append(True)

            def resumeProducing(self) -> None:
                paused.append(False)

            def stopProducing(self) -> None:
                pass

        server.registerProducer(Producer(), True)
        blocks = [bytes([i]) * 65536 for i in range(16)]
        for block in blocks:
            write_through(server, [block[:1000], block[1000:]])
        self.assertTrue(server._tempDataBuffer or server.dataBuffer)
        self.assertIn(True, paused)
        client.want = sum(map(len, blocks))
        client_transport.resumeProducing()
        data = yield client.done
        self.assertEqual(data, b"".join(blocks))
        self.assertEqual(paused[-1], False)

    @defer.inlineCallbacks
    def test_after_lose_connection_the_transport_decides(self) -> None:
        """A transport closing down takes its ordinary path (the write is Twisted's to drop)."""
        server, _, _ = yield self._connect()
        server.loseConnection()
        write_through(server, [b"late"])
        self.assertEqual(server._tempDataBuffer, [b"late"])
