"""UDP over TCP (sing "udp-over-tcp", anytls-protocol.md section 10): the magic names."""

from __future__ import annotations

from typing import Optional

from .address import Destination

MAGIC_V2 = "sp.v2.udp-over-tcp.arpa"
MAGIC_V1 = "sp.udp-over-tcp.arpa"


def uot_version(dest: Destination) -> Optional[int]:
    """2 or 1 for the magic destinations (exact, case-sensitive, any port), else ``None``."""
    if dest.host == MAGIC_V2:
        return 2
    if dest.host == MAGIC_V1:
        return 1
    return None
