"""Our server TLS options in real in-memory handshakes (ALPN never fatal), and --port parsing."""

from __future__ import annotations

import os
import socket
import struct
from typing import List, Optional, Tuple

from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import _SystemdParser, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.systemd import ListenFDs
from twisted.test.iosim import FakeTransport, connect, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from anytls_twisted import certs, tls
from anytls_twisted.protocol import codec
from anytls_twisted.protocol.auth import encode_preamble
from anytls_twisted.tls import PortSpec, parse_alpn, parse_port

from .helpers import PASSWORD, SETTINGS_V2, Server
from .test_certs import cert_pem, key_pem, make_cert, make_key

ALPN_OFFER = [b"h2", b"http/1.1"]


@implementer(IHandshakeListener)
class Peer(protocol.Protocol):
    """Records the handshake, received bytes and how the connection ended; the server echoes."""

    def __init__(self, echo: bool, greeting: bytes = b"") -> None:
        self.echo = echo
        self.greeting = greeting
        self.handshake_done = False
        self.received = b""
        self.lost: Optional[Failure] = None

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


class Loopback:
    """A server and a client TLSMemoryBIOProtocol joined in memory, pumped to quiescence."""

    def __init__(self, server_options, client_options) -> None:
        self.server = Peer(echo=True)
        self.client = Peer(echo=False, greeting=b"ping")
        server_app, client_app = protocol.Factory(), protocol.Factory()
        server_app.protocol, client_app.protocol = (lambda: self.server), (lambda: self.client)
        clock = Clock()
        server_factory = tls.wrap_tls(server_app, server_options, clock=clock)
        client_factory = TLSMemoryBIOFactory(client_options, True, client_app, clock=clock)
        self.client_tls, self.server_tls, self.pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            clock=clock,
        )
        self.pump.flush()

    def assertWorks(self, case: SynchronousTestCase, negotiated: Optional[bytes]) -> None:
        case.assertTrue(self.client.handshake_done and self.server.handshake_done)
        case.assertIsNone(self.client.lost)
        case.assertEqual(self.server.received, b"ping")
        case.assertEqual(self.client.received, b"ping")
        case.assertEqual(self.client_tls.negotiatedProtocol, negotiated)
        case.assertEqual(self.server_tls.negotiatedProtocol, negotiated)


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        cert_path, key_path = certs.ensure_self_signed(self.mktemp(), "localhost")
        with open(cert_path, "rb") as f:
            self.cert_pem = f.read()
        self.material = certs.load_certificate_files(cert_path, key_path)

    def client(self, alpn: Optional[List[bytes]] = None, **kwargs):
        """A client that verifies the server against the generated certificate."""
        return optionsForClientTLS(
            "localhost",
            trustRoot=Certificate.loadPEM(self.cert_pem),
            acceptableProtocols=alpn,
            **kwargs,
        )

    def test_no_alpn_offered(self) -> None:
        """(a) A client offering no ALPN (the anytls-go client) connects and exchanges data."""
        Loopback(tls.server_tls_options(self.material), self.client()).assertWorks(self, None)

    def test_alpn_offered_default_server(self) -> None:
        """(b) A client offering h2,http/1.1 (sing-box with tls.alpn) gets no ALPN, no alert."""
        Loopback(tls.server_tls_options(self.material), self.client(ALPN_OFFER)).assertWorks(
            self, None
        )
        Loopback(
            tls.server_tls_options(self.material, tls.ALPN_NONE), self.client(ALPN_OFFER)
        ).assertWorks(self, None)

    def test_alpn_offered_tls12(self) -> None:
        """The same over TLS 1.2, where ALPN travels in the ServerHello rather than encrypted."""
        client = self.client(
            ALPN_OFFER, extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2}
        )
        loop = Loopback(tls.server_tls_options(self.material), client)
        loop.assertWorks(self, None)
        self.assertEqual(loop.client_tls.getHandle().get_protocol_version_name(), "TLSv1.2")

    def test_alpn_selected(self) -> None:
        """(c) With a configured list the server selects from it."""
        server = tls.server_tls_options(self.material, ("h2", "http/1.1"))
        Loopback(server, self.client(ALPN_OFFER)).assertWorks(self, b"h2")

    def test_alpn_server_preference(self) -> None:
        """The server's order decides (RFC 7301), as with Go and nginx."""
        server = tls.server_tls_options(self.material, ("http/1.1", "h2"))
        Loopback(server, self.client(ALPN_OFFER)).assertWorks(self, b"http/1.1")

    def test_alpn_no_overlap(self) -> None:
        """(d) A client whose list shares nothing with ours still connects, with no ALPN."""
        server = tls.server_tls_options(self.material, ("h2", "http/1.1"))
        Loopback(server, self.client([b"foo"])).assertWorks(self, None)

    def test_alpn_server_list_client_none(self) -> None:
        server = tls.server_tls_options(self.material, ("h2",))
        Loopback(server, self.client()).assertWorks(self, None)

    def test_tls12_minimum(self) -> None:
        """TLS 1.0 and 1.1 are refused (OpenSSL option bits; clients that old cannot be built
        against a modern OpenSSL to try)."""
        options = tls.server_tls_options(self.material).getContext().set_options(0)
        self.assertTrue(options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1)
        self.assertFalse(options & SSL.OP_NO_TLSv1_2 or options & SSL.OP_NO_TLSv1_3)

    def test_plain_twisted_fails(self) -> None:
        """Why the fix exists: Twisted's own CertificateOptions ends case (b) with a fatal
        internal_error alert."""
        server = CertificateOptions(
            privateKey=self.material.private_key, certificate=self.material.certificate
        )
        loop = Loopback(server, self.client(ALPN_OFFER))
        self.assertFalse(loop.client.handshake_done)
        self.assertEqual(loop.server.received, b"")
        self.assertIsNotNone(loop.client.lost)
        loop.client.lost.trap(SSL.Error)
        self.assertIn("internal error", str(loop.client.lost.value))
        # ... while the same server without ALPN on the client side works.
        Loopback(server, self.client()).assertWorks(self, None)

    def test_chain_sent(self) -> None:
        """A leaf signed by an intermediate verifies against the root: the chain is sent."""
        root_key, mid_key, leaf_key = make_key(), make_key(), make_key()
        root = make_cert(root_key, "root", ca=True)
        mid = make_cert(mid_key, "mid", root_key, "root", ca=True)
        leaf = make_cert(leaf_key, "localhost", mid_key, "mid")
        directory = self.mktemp()
        os.makedirs(directory)
        cert_path, key_path = (
            os.path.join(directory, "full.pem"),
            os.path.join(directory, "key.pem"),
        )
        with open(cert_path, "wb") as f:
            f.write(cert_pem(leaf) + cert_pem(mid))
        with open(key_path, "wb") as f:
            f.write(key_pem(leaf_key))
        material = certs.load_certificate_files(cert_path, key_path)
        client = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem(root)))
        Loopback(tls.server_tls_options(material), client).assertWorks(self, None)

    def test_ip_server_name(self) -> None:
        """A certificate generated for an IP verifies for that IP (IP SAN)."""
        cert_path, key_path = certs.ensure_self_signed(self.mktemp(), "127.0.0.1")
        with open(cert_path, "rb") as f:
            root = Certificate.loadPEM(f.read())
        material = certs.load_certificate_files(cert_path, key_path)
        client = optionsForClientTLS("127.0.0.1", trustRoot=root, acceptableProtocols=ALPN_OFFER)
        Loopback(tls.server_tls_options(material), client).assertWorks(self, None)

    def test_wrong_name_rejected(self) -> None:
        """The client really verifies: another name fails."""
        client = optionsForClientTLS("other.example", trustRoot=Certificate.loadPEM(self.cert_pem))
        loop = Loopback(tls.server_tls_options(self.material), client)
        self.assertFalse(loop.client.handshake_done)
        self.assertIsNotNone(loop.client.lost)


class ParseAlpnTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for text, expected in [
            ("", ()),
            ("  ", ()),
            ("h2", ("h2",)),
            ("h2,http/1.1", ("h2", "http/1.1")),
            (" h2 , http/1.1 ", ("h2", "http/1.1")),
            ("h2,h2", ("h2",)),
            ("x" * 255, ("x" * 255,)),
        ]:
            self.assertEqual(parse_alpn(text), expected, text)

    def test_invalid(self) -> None:
        for text in ["h2,", ",h2", "h2,,http/1.1", "x" * 256, "h\u00e9", "h 2", "h2,\x01"]:
            e = self.assertRaises(ValueError, parse_alpn, text)
            self.assertNotIn("\n", str(e))


class ParsePortTests(SynchronousTestCase):
    def test_table(self) -> None:
        def ssl(endpoint, description, **files):
            return PortSpec(endpoint=endpoint, tls=True, description=description, **files)

        def plain(description):
            return PortSpec(endpoint=description, tls=False, description=description)

        for description, expected in [
            ("8443", ssl("tcp:8443", "8443")),
            ("ssl:8443", ssl("tcp:8443", "ssl:8443")),
            ("ssl:port=8443", ssl("tcp:8443", "ssl:port=8443")),
            ("ssl:0", ssl("tcp:0", "ssl:0")),
            (
                "ssl:443:interface=127.0.0.1:backlog=100",
                ssl(
                    "tcp:443:interface=127.0.0.1:backlog=100",
                    "ssl:443:interface=127.0.0.1:backlog=100",
                ),
            ),
            ("ssl:backlog=7:port=443", ssl("tcp:443:backlog=7", "ssl:backlog=7:port=443")),
            (
                r"ssl:443:interface=\:\:1",
                ssl(r"tcp:443:interface=\:\:1", r"ssl:443:interface=\:\:1"),
            ),
            ("ssl:443:interface=", ssl("tcp:443", "ssl:443:interface=")),
            (
                "ssl:443:privateKey=/k.pem",
                ssl(
                    "tcp:443", "ssl:443:privateKey=/k.pem", private_key="/k.pem", cert_key="/k.pem"
                ),
            ),
            (
                "ssl:443:certKey=/c.pem",
                ssl("tcp:443", "ssl:443:certKey=/c.pem", private_key="/c.pem", cert_key="/c.pem"),
            ),
            (
                "ssl:443:privateKey=/k.pem:certKey=/c.pem:extraCertChain=/chain.pem",
                ssl(
                    "tcp:443",
                    "ssl:443:privateKey=/k.pem:certKey=/c.pem:extraCertChain=/chain.pem",
                    private_key="/k.pem",
                    cert_key="/c.pem",
                    extra_cert_chain="/chain.pem",
                ),
            ),
            (
                r"ssl:443:privateKey=C\:\\k=1.pem",
                ssl(
                    "tcp:443",
                    r"ssl:443:privateKey=C\:\\k=1.pem",
                    private_key="C:\\k=1.pem",
                    cert_key="C:\\k=1.pem",
                ),
            ),
            ("tcp:8080", plain("tcp:8080")),
            (r"tcp6:8080:interface=\:\:1", plain(r"tcp6:8080:interface=\:\:1")),
            ("unix:/run/anytls.sock:mode=660", plain("unix:/run/anytls.sock:mode=660")),
            ("systemd:domain=INET6:index=0", plain("systemd:domain=INET6:index=0")),
            ("haproxy:tcp:8443", plain("haproxy:tcp:8443")),
            ("haproxy:unix:/run/a.sock", plain("haproxy:unix:/run/a.sock")),
            ("unix:/tmp/odd\\", plain("unix:/tmp/odd\\")),
            ("tlsx:8443", plain("tlsx:8443")),
            # tls:ENDPOINT: our TLS on any endpoint, the endpoint string kept byte for byte.
            (
                "tls:systemd:domain=INET:index=0",
                ssl("systemd:domain=INET:index=0", "tls:systemd:domain=INET:index=0"),
            ),
            (
                "tls:systemd:domain=INET6:name=anytls",
                ssl("systemd:domain=INET6:name=anytls", "tls:systemd:domain=INET6:name=anytls"),
            ),
            (
                "tls:unix:/run/anytls.sock",
                ssl("unix:/run/anytls.sock", "tls:unix:/run/anytls.sock"),
            ),
            ("tls:tcp:8443", ssl("tcp:8443", "tls:tcp:8443")),
            (
                r"tls:tcp6:443:interface=\:\:1",
                ssl(r"tcp6:443:interface=\:\:1", r"tls:tcp6:443:interface=\:\:1"),
            ),
            (
                "tls:unix:/run/a.sock:mode=660:privateKey=/k.pem",
                ssl(
                    "unix:/run/a.sock:mode=660",
                    "tls:unix:/run/a.sock:mode=660:privateKey=/k.pem",
                    private_key="/k.pem",
                    cert_key="/k.pem",
                ),
            ),
            (
                r"tls:certKey=C\:\\c.pem:extraCertChain=/x.pem:unix:/a\:b.sock",
                ssl(
                    r"unix:/a\:b.sock",
                    r"tls:certKey=C\:\\c.pem:extraCertChain=/x.pem:unix:/a\:b.sock",
                    private_key="C:\\c.pem",
                    cert_key="C:\\c.pem",
                    extra_cert_chain="/x.pem",
                ),
            ),
            ("tls:haproxy:tcp:443", ssl("haproxy:tcp:443", "tls:haproxy:tcp:443")),
            # haproxy:ssl: / haproxy:tls: -> PROXY header first (Twisted's wrapper), then our TLS.
            ("haproxy:ssl:8443", ssl("haproxy:tcp:8443", "haproxy:ssl:8443")),
            (
                "haproxy:ssl:8443:interface=127.0.0.1:backlog=9",
                ssl(
                    "haproxy:tcp:8443:interface=127.0.0.1:backlog=9",
                    "haproxy:ssl:8443:interface=127.0.0.1:backlog=9",
                ),
            ),
            (
                r"haproxy:ssl:443:interface=\:\:1",
                ssl(r"haproxy:tcp:443:interface=\:\:1", r"haproxy:ssl:443:interface=\:\:1"),
            ),
            (
                "haproxy:ssl:443:privateKey=/k.pem:certKey=/c.pem",
                ssl(
                    "haproxy:tcp:443",
                    "haproxy:ssl:443:privateKey=/k.pem:certKey=/c.pem",
                    private_key="/k.pem",
                    cert_key="/c.pem",
                ),
            ),
            (
                "haproxy:tls:systemd:domain=INET:index=0",
                ssl(
                    "haproxy:systemd:domain=INET:index=0", "haproxy:tls:systemd:domain=INET:index=0"
                ),
            ),
            (
                "haproxy:tls:unix:/run/a.sock",
                ssl("haproxy:unix:/run/a.sock", "haproxy:tls:unix:/run/a.sock"),
            ),
        ]:
            self.assertEqual(parse_port(description), expected, description)

    def test_errors(self) -> None:
        for description, fragment in [
            ("ssl:443:sslmethod=TLSv1_2_METHOD", "ssl port option sslmethod is not supported"),
            ("ssl:443:dhParameters=dh.pem", "ssl port option dhParameters is not supported"),
            ("ssl:443:caCertsDir=/etc/ssl", "ssl port option caCertsDir is not supported"),
            ("ssl:443:server.pem", "one positional argument"),
            ("ssl:443:port=444", "given twice"),
            ("ssl:443:backlog=1:backlog=2", "given twice"),
            ("ssl", "needs a port number"),
            ("ssl:interface=127.0.0.1", "needs a port number"),
            ("ssl:https", "port must be a number"),
            ("ssl:65536", "port must be a number"),
            ("ssl:443:backlog=0", "backlog must be a number"),
            ("ssl:443:privateKey=", "privateKey is empty"),
            ("ssl:443\\", "backslash"),
            ("tls", "needs an endpoint"),
            ("tls:", "needs an endpoint"),
            ("tls:privateKey=/k.pem", "needs an endpoint"),
            ("tls:haproxy", "needs an endpoint"),
            ("tls:ssl:443", "TLS twice"),
            ("tls:tls:tcp:443", "TLS twice"),
            ("tls:haproxy:ssl:443", "TLS twice"),
            ("haproxy:tls:ssl:443", "TLS twice"),
            ("tls:tcp:1:privateKey=", "privateKey is empty"),
            ("tls:tcp:1:certKey=a:certKey=b", "given twice"),
            ("tls:unix:/x\\", "backslash"),
            ("haproxy:ssl:443:sslmethod=TLSv1_2_METHOD", "sslmethod is not supported"),
            ("haproxy:ssl:65536", "port must be a number"),
            ("haproxy:ssl:443\\", "backslash"),
        ]:
            e = self.assertRaises(ValueError, parse_port, description)
            self.assertIn(fragment, str(e), description)

    def test_endpoint_is_twisteds(self) -> None:
        """The endpoint string we produce means to Twisted what the ssl: string meant."""
        for description, port, backlog, interface in [
            ("ssl:8443", 8443, 50, ""),
            ("ssl:8443:interface=127.0.0.1:backlog=7", 8443, 7, "127.0.0.1"),
            (r"ssl:8443:interface=\:\:1", 8443, 50, "::1"),
            ("ssl:interface=fe80\\:\\:1%eth0:port=9", 9, 50, "fe80::1%eth0"),
        ]:
            reactor = MemoryReactor()
            factory = protocol.Factory()
            serverFromString(reactor, parse_port(description).endpoint).listen(factory)
            self.assertEqual(reactor.tcpServers, [(port, factory, backlog, interface)], description)

    def test_haproxy_endpoint_is_twisteds(self) -> None:
        """haproxy:ssl: listens where the ssl: port would, with Twisted's PROXY wrapper around
        the factory it is given (our TLS factory): the header is read before TLS."""
        for description, port, backlog, interface in [
            ("haproxy:ssl:8443", 8443, 50, ""),
            ("haproxy:ssl:8443:interface=127.0.0.1:backlog=7", 8443, 7, "127.0.0.1"),
            (r"haproxy:ssl:8443:interface=\:\:1", 8443, 50, "::1"),
            ("haproxy:tls:tcp:9:interface=127.0.0.1", 9, 50, "127.0.0.1"),
            ("tls:haproxy:tcp:9", 9, 50, ""),
        ]:
            reactor = MemoryReactor()
            factory = protocol.Factory()
            serverFromString(reactor, parse_port(description).endpoint).listen(factory)
            [(got_port, wrapper, got_backlog, got_interface)] = reactor.tcpServers
            self.assertEqual(
                (got_port, got_backlog, got_interface), (port, backlog, interface), description
            )
            self.assertIsInstance(wrapper, HAProxyWrappingFactory, description)
            self.assertIs(wrapper.wrappedFactory, factory, description)

    def test_unix_endpoint_is_twisteds(self) -> None:
        reactor = MemoryReactor()
        factory = protocol.Factory()
        spec = parse_port("tls:unix:/run/anytls.sock:mode=660:privateKey=/k.pem")
        serverFromString(reactor, spec.endpoint).listen(factory)
        self.assertEqual(len(reactor.unixServers), 1)
        self.assertEqual(reactor.unixServers[0][:2], ("/run/anytls.sock", factory))
        self.assertEqual(reactor.unixServers[0][3], 0o660)

    def test_check_endpoint(self) -> None:
        """Endpoints Twisted cannot use fail at start with one line, not a traceback later."""
        for endpoint in ["tcp:8443", "haproxy:tcp:8443:interface=127.0.0.1", "unix:/run/a.sock"]:
            tls.check_endpoint(endpoint)
        for endpoint, fragment in [
            ("nosuch:1", "Unknown endpoint type"),
            ("tcp:1:colour=blue", "colour"),
            ("tcp:https", "invalid literal"),
            # No LISTEN_FDS in the test's environment: nothing was passed.
            ("systemd:domain=INET:index=0", "start the service through its .socket unit"),
            ("systemd:domain=INET:name=anytls", "start the service through its .socket unit"),
            ("haproxy:systemd:domain=INET:index=0", "start the service through its .socket unit"),
        ]:
            e = self.assertRaises(ValueError, tls.check_endpoint, endpoint)
            self.assertIn(fragment, str(e), endpoint)
            self.assertNotIn("\n", str(e))

    def test_check_endpoint_systemd_family(self) -> None:
        """A socket passed by systemd must be of the declared domain: ListenStream=8443 gives
        an IPv6 socket, which Twisted would adopt as INET and then misreport every peer."""
        sockets = {}
        for family, bind in [
            (socket.AF_INET, ("127.0.0.1", 0)),
            (socket.AF_INET6, ("::1", 0)),
            (socket.AF_UNIX, None),
        ]:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError:
                continue
            self.addCleanup(sock.close)
            if bind is not None:
                try:
                    sock.bind(bind)
                except OSError:
                    continue
            sockets[family] = sock
        names = {socket.AF_INET: "v4", socket.AF_INET6: "v6", socket.AF_UNIX: "unix"}
        fds = [s.fileno() for s in sockets.values()]
        self.patch(_SystemdParser, "_sddaemon", ListenFDs(fds, tuple(names[f] for f in sockets)))
        domains = {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}
        for family in sockets:
            for domain in domains.values():
                endpoint = f"systemd:domain={domain}:name={names[family]}"
                if domain == domains[family]:
                    tls.check_endpoint(endpoint)
                    tls.check_endpoint("haproxy:" + endpoint)
                else:
                    e = self.assertRaises(ValueError, tls.check_endpoint, endpoint)
                    self.assertIn(f"say domain={domains[family]}", str(e))
                    e = self.assertRaises(ValueError, tls.check_endpoint, "haproxy:" + endpoint)
                    self.assertIn(f"say domain={domains[family]}", str(e))
        for sock in sockets.values():  # checking leaves the inherited sockets open
            sock.getsockname()


