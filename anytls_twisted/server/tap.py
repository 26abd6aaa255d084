"""``twistd anytls``: command-line options and ``makeService``.

Configuration errors end twistd with one clear line and a non-zero status, never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Tuple, cast

from twisted.python import usage

from .. import certs, logs, tls
from .. import clientconfig as banner
from .. import metrics as metrics_
from .._version import __version__
from ..protocol.address import DestinationPolicy
from ..protocol.auth import UserTable
from ..protocol.padding import DEFAULT_SCHEME, PaddingScheme, PaddingSchemeError
from . import configfile
from . import settings as defaults
from . import workers as workers_
from .reload import Reloaded, Reloader, SwappableTLS
from .service import build_service
from .settings import ServerConfig

_log = logs.get_logger("anytls_twisted.tap")

DEFAULT_PORT = "ssl:8443"


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if value <= 0:
            raise ValueError(f"must be positive, got {text}")
        return value

    convert.coerceDoc = "A positive number."  # type: ignore[attr-defined]
    return convert


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run an AnyTLS proxy server. Clients (sing-box, mihomo, anytls-go) authenticate with a "
        "password and relay TCP streams and UDP-over-TCP flows through it. With no certificate "
        "files, a long-lived self-signed certificate is generated in the state directory and "
        "its public-key pin is logged for the clients' certificate_public_key_sha256."
    )

    optParameters = [
        [
            "config",
            None,
            None,
            "A JSON file in the shape of a sing-box anytls inbound (users, listen, listen_port, padding_scheme, tls), or a whole sing-box config whose first anytls inbound is used. Command-line options override it; SIGHUP reloads it.",
        ],
        [
            "password",
            None,
            None,
            "The password clients authenticate with (user 'default'; replaces the config file's users). Visible in ps; prefer --password-file.",
        ],
        [
            "password-file",
            None,
            None,
            "A file holding the password (first line; surrounding whitespace stripped).",
        ],
        [
            "state-dir",
            None,
            None,
            "Where the generated certificate is kept. [default: $STATE_DIRECTORY, else $XDG_STATE_HOME/anytls-twisted, else ~/.local/state/anytls-twisted]",
        ],
        [
            "server-name",
            None,
            None,
            "The name in the generated certificate (clients' tls.server_name). [default: the config file's tls.server_name, else localhost]",
        ],
        [
            "cert",
            None,
            None,
            "Certificate file (PEM, chain after the leaf) for ssl: ports that name no certKey.",
        ],
        ["key", None, None, "Private key file (PEM) for ssl: ports that name no privateKey."],
        [
            "alpn",
            None,
            None,
            "ALPN protocols to select from, comma-separated (e.g. h2,http/1.1). [default: the config file's tls.alpn, else none: negotiate no ALPN, like the reference servers; clients offering ALPN are accepted either way]",
        ],
        [
            "padding-scheme",
            None,
            None,
            "A padding scheme file sent to clients whose scheme differs. [default: the protocol's default scheme]",
        ],
        [
            "auth-timeout",
            None,
            defaults.AUTH_TIMEOUT,
            "Seconds allowed for the TLS handshake plus the auth preamble.",
            _positive(float),
        ],
        [
            "connect-timeout",
            None,
            defaults.CONNECT_TIMEOUT,
            "Seconds allowed to resolve and connect to an origin.",
            _positive(float),
        ],
        [
            "synack-guard",
            None,
            defaults.SYNACK_GUARD,
            "Seconds after which a still-pending connect is acknowledged anyway, so sing-box's 3 s watchdog does not close reused sessions; a later failure ends the stream with FIN.",
            _positive(float),
        ],
        [
            "idle-session-timeout",
            None,
            defaults.IDLE_SESSION_TIMEOUT,
            "Close sessions with no streams and no frames for this many seconds. Longer than clients' own pools (sing-box: 30-60 s), so clients normally close first.",
            _positive(float),
        ],
        [
            "idle-session-check-interval",
            None,
            defaults.IDLE_SESSION_CHECK_INTERVAL,
            "Seconds between idle-session checks.",
            _positive(float),
        ],
        [
            "udp-timeout",
            None,
            defaults.UDP_TIMEOUT,
            "Close a UDP-over-TCP stream after this many seconds without datagrams.",
            _positive(float),
        ],
        [
            "max-streams-per-session",
            None,
            defaults.MAX_STREAMS_PER_SESSION,
            "Concurrent streams one session may open.",
            _positive(int),
        ],
        [
            "shutdown-grace",
            None,
            defaults.SHUTDOWN_GRACE,
            "Seconds sessions get to close at shutdown before they are aborted.",
            _positive(float),
        ],
        [
            "certificate-check-interval",
            None,
            defaults.CERTIFICATE_CHECK_INTERVAL,
            "Seconds between checks of the certificate and key files; a change reloads them (as SIGHUP does).",
            _positive(float),
        ],
        [
            "log-level",
            None,
            "info",
            "Lowest level logged: debug (per-stream events), info, warn or error.",
        ],
        [
            "log-format",
            None,
            "text",
            "text (twistd's lines) or json: one JSON object per line on stdout (for journald and log shippers; use with -n, without --logfile).",
        ],
        [
            "public-address",
            None,
            None,
            "HOST or HOST:PORT clients dial ([IPV6]:PORT), for the client config logged at start. [default: the listening interface if specific, else a placeholder]",
        ],
        [
            "metrics",
            None,
            None,
            "A Twisted endpoint serving Prometheus metrics at /metrics and a health check at /healthz, e.g. tcp:9095:interface=127.0.0.1. [default: off]",
        ],
        [
            "workers",
            None,
            1,
            "Processes serving the (TCP) ports, each with its own reactor; worker i serves --metrics on its port plus i (docs/scaling.md).",
            _positive(int),
        ],
        ["worker-fds", None, None, "Internal (set by the parent for its workers)."],
        ["worker-index", None, 0, "Internal (set by the parent for its workers).", int],
    ]
    optFlags = [
        [
            "allow-private",
            None,
            "Allow destinations on loopback, private, link-local and other non-global addresses (off by default: a proxy reaching its own host's services is a hole).",
        ],
        ["version", None, "Print the version and exit."],
        [
            "show-password",
            None,
            "Put the real password (the first user's) in the client config logged at start or printed, instead of <password>.",
        ],
        [
            "print-client-config",
            None,
            "Print a sing-box outbound and an anytls:// URI for every port to stdout and exit, without listening.",
        ],
    ]
    compData = usage.Completions(
        optActions={
            "password-file": usage.CompleteFiles(),
            "cert": usage.CompleteFiles(),
            "key": usage.CompleteFiles(),
            "padding-scheme": usage.CompleteFiles(),
            "state-dir": usage.CompleteDirs(),
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []

    def opt_port(self, description: str) -> None:
        """A Twisted endpoint to listen on; repeat for several. ssl:PORT gets our TLS (generated certificate unless privateKey/certKey or --cert/--key), as does tls:ENDPOINT for any other endpoint (e.g. tls:systemd:domain=INET:name=anytls); haproxy:ssl:PORT reads a PROXY header, then TLS. tcp:, unix:, systemd: are plain, for use behind a TLS-terminating proxy. [default: ssl:8443]"""
        self["port"].append(description)

    def opt_version(self) -> None:
        print(f"anytls-twisted {__version__}")
        sys.exit(0)

    def parseOptions(self, options=None) -> None:
        """Under twistd, turn a usage error into one line on stderr and exit status 2."""
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            sys.stderr.write(f"twistd anytls: error: {e} (see twistd anytls --help)\n")
            raise SystemExit(2)

    parent = None

    def postOptions(self) -> None:
        settings = _read_config_file(self["config"])
        self["file-settings"] = settings
        if not self["port"]:
            from_file = settings.port_description() if settings else None
            self["port"] = [from_file or DEFAULT_PORT]
        self["users"] = _users(self["password"], self["password-file"], settings)
        if self["log-level"] not in logs.LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(logs.LEVELS)}")
        _apply_log_format(self)
        if self["metrics"] is not None:
            try:
                metrics_.check_endpoint(self["metrics"])
            except ValueError as e:
                raise usage.UsageError(f"--metrics {self['metrics']}: {e}")
        self["padding"] = _read_padding(self["padding-scheme"])
        if self["padding-scheme"] is None and settings and settings.padding:
            self["padding"] = settings.padding
        if self["alpn"] is None:
            self["alpn"] = ",".join(settings.alpn) if settings else ""
        if self["server-name"] is None:
            self["server-name"] = (settings and settings.server_name) or "localhost"
        if self["cert"] is None and settings and settings.certificate_path:
            self["cert"], self["key"] = settings.certificate_path, settings.key_path
        try:
            self["alpn-list"] = tls.parse_alpn(self["alpn"])
        except ValueError as e:
            raise usage.UsageError(f"--alpn: {e}")
        if bool(self["cert"]) != bool(self["key"]):
            raise usage.UsageError("--cert and --key go together")
        if self["state-dir"] is None:
            self["state-dir"] = certs.default_state_dir()
        specs = []
        for description in self["port"]:
            try:
                specs.append(tls.parse_port(description))
                tls.check_endpoint(specs[-1].endpoint)
            except ValueError as e:
                raise usage.UsageError(f"--port {description}: {e}")
        self["port-specs"] = specs
        _check_workers(self)
        self["tls-material"] = _load_material(self, specs)
        _check_client_config_options(self)
        if self["print-client-config"]:
            _print_client_config(self)


def _apply_log_format(options: Options) -> None:
    """``--log-format json`` under twistd: make twistd's own ``--logger`` our JSON observer
    (twistd reads it after this runs, and starts logging after makeService)."""
    if options["log-format"] not in logs.FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(logs.FORMATS)}")
    twistd = options.parent
    if options["log-format"] != "json" or twistd is None:
        return
    if twistd.get("logfile") not in (None, "", "-"):
        raise usage.UsageError("--log-format json writes to stdout; drop twistd's --logfile")
    if twistd.get("logger") not in (None, logs.JSON_OBSERVER):
        raise usage.UsageError(
            "--log-format json and twistd's --logger are two observers; give one"
        )
    twistd["logger"] = logs.JSON_OBSERVER


def _check_workers(options: Options) -> None:
    """--workers N > 1: every port must be one we can bind once and share (TCP)."""
    options["worker-listen"] = None
    if options["worker-fds"] is not None:
        try:
            options["worker-fds-parsed"] = workers_.parse_worker_fds(options["worker-fds"])
        except ValueError as e:
            raise usage.UsageError(str(e))
        return
    if options["workers"] > 1:
        try:
            options["worker-listen"] = [
                workers_.parse_tcp(spec.endpoint) for spec in options["port-specs"]
            ]
            workers_.metrics_for(options["metrics"], 1)
        except ValueError as e:
            raise usage.UsageError(str(e))


def _check_client_config_options(options: Options) -> None:
    if options["public-address"] is None:
        options["public-address-parsed"] = None
        return
    try:
        options["public-address-parsed"] = banner.parse_public_address(options["public-address"])
    except ValueError as e:
        raise usage.UsageError(f"--public-address: {e}")


def _client_endpoints(options: Options) -> List[banner.ClientEndpoint]:
    """What clients dial, per port (docs/configuration.md, "Client configuration")."""
    endpoints = []
    for spec in options["port-specs"]:
        material = options["tls-material"][_files_for(options, spec)] if spec.tls else None
        endpoints.append(
            banner.client_endpoint(
                spec,
                material.certificate if material else None,
                material.pin if material else None,
                options["server-name"],
                options.get("public-address-parsed"),
            )
        )
    return banner.unique(endpoints)


def _shown_password(options: Options) -> Optional[str]:
    users = options.get("users") or ()
    return users[0][1] if options["show-password"] and users else None


def _print_client_config(options: Options) -> None:
    """``--print-client-config``: the blocks on stdout, the hints on stderr, exit 0."""
    endpoints = _client_endpoints(options)
    if not endpoints:
        sys.stderr.write(
            "twistd anytls: no port has a port number clients could dial; give --public-address HOST:PORT\n"
        )
        raise SystemExit(1)
    password = _shown_password(options)
    sys.stdout.write(banner.render(endpoints, password))
    sys.stdout.flush()
    for hint in banner.hints(endpoints, password is not None):
        sys.stderr.write(f"note: {hint}\n")
    raise SystemExit(0)


def _read_config_file(path: Optional[str]):
    if path is None:
        return None
    try:
        settings = configfile.load(path)
    except configfile.ConfigFileError as e:
        raise usage.UsageError(str(e))
    for warning in settings.warnings:
        _log.warn("{warning}", warning=warning)
    return settings


def _users(password: Optional[str], path: Optional[str], settings) -> Tuple[Tuple[str, str], ...]:
    """The command line's one password (user ``default``) wins over the config file's users."""
    if password is None and path is None and settings and settings.users:
        return settings.users
    return (("default", _read_password(password, path)),)


def _read_password(password: Optional[str], path: Optional[str]) -> str:
    if (password is None) == (path is None):
        raise usage.UsageError(
            "give exactly one of --password or --password-file (or users in --config)"
        )
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise usage.UsageError(f"cannot read password file {path}: {e}")
    if not password:
        raise usage.UsageError("the password is empty")
    return password


def _read_padding(path: Optional[str]) -> PaddingScheme:
    if path is None:
        return DEFAULT_SCHEME
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 17)
        return PaddingScheme.parse(raw)
    except OSError as e:
        raise usage.UsageError(f"cannot read padding scheme {path}: {e}")
    except PaddingSchemeError as e:
        raise usage.UsageError(f"invalid padding scheme {path}: {e}")


def _load_material(options: Options, specs) -> dict:
    """Load (or generate) the certificate for every TLS port, keyed by (cert, key, chain)."""
    material = {}
    for spec in specs:
        if not spec.tls:
            continue
        key = _files_for(options, spec)
        if key in material:
            continue
        cert_path, key_path, chain = key
        try:
            if cert_path is None:
                cert_path, key_path = certs.ensure_self_signed(
                    options["state-dir"], options["server-name"]
                )
            material[key] = certs.load_certificate_files(cert_path, cast(str, key_path), chain)
        except certs.CertificateError as e:
            raise usage.UsageError(str(e))
    return material


def _files_for(options: Options, spec) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    cert = spec.cert_key or options["cert"]
    key = spec.private_key or options["key"]
    return cert, key, spec.extra_cert_chain


def _config_from(options: Options) -> ServerConfig:
    return ServerConfig(
        users=UserTable(options["users"]),
        padding=options["padding"],
        policy=DestinationPolicy(allow_private=bool(options["allow-private"])),
        auth_timeout=options["auth-timeout"],
        connect_timeout=options["connect-timeout"],
        synack_guard=options["synack-guard"],
        idle_session_timeout=options["idle-session-timeout"],
        idle_session_check_interval=options["idle-session-check-interval"],
        udp_timeout=options["udp-timeout"],
        max_streams=options["max-streams-per-session"],
        shutdown_grace=options["shutdown-grace"],
    )


def _tls_ports(options: Options) -> List[tuple]:
    """``(spec, TLS options, material)`` for every TLS port, in order."""
    out = []
    for spec in options["port-specs"]:
        if spec.tls:
            material = options["tls-material"][_files_for(options, spec)]
            out.append((spec, tls.server_tls_options(material, options["alpn-list"]), material))
    return out


def _watched_files(options: Options) -> Tuple[str, ...]:
    return tuple(sorted({p for key in options["tls-material"] for p in key if p}))


def _rebuild(argv: List[str]) -> Reloaded:
    """Parse the same command line again, re-reading every file it names."""
    fresh = Options()
    fresh.parseOptions(argv)
    ports = _tls_ports(fresh)
    return Reloaded(
        users=UserTable(fresh["users"]),
        padding=fresh["padding"],
        tls_options=tuple(creator for _, creator, _ in ports),
        pins=tuple(material.pin for _, _, material in ports),
        watched=_watched_files(fresh),
    )


def makeService(options: Options, reactor=None):
    """Build the service; ``reactor`` is injectable for tests."""
    if reactor is None:
        from twisted.internet import reactor
    logs.set_level(options["log-level"])
    config = _config_from(options)
    listeners: List[tuple] = []
    index = options.get("worker-index") or 0
    shared = _shared_sockets(options, reactor)
    slots: List[SwappableTLS] = []
    tls_ports = {id(spec): (creator, material) for spec, creator, material in _tls_ports(options)}
    for spec in options["port-specs"]:
        if spec.tls:
            creator, material = tls_ports[id(spec)]
            slot = SwappableTLS(creator)
            slots.append(slot)
            listeners.append(
                (shared.pop(0) if shared else spec.endpoint, lambda f, c=slot: tls.wrap_tls(f, c))
            )
            _log.info(
                "listening on {port} with TLS; certificate_public_key_sha256={pin} "
                "(expires {not_after})",
                port=spec.description,
                pin=material.pin,
                not_after=str(material.not_after),
            )
        else:
            listeners.append((shared.pop(0) if shared else spec.endpoint, lambda f: f))
            _log.warn(
                "listening on {port} WITHOUT TLS: only use this behind a TLS-terminating proxy",
                port=spec.description,
            )
    if options.get("worker-fds") is None:  # the parent logs it once for all workers
        banner.log_client_configs(_client_endpoints(options), _shown_password(options))
    if config.policy.allow_private:
        _log.warn("--allow-private: clients may reach loopback and private addresses")
    metrics = metrics_.Metrics() if options.get("metrics") else None
    top = build_service(config, listeners, reactor, metrics=metrics)
    if metrics is not None:
        options["metrics"] = workers_.metrics_for(options["metrics"], index)
        metrics_.metrics_service(
            options["metrics"], metrics, lambda: bool(top.running), reactor
        ).setServiceParent(top)
        _log.info("metrics on {endpoint} (/metrics, /healthz)", endpoint=options["metrics"])
    argv = list(getattr(options, "argv", []))
    reloader = Reloader(
        reactor,
        top.factory,
        slots,
        lambda: _rebuild(argv),
        _watched_files(options),
        options["certificate-check-interval"],
    )
    reloader.setServiceParent(top)
    top.reloader = reloader
    if options.get("worker-listen"):
        _supervise(options, top, reactor)
    elif options.get("worker-fds") is not None:
        workers_.watch_parent(reactor)
        _log.info("worker {worker} serving (pid {pid})", worker=index, pid=os.getpid())
    return top


def _shared_sockets(options: Options, reactor) -> list:
    """With --workers, one listener factory per port that adopts the shared socket."""
    if options.get("worker-fds") is not None:
        pairs = options["worker-fds-parsed"]
        haproxy = [spec.endpoint.startswith("haproxy:") for spec in options["port-specs"]]
    elif options.get("worker-listen"):
        try:
            socks = [workers_.bind(listen) for listen in options["worker-listen"]]
        except OSError as e:
            raise SystemExit(f"twistd anytls: error: cannot listen for --workers: {e}") from None
        options["worker-sockets"] = socks
        pairs = [(s.fileno(), s.family) for s in socks]
        haproxy = [listen.haproxy for listen in options["worker-listen"]]
    else:
        return []

    def adopt(fd, family, proxied):
        return lambda factory: workers_.AdoptedPort(
            fd, family, workers_.wrap_haproxy(factory) if proxied else factory, reactor
        )

    return [adopt(fd, family, proxied) for (fd, family), proxied in zip(pairs, haproxy)]


def _supervise(options: Options, top, reactor) -> None:
    socks = options["worker-sockets"]
    twistd = ["--nodaemon", "--pidfile="]
    if options.parent is not None and options.parent.get("logger"):
        twistd.append(f"--logger={options.parent['logger']}")
    argv = list(getattr(options, "argv", []))
    families = [int(s.family) for s in socks]
    supervisor = workers_.WorkerSupervisor(
        options["workers"],
        lambda i: workers_.worker_argv(sys.executable, twistd, argv, i, families),
        [s.fileno() for s in socks],
        reactor.spawnProcess,
        reactor,
    )
    supervisor.setServiceParent(top)
    top.supervisor = supervisor
    _log.info(
        "worker 0 serving (pid {pid}); starting {n} more", pid=os.getpid(), n=options["workers"] - 1
    )
