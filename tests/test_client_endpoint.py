"""The client endpoint (``anytls_twisted.client.endpoint``) on fake transports: connect after
the SYNACK, refusals with the server's reason, data and pauses both ways, FIN on close,
cancellation; the shared session managers; and the ``anytls:`` endpoint string."""

from __future__ import annotations

import os
from typing import List, Optional

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    NoProtocol,
)
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from anytls_twisted.client.endpoint import (
    AnyTLSClientEndpoint,
    AnyTLSConnectError,
    ServerUnreachable,
    StreamAddress,
    StreamRefused,
    shared_sessions,
)
from anytls_twisted.client.pool import Pool
from anytls_twisted.client.sessions import SessionManager
from anytls_twisted.protocol.address import Destination, parse_socks_address
from anytls_twisted.protocol.codec import Command

from .test_client_session import LOW, PASSWORD, FakeEndpoint, Server, Transport, set_endpoint


class App(Protocol):
    """The application's protocol: records what happens to it."""

    def __init__(self) -> None:
        self.made = False
        self.received: List[bytes] = []
        self.lost: Optional[Failure] = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


@implementer(IPushProducer)
class Producer:
    """An application's producer (streaming, or pull when registered so)."""

    def __init__(self) -> None:
        self.events: List[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class PendingEndpoint:
    """A server endpoint whose dial completes when the test says."""

    def __init__(self) -> None:
        self.dials: List[defer.Deferred] = []
        self.factory = None

    def connect(self, factory):
        self.factory = factory
        d: defer.Deferred = defer.Deferred()
        self.dials.append(d)
        return d

    def complete(self) -> Server:
        session = self.factory.buildProtocol(None)
        transport = Transport()
        session.makeConnection(transport)
        self.dials.pop(0).callback(session)
        return Server(session, transport)


def setup(host="example.com", port=80, dialer=None):
    clock = MemoryReactorClock()
    dialer = dialer or FakeEndpoint()
    manager = SessionManager(
        lambda: dialer, PASSWORD, clock, Pool(), randrange=LOW, server="proxy.test:443"
    )
    return AnyTLSClientEndpoint(clock, host, port, manager), manager, dialer, clock


class EndpointTests(unittest.TestCase):
    def connected(self, v2=True):
        """An endpoint whose connect was accepted: (protocol, server, manager, clock)."""
        endpoint, manager, dialer, clock = setup()
        d = endpoint.connect(Factory.forProtocol(App))
        server = dialer.sessions[0]
        server.frames()
        if v2:
            server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, 1)
        return self.successResultOf(d), server, manager, clock

    def test_connect_fires_after_the_synack(self):
        """If the server accepts the stream, then connect fires with a connected protocol
        whose transport is a transport, a consumer and a producer naming the destination."""
        endpoint, manager, dialer, clock = setup()
        verifyObject(IStreamClientEndpoint, endpoint)
        d = endpoint.connect(Factory.forProtocol(App))
        server = dialer.sessions[0]
        frames = server.frames()
        self.assertEqual([f.cmd for f in frames], [Command.SETTINGS, Command.SYN, Command.PSH])
        self.assertEqual(parse_socks_address(frames[2].data)[0], Destination("example.com", 80))
        self.assertNoResult(d)
        server.send(Command.SERVER_SETTINGS, 0, b"v=2")
        server.send(Command.SYNACK, 1)
        app = self.successResultOf(d)
        self.assertTrue(app.made)
        for interface in (ITransport, IConsumer, IPushProducer):
            verifyObject(interface, app.transport)
        self.assertEqual(
            app.transport.getPeer(), StreamAddress("example.com", 80, "proxy.test:443")
        )
        self.assertEqual(app.transport.getHost(), server.transport.getHost())

    def test_refused_with_the_servers_reason(self):
        """If the server's SYNACK carries an error, then connect fails with StreamRefused
        carrying the server's text, and the stream is ended with a FIN."""
        endpoint, manager, dialer, clock = setup()
        d = endpoint.connect(Factory.forProtocol(App))
        server = dialer.sessions[0]
        server.frames()
        server.send(Command.SYNACK, 1, b"dial tcp 127.0.0.1:80: connection refused")
        failure = self.failureResultOf(d, StreamRefused)
        self.assertEqual(failure.value.reason, "dial tcp 127.0.0.1:80: connection refused")
        self.assertEqual(
            str(failure.value),
            "example.com:80: refused by the server: dial tcp 127.0.0.1:80: connection refused",
        )
        self.assertEqual([(f.cmd, f.sid) for f in server.frames()], [(Command.FIN, 1)])

    def test_unreachable_server(self):
        """If no session can be dialled, then connect fails with ServerUnreachable saying
        so (a ConnectError like any endpoint's)."""
        endpoint, manager, dialer, clock = setup()
        dialer.fail = True
        failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(App)))
        self.assertIsInstance(failure.value, ServerUnreachable)
        self.assertIsInstance(failure.value, AnyTLSConnectError)
        self.assertIn("cannot reach the server proxy.test:443: refused", str(failure.value))

    def test_session_lost_while_opening(self):
        """If the session is lost before the SYNACK, then connect fails with the reason."""
        endpoint, manager, dialer, clock = setup()
        d = endpoint.connect(Factory.forProtocol(App))
        dialer.sessions[0].send(Command.SERVER_SETTINGS, 0, b"v=2")  # answered, then lost
        dialer.sessions[0].session.connectionLost(Failure(ConnectionError("reset")))
        failure = self.failureResultOf(d, AnyTLSConnectError)
        self.assertEqual(str(failure.value), "example.com:80: session closed: reset")

    def test_data_both_ways(self):
        """If the application writes, then the server gets PSH frames; if the server sends,
        then dataReceived gets the bytes."""
        app, server, manager, clock = self.connected()
        app.transport.write(b"GET / HTTP/1.1\r\n")
        app.transport.writeSequence([b"Host: a\r\n", b"\r\n"])
        self.assertEqual(
            [(f.cmd, f.data) for f in server.frames()],
            [(Command.PSH, b"GET / HTTP/1.1\r\n"), (Command.PSH, b"Host: a\r\n\r\n")],
        )
        server.send(Command.PSH, 1, b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(app.received, [b"HTTP/1.1 200 OK\r\n"])

    def test_v1_server_data_establishes(self):
        """If a server without SYNACK (v1) sends data first, then connect fires and the
        protocol gets that data."""
        endpoint, manager, dialer, clock = setup()
        d = endpoint.connect(Factory.forProtocol(App))
        dialer.sessions[0].send(Command.PSH, 1, b"banner")
        self.assertEqual(self.successResultOf(d).received, [b"banner"])

    def test_lose_connection_sends_fin(self):
        """If the application closes, then a FIN goes to the server, connectionLost
        (ConnectionDone) follows on the next turn, and the session goes back to the pool."""
        app, server, manager, clock = self.connected()
        app.transport.loseConnection()
        self.assertEqual([(f.cmd, f.sid) for f in server.frames()], [(Command.FIN, 1)])
        self.assertIsNone(app.lost)
        app.transport.write(b"late")
        clock.advance(0)
        app.lost.trap(ConnectionDone)
        self.assertEqual(server.frames(), [])
        self.assertEqual(len(manager.pool), 1)

    def test_abort_connection_sends_fin(self):
        """If the application aborts, then a FIN goes out too and the reason is
        ConnectionAborted."""
        app, server, manager, clock = self.connected()
        app.transport.abortConnection()
        self.assertEqual([(f.cmd, f.sid) for f in server.frames()], [(Command.FIN, 1)])
        clock.advance(0)
        app.lost.trap(ConnectionAborted)

    def test_server_fin_is_connection_done(self):
        """If the server ends the stream, then connectionLost gets ConnectionDone and no FIN
        goes back."""
        app, server, manager, clock = self.connected()
        server.send(Command.PSH, 1, b"last")
        server.send(Command.FIN, 1)
        clock.advance(0)
        self.assertEqual(app.received, [b"last"])
        app.lost.trap(ConnectionDone)
        app.transport.loseConnection()
        self.assertEqual(server.frames(), [])

    def test_session_loss_is_connection_lost(self):
        """If the session is lost, then connectionLost gets ConnectionLost with the reason and
        the application's producer is stopped."""
        app, server, manager, clock = self.connected()
        producer = Producer()
        app.transport.registerProducer(producer, True)
        server.session.connectionLost(Failure(ConnectionError("reset")))
        clock.advance(0)
        app.lost.trap(ConnectionLost)
        self.assertNotIsInstance(app.lost.value, ConnectionDone)
        self.assertIn("session closed: reset", str(app.lost.value))
        self.assertEqual(producer.events, ["stop"])

    def test_server_backed_up_pauses_the_applications_producer(self):
        """If the session says the server is backed up, then the application's producer is
        paused, and resumed when it drains; one registered meanwhile starts paused."""
        app, server, manager, clock = self.connected()
        producer = Producer()
        app.transport.registerProducer(producer, True)
        server.session.pauseProducing()
        self.assertEqual(producer.events, ["pause"])
        server.session.resumeProducing()
        self.assertEqual(producer.events, ["pause", "resume"])
        app.transport.unregisterProducer()
        server.session.pauseProducing()
        late = Producer()
        app.transport.registerProducer(late, True)
        self.assertEqual(late.events, ["pause"])
        self.assertRaises(RuntimeError, app.transport.registerProducer, Producer(), True)

    def test_pull_producer_is_pulled_while_the_server_keeps_up(self):
        """If the application registers a pull producer, then it is asked for more on the
        next turn and after each write, and not while the server is backed up."""
        app, server, manager, clock = self.connected()
        producer = Producer()
        writes = iter([b"one", b"two"])
        producer.resumeProducing = lambda: (  # type: ignore[method-assign]
            producer.events.append("resume"),
            app.transport.write(next(writes, b"")),
        )
        app.transport.registerProducer(producer, False)
        self.assertEqual(producer.events, [])
        server.session.pauseProducing()
        clock.advance(0)
        self.assertEqual(producer.events, [])
        server.session.resumeProducing()
        clock.advance(0)  # pulls until the producer stops writing
        self.assertEqual(producer.events, ["resume"] * 3)
        self.assertEqual([f.data for f in server.frames()], [b"one", b"two"])
        app.transport.unregisterProducer()
        clock.advance(0)
        self.assertEqual(len(producer.events), 3)

    def test_slow_application_pauses_the_session(self):
        """If the application pauses its transport, then the session stops reading the
        server; data already decoded is held and delivered on resume."""
        app, server, manager, clock = self.connected()
        app.transport.pauseProducing()
        self.assertEqual(server.transport.producerState, "paused")
        server.send(Command.PSH, 1, b"held")
        self.assertEqual(app.received, [])
        app.transport.resumeProducing()
        self.assertEqual(app.received, [b"held"])
        self.assertEqual(server.transport.producerState, "producing")

    def test_cancel_before_the_synack_ends_the_stream(self):
        """If connect is cancelled before the SYNACK, then it fails with
        ConnectingCancelledError, the stream is ended with a FIN, and a late SYNACK is
        ignored."""
        endpoint, manager, dialer, clock = setup()
        factory = Factory.forProtocol(App)
        d = endpoint.connect(factory)
        server = dialer.sessions[0]
        server.frames()
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertEqual([(f.cmd, f.sid) for f in server.frames()], [(Command.FIN, 1)])
        server.send(Command.SYNACK, 1)
        self.assertEqual(server.frames(), [])

    def test_cancel_while_dialling(self):
        """If connect is cancelled while the session is still dialled, then no stream is
        opened on it: the new session goes to the pool unused."""
        dialer = PendingEndpoint()
        endpoint, manager, _, clock = setup(dialer=dialer)
        d = endpoint.connect(Factory.forProtocol(App))
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        server = dialer.complete()
        self.assertNotIn(Command.SYN, [f.cmd for f in server.frames()])
        self.assertEqual(manager.pool.idle_sessions(), [server.session])

    def test_factory_without_protocol(self):
        """If the factory builds no protocol, then connect fails with NoProtocol and the
        stream is ended."""
        endpoint, manager, dialer, clock = setup()

        class NoneFactory(Factory):
            def buildProtocol(self, addr):
                return None

        d = endpoint.connect(NoneFactory())
        server = dialer.sessions[0]
        server.frames()
        server.send(Command.SYNACK, 1)
        self.failureResultOf(d, NoProtocol)
        self.assertEqual([(f.cmd, f.sid) for f in server.frames()], [(Command.FIN, 1)])

    def test_ipv6_destination(self):
        """If the host is an IPv6 literal (brackets or not), then the SYN carries it."""
        for host in ("::1", "[::1]"):
            endpoint, manager, dialer, clock = setup(host=host, port=8080)
            endpoint.connect(Factory.forProtocol(App))
            frames = dialer.sessions[0].frames()
            self.assertEqual(parse_socks_address(frames[2].data)[0], Destination("::1", 8080))

    def test_bad_destinations(self):
        """If the port or the host cannot be sent, then ValueError says which."""
        for host, port, words in [
            ("example.com", 0, "1 to 65535"),
            ("example.com", "http", "must be a number"),
            ("", 80, "not a valid host name"),
            ("a/b", 80, "not a valid host name"),
        ]:
            with self.assertRaises(ValueError) as caught:
                setup(host=host, port=port)
            self.assertIn(words, str(caught.exception))


URI = "anytls://{password}@127.0.0.1:{port}/?sni=localhost&insecure=1"


def write_config(case: unittest.TestCase, text: str, name: str = "client.txt") -> str:
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class SharedSessionsTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.sessions = shared_sessions(self.reactor)
        self.addCleanup(self.sessions.close)

    def test_one_manager_per_file(self):
        """If several endpoints are made from one file, then they share one running manager
        with the file's pool settings; another file gets another."""
        one = write_config(self, URI.format(password="p", port=1) + "\n")
        two = write_config(self, "# second\n" + URI.format(password="q", port=2) + "\n")
        a = AnyTLSClientEndpoint.from_config_file(self.reactor, "example.com", 80, one)
        b = AnyTLSClientEndpoint.from_config_file(self.reactor, "example.org", 443, one)
        c = AnyTLSClientEndpoint.from_config_file(self.reactor, "example.com", 80, two)
        self.assertIs(a.manager, b.manager)
        self.assertIsNot(a.manager, c.manager)
        self.assertIs(shared_sessions(self.reactor), self.sessions)
        self.assertTrue(a.manager.running)
        self.assertEqual((a.manager.server, c.manager.server), ("127.0.0.1:1", "127.0.0.1:2"))
        self.assertEqual(a.manager.password, "p")

    def test_every_server_of_several(self):
        """If the file names several servers, then the manager uses them all, in order."""
        path = write_config(
            self, URI.format(password="p", port=1) + "\n" + URI.format(password="q", port=2)
        )
        servers = self.sessions.manager(path).servers.servers
        self.assertEqual([s.name for s in servers], ["127.0.0.1:1", "127.0.0.1:2"])
        self.assertEqual([s.config.password for s in servers], ["p", "q"])

    def test_stopped_at_shutdown(self):
        """If the reactor shuts down, then the managers are stopped (a "before" "shutdown"
        trigger), and a new registry is made for later endpoints."""
        path = write_config(self, URI.format(password="p", port=1))
        manager = self.sessions.manager(path)
        [(trigger, args, kw)] = self.reactor.triggers["before"]["shutdown"]
        self.successResultOf(trigger(*args, **kw))
        self.assertFalse(manager.running)
        self.assertIsNot(shared_sessions(self.reactor), self.sessions)
        shared_sessions(self.reactor).close()

    def test_close_waits_for_the_sessions(self):
        """If a manager has a live session, then close fires once its connection is gone."""
        path = write_config(self, URI.format(password="p", port=1))
        manager = self.sessions.manager(path)
        dialer = FakeEndpoint()
        set_endpoint(manager, lambda: dialer)
        endpoint = AnyTLSClientEndpoint(self.reactor, "example.com", 80, manager)
        opening = endpoint.connect(Factory.forProtocol(App))
        d = self.sessions.close()
        self.assertNoResult(d)
        server = dialer.sessions[0]
        self.assertTrue(server.transport.aborted)
        server.session.connectionLost(Failure(ConnectionAborted()))
        self.successResultOf(d)
        self.failureResultOf(opening, AnyTLSConnectError)

    def test_bad_files(self):
        """If the file cannot be used, then ValueError says why in one line."""
        missing = os.path.join(os.path.abspath(self.mktemp()), "nope.json")
        with self.assertRaises(ValueError) as caught:
            self.sessions.manager(missing)
        self.assertEqual(
            str(caught.exception),
            f"anytls endpoint: cannot read config file {missing}: No such file or directory",
        )
        bad = write_config(self, '{"type": "anytls", "server": "a", "bogus": 1}', "bad.json")
        with self.assertRaises(ValueError) as caught:
            self.sessions.manager(bad)
        self.assertIn(bad, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))
        self.assertEqual(self.sessions.managers, {})


class EndpointStringTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.addCleanup(shared_sessions(self.reactor).close)
        self.path = write_config(self, URI.format(password="p", port=1))

    def parse(self, description: str) -> AnyTLSClientEndpoint:
        return clientFromString(self.reactor, description)

    def test_plugin(self):
        """If Twisted's plugins are listed, then ours parses the anytls prefix."""
        from twisted.plugin import getPlugins

        [parser] = [
            p
            for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
            if p.prefix == "anytls"
        ]
        verifyObject(IStreamClientEndpointStringParserWithReactor, parser)

    def test_host_port_config(self):
        """If the string is anytls:HOST:PORT:config=FILE, then it is our endpoint to
        HOST:PORT on the file's shared manager."""
        endpoint = self.parse(f"anytls:example.com:80:config={self.path}")
        self.assertIsInstance(endpoint, AnyTLSClientEndpoint)
        self.assertEqual(endpoint.destination, Destination("example.com", 80))
        self.assertIs(endpoint.manager, shared_sessions(self.reactor).manager(self.path))

    def test_ipv4_and_escaped_ipv6(self):
        """If the host is an IP literal, IPv6 escaped as endpoint strings escape colons, then
        it is parsed as such."""
        endpoint = self.parse(f"anytls:127.0.0.1:8080:config={self.path}")
        self.assertEqual(endpoint.destination, Destination("127.0.0.1", 8080))
        endpoint = self.parse(f"anytls:\\:\\:1:8080:config={self.path}")
        self.assertEqual(endpoint.destination, Destination("::1", 8080))

    def test_keywords(self):
        """If host= and port= are given as keywords, then they are used."""
        endpoint = self.parse(f"anytls:config={self.path}:host=example.org:port=443")
        self.assertEqual(endpoint.destination, Destination("example.org", 443))
        endpoint = self.parse(f"anytls:example.net:port=8443:config={self.path}")
        self.assertEqual(endpoint.destination, Destination("example.net", 8443))

    def test_errors(self):
        """If the string is incomplete or wrong, then ValueError says what, in one line."""
        for description, words in [
            ("anytls:example.com:80", "config=FILE is needed"),
            ("anytls:example.com", "a host and a port are needed"),
            (f"anytls:example.com:80:config={self.path}:sni=x", "unknown option sni="),
            (f"anytls:example.com:80:9:config={self.path}", "unexpected argument '9'"),
            (f"anytls:example.com:http:config={self.path}", "the port must be a number"),
            ("anytls:example.com:80:config=/nonexistent/c.json", "cannot read config file"),
        ]:
            with self.assertRaises(ValueError, msg=description) as caught:
                self.parse(description)
            self.assertIn(words, str(caught.exception), description)
            self.assertTrue(str(caught.exception).startswith("anytls endpoint: "), description)
            self.assertNotIn("\n", str(caught.exception))
