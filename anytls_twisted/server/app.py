"""The whole server as one service, built from loaded :class:`~.settings.Settings`.

:class:`AnyTLSServer` is the :class:`~.service.AnyTLSService` (factory, registry, listeners,
reaper) plus what the command line adds: the ``--metrics`` listener, the reloader and, with
``--workers``, the shared ports and the worker supervisor. It builds and owns all of them.
Ports are bound when the service starts; only then is the banner logged (the ports, the
certificate, the client configuration), so a port in use ends twistd with its one error line.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, List, Optional

from twisted.application import service
from twisted.internet.protocol import Factory

from .. import clientconfig, logs, tls
from . import workers
from .reload import Reloader
from .service import AnyTLSService, Listener
from .settings import LiveConfig, PortTLS, Settings

if TYPE_CHECKING:
    from ..metrics import Metrics

# Start-up events keep the namespace of ``twistd anytls`` (docs/logging.md).
_log = logs.get_logger("anytls_twisted.tap")


def _listeners(settings: Settings, live: LiveConfig, reactor: Any) -> List[Listener]:
    """Per port, where it listens (an endpoint, or a shared or inherited socket) and its TLS:
    the live configuration's current options for that port, at every handshake."""
    endpoints = [port.spec.endpoint for port in settings.ports]
    shared = workers.listeners(settings.workers, endpoints, reactor)
    result: List[Listener] = []
    for index, port in enumerate(settings.ports):
        where = shared[index] if shared else port.spec.endpoint
        if port.tls_options is not None:
            result.append((where, _with_tls(live.tls_for(port.description))))
        else:
            result.append((where, lambda factory: factory))
    return result


def _with_tls(creator: PortTLS) -> Callable[[Factory], Any]:
    return lambda factory: tls.wrap_tls(factory, creator)


class AnyTLSServer(AnyTLSService):
    """The server ``twistd anytls`` runs.

    @ivar settings: the settings it started with (reloads change ``live``, not these).
    @ivar reloader: the :class:`~.reload.Reloader` (SIGHUP, changed certificate files).
    @ivar metrics_listener: the ``--metrics`` web service, or None.
    @ivar supervisor: the :class:`~.workers.WorkerSupervisor` of a ``--workers`` parent, or None.
    """

    def __init__(self, settings: Settings, reactor: Any, reload: Callable[[], Settings]) -> None:
        """``reload`` loads the settings again (from the saved options) for the reloader."""
        live = LiveConfig(settings.config, settings.ports)
        metrics: Optional[Metrics] = None
        if settings.metrics is not None:
            # Imported only with --metrics: prometheus_client and twisted.web cost about 5 MiB
            # of RSS (docs/performance.md, "Idle memory"). A reload cannot turn metrics on.
            from ..metrics import Metrics, metrics_service

            metrics = Metrics()
        super().__init__(live, _listeners(settings, live, reactor), reactor, metrics=metrics)
        self.settings = settings
        self._reactor = reactor
        self.metrics_listener: Optional[service.Service] = None
        if settings.metrics is not None and metrics is not None:
            self.metrics_listener = metrics_service(
                settings.metrics, metrics, lambda: bool(self.running), reactor
            )
            self.metrics_listener.setServiceParent(self)
        self.reloader = Reloader(
            reactor,
            live,
            self.registry,
            reload,
            settings.watched,
            settings.certificate_check_interval,
        )
        self.reloader.setServiceParent(self)
        shared = [port for port in self.listeners if isinstance(port, workers.SharedPort)]
        self.supervisor = workers.supervisor(settings.workers, shared, reactor)
        if self.supervisor is not None:
            self.supervisor.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self._announce()
        if self.settings.workers.is_worker:
            workers.watch_parent(self._reactor)

    def _announce(self) -> None:
        """What the operator needs once the ports listen: each port, the certificate, the
        client configuration (logged by the parent only), the metrics endpoint, the workers."""
        settings = self.settings
        if settings.generated_certificate is not None:
            _log.info(
                "generated self-signed certificate for {server_name}: {cert_path}",
                server_name=settings.client.server_name,
                cert_path=settings.generated_certificate,
            )
        for port in settings.ports:
            if port.material is not None:
                _log.info(
                    "listening on {port} with TLS; certificate_public_key_sha256={pin} "
                    "(expires {not_after})",
                    port=port.description,
                    pin=port.material.pin,
                    not_after=str(port.material.not_after),
                )
            else:
                _log.warn(
                    "listening on {port} WITHOUT TLS: only use this behind a TLS-terminating proxy",
                    port=port.description,
                )
        if not settings.workers.is_worker:  # the parent logs it once for all workers
            clientconfig.log_client_configs(
                client_endpoints(settings),
                clientconfig.shown_password(settings.users, settings.client.show_password),
            )
        routes = settings.config.fallback
        if routes:
            by_alpn = "".join(f", ALPN {p}: {e}" for p, e in routes.by_alpn)
            _log.info(
                "connections that are not AnyTLS clients go to the fallback {fallback}{by_alpn}",
                fallback=routes.default or "(none)",
                by_alpn=by_alpn,
            )
        if settings.config.policy.allow_private:
            _log.warn("--allow-private: clients may reach loopback and private addresses")
        if settings.metrics is not None:
            _log.info("metrics on {endpoint} (/metrics, /healthz)", endpoint=settings.metrics)
        if self.supervisor is not None:
            _log.info(
                "worker 0 serving (pid {pid}); starting {n} more",
                pid=os.getpid(),
                n=settings.workers.count - 1,
            )
        elif settings.workers.is_worker:
            _log.info(
                "worker {worker} serving (pid {pid})",
                worker=settings.workers.index,
                pid=os.getpid(),
            )


def client_endpoints(settings: Settings) -> List[clientconfig.ClientEndpoint]:
    """What clients dial, per port (docs/configuration.md, "Client configuration")."""
    return clientconfig.endpoints_for(
        ((port.spec, port.material) for port in settings.ports),
        settings.client.server_name,
        settings.client.public_address,
    )
