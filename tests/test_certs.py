"""The generated self-signed certificate, loading operator files, and the public-key pin."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import certs
from anytls_twisted.certs import CertificateError

PEM = serialization.Encoding.PEM


def make_key():
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_cert(key, name, issuer_key=None, issuer_name=None, days=365, ca=False) -> x509.Certificate:
    """A certificate for ``name`` signed by ``issuer_key`` (self-signed when None)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key or key, hashes.SHA256())
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(PEM)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class EnsureSelfSignedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = os.path.join(self.mktemp(), "state")

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.state, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_generates(self) -> None:
        """A new EC P-256 certificate for the name, valid ten years, with files of safe modes."""
        cert_path, key_path = certs.ensure_self_signed(self.state, "proxy.example")
        self.assertEqual(cert_path, os.path.join(self.state, "self-signed-cert.pem"))
        self.assertEqual(key_path, os.path.join(self.state, "self-signed-key.pem"))
        self.assertEqual(mode(self.state), 0o700)
        self.assertEqual(mode(key_path), 0o600)
        self.assertEqual(mode(cert_path), 0o644)
        self.assertEqual(
            sorted(os.listdir(self.state)), sorted(["self-signed-cert.pem", "self-signed-key.pem"])
        )

        cert = x509.load_pem_x509_certificate(read(cert_path))
        key = serialization.load_pem_private_key(read(key_path), None)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        self.assertEqual(
            cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "proxy.example"
        )
        self.assertEqual(cert.issuer, cert.subject)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["proxy.example"])
        self.assertGreaterEqual(
            cert.not_valid_after_utc - cert.not_valid_before_utc, datetime.timedelta(days=9 * 365)
        )
        self.assertLess(cert.not_valid_before_utc, datetime.datetime.now(datetime.timezone.utc))
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.digital_signature)
        self.assertFalse(usage.key_cert_sign)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        cert.verify_directly_issued_by(cert)

    def test_reuses(self) -> None:
        """A second call leaves the files exactly as they were."""
        cert_path, key_path = certs.ensure_self_signed(self.state)
        before = read(cert_path), read(key_path)
        self.assertEqual(certs.ensure_self_signed(self.state), (cert_path, key_path))
        self.assertEqual((read(cert_path), read(key_path)), before)

    def test_other_name_regenerates(self) -> None:
        cert_path, _ = certs.ensure_self_signed(self.state, "a.example")
        before = read(cert_path)
        certs.ensure_self_signed(self.state, "b.example")
        after = read(cert_path)
        self.assertNotEqual(after, before)
        sans = x509.load_pem_x509_certificate(after).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        self.assertEqual(sans.value.get_values_for_type(x509.DNSName), ["b.example"])

    def test_ip_name(self) -> None:
        """An IP literal gets an IP SAN (what Go checks for IP server names), and no DNS SAN
        (service_identity refuses IP text there)."""
        cert_path, _ = certs.ensure_self_signed(self.state, "::1")
        sans = (
            x509.load_pem_x509_certificate(read(cert_path))
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value
        )
        self.assertEqual(sans.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("::1")])
        self.assertEqual(sans.get_values_for_type(x509.DNSName), [])
        before = read(cert_path)
        certs.ensure_self_signed(self.state, "::1")
        self.assertEqual(read(cert_path), before)

    def test_expiring_soon_regenerates(self) -> None:
        """A certificate with less than 30 days left is replaced."""
        os.makedirs(self.state)
        key = make_key()
        self.write("self-signed-key.pem", key_pem(key))
        old = cert_pem(make_cert(key, "localhost", days=10))
        cert_path = self.write("self-signed-cert.pem", old)
        certs.ensure_self_signed(self.state, "localhost")
        self.assertNotEqual(read(cert_path), old)

    def test_mismatched_pair_regenerates(self) -> None:
        """A key that does not belong to the certificate (say, after an interrupted write) is
        not reused."""
        cert_path, key_path = certs.ensure_self_signed(self.state)
        before = read(cert_path)
        self.write("self-signed-key.pem", key_pem(make_key()))
        certs.ensure_self_signed(self.state)
        self.assertNotEqual(read(cert_path), before)
        certs.load_certificate_files(cert_path, key_path)

    def test_existing_directory_mode_kept(self) -> None:
        os.makedirs(self.state)
        os.chmod(self.state, 0o750)
        certs.ensure_self_signed(self.state)
        self.assertEqual(mode(self.state), 0o750)

    def test_unwritable(self) -> None:
        """A state directory that cannot be created is a CertificateError naming it."""
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        state = os.path.join(blocker, "state")
        e = self.assertRaises(CertificateError, certs.ensure_self_signed, state)
        self.assertIn(state, str(e))
        self.assertNotIn("\n", str(e))

    def test_empty_name(self) -> None:
        self.assertRaises(CertificateError, certs.ensure_self_signed, self.state, "")


