"""Certificates: a generated long-lived self-signed one, loading operator files, and the pin.

anytls-go regenerates a one-hour certificate at every start, so clients can only skip
verification. We keep one certificate for years in the state directory instead, so clients can
pin it (sing-box's ``certificate_public_key_sha256``) or trust its file.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import tempfile
from typing import List, Optional, Tuple

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_NAME = "self-signed-cert.pem"
KEY_NAME = "self-signed-key.pem"
VALID_FOR = datetime.timedelta(days=3650)
RENEW_BEFORE = datetime.timedelta(days=30)


class CertificateError(Exception):
    """A certificate or key that cannot be used; the message names the file and the problem."""


def default_state_dir() -> str:
    """``$STATE_DIRECTORY`` (systemd's StateDirectory=), else the XDG state home."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return systemd.split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "anytls-twisted")


@attr.frozen
class TLSMaterial:
    """A loaded certificate chain and key, with what operators and clients need to know."""

    certificate: x509.Certificate
    chain: Tuple[x509.Certificate, ...]
    private_key: object = attr.field(repr=False)
    cert_path: str

    @property
    def pin(self) -> str:
        return spki_pin(self.certificate)

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc


def spki_pin(certificate: x509.Certificate) -> str:
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def public_key_pin(cert_pem: bytes) -> str:
    """Base64 SHA-256 of the leaf's SubjectPublicKeyInfo: sing-box's certificate_public_key_sha256."""
    return spki_pin(x509.load_pem_x509_certificate(cert_pem))


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateError(f"cannot read {what} {path}: {e}") from None


def load_certificate_files(cert_path: str, key_path: str, chain_path: Optional[str] = None) -> TLSMaterial:
    """Load a leaf (plus any chain after it in the file, or in ``chain_path``) and its key."""
    try:
        certificates: List[x509.Certificate] = x509.load_pem_x509_certificates(_read(cert_path, "certificate"))
    except ValueError:
        raise CertificateError(f"{cert_path} does not hold a PEM certificate") from None
    if chain_path:
        try:
            certificates += x509.load_pem_x509_certificates(_read(chain_path, "certificate chain"))
        except ValueError:
            raise CertificateError(f"{chain_path} does not hold PEM certificates") from None
    try:
        key = serialization.load_pem_private_key(_read(key_path, "private key"), password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"{key_path} does not hold an unencrypted PEM private key ({e})") from None
    leaf = certificates[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != leaf.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise CertificateError(f"certificate {cert_path} does not match private key {key_path}")
    return TLSMaterial(leaf, tuple(certificates[1:]), key, cert_path)


def _names(server_name: str) -> List[x509.GeneralName]:
    names: List[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(server_name)))
    except ValueError:
        pass
    names.append(x509.DNSName(server_name))
    return names


def _usable(cert_path: str, server_name: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path, "certificate"))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (CertificateError, ValueError, x509.ExtensionNotFound):
        return False
    now = datetime.datetime.now(datetime.timezone.utc)
    return server_name in sans.get_values_for_type(x509.DNSName) and cert.not_valid_after_utc - now > RENEW_BEFORE


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    directory = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def ensure_self_signed(state_dir: str, server_name: str = "localhost") -> Tuple[str, str]:
    """Return ``(cert_path, key_path)`` of a self-signed certificate for ``server_name``.

    An existing one is reused while it names ``server_name`` and has more than 30 days left;
    otherwise a new EC P-256 certificate valid for ten years is written (key mode 0600).
    """
    cert_path = os.path.join(state_dir, CERT_NAME)
    key_path = os.path.join(state_dir, KEY_NAME)
    if os.path.exists(key_path) and _usable(cert_path, server_name):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.SubjectAlternativeName(_names(server_name)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        _write_atomic(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as e:
        raise CertificateError(f"cannot write the generated certificate to {state_dir}: {e}") from None
    return cert_path, key_path
