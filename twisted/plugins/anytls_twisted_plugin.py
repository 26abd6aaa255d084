"""twistd dropin: ``twistd anytls`` (the tap module is imported only when used)."""

from twisted.application.service import ServiceMaker

anytls = ServiceMaker(
    "AnyTLS proxy server",
    "anytls_twisted.server.tap",
    "An AnyTLS proxy server for sing-box, mihomo and anytls-go clients.",
    "anytls",
)
