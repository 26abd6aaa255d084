"""``twistd anytls-client``: read the files the options name, then build the client service
(the local proxy ports, the session manager and, with ``--metrics``, the metrics listener).
A configuration error ends twistd with one line and exit status 2, never a traceback.

SIGHUP reads the same files again (``--config``, ``--password-file``, ``--certificate``,
``--proxy-user-file``) with the same command line: new streams use the result, live streams
are never cut (:meth:`.sessions.SessionManager.reconfigure`), and a reload that fails keeps
everything as it was and says why in one line. ``--listen`` and ``--metrics`` need a restart."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import attr
from twisted.application import service, strports
from twisted.python import usage

from .. import endpoints, logs, sighup
from ..protocol.address import parse_ip
from ..protocol.liveness import Liveness
from ..singbox import ConfigFileError
from .config import ClientConfig, parse_uri, to_outbound
from .configfile import load_file
from .connect import route, server_label, tls_creator
from .local import LocalProxyFactory
from .localauth import ProxyUsers, ProxyUsersError
from .nullmetrics import CLIENT_NULL_METRICS, ClientNullMetrics
from .options import Options
from .pool import Pool
from .sessions import SessionManager

__all__ = ["ClientService", "Options", "load", "makeService"]

_log = logs.get_logger("anytls_twisted.client.tap")


class ConfigError(usage.UsageError):
    """A configuration that cannot be used; one line naming the option or file."""


def load(options: Options) -> List[ClientConfig]:
    """The servers from ``--config`` files (in order) then ``--server`` URIs, with the
    overrides of the other options applied to every one."""
    password_file = options["password-file"]
    configs: List[ClientConfig] = []
    try:
        for path in options["config"]:
            configs += load_file(path, password_file=password_file is not None)
        for uri in options["server"]:
            configs.append(parse_uri(uri, password_file=password_file is not None))
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
    if options["alpn"] is not None:
        alpn = tuple(p.strip() for p in options["alpn"].split(",") if p.strip())
        if any(len(p) > 255 for p in alpn):
            raise ConfigError("--alpn: each protocol name is 1 to 255 characters")
        changes["alpn"] = alpn
    result = []
    for config in configs:
        config = attr.evolve(config, **changes)
        if config.certificate_path and not config.insecure:
            try:
                open(config.certificate_path, "rb").close()
            except OSError as e:
                raise ConfigError(
                    f"cannot read certificate file {config.certificate_path}: {e}"
                ) from None
        if config.tls:
            try:
                tls_creator(config)  # settings that cannot work together fail now, in one line
            except (ValueError, OSError) as e:
                raise ConfigError(f"{server_label(config)}: {e}") from None
        result.append(config)
    labels = [server_label(c) for c in result]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ConfigError(f"server {twice[0]} is given twice")
    return result


#: What a reload rebuilds: the servers' configurations and the local proxy users.
Rebuild = Callable[[], Tuple[List[ClientConfig], Optional[ProxyUsers]]]


class ClientService(service.MultiService):
    """The client: one session manager for every server, one local proxy port per
    ``--listen`` and, with ``metrics_endpoint``, the ``/metrics`` and ``/healthz`` listener.

    @ivar configs: the servers, in the order new sessions try them.
    @ivar metrics: the :class:`~.metrics.ClientMetrics`, or the do-nothing interface.
    @ivar metrics_listener: the metrics web service, or None.
    @ivar rebuild: reads the files again for a reload (SIGHUP); None: reloading is off.
    @ivar reloads: reloads applied.
    @ivar reload_failures: reloads that failed (the configuration was kept).
    """

    def __init__(
        self,
        configs: Sequence[ClientConfig],
        listen: List[str],
        reactor: Any,
        client_name: str = "",
        users: Optional[ProxyUsers] = None,
        rebuild: Optional[Rebuild] = None,
        metrics_endpoint: Optional[str] = None,
        strategy: str = "round-robin",
        prewarm: int = 0,
        reuse: bool = True,
        liveness: Optional[Liveness[Any]] = None,
    ) -> None:
        super().__init__()
        if not configs:
            raise ValueError("at least one server is needed")
        self.configs = list(configs)
        self.listen = listen
        self.users = users
        self.reactor = reactor
        self.rebuild = rebuild
        self.strategy = strategy
        self.reloads = 0
        self.reload_failures = 0
        self._previous_sighup: Any = None
        self.metrics_endpoint = metrics_endpoint
        self.metrics: ClientNullMetrics = CLIENT_NULL_METRICS
        self.metrics_listener: Optional[service.Service] = None
        if metrics_endpoint is not None:
            # Imported only with --metrics: prometheus_client and twisted.web cost RSS
            # (docs/performance.md, "Idle memory"); a reload cannot turn metrics on.
            from ..metrics import metrics_service
            from .metrics import ClientMetrics

            self.metrics = live = ClientMetrics()
            # The first child, so stopped last: /healthz answers 503 while the rest stops,
            # and while no server is up.
            self.metrics_listener = metrics_service(metrics_endpoint, live, self.healthy, reactor)
            self.metrics_listener.setServiceParent(self)
        first = self.configs[0]
        pool: Pool[Any] = Pool(
            first.idle_session_check_interval,
            first.idle_session_timeout,
            first.min_idle_session,
            reuse=reuse,
        )
        self.manager = SessionManager(
            None,
            "",
            reactor,
            pool,
            client_name,
            metrics=self.metrics,
            routes=[route(reactor, c) for c in self.configs],
            strategy=strategy,
            prewarm=prewarm,
            liveness=liveness,
        )
        self.manager.setServiceParent(self)
        self.factory = LocalProxyFactory(self.manager, reactor, users)
        for description in listen:
            strports.service(description, self.factory, reactor=reactor).setServiceParent(self)

    def healthy(self) -> bool:
        """What ``/healthz`` says: running, and at least one server up."""
        return bool(self.running) and self.manager.servers.any_up

    @property
    def config(self) -> ClientConfig:
        """The first server's configuration (its pool settings are the client's)."""
        return self.configs[0]

    def startService(self) -> None:
        super().startService()
        if self.rebuild is not None:
            self._previous_sighup = sighup.install(self.reactor, self.reload)
        extra = ""
        if len(self.configs) > 1:
            extra += f"; {self.strategy}"
        if self.manager.prewarm:
            extra += f"; {self.manager.prewarm} pre-warmed per server"
        if not self.manager.pool.reuse:
            extra += "; sessions not reused"
        if self.metrics_endpoint is not None:
            extra += f"; metrics on {self.metrics_endpoint} (/metrics, /healthz)"
        _log.info(
            "anytls-client: proxy (SOCKS5, SOCKS4a, HTTP) on {listen}; {servers_text}{extra}",
            listen=", ".join(self.listen),
            servers=[server_label(c) for c in self.configs],
            servers_text=_describe_servers(self.configs),
            strategy=self.strategy,
            extra=extra,
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
        for config in self.configs:
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
            configs, users = self.rebuild()
            routes = [route(self.reactor, c) for c in configs]
        except Exception as e:
            self.reload_failures += 1
            sighup.reload_failed(_log, why, e)
            return False
        first = configs[0]
        before = [r.identity for r in (h.config for h in self.manager.servers.servers)]
        closed, retiring = self.manager.reconfigure(
            routes,
            first.idle_session_check_interval,
            first.idle_session_timeout,
            first.min_idle_session,
        )
        changed = before != [r.identity for r in routes]
        self.configs = list(configs)
        self.users = users
        self.factory.users = users
        self.reloads += 1
        for config in configs:
            for warning in config.warnings:
                _log.warn("{warning}", warning=warning)
        _log.info(
            "reloaded ({why}): {servers_text}{change}; local proxy users: {users}",
            why=why,
            servers=[server_label(c) for c in configs],
            servers_text=_describe_servers(configs),
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


def _describe_servers(configs: Sequence[ClientConfig]) -> str:
    parts = [f"{server_label(c)} ({_describe_tls(c)})" for c in configs]
    return ("server " if len(parts) == 1 else "servers ") + ", ".join(parts)


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
        configs = load(options)
        users = _proxy_users(options["proxy-user-file"])
    except ConfigError as e:
        if options.parent is None:
            raise
        sys.stderr.write(f"twistd anytls-client: error: {e}\n")
        raise SystemExit(2) from None
    if options["print-config"]:
        outbounds = [to_outbound(c, show_password=options["show-password"]) for c in configs]
        tags = [o["tag"] for o in outbounds]
        for index, outbound in enumerate(outbounds):
            if tags.count(outbound["tag"]) > 1:  # sing-box needs unique tags
                outbound["tag"] = f"{outbound['tag']}-{index + 1}"
        sys.stdout.write(json.dumps({"outbounds": outbounds}, indent=2) + "\n")
        sys.stdout.flush()
        raise SystemExit(0)
    logs.set_level(options["log-level"])

    def rebuild() -> Tuple[List[ClientConfig], Optional[ProxyUsers]]:
        return load(options), _proxy_users(options["proxy-user-file"])

    return ClientService(
        configs,
        options["listen"],
        reactor,
        options["client-metadata"],
        users=users,
        rebuild=rebuild,
        metrics_endpoint=options["metrics"],
        strategy=options["strategy"],
        prewarm=options["prewarm"],
        reuse=not options["disable-reuse"],
        liveness=Liveness(options["heartbeat-idle"], options["heartbeat-timeout"]),
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