def proxy_v2_header(source: Tuple[str, int], destination: Tuple[str, int]) -> bytes:
    """A PROXY protocol v2 header (PROXY command, TCP over IPv4), as HAProxy's send-proxy-v2."""
    body = socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
    body += struct.pack(">HH", source[1], destination[1])
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", len(body)) + body


class _Authenticator(protocol.Protocol):
    """A client that sends the AnyTLS preamble and Settings as soon as it is connected."""

    def connectionMade(self) -> None:
        self.transport.write(
            encode_preamble(PASSWORD, 30)
            + codec.encode_frame(codec.Command.SETTINGS, 0, SETTINGS_V2)
        )


class ListenEndpointTests(SynchronousTestCase):
    def test_default_backlog_added_to_tcp_only(self):
        """TCP endpoints without a backlog get DEFAULT_BACKLOG; others are left alone."""
        big = f"backlog={tls.DEFAULT_BACKLOG}"
        for given, expected in [
            ("tcp:8443", f"tcp:8443:{big}"),
            (r"tcp:443:interface=\:\:1", rf"tcp:443:interface=\:\:1:{big}"),
            ("tcp6:443", f"tcp6:443:{big}"),
            ("haproxy:tcp:8443", f"haproxy:tcp:8443:{big}"),
            ("tcp:8443:backlog=7", "tcp:8443:backlog=7"),
            ("tcp:port=5:backlog=9", "tcp:port=5:backlog=9"),
            ("unix:/run/a.sock", "unix:/run/a.sock"),
            ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ]:
            self.assertEqual(tls.listen_endpoint(given), expected, given)
            if not given.startswith("systemd:"):  # needs inherited descriptors to parse
                serverFromString(MemoryReactor(), tls.listen_endpoint(given))  # still parses


