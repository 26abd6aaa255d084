"""Backpressure in both directions, proven with producer states on fake transports."""

from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol.codec import Command

from .helpers import Server
from .test_session import open_stream


class FlowTests(SynchronousTestCase):
    def setUp(self):
        self.server = Server(pending_high_water=1000)
        self.client = self.server.connect()
        self.client.auth()
        self.client.received()

    def test_session_registered_on_tls_transport(self):
        self.assertIs(self.client.transport.producer, self.client.proto)
        self.assertTrue(self.client.transport.streaming)

    def test_origin_paused_while_client_backed_up(self):
        """Origin -> client: a full TLS transport pauses every origin; draining resumes them."""
        open_stream(self.client, 1)
        open_stream(self.client, 3)
        _, first = self.server.origin_connect(0)
        _, second = self.server.origin_connect(1)
        self.client.proto.pauseProducing()  # what the TLS transport does when its buffer is full
        self.assertEqual((first.producerState, second.producerState), ("paused", "paused"))
        self.client.proto.resumeProducing()
        self.assertEqual((first.producerState, second.producerState), ("producing", "producing"))

    def test_stream_connected_while_backed_up_starts_paused(self):
        open_stream(self.client)
        self.client.proto.pauseProducing()
        _, origin = self.server.origin_connect()
        self.assertEqual(origin.producerState, "paused")
        self.client.proto.resumeProducing()
        self.assertEqual(origin.producerState, "producing")

    def test_client_paused_while_origin_backed_up(self):
        """Client -> origin: a full origin transport stops reading TLS until it drains."""
        open_stream(self.client)
        _, origin = self.server.origin_connect()
        producer = origin.producer  # the client's side of stream 1, as the origin sees it
        self.assertIs(producer.stream, self.client.proto.streams[1])
        producer.pauseProducing()  # what the origin transport does when its buffer is full
        self.assertEqual(self.client.transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.client.transport.producerState, "producing")

    def test_reading_resumes_when_blocked_stream_ends(self):
        """A blocked stream that the client closes no longer holds the session paused."""
        open_stream(self.client)
        _, origin = self.server.origin_connect()
        origin.producer.pauseProducing()
        self.client.frame(Command.FIN, 1)
        self.assertEqual(self.client.transport.producerState, "producing")

    def test_pre_connect_data_bounded(self):
        """Data before the connect pauses reading past the high-water mark, resumes on connect."""
        open_stream(self.client, data=b"a" * 600)
        self.assertEqual(self.client.transport.producerState, "producing")
        self.client.frame(Command.PSH, 1, b"b" * 600)
        self.assertEqual(self.client.transport.producerState, "paused")
        _, origin = self.server.origin_connect()
        self.assertEqual(origin.value(), b"a" * 600 + b"b" * 600)
        self.assertEqual(self.client.transport.producerState, "producing")

    def test_pre_connect_hard_limit(self):
        """Past four times the high-water mark before the connect, the stream is ended."""
        open_stream(self.client)
        for _ in range(5):
            self.client.frame(Command.PSH, 1, b"c" * 1000)
        frames = self.client.received()
        self.assertEqual([f.cmd for f in frames], [Command.SYNACK, Command.FIN])
        self.assertEqual(self.client.transport.producerState, "producing")
        self.assertEqual(self.client.proto.streams, {})
