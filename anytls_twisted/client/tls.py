"""The client's TLS: what it verifies, the SNI and ALPN it sends (docs: anytls-protocol.md
section 2, client side; client-behaviour.md section 10).

Verification follows the sing-box outbound, whose configuration the client reads:

* By default the server's certificate must chain to the system's CAs (Twisted's
  ``platformTrust()``) and name ``server_name`` (service_identity, as Twisted's
  ``optionsForClientTLS`` checks). With no server name (the server is an IP address) the
  certificate must name that IP address (an IP SAN), as Go checks.
* ``ca_pem`` (``tls.certificate`` / ``tls.certificate_path``): those certificates and nothing
  else are trusted, and any of them may be the server's own (a self-signed server certificate
  works, as in Go, whose root pool accepts a leaf). The name is still checked.
* ``pins`` (``tls.certificate_public_key_sha256``): the leaf's public key must hash to one of
  them, and nothing else is checked (no chain, name or dates): sing-box sets
  ``InsecureSkipVerify`` and verifies only the pin, which it enforces even with ``insecure``,
  and refuses pins together with ``certificate``/``certificate_path``. We do the same.
* ``insecure`` (and no pins): nothing is verified; the caller logs a warning.

A failed check ends the handshake before the client's first byte of AnyTLS, and the
application protocol's ``connectionLost`` gets a :class:`CertificateVerifyError` whose message
is one line: ``certificate verify failed: ...`` or ``certificate pin mismatch: got X, want one
of Y``.

TLS 1.2 is the minimum and 1.3 the maximum, Go's defaults; ciphers are Twisted's. The SNI is
``server_name`` unless it is None or an IP address (TLS allows no IP there). The ClientHello is
OpenSSL's whatever browser fingerprint the configuration asks for.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import TYPE_CHECKING, Callable, FrozenSet, Optional, Sequence

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509, X509StoreFlags
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..certs import spki_pin

if TYPE_CHECKING:  # Twisted's annotations name it; it is not exported
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = ["CertificateVerifyError", "client_tls"]


class CertificateVerifyError(Exception):
    """The server's certificate was refused; the message is one line for the log."""


_VerifyCallback = Callable[[SSL.Connection, X509, int, int, int], bool]

# Twisted leaves these unannotated; their signatures, for the strict type check.
_platform_trust: Callable[[], IOpenSSLTrustRoot] = platformTrust
_trust_certificates: Callable[[Sequence[Certificate]], IOpenSSLTrustRoot] = (
    trustRootFromCertificates
)
_certificate: Callable[[X509], Certificate] = Certificate
_failure: Callable[[BaseException], Failure] = Failure


def _verify_error_text(errno: int) -> str:
    """OpenSSL's text for an ``X509_V_ERR_*`` code, e.g. ``self-signed certificate``."""
    try:
        from OpenSSL._util import ffi, lib  # no public API for this string

        return str(ffi.string(lib.X509_verify_cert_error_string(errno)).decode("ascii"))
    except Exception:  # pragma: no cover - a pyOpenSSL without the private binding
        return f"OpenSSL verify error {errno}"


