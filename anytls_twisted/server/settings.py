"""The server's settings as one frozen value, built once from the command line."""

from __future__ import annotations

import attr

from ..protocol.address import DestinationPolicy
from ..protocol.auth import UserTable
from ..protocol.padding import DEFAULT_SCHEME, PaddingScheme

#: Defaults, shared by the command line, the docs and the tests.
AUTH_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
SYNACK_GUARD = 2.0
IDLE_SESSION_TIMEOUT = 300.0
IDLE_SESSION_CHECK_INTERVAL = 30.0
UDP_TIMEOUT = 300.0
SHUTDOWN_GRACE = 5.0
CERTIFICATE_CHECK_INTERVAL = 30.0
MAX_STREAMS_PER_SESSION = 1024
#: Bytes a stream may hold from the client before its origin is connected; past this the
#: session stops reading its TLS connection until the connect finishes.
PENDING_HIGH_WATER = 256 * 1024


@attr.frozen
class ServerConfig:
    users: UserTable
    padding: PaddingScheme = DEFAULT_SCHEME
    policy: DestinationPolicy = DestinationPolicy()
    auth_timeout: float = AUTH_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    synack_guard: float = SYNACK_GUARD
    idle_session_timeout: float = IDLE_SESSION_TIMEOUT
    idle_session_check_interval: float = IDLE_SESSION_CHECK_INTERVAL
    udp_timeout: float = UDP_TIMEOUT
    shutdown_grace: float = SHUTDOWN_GRACE
    max_streams: int = MAX_STREAMS_PER_SESSION
    pending_high_water: int = PENDING_HIGH_WATER