class ProxyHeaderTests(SynchronousTestCase):
    """Behind a haproxy: port the session logs the client's address from the PROXY header, not
    the proxy's: Twisted's wrapper only knows it once the header is read, after connectionMade."""

    HAPROXY_SIDE = IPv4Address("TCP", "127.0.0.2", 40001)  # the proxy's own connection to us

    def test_plain(self) -> None:
        """haproxy:tcp: (no TLS): the peer comes from the v1 header read with the first data."""
        server = Server()
        wrapper = HAProxyWrappingFactory(server.factory).buildProtocol(self.HAPROXY_SIDE)
        wrapper.makeConnection(StringTransport(peerAddress=self.HAPROXY_SIDE))
        [session] = server.registry.sessions
        self.assertEqual(session.peer, "127.0.0.2:40001")  # nothing read yet
        wrapper.dataReceived(
            b"PROXY TCP4 198.51.100.20 192.0.2.1 51234 8443\r\n" + encode_preamble(PASSWORD, 30)
        )
        self.assertEqual((session.user, session.peer), ("alice", "198.51.100.20:51234"))

    def test_header_then_close_before_auth(self) -> None:
        """A connection that sent the header but never authenticated is logged with the client's
        address too."""
        server = Server()
        wrapper = HAProxyWrappingFactory(server.factory).buildProtocol(self.HAPROXY_SIDE)
        wrapper.makeConnection(StringTransport(peerAddress=self.HAPROXY_SIDE))
        [session] = server.registry.sessions
        wrapper.dataReceived(proxy_v2_header(("198.51.100.21", 50000), ("192.0.2.1", 8443)))
        wrapper.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((session.user, session.peer), (None, "198.51.100.21:50000"))

    def test_tls_after_header(self) -> None:
        """The real stack in memory: PROXY v2 header, then a TLS handshake with our options,
        then auth: getPeer() on the TLS transport reaches the header's source address."""
        cert_path, key_path = certs.ensure_self_signed(self.mktemp(), "localhost")
        material = certs.load_certificate_files(cert_path, key_path)
        with open(cert_path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        server = Server()
        clock = Clock()
        listening = HAProxyWrappingFactory(
            tls.wrap_tls(server.factory, tls.server_tls_options(material), clock=clock)
        )
        client_app = protocol.Factory.forProtocol(_Authenticator)
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS("localhost", trustRoot=trust), True, client_app, clock=clock
        )
        server_proto = listening.buildProtocol(self.HAPROXY_SIDE)
        client_proto = client_factory.buildProtocol(None)
        server_transport = FakeTransport(server_proto, True, peerAddress=self.HAPROXY_SIDE)
        client_transport = FakeTransport(client_proto, False)
        client_transport.write(
            proxy_v2_header(("203.0.113.9", 4242), ("192.0.2.1", 8443))
        )  # before TLS
        connect(server_proto, server_transport, client_proto, client_transport, clock=clock).flush()
        [session] = server.registry.sessions
        self.assertEqual(session.user, "alice")
        self.assertEqual(session.peer, "203.0.113.9:4242")
        self.assertEqual(server_proto.getPeer(), IPv4Address("TCP", "203.0.113.9", 4242))
        self.assertEqual(server_transport.getPeer(), self.HAPROXY_SIDE)  # the socket's own peer