def _names(cert: x509.Certificate) -> str:
    """The names a certificate is for, as ``DNS:a, IP:1.2.3.4``."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return "no subject alternative names"
    names = [f"DNS:{n}" for n in sans.get_values_for_type(x509.DNSName)]
    names += [f"IP:{n}" for n in sans.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "no DNS or IP names"


def _canonical_pin(pin: str) -> str:
    try:
        digest = base64.b64decode(pin, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"certificate pin {pin!r} is not a base64 SHA-256 digest")
    return base64.b64encode(digest).decode("ascii")


def _ip(text: str) -> Optional[str]:
    """The canonical form of an IP literal (brackets allowed), else None."""
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return None


@implementer(IOpenSSLClientConnectionCreator)
class _ClientTLS:
    """Makes each client ``SSL.Connection``: the shared context of ``options``, plus the SNI
    and a verify callback of its own."""

    def __init__(
        self,
        options: CertificateOptions,
        sni: Optional[bytes],
        identity: Optional[str],
        pins: FrozenSet[str],
        verify_chain: bool,
    ) -> None:
        self._options = options
        self._sni = sni
        self._identity = identity  # the DNS name or IP checked, None for no name check
        self._pins = pins
        self._verify_chain = verify_chain

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        if self._verify_chain or self._pins:
            connection.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._callback(tlsProtocol)
            )
        else:
            connection.set_verify(SSL.VERIFY_NONE)
        return connection

    def _callback(self, tls_protocol: TLSMemoryBIOProtocol) -> _VerifyCallback:
        """OpenSSL calls this for each certificate of the chain, top down, and again for each
        error; returning False ends the handshake with an alert. The reason goes to the
        protocol first (``failVerification``), so the application sees ours, not OpenSSL's
        generic "certificate verify failed"."""
        failed = False

        def fail(message: str) -> bool:
            nonlocal failed
            if not failed:
                failed = True
                fail_verification: Callable[[Failure], None] = tls_protocol.failVerification
                fail_verification(_failure(CertificateVerifyError(message)))
            return False

        def check(cert: x509.Certificate, errno: int, depth: int, ok: int) -> bool:
            if self._pins:
                if depth != 0:
                    return True  # only the leaf's key matters
                got = spki_pin(cert)
                if got in self._pins:
                    return True
                want = ", ".join(sorted(self._pins))
                return fail(f"certificate pin mismatch: got {got}, want one of {want}")
            if not ok:
                subject = cert.subject.rfc4514_string() or _names(cert)
                return fail(
                    f"certificate verify failed: {_verify_error_text(errno)} "
                    f"(depth {depth}: {subject})"
                )
            if depth != 0 or self._identity is None:
                return True
            try:
                if _ip(self._identity) is not None:
                    verify_certificate_ip_address(cert, self._identity)
                else:
                    verify_certificate_hostname(cert, self._identity)
            except (VerificationError, CertificateError):
                return fail(
                    f"certificate verify failed: the certificate is for {_names(cert)}, "
                    f"not {self._identity}"
                )
            return True

        def callback(
            connection: SSL.Connection, cert: X509, errno: int, depth: int, ok: int
        ) -> bool:
            if failed:
                return False
            try:
                return check(cert.to_cryptography(), errno, depth, ok)
            except Exception as e:  # an exception here would surface from OpenSSL's depths
                return fail(f"certificate verify failed: {type(e).__name__}: {e}")

        return callback


def client_tls(
    *,
    server_name: Optional[str],
    server: Optional[str] = None,
    insecure: bool = False,
    alpn: Sequence[str] = (),
    ca_pem: Optional[bytes] = None,
    pins: Sequence[str] = (),
) -> IOpenSSLClientConnectionCreator:
    """The client's TLS connection creator (see the module docstring for what is verified).

    @param server_name: The SNI to send and the name to verify, or None for no SNI (the
        server is dialed by IP address); an IP literal here also means no SNI.
    @param server: The address dialed. With no ``server_name``, a certificate verified by name
        must name this IP address; a host name here cannot be verified without a server name.
    @param insecure: Verify nothing (pins are still enforced, as sing-box does).
    @param alpn: ALPN protocols to offer, most preferred first.
    @param ca_pem: PEM certificates to trust instead of the system's CAs.
    @param pins: base64 SHA-256 public-key pins (``certs.public_key_pin``), any of which the
        leaf must match; then nothing else is verified.
    @raise ValueError: A combination that cannot work (pins with ``ca_pem``, a malformed pin
        or PEM, or verification by name with nothing to verify against), in one line.
    """
    pin_set = frozenset(_canonical_pin(p) for p in pins)
    if pin_set and ca_pem is not None:
        raise ValueError(
            "certificate_public_key_sha256 cannot be combined with certificate or "
            "certificate_path (as in sing-box): a pin skips chain verification"
        )
    sni: Optional[bytes] = None
    identity: Optional[str] = None
    if server_name is not None:
        identity = _ip(server_name)
        if identity is None:
            try:
                sni = server_name.encode("idna")
            except UnicodeError as e:
                raise ValueError(f"server name {server_name!r} is not a valid host name: {e}")
            identity = sni.decode("ascii")
    verify_chain = not insecure and not pin_set
    if verify_chain and identity is None:
        identity = _ip(server) if server is not None else None
        if identity is None:
            raise ValueError(
                f"cannot verify the server's certificate: no server name to check it against "
                f"(server {server!r}); set tls.server_name, pin the server's public key "
                "(certificate_public_key_sha256), or set insecure"
            )
    trust: Optional[IOpenSSLTrustRoot] = None
    if verify_chain:
        if ca_pem is not None:
            try:
                certificates = x509.load_pem_x509_certificates(ca_pem)
            except ValueError:
                raise ValueError("the trusted certificate is not a PEM certificate") from None
            trust = _trust_certificates(
                [_certificate(X509.from_cryptography(c)) for c in certificates]
            )
        else:
            trust = _platform_trust()
    options = CertificateOptions(
        trustRoot=trust,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableProtocols=[p.encode("ascii") for p in alpn] or None,
    )
    if verify_chain and ca_pem is not None:
        # Any trusted certificate may end the chain, even one that is not a CA's (Go's
        # behaviour, and what a pasted server certificate needs).
        store = options.getContext().get_cert_store()
        assert store is not None
        store.set_flags(X509StoreFlags.PARTIAL_CHAIN)
    return _ClientTLS(options, sni, identity, pin_set, verify_chain)
