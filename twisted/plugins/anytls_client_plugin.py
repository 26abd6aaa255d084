"""twistd dropin: ``twistd anytls-client`` (the tap module is imported only when used)."""

from twisted.application.service import ServiceMaker

anytls_client = ServiceMaker(
    "AnyTLS client",
    "anytls_twisted.client.tap",
    "A local SOCKS5/HTTP proxy carried to an AnyTLS server over pooled TLS sessions.",
    "anytls-client",
)