def _negotiated_cipher(server_options, tls13: bytes = b"", tls12: bytes = b"") -> str:
    """The cipher a pyOpenSSL client offering ``tls13`` (or, TLS 1.2 only, ``tls12``) in that
    order ends up with, handshaking in memory with ``server_options``."""
    client_context = SSL.Context(SSL.TLS_METHOD)
    client_context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    if tls13:
        client_context.set_tls13_ciphersuites(tls13)
    if tls12:
        client_context.set_max_proto_version(SSL.TLS1_2_VERSION)
        client_context.set_cipher_list(tls12)
    server = SSL.Connection(server_options.getContext(), None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    for _ in range(10):
        for side, other in ((client, server), (server, client)):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(side.bio_read(65536))
            except SSL.WantReadError:
                pass
    name = client.get_cipher_name()
    assert name is not None, "no handshake"
    return name


class CipherOrderTests(SynchronousTestCase):
    """The server chooses as Go's servers (sing-box's) do: AES-128-GCM over AES-256-GCM
    whatever the client's order, ChaCha20 for a client that lists it first."""

    def setUp(self) -> None:
        cert_path, key_path = certs.ensure_self_signed(self.mktemp(), "localhost")
        self.options = tls.server_tls_options(certs.load_certificate_files(cert_path, key_path))

    def test_tls13(self) -> None:
        aes256_first = b"TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"
        chacha_first = b"TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
        self.assertEqual(_negotiated_cipher(self.options, aes256_first), "TLS_AES_128_GCM_SHA256")
        self.assertEqual(
            _negotiated_cipher(self.options, chacha_first), "TLS_CHACHA20_POLY1305_SHA256"
        )
        only_256 = b"TLS_AES_256_GCM_SHA384"
        self.assertEqual(_negotiated_cipher(self.options, only_256), "TLS_AES_256_GCM_SHA384")

    def test_tls12(self) -> None:
        offered = b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"
        self.assertEqual(
            _negotiated_cipher(self.options, tls12=offered), "ECDHE-ECDSA-AES128-GCM-SHA256"
        )
