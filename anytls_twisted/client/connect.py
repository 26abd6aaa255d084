"""How the client reaches its server: the TLS connection creator and the endpoint.

:func:`tls_creator` is the one place that chooses the client's TLS; the verification rules
(system CAs and the server name by default, a configured certificate, public-key pins as
sing-box takes them, ``insecure``) live in :mod:`anytls_twisted.client.tls`.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint

from ..tls_transport import ClientTLSEndpoint
from .config import ClientConfig
from .sessions import Route
from .tls import client_tls

#: Seconds allowed for the TCP connect to the server.
CONNECT_TIMEOUT = 10.0


def tls_creator(config: ClientConfig) -> IOpenSSLClientConnectionCreator:
    """The TLS client connection creator for ``config``. Raises ``ValueError`` (one line) for
    settings that cannot work together, e.g. pins with a certificate."""
    pem: Optional[bytes] = None
    if config.certificate is not None:
        pem = config.certificate.encode("ascii")
    elif config.certificate_path is not None:
        with open(config.certificate_path, "rb") as f:
            pem = f.read()
    return client_tls(
        server_name=config.server_name,
        server=config.server,
        insecure=config.insecure,
        alpn=config.alpn,
        ca_pem=pem,
        pins=config.certificate_pins,
    )


def server_endpoint(
    reactor: Any, config: ClientConfig, tls: Optional[IOpenSSLClientConnectionCreator] = None
) -> IStreamClientEndpoint:
    """TCP to the server (names resolved, IPv4 and IPv6 raced), wrapped in TLS unless the
    configuration says plain (a sing-box outbound without ``tls``)."""
    tcp = HostnameEndpoint(reactor, config.server, config.server_port, timeout=CONNECT_TIMEOUT)
    if not config.tls:
        return tcp
    return ClientTLSEndpoint(tls if tls is not None else tls_creator(config), tcp)


def server_label(config: ClientConfig) -> str:
    """``host:port`` of the server, IPv6 in brackets, for the log."""
    host = f"[{config.server}]" if ":" in config.server else config.server
    return f"{host}:{config.server_port}"


#: Fields whose change means existing sessions lead to the wrong place (or with the wrong
#: credentials or trust): the pool settings and the display name are not among them.
_ROUTE_FIELDS = (
    "server",
    "server_port",
    "password",
    "server_name",
    "insecure",
    "tls",
    "alpn",
    "certificate",
    "certificate_path",
    "certificate_pins",
)


def route(reactor: Any, config: ClientConfig) -> Route:
    """How new sessions reach the server ``config`` describes (its TLS settings built now,
    so a certificate file is read once per load)."""
    tls = tls_creator(config) if config.tls else None
    return Route(
        server_label(config),
        lambda: server_endpoint(reactor, config, tls),
        config.password,
        config.tls,
        key=tuple(getattr(config, name) for name in _ROUTE_FIELDS),
    )
