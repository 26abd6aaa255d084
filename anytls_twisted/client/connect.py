"""How the client reaches its server: the TLS connection creator and the endpoint.

:func:`tls_creator` is the one place that builds the client's TLS: when the verifying creator
of ``anytls_twisted/client/tls.py`` lands, it replaces the body of this function and nothing
else changes. Until then verification uses Twisted's ``optionsForClientTLS`` (the platform's
CAs, or the configured certificate file as the only trust root); ``insecure`` skips
verification but still sends the SNI. Pins, ALPN and fingerprints are not applied yet.
"""

from __future__ import annotations

from typing import Any, Optional

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from zope.interface import implementer

from .config import ClientConfig

#: Seconds allowed for the TCP connect to the server.
CONNECT_TIMEOUT = 10.0


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """A client TLS connection that checks nothing about the server's certificate (--insecure)
    but still names the server (SNI)."""

    def __init__(self, server_name: Optional[str]) -> None:
        self._server_name = server_name
        self._context = ssl.CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name.encode("idna"))
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


def tls_creator(config: ClientConfig) -> IOpenSSLClientConnectionCreator:
    """The TLS client connection creator for ``config`` (the one place TLS is chosen)."""
    name = config.server_name or config.server
    if config.insecure:
        return _Unverified(config.server_name)
    trust: Any = None
    if config.certificate_path or config.certificate:
        pem = config.certificate
        if pem is None:
            assert config.certificate_path is not None
            with open(config.certificate_path, "rb") as f:
                pem_bytes = f.read()
        else:
            pem_bytes = pem.encode("ascii")
        trust = ssl.Certificate.loadPEM(pem_bytes)
    return ssl.optionsForClientTLS(name, trustRoot=trust)


def server_endpoint(reactor: Any, config: ClientConfig) -> IStreamClientEndpoint:
    """TCP to the server (names resolved, IPv4 and IPv6 raced), wrapped in TLS unless the
    configuration says plain (a sing-box outbound without ``tls``)."""
    tcp = HostnameEndpoint(reactor, config.server, config.server_port, timeout=CONNECT_TIMEOUT)
    if not config.tls:
        return tcp
    return wrapClientTLS(tls_creator(config), tcp)
