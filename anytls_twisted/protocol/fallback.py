"""Where a connection that is not an AnyTLS client goes: the fallback routes. Pure, no I/O.

The session machine decides *that* a connection is not AnyTLS (its first 32 bytes match no
user's digest, or fewer than 32 bytes came before the auth timeout); these routes decide
*where* it goes, as sing-box's trojan inbound does with ``fallback`` and ``fallback_for_alpn``:

* with per-ALPN routes and a negotiated protocol, only that protocol's route (none: close);
* otherwise the default route (none: close).

Routes are endpoint strings; the shell that dials them (``server/fallback.py``) owns their
meaning.
"""

from __future__ import annotations

from typing import Optional, Tuple

import attr

#: Why a connection went to the fallback (the log line and ``anytls_fallbacks_total``).
WRONG_PASSWORD = "wrong_password"
TIMEOUT = "timeout"
REASONS = (WRONG_PASSWORD, TIMEOUT)

#: What the log says about each reason.
WHY = {
    WRONG_PASSWORD: "its first 32 bytes match no user's password",
    TIMEOUT: "fewer than 32 bytes came within the auth timeout",
}


@attr.frozen
class FallbackRoutes:
    """The fallback of a server: a default endpoint and endpoints by negotiated ALPN.

    @ivar default: the endpoint for connections no ALPN route takes, or None.
    @ivar by_alpn: ``(protocol, endpoint)`` pairs, in the order given.
    """

    default: Optional[str] = None
    by_alpn: Tuple[Tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return self.default is not None or bool(self.by_alpn)

    def choose(self, alpn: Optional[str]) -> Tuple[Optional[str], str]:
        """The endpoint for a connection that negotiated ``alpn`` (None or empty: none),
        and, when there is none, why (for the log)."""
        if self.by_alpn and alpn:
            for protocol, endpoint in self.by_alpn:
                if protocol == alpn:
                    return endpoint, ""
            return None, f"no fallback for ALPN {alpn}"
        if self.default is None:
            return None, "no default fallback"
        return self.default, ""

    def unreachable(self, alpn: Tuple[str, ...]) -> Tuple[str, ...]:
        """The per-ALPN routes a server selecting from ``alpn`` never uses."""
        return tuple(protocol for protocol, _ in self.by_alpn if protocol not in alpn)
