"""Certificates: the generated self-signed one, loading the operator's files, public-key pins.

With no certificate configured the server still needs one, and it must outlive restarts so that
clients trusting it (``tls.certificate_path`` or ``tls.certificate_public_key_sha256``) keep
working: it is generated once into the state directory and reused while it fits.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .logs import get_logger

_log = get_logger("anytls_twisted.certs")

CERT_NAME = "self-signed-cert.pem"
KEY_NAME = "self-signed-key.pem"
VALIDITY = datetime.timedelta(days=3650)
BACKDATE = datetime.timedelta(hours=1)  # tolerate clients whose clocks run a little behind
RENEW_BEFORE = datetime.timedelta(days=30)


class CertificateError(Exception):
    """A certificate or key file cannot be used; the message is one line naming the file."""


@attr.frozen
class TLSMaterial:
    """What a TLS port needs: the leaf, its key, the chain sent after it, and facts to log.

    @ivar certificate: The leaf certificate, the first in its PEM file.
    @ivar private_key: The leaf's private key (a ``cryptography`` private key object, checked
        to match the certificate); left out of ``repr``.
    @ivar chain: The intermediate certificates sent after the leaf: the rest of the
        certificate file, then those of the chain file.
    @ivar pin: The leaf's public-key pin (:func:`spki_pin`), for sing-box's
        ``tls.certificate_public_key_sha256``.
    @ivar not_after: When the leaf expires (UTC).
    @ivar cert_path: The file the leaf was loaded from, for messages.
    """

    certificate: x509.Certificate
    private_key: Any = attr.field(repr=False)
    chain: Tuple[x509.Certificate, ...]
    pin: str
    not_after: datetime.datetime
    cert_path: str


def default_state_dir() -> str:
    """Where the generated certificate lives when ``--state-dir`` is not given.

    systemd's ``StateDirectory=`` creates a directory the service may write and exports it as
    ``$STATE_DIRECTORY`` (colon-separated when several are listed); otherwise the XDG base
    directory spec's state home, which is meant for exactly this kind of persistent,
    non-portable data.
    """
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return state
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(xdg):  # the spec says relative values are invalid and to be ignored
        xdg = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(xdg, "anytls-twisted")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_pin(cert: x509.Certificate) -> str:
    """The pin (see ``public_key_pin``) of a parsed certificate."""
    return base64.b64encode(hashlib.sha256(_spki(cert.public_key())).digest()).decode("ascii")


def public_key_pin(cert_pem: bytes) -> str:
    """base64 SHA-256 of the leaf's DER SubjectPublicKeyInfo: sing-box's
    ``tls.certificate_public_key_sha256`` value, which survives re-issuing with the same key."""
    try:
        return spki_pin(x509.load_pem_x509_certificates(cert_pem)[0])
    except ValueError:
        raise CertificateError("not a PEM certificate") from None


def _san_for(server_name: str) -> Tuple[str, List[x509.GeneralName]]:
    """The name as it goes into CN and SAN: an IP literal gets an IP SAN, which is what Go
    clients check for an IP server name; other names are IDNA-encoded DNS SANs.

    No DNS SAN repeats an IP: service_identity (Twisted's and other Python clients) rejects a
    certificate holding an IP text in a DNS SAN outright, and Go clients never look there.
    """
    if not server_name:
        raise CertificateError("cannot make a certificate for an empty server name")
    try:
        ip = ipaddress.ip_address(server_name)
    except ValueError:
        try:
            name = server_name.encode("idna").decode("ascii").lower()
        except UnicodeError as e:
            raise CertificateError(
                f"cannot make a certificate for server name {server_name!r}: {e}"
            ) from None
        return name, [x509.DNSName(name)]
    return str(ip), [x509.IPAddress(ip)]


def _has_name(cert: x509.Certificate, names: Sequence[x509.GeneralName]) -> bool:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return names[0] in sans


def _reusable(cert_path: str, key_path: str, names: Sequence[x509.GeneralName]) -> bool:
    """Whether the files from an earlier run still serve: readable, matching, naming the
    server, and not expiring within RENEW_BEFORE."""
    try:
        material = _load(cert_path, key_path, None)
    except CertificateError:
        return False
    now = _now()
    cert = material.certificate
    return (
        _has_name(cert, names)
        and cert.not_valid_before_utc <= now
        and material.not_after > now + RENEW_BEFORE
    )


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write via a temporary file in the same directory and rename, so a reader (or a crash)
    never sees half a file; the mode is set before any key bytes are written."""
    directory, base = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp")
    except OSError as e:
        raise CertificateError(f"cannot write {path}: {e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CertificateError(f"cannot write {path}: {e}") from None


def _generate(server_name: str, names: List[x509.GeneralName]) -> Tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, server_name)] if len(server_name) <= 64 else []
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_self_signed(state_dir: str, server_name: str = "localhost") -> Tuple[str, str]:
    """Return ``(cert_path, key_path)`` of the self-signed certificate in ``state_dir``,
    generating it (EC P-256, 10 years) unless the existing pair still fits ``server_name``."""
    name, names = _san_for(server_name)
    cert_path = os.path.join(state_dir, CERT_NAME)
    key_path = os.path.join(state_dir, KEY_NAME)
    if not os.path.isdir(state_dir):
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise CertificateError(f"cannot create state directory {state_dir}: {e}") from None
    if _reusable(cert_path, key_path, names):
        return cert_path, key_path
    cert_pem, key_pem = _generate(name, names)
    _write_atomic(key_path, key_pem, 0o600)  # key first: a lone new key fails _reusable next time
    _write_atomic(cert_path, cert_pem, 0o644)
    return cert_path, key_path


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateError(f"cannot read {what} {path}: {e}") from None


