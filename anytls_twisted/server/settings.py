"""The server's settings: the defaults, the frozen values :func:`.load.load` builds from the
command line and the files it names, and :class:`LiveConfig`, the one configuration that a
reload replaces and that everything running reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import attr
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from ..certs import TLSMaterial
from ..protocol.address import DestinationPolicy
from ..protocol.auth import UserTable
from ..protocol.fallback import FallbackRoutes
from ..protocol.padding import DEFAULT_SCHEME, PaddingScheme
from ..tls import PortSpec

if TYPE_CHECKING:
    from .workers import TCPListen

#: Defaults, shared by the command line, the docs and the tests.
AUTH_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
SYNACK_GUARD = 2.0
IDLE_SESSION_TIMEOUT = 300.0
IDLE_SESSION_CHECK_INTERVAL = 30.0
#: Idle sessions silent for this long are asked with a heartbeat (0: never); see
#: docs/configuration.md for why 60 s.
HEARTBEAT_INTERVAL = 60.0
#: Seconds a heartbeat may wait for its answer before the session is closed.
HEARTBEAT_TIMEOUT = 15.0
UDP_TIMEOUT = 300.0
SHUTDOWN_GRACE = 5.0
CERTIFICATE_CHECK_INTERVAL = 30.0
MAX_STREAMS_PER_SESSION = 1024
#: Abuse limits (docs/configuration.md, "Abuse limits"): new connections a second per source,
#: and how many a source may open at once before that rate applies; 0 turns a limit off.
CONNECTION_RATE = 20.0
CONNECTION_BURST = 100
MAX_SESSIONS = 0
MAX_SESSIONS_PER_USER = 0
MAX_STREAMS = 0
#: Sources the connection rate limit remembers (least recently seen forgotten first).
RATE_LIMIT_SOURCES = 16384
#: Bytes a stream may hold from the client before its origin is connected; past this the
#: session stops reading its TLS connection until the connect finishes.
PENDING_HIGH_WATER = 256 * 1024
DEFAULT_PORT = "ssl:8443"


@attr.frozen(kw_only=True)
class Limits:
    """The abuse limits, read at each connection, session and stream (0: no limit).

    @ivar connection_rate: new connections a second per source address (an IPv6 /64).
    @ivar connection_burst: new connections a source may open at once (the bucket's size).
    @ivar max_sessions: connections open at once, in the handshake or authenticated.
    @ivar max_sessions_per_user: authenticated sessions of one user open at once.
    @ivar max_streams: streams open at once over all sessions.
    """

    connection_rate: float = CONNECTION_RATE
    connection_burst: int = CONNECTION_BURST
    max_sessions: int = MAX_SESSIONS
    max_sessions_per_user: int = MAX_SESSIONS_PER_USER
    max_streams: int = MAX_STREAMS


@attr.frozen
class ServerConfig:
    """What sessions and streams read, through ``factory.config``, when they use it.

    @ivar users: the password-digest to user table.
    @ivar padding: the scheme sent to clients whose ``padding-md5`` differs.
    @ivar policy: which resolved destination addresses may be reached.
    @ivar max_streams: concurrent streams per session.
    @ivar limits: the abuse limits (:class:`Limits`).
    @ivar pending_high_water: bytes a stream holds before its origin connects, before it
        pauses the client (four times that ends the stream).
    @ivar fallback: where connections that are not AnyTLS clients go (empty: closed).
    The other fields are the timeouts of the same names, in seconds (docs/configuration.md).
    """

    users: UserTable
    padding: PaddingScheme = DEFAULT_SCHEME
    policy: DestinationPolicy = DestinationPolicy()
    auth_timeout: float = AUTH_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    synack_guard: float = SYNACK_GUARD
    idle_session_timeout: float = IDLE_SESSION_TIMEOUT
    idle_session_check_interval: float = IDLE_SESSION_CHECK_INTERVAL
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    udp_timeout: float = UDP_TIMEOUT
    shutdown_grace: float = SHUTDOWN_GRACE
    max_streams: int = MAX_STREAMS_PER_SESSION
    pending_high_water: int = PENDING_HIGH_WATER
    fallback: FallbackRoutes = FallbackRoutes()
    limits: Limits = Limits()


@attr.frozen(kw_only=True)
class Port:
    """One ``--port`` as loaded: its parsed description and, for a port we put TLS on, the
    certificate and the TLS options (an ``IOpenSSLServerConnectionCreator``)."""

    spec: PortSpec
    material: Optional[TLSMaterial] = None
    tls_options: Any = None

    @property
    def description(self) -> str:
        return self.spec.description


@attr.frozen(kw_only=True)
class Workers:
    """``--workers``: how many processes, and this process's part.

    The parent of N > 1 processes binds ``shared`` itself; a worker adopts ``inherited``
    (descriptor, address family) pairs, one per port, and has ``index`` 1 to N-1."""

    count: int = 1
    index: int = 0
    shared: Tuple[TCPListen, ...] = ()
    inherited: Optional[Tuple[Tuple[int, int], ...]] = None
    argv: Tuple[str, ...] = ()  # our command line, for the workers' own
    twistd_argv: Tuple[str, ...] = ()  # twistd's options for the workers

    @property
    def is_worker(self) -> bool:
        return self.inherited is not None


@attr.frozen(kw_only=True)
class ClientChoices:
    """What the client configuration shows (clientconfig.py) and whether to print it."""

    server_name: str = "localhost"
    public_address: Optional[Tuple[str, Optional[int]]] = None
    show_password: bool = False
    print_and_exit: bool = False
    format: str = "both"


@attr.frozen(kw_only=True)
class Settings:
    """Everything :func:`.load.load` read and derived, once; a reload builds a new one."""

    config: ServerConfig
    users: Tuple[Tuple[str, str], ...]  # (name, password), as given
    ports: Tuple[Port, ...]
    alpn: Tuple[str, ...] = ()  # what the TLS ports select from
    metrics: Optional[str] = None  # this process's --metrics endpoint
    workers: Workers = Workers()
    log_level: str = "info"
    client: ClientChoices = ClientChoices()
    certificate_check_interval: float = CERTIFICATE_CHECK_INTERVAL
    watched: Tuple[str, ...] = ()  # certificate and key files whose change reloads
    generated_certificate: Optional[str] = None  # its path, when a TLS port uses it
    warnings: Tuple[str, ...] = ()  # about the config file, to log


class PortsChanged(ValueError):
    """A reload named other ports than the running ones; listening ports need a restart."""


def _names(ports: Iterable[str]) -> str:
    return ", ".join(sorted(ports)) or "none"


class LiveConfig:
    """The one reloadable configuration of a running server: the current frozen
    :class:`ServerConfig` and the TLS options of every TLS port, keyed by port description.

    The factory, the registry, the service and the TLS of every port read it when they use
    it; :meth:`update` replaces it all at once. A reload naming other ports is refused as a
    whole (:class:`PortsChanged`): a server half on the old file and half on the new would
    match neither.

    @ivar ports: the descriptions of the running ports (a reload must name the same).
    """

    def __init__(self, config: ServerConfig, ports: Iterable[Port] = ()) -> None:
        self._config = config
        ports = tuple(ports)
        self.ports = frozenset(port.description for port in ports)
        self._tls = self._tls_of(ports)

    @classmethod
    def of(cls, config: Union[ServerConfig, LiveConfig]) -> LiveConfig:
        """``config`` itself if live, else a live configuration holding it (no ports)."""
        return config if isinstance(config, LiveConfig) else cls(config)

    @property
    def config(self) -> ServerConfig:
        """The current settings; read it at use time, do not keep it."""
        return self._config

    def tls_options(self, port: str) -> Any:
        """The current TLS options of the TLS port described as ``port``."""
        return self._tls[port]

    def tls_for(self, port: str) -> PortTLS:
        """A TLS connection creator for ``port`` that always uses its current options."""
        self.tls_options(port)  # KeyError now rather than at the first handshake
        return PortTLS(self, port)

    def update(self, config: ServerConfig, ports: Sequence[Port] = ()) -> None:
        """Make ``config`` and the ports' TLS options current, for the same set of ports."""
        given = frozenset(port.description for port in ports)
        if given != self.ports:
            raise PortsChanged(
                f"the ports changed (running: {_names(self.ports)}; now: {_names(given)}); "
                "listening ports need a restart"
            )
        self._tls = self._tls_of(ports)
        self._config = config

    @staticmethod
    def _tls_of(ports: Iterable[Port]) -> Dict[str, Any]:
        return {p.description: p.tls_options for p in ports if p.tls_options is not None}


@implementer(IOpenSSLServerConnectionCreator)
class PortTLS:
    """The TLS of one port: each new handshake asks the live configuration for the port's
    current options, so a reload (new certificate, ALPN) applies to new connections."""

    def __init__(self, live: LiveConfig, port: str) -> None:
        self.live = live
        self.port = port

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        return self.live.tls_options(self.port).serverConnectionForTLS(protocol)
