"""``twistd anytls-client``: read the files the options name, then build the client service
(the local proxy ports and the session manager). A configuration error ends twistd with one
line and exit status 2, never a traceback.

SIGHUP reads the same files again (``--config``, ``--password-file``, ``--certificate``,
``--proxy-user-file``) with the same command line: new streams use the result, live streams
are never cut (:meth:`.sessions.SessionManager.reconfigure`), and a reload that fails keeps
everything as it was and says why in one line. ``--listen`` needs a restart."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, List, Optional, Tuple

import attr
from twisted.application import service, strports
from twisted.python import usage

from .. import endpoints, logs, sighup
from ..protocol.address import parse_ip
from ..singbox import ConfigFileError
from .config import ClientConfig, parse_uri, to_outbound
from .configfile import load_file
from .connect import server_endpoint, server_label, tls_creator
from .local import LocalProxyFactory
from .localauth import ProxyUsers, ProxyUsersError
from .options import Options
from .pool import Pool
from .sessions import SessionManager

__all__ = ["ClientService", "Options", "load", "makeService"]

_log = logs.get_logger("anytls_twisted.client.tap")


class ConfigError(usage.UsageError):
    """A configuration that cannot be used; one line naming the option or file."""


def load(options: Options) -> ClientConfig:
    """The server's configuration from ``--server`` or ``--config``, with the overrides of the
    other options applied."""
    password_file = options["password-file"]
    try:
        if options["server"] is not None:
            config = parse_uri(options["server"], password_file=password_file is not None)
        else:
            configs = load_file(options["config"], password_file=password_file is not None)
            if len(configs) > 1:
                raise ConfigError(
                    f"{options['config']}: {len(configs)} servers; only one is supported yet"
                )
            config = configs[0]
    except (ConfigFileError, ValueError) as e:
        raise ConfigError(str(e)) from None
    changes: dict[str, Any] = {}
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                changes["password"] = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read password file {password_file}: {e}") from None
        if not changes["password"]:
            raise ConfigError(f"password file {password_file} is empty")
    if options["insecure"]:
        changes["insecure"] = True
    for name in ("idle-session-check-interval", "idle-session-timeout", "min-idle-session"):
        if options[name] is not None:
            changes[name.replace("-", "_")] = options[name]
    if options["certificate-pin"]:
        changes.update(certificate_pins=tuple(options["certificate-pin"]), certificate=None)
        changes["certificate_path"] = None
    elif options["certificate"] is not None:
        changes.update(
            certificate_path=options["certificate"], certificate=None, certificate_pins=()
        )
        config = attr.evolve(config, certificate_path=options["certificate"])
    if options["alpn"] is not None:
        alpn = tuple(p.strip() for p in options["alpn"].split(",") if p.strip())
        if any(len(p) > 255 for p in alpn):
            raise ConfigError("--alpn: each protocol name is 1 to 255 characters")
        changes["alpn"] = alpn
    if config.certificate_path and not config.insecure and not options["insecure"]:
        try:
            open(config.certificate_path, "rb").close()
        except OSError as e:
            raise ConfigError(f"cannot read certificate file {config.certificate_path}: {e}")
    config = attr.evolve(config, **changes)
    if config.tls:
        try:
            tls_creator(config)  # settings that cannot work together fail now, in one line
        except (ValueError, OSError) as e:
            raise ConfigError(str(e)) from None
    return config


#: What a reload rebuilds: the server's configuration and the local proxy users.
Rebuild = Callable[[], Tuple[ClientConfig, Optional[ProxyUsers]]]

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


class ClientService(service.MultiService):
    """The client: one session manager, one local proxy port per ``--listen``.

    @ivar rebuild: reads the files again for a reload (SIGHUP); None: reloading is off.
    @ivar reloads: reloads applied.
    @ivar reload_failures: reloads that failed (the configuration was kept).
    """

    def __init__(
        self,
        config: ClientConfig,
        listen: List[str],
        reactor: Any,
        client_name: str = "",
        users: Optional[ProxyUsers] = None,
        rebuild: Optional[Rebuild] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.listen = listen
        self.users = users
        self.reactor = reactor
        self.rebuild = rebuild
        self.reloads = 0
        self.reload_failures = 0
        self._previous_sighup: Any = None
        pool: Pool[Any] = Pool(
            config.idle_session_check_interval,
            config.idle_session_timeout,
            config.min_idle_session,
        )
        tls = tls_creator(config) if config.tls else None
        self.manager = SessionManager(
            lambda: server_endpoint(reactor, config, tls),
            config.password,
            reactor,
            pool,
            client_name,
            server=server_label(config),
        )
        self.manager.setServiceParent(self)
        self.factory = LocalProxyFactory(self.manager, reactor, users)
        for description in listen:
            strports.service(description, self.factory, reactor=reactor).setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        config = self.config
        if self.rebuild is not None:
            self._previous_sighup = sighup.install(self.reactor, self.reload)
        _log.info(
            "anytls-client: proxy (SOCKS5, SOCKS4a, HTTP) on {listen}; server {server}:{port} "
            "({tls})",
            listen=", ".join(self.listen),
            server=config.server,
            port=config.server_port,
            tls=_describe_tls(config),
        )
        if self.users is None:
            for description in self.listen:
                if not _loopback_only(description):
                    _log.warn(
                        "--listen {listen} is reachable from other machines and asks for no "
                        "password: anyone who reaches it can use your server; add "
                        "--proxy-user-file or listen on 127.0.0.1",
                        listen=description,
                    )
        else:
            _log.info("local proxy users: {users}", users=", ".join(self.users.names))
        for warning in config.warnings:
            _log.warn("{warning}", warning=warning)

    def stopService(self) -> Any:
        sighup.restore(self._previous_sighup)
        self._previous_sighup = None
        return super().stopService()

    def reload(self, why: str) -> bool:
        """Read the files again and use them for new streams; False (and one error line) when
        they cannot be used, keeping the current configuration."""
        if self.rebuild is None:
            return False
        try:
            config, users = self.rebuild()
            tls = tls_creator(config) if config.tls else None
        except Exception as e:
            self.reload_failures += 1
            _log.error(
                "reload ({why}) failed, keeping the current configuration: {error}",
                why=why,
                error=str(e) or e.__class__.__name__,
            )
            return False
        old = self.config
        changed = any(getattr(old, f) != getattr(config, f) for f in _ROUTE_FIELDS)
        reactor = self.reactor
        closed, retiring = self.manager.reconfigure(
            lambda: server_endpoint(reactor, config, tls),
            config.password,
            config.idle_session_check_interval,
            config.idle_session_timeout,
            config.min_idle_session,
            server_changed=changed,
            server=server_label(config),
        )
        self.config = config
        self.users = users
        self.factory.users = users
        self.reloads += 1
        for warning in config.warnings:
            _log.warn("{warning}", warning=warning)
        _log.info(
            "reloaded ({why}): server {server}:{port} ({tls}){change}; local proxy users: {users}",
            why=why,
            server=config.server,
            port=config.server_port,
            tls=_describe_tls(config),
            server_changed=changed,
            change=(
                f", changed: closed {logs.plural(closed, 'idle session')}, "
                f"{logs.plural(retiring, 'busy session')} closing after their stream"
                if changed
                else ", unchanged: sessions kept"
            ),
            sessions_closed=closed,
            sessions_retiring=retiring,
            users=", ".join(users.names) if users is not None else "none (no authentication)",
        )
        return True


def _describe_tls(config: ClientConfig) -> str:
    if not config.tls:
        return "plain TCP"
    tls = f"TLS, SNI {config.server_name or 'none'}"
    if config.certificate_pins:
        return tls + ", certificate pinned"
    if config.insecure:
        return tls + ", certificate NOT verified"
    return tls + ", certificate verified"


def makeService(options: Options, reactor: Optional[Any] = None) -> ClientService:
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load(options)
        users = _proxy_users(options["proxy-user-file"])
    except ConfigError as e:
        if options.parent is None:
            raise
        sys.stderr.write(f"twistd anytls-client: error: {e}\n")
        raise SystemExit(2) from None
    if options["print-config"]:
        outbound = to_outbound(config, show_password=options["show-password"])
        sys.stdout.write(json.dumps({"outbounds": [outbound]}, indent=2) + "\n")
        sys.stdout.flush()
        raise SystemExit(0)
    logs.set_level(options["log-level"])

    def rebuild() -> Tuple[ClientConfig, Optional[ProxyUsers]]:
        return load(options), _proxy_users(options["proxy-user-file"])

    return ClientService(
        config, options["listen"], reactor, options["client-metadata"], users, rebuild
    )


def _loopback_only(description: str) -> bool:
    """Whether a ``--listen`` endpoint only accepts connections from this machine."""
    try:
        endpoint = endpoints.parse(description)
    except ValueError:
        return False
    if endpoint.kind == "unix":
        return True
    if endpoint.kind not in ("tcp", "tcp6"):
        return False
    ip = parse_ip(endpoint.keyword("interface") or "")
    return ip is not None and ip.is_loopback


def _proxy_users(path: Optional[str]) -> Optional[ProxyUsers]:
    if path is None:
        return None
    try:
        return ProxyUsers.from_file(path)
    except ProxyUsersError as e:
        raise ConfigError(str(e)) from None