def _certificates(path: str, what: str) -> List[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(path, what))
    except ValueError:
        raise CertificateError(f"{path} does not hold a PEM certificate") from None


def load_certificate_files(
    cert_path: str, key_path: str, chain_path: Optional[str] = None
) -> TLSMaterial:
    """Load a PEM leaf (any further certificates in its file are chain), its PEM key (which may
    share the file, as with Twisted's ``ssl:`` ``privateKey``) and an optional chain file.

    An expired certificate is loaded with a warning: refusing to start would not help clients.
    """
    material = _load(cert_path, key_path, chain_path)
    if material.not_after <= _now():
        _log.warn(
            "certificate {cert_path} expired at {not_after}",
            cert_path=cert_path,
            not_after=str(material.not_after),
        )
    return material


def _load(cert_path: str, key_path: str, chain_path: Optional[str]) -> TLSMaterial:
    certs = _certificates(cert_path, "certificate")
    chain = certs[1:] + (_certificates(chain_path, "certificate chain") if chain_path else [])
    try:
        key = serialization.load_pem_private_key(_read(key_path, "private key"), password=None)
    except TypeError:
        raise CertificateError(
            f"private key {key_path} is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{key_path} does not hold a PEM private key") from None
    leaf = certs[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise CertificateError(f"certificate {cert_path} does not match private key {key_path}")
    return TLSMaterial(
        certificate=leaf,
        private_key=key,
        chain=tuple(chain),
        pin=spki_pin(leaf),
        not_after=leaf.not_valid_after_utc,
        cert_path=cert_path,
    )


class Certificates:
    """The certificates of one configuration: each set of files is loaded once, and no files
    means the self-signed certificate for ``server_name`` kept in ``state_dir``."""

    def __init__(self, state_dir: str, server_name: str) -> None:
        self.state_dir = state_dir
        self.server_name = server_name
        self.generated: Optional[str] = None  # the generated certificate's path, once used
        self._loaded: Dict[Tuple[Optional[str], ...], TLSMaterial] = {}

    def get(
        self, cert_path: Optional[str], key_path: Optional[str], chain_path: Optional[str] = None
    ) -> TLSMaterial:
        files = (cert_path, key_path, chain_path)
        if files not in self._loaded:
            if cert_path is None or key_path is None:
                cert_path, key_path = ensure_self_signed(self.state_dir, self.server_name)
                self.generated = cert_path
            self._loaded[files] = load_certificate_files(cert_path, key_path, chain_path)
        return self._loaded[files]

    def files(self) -> Tuple[str, ...]:
        """The operator's files in use (certificates, keys, chains), to watch for changes."""
        return tuple(sorted({path for files in self._loaded for path in files if path}))