class PinTests(SynchronousTestCase):
    def test_independent_computation(self) -> None:
        cert = make_cert(make_key(), "localhost")
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        expected = base64.b64encode(hashlib.sha256(spki).digest()).decode()
        self.assertEqual(certs.public_key_pin(cert_pem(cert)), expected)
        self.assertEqual(len(expected), 44)

    def test_leaf_of_chain(self) -> None:
        """With several certificates the pin is the first (leaf) one's."""
        ca_key, leaf_key = make_key(), make_key()
        ca = make_cert(ca_key, "ca", ca=True)
        leaf = make_cert(leaf_key, "leaf", ca_key, "ca")
        self.assertEqual(
            certs.public_key_pin(cert_pem(leaf) + cert_pem(ca)),
            certs.public_key_pin(cert_pem(leaf)),
        )

    def test_not_pem(self) -> None:
        self.assertRaises(CertificateError, certs.public_key_pin, b"nope")


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_generated(self) -> None:
        cert_path, key_path = certs.ensure_self_signed(os.path.join(self.dir, "state"))
        material = certs.load_certificate_files(cert_path, key_path)
        self.assertEqual(material.certificate, x509.load_pem_x509_certificate(read(cert_path)))
        self.assertEqual(material.chain, ())
        self.assertEqual(material.pin, certs.public_key_pin(read(cert_path)))
        self.assertEqual(material.not_after, material.certificate.not_valid_after_utc)
        self.assertEqual(material.cert_path, cert_path)

    def test_mismatch(self) -> None:
        cert = self.write("c.pem", cert_pem(make_cert(make_key(), "localhost")))
        key = self.write("k.pem", key_pem(make_key()))
        e = self.assertRaises(CertificateError, certs.load_certificate_files, cert, key)
        self.assertEqual(str(e), f"certificate {cert} does not match private key {key}")

    def test_missing_files(self) -> None:
        key = make_key()
        cert = self.write("c.pem", cert_pem(make_cert(key, "localhost")))
        keyfile = self.write("k.pem", key_pem(key))
        missing = os.path.join(self.dir, "missing.pem")
        for args, start in [
            ((missing, keyfile), f"cannot read certificate {missing}: "),
            ((cert, missing), f"cannot read private key {missing}: "),
            ((cert, keyfile, missing), f"cannot read certificate chain {missing}: "),
        ]:
            e = self.assertRaises(CertificateError, certs.load_certificate_files, *args)
            self.assertTrue(str(e).startswith(start), str(e))
            self.assertIn("No such file or directory", str(e))

    def test_not_pem(self) -> None:
        key = make_key()
        cert = self.write("c.pem", cert_pem(make_cert(key, "localhost")))
        junk = self.write("junk.pem", b"hello\n")
        e = self.assertRaises(CertificateError, certs.load_certificate_files, cert, junk)
        self.assertEqual(str(e), f"{junk} does not hold a PEM private key")
        e = self.assertRaises(CertificateError, certs.load_certificate_files, junk, junk)
        self.assertEqual(str(e), f"{junk} does not hold a PEM certificate")
        key_only = self.write("key-only.pem", key_pem(key))
        e = self.assertRaises(CertificateError, certs.load_certificate_files, key_only, key_only)
        self.assertEqual(str(e), f"{key_only} does not hold a PEM certificate")

    def test_encrypted_key(self) -> None:
        key = make_key()
        cert = self.write("c.pem", cert_pem(make_cert(key, "localhost")))
        encrypted = key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")
        )
        keyfile = self.write("k.pem", encrypted)
        e = self.assertRaises(CertificateError, certs.load_certificate_files, cert, keyfile)
        self.assertIn(keyfile, str(e))
        self.assertIn("encrypted", str(e))

    def test_chain_in_cert_file(self) -> None:
        """The first certificate is the leaf, the rest are chain; a chain file adds more."""
        root_key, mid_key, leaf_key = make_key(), make_key(), make_key()
        root = make_cert(root_key, "root", ca=True)
        mid = make_cert(mid_key, "mid", root_key, "root", ca=True)
        leaf = make_cert(leaf_key, "leaf", mid_key, "mid")
        cert = self.write("fullchain.pem", cert_pem(leaf) + cert_pem(mid))
        key = self.write("k.pem", key_pem(leaf_key))
        material = certs.load_certificate_files(cert, key)
        self.assertEqual(material.certificate, leaf)
        self.assertEqual(material.chain, (mid,))
        self.assertEqual(material.pin, certs.public_key_pin(cert_pem(leaf)))

        chain = self.write("chain.pem", cert_pem(root))
        self.assertEqual(certs.load_certificate_files(cert, key, chain).chain, (mid, root))

    def test_key_and_cert_in_one_file(self) -> None:
        """Twisted's ``ssl:PORT:privateKey=F`` convention: one file holds both."""
        key = make_key()
        cert = make_cert(key, "localhost")
        both = self.write("both.pem", key_pem(key) + cert_pem(cert))
        material = certs.load_certificate_files(both, both)
        self.assertEqual(material.certificate, cert)
        self.assertEqual(material.chain, ())


class DefaultStateDirTests(SynchronousTestCase):
    def environ(self, **values: str) -> None:
        self.patch(os, "environ", dict(values, HOME="/home/u"))

    def test_systemd(self) -> None:
        self.environ(STATE_DIRECTORY="/var/lib/anytls:/var/lib/other", XDG_STATE_HOME="/x")
        self.assertEqual(certs.default_state_dir(), "/var/lib/anytls")

    def test_xdg(self) -> None:
        self.environ(XDG_STATE_HOME="/x/state")
        self.assertEqual(certs.default_state_dir(), "/x/state/anytls-twisted")

    def test_relative_xdg_ignored(self) -> None:
        self.environ(XDG_STATE_HOME="state")
        self.assertEqual(certs.default_state_dir(), "/home/u/.local/state/anytls-twisted")

    def test_home(self) -> None:
        self.environ(STATE_DIRECTORY="")
        self.assertEqual(certs.default_state_dir(), "/home/u/.local/state/anytls-twisted")
