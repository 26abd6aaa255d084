"""The client's TLS connection creator against our server's TLS, in memory: what is verified,
the SNI and ALPN sent, and the one-line errors a refused certificate gives."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import certs, tls
from anytls_twisted.certs import TLSMaterial
from anytls_twisted.client import tls as client_tls_module
from anytls_twisted.client.tls import CertificateVerifyError, client_tls

from .test_certs import cert_pem, key_pem, make_cert, make_key
from .test_tls import Loopback

OTHER_PIN = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="  # SHA-256 of b""


class ClientTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.material, self.cert_pem = self.generated("localhost")

    def generated(self, name: str) -> tuple[TLSMaterial, bytes]:
        cert_path, key_path = certs.ensure_self_signed(self.mktemp(), name)
        with open(cert_path, "rb") as f:
            return certs.load_certificate_files(cert_path, key_path), f.read()

    def issued(self, leaf_pem: bytes, leaf_key: object) -> TLSMaterial:
        directory = self.mktemp()
        os.makedirs(directory)
        cert_path, key_path = (os.path.join(directory, n) for n in ("cert.pem", "key.pem"))
        with open(cert_path, "wb") as f:
            f.write(leaf_pem)
        with open(key_path, "wb") as f:
            f.write(key_pem(leaf_key))
        return certs.load_certificate_files(cert_path, key_path)

    def connect(
        self,
        client: IOpenSSLClientConnectionCreator,
        material: Optional[TLSMaterial] = None,
        alpn: Sequence[str] = (),
    ) -> Loopback:
        return Loopback(tls.server_tls_options(material or self.material, alpn), client)

    def assertRefused(self, loop: Loopback, message: str) -> None:
        """The handshake failed before any application data, with ``message`` as the reason."""
        self.assertFalse(loop.client.handshake_done)
        self.assertEqual(loop.server.received, b"")
        assert loop.client.lost is not None
        loop.client.lost.trap(CertificateVerifyError)
        self.assertEqual(loop.client.lost.getErrorMessage(), message)
        self.assertNotIn("\n", message)

    def test_pinned(self) -> None:
        """A matching pin is enough: no CA, and the name is not checked."""
        pin = certs.public_key_pin(self.cert_pem)
        client = client_tls(server_name="other.example", pins=[OTHER_PIN, pin])
        self.connect(client).assertWorks(self, None)

    def test_wrong_pin(self) -> None:
        client = client_tls(server_name="localhost", pins=[OTHER_PIN])
        loop = self.connect(client)
        self.assertRefused(
            loop,
            f"certificate pin mismatch: got {self.material.pin}, want one of {OTHER_PIN}",
        )

    def test_pin_enforced_when_insecure(self) -> None:
        """sing-box checks the pin even with insecure set."""
        client = client_tls(server_name="localhost", insecure=True, pins=[OTHER_PIN])
        self.assertRefused(
            self.connect(client),
            f"certificate pin mismatch: got {self.material.pin}, want one of {OTHER_PIN}",
        )

    def test_ca_pem(self) -> None:
        """The self-signed server certificate, trusted as given."""
        client = client_tls(server_name="localhost", ca_pem=self.cert_pem)
        self.connect(client).assertWorks(self, None)

    def test_ca_pem_wrong_name(self) -> None:
        client = client_tls(server_name="other.example", ca_pem=self.cert_pem)
        self.assertRefused(
            self.connect(client),
            "certificate verify failed: the certificate is for DNS:localhost, not other.example",
        )

    def test_ca_pem_other_certificate(self) -> None:
        """Trusting exactly the given certificates: another self-signed one is refused."""
        _, other_pem = self.generated("localhost")
        client = client_tls(server_name="localhost", ca_pem=other_pem)
        loop = self.connect(client)
        self.assertFalse(loop.client.handshake_done)
        assert loop.client.lost is not None
        message = loop.client.lost.getErrorMessage()
        self.assertTrue(message.startswith("certificate verify failed: "), message)
        self.assertIn("self-signed certificate", message)

    def test_ca_pem_root_and_leaf(self) -> None:
        """A root in ca_pem verifies the leaves it issued; the leaf alone (not a CA) also
        works, as in Go, where any certificate in the pool may end the chain."""
        root_key, leaf_key = make_key(), make_key()
        root = make_cert(root_key, "root", ca=True)
        leaf = make_cert(leaf_key, "localhost", root_key, "root")
        material = self.issued(cert_pem(leaf), leaf_key)
        for trusted in (
            cert_pem(root),
            cert_pem(leaf),
            cert_pem(make_cert(make_key(), "x")) + cert_pem(root),
        ):
            client = client_tls(server_name="localhost", ca_pem=trusted)
            self.connect(client, material).assertWorks(self, None)

    def test_default_refuses_self_signed(self) -> None:
        """Verification is on by default, against the system's CAs."""
        client = client_tls(server_name="localhost")
        loop = self.connect(client)
        self.assertRefused(
            loop, "certificate verify failed: self-signed certificate (depth 0: CN=localhost)"
        )

    def test_insecure(self) -> None:
        """Nothing is verified: a self-signed certificate for another name works."""
        client = client_tls(server_name="other.example", insecure=True)
        self.connect(client).assertWorks(self, None)
        self.connect(client_tls(server_name=None, insecure=True)).assertWorks(self, None)

    def test_sni(self) -> None:
        loop = self.connect(client_tls(server_name="localhost", insecure=True))
        self.assertEqual(loop.server_tls.getHandle().get_servername(), b"localhost")
        loop = self.connect(client_tls(server_name="b\u00fccher.example", insecure=True))
        self.assertEqual(loop.server_tls.getHandle().get_servername(), b"xn--bcher-kva.example")

    def test_no_sni(self) -> None:
        """None, or an IP address, sends no SNI."""
        for server_name in (None, "127.0.0.1", "::1"):
            loop = self.connect(client_tls(server_name=server_name, insecure=True))
            loop.assertWorks(self, None)
            self.assertIsNone(loop.server_tls.getHandle().get_servername(), server_name)

    def test_ip_verified(self) -> None:
        """With no server name the certificate must name the IP dialed (an IP SAN)."""
        material, pem = self.generated("127.0.0.1")
        client = client_tls(server_name=None, server="127.0.0.1", ca_pem=pem)
        loop = self.connect(client, material)
        loop.assertWorks(self, None)
        self.assertIsNone(loop.server_tls.getHandle().get_servername())
        client = client_tls(server_name=None, server="127.0.0.2", ca_pem=pem)
        self.assertRefused(
            self.connect(client, material),
            "certificate verify failed: the certificate is for IP:127.0.0.1, not 127.0.0.2",
        )
        # An IP given as the server name means the same.
        self.connect(client_tls(server_name="127.0.0.1", ca_pem=pem), material).assertWorks(
            self, None
        )

    def test_nothing_to_verify_against(self) -> None:
        e = self.assertRaises(ValueError, client_tls, server_name=None, server="example.com")
        self.assertIn("no server name", str(e))
        self.assertRaises(ValueError, client_tls, server_name=None)
        # ... unless nothing is verified by name.
        client_tls(server_name=None, server="example.com", insecure=True)
        client_tls(server_name=None, server="example.com", pins=[OTHER_PIN])

    def test_bad_arguments(self) -> None:
        e = self.assertRaises(
            ValueError, client_tls, server_name="a", ca_pem=self.cert_pem, pins=[OTHER_PIN]
        )
        self.assertIn("cannot be combined", str(e))
        e = self.assertRaises(ValueError, client_tls, server_name="a", pins=["abc"])
        self.assertIn("not a base64 SHA-256 digest", str(e))
        e = self.assertRaises(ValueError, client_tls, server_name="a", ca_pem=b"junk")
        self.assertIn("not a PEM certificate", str(e))

    def test_alpn(self) -> None:
        """ALPN is offered when given; a server selecting h2 gets it."""
        client = client_tls(server_name="localhost", insecure=True, alpn=["h2", "http/1.1"])
        self.connect(client, alpn=("h2",)).assertWorks(self, b"h2")
        client = client_tls(server_name="localhost", insecure=True)
        self.connect(client, alpn=("h2",)).assertWorks(self, None)

    def test_versions(self) -> None:
        """TLS 1.3 when the server has it, 1.2 when that is the server's most; not below."""
        loop = self.connect(client_tls(server_name="localhost", insecure=True))
        self.assertEqual(loop.client_tls.getHandle().get_protocol_version_name(), "TLSv1.3")
        server = CertificateOptions(
            privateKey=self.material.private_key,
            certificate=self.material.certificate,
            lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
        )
        loop = Loopback(server, client_tls(server_name="localhost", ca_pem=self.cert_pem))
        loop.assertWorks(self, None)
        self.assertEqual(loop.client_tls.getHandle().get_protocol_version_name(), "TLSv1.2")
        creator = client_tls(server_name="localhost", insecure=True)
        options = creator._options.getContext().set_options(0)  # before any connection
        self.assertTrue(options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1)
        self.assertFalse(options & SSL.OP_NO_TLSv1_2 or options & SSL.OP_NO_TLSv1_3)

    def test_error_in_check(self) -> None:
        """An exception while checking refuses the certificate with one line, rather than
        escaping into OpenSSL's callback."""

        def broken(cert: object) -> str:
            raise RuntimeError("boom")

        self.patch(client_tls_module, "spki_pin", broken)
        client = client_tls(server_name="localhost", pins=[OTHER_PIN])
        self.assertRefused(self.connect(client), "certificate verify failed: RuntimeError: boom")
