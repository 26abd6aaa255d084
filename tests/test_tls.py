"""Our server TLS options in real in-memory handshakes (ALPN never fatal), and --port parsing."""

from __future__ import annotations

import os
from typing import List, Optional

from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from anytls_twisted import certs, tls
from anytls_twisted.tls import PortSpec, parse_alpn, parse_port

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
        self.server_tls, self.client_tls, self.pump = connectedServerAndClient(
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
            "localhost", trustRoot=Certificate.loadPEM(self.cert_pem), acceptableProtocols=alpn, **kwargs
        )

    def test_no_alpn_offered(self) -> None:
        """(a) A client offering no ALPN (the anytls-go client) connects and exchanges data."""
        Loopback(tls.server_tls_options(self.material), self.client()).assertWorks(self, None)

    def test_alpn_offered_default_server(self) -> None:
        """(b) A client offering h2,http/1.1 (sing-box with tls.alpn) gets no ALPN, no alert."""
        Loopback(tls.server_tls_options(self.material), self.client(ALPN_OFFER)).assertWorks(self, None)
        Loopback(tls.server_tls_options(self.material, tls.ALPN_NONE), self.client(ALPN_OFFER)).assertWorks(
            self, None
        )

    def test_alpn_offered_tls12(self) -> None:
        """The same over TLS 1.2, where ALPN travels in the ServerHello rather than encrypted."""
        client = self.client(ALPN_OFFER, extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2})
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
        server = CertificateOptions(privateKey=self.material.private_key, certificate=self.material.certificate)
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
        cert_path, key_path = os.path.join(directory, "full.pem"), os.path.join(directory, "key.pem")
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
                ssl("tcp:443:interface=127.0.0.1:backlog=100", "ssl:443:interface=127.0.0.1:backlog=100"),
            ),
            ("ssl:backlog=7:port=443", ssl("tcp:443:backlog=7", "ssl:backlog=7:port=443")),
            (r"ssl:443:interface=\:\:1", ssl(r"tcp:443:interface=\:\:1", r"ssl:443:interface=\:\:1")),
            ("ssl:443:interface=", ssl("tcp:443", "ssl:443:interface=")),
            (
                "ssl:443:privateKey=/k.pem",
                ssl("tcp:443", "ssl:443:privateKey=/k.pem", private_key="/k.pem", cert_key="/k.pem"),
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
                ssl("tcp:443", r"ssl:443:privateKey=C\:\\k=1.pem", private_key="C:\\k=1.pem", cert_key="C:\\k=1.pem"),
            ),
            ("tcp:8080", plain("tcp:8080")),
            (r"tcp6:8080:interface=\:\:1", plain(r"tcp6:8080:interface=\:\:1")),
            ("unix:/run/anytls.sock:mode=660", plain("unix:/run/anytls.sock:mode=660")),
            ("systemd:domain=INET6:index=0", plain("systemd:domain=INET6:index=0")),
            ("haproxy:tcp:8443", plain("haproxy:tcp:8443")),
            ("unix:/tmp/odd\\", plain("unix:/tmp/odd\\")),
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
