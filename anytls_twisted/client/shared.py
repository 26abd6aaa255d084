"""Session managers shared by every AnyTLS endpoint made from one configuration file.

:func:`shared_sessions` keeps one :class:`~.sessions.SessionManager` per configuration file and
reactor, started when first asked for and stopped at reactor shutdown, so that endpoints made
from the same file share pooled sessions (:mod:`.endpoint`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed

from ..logs import get_logger
from .config import ClientConfig
from .configfile import load_file
from .connect import route, tls_creator
from .pool import Pool
from .sessions import SessionManager

_log = get_logger("anytls_twisted.client.endpoint")

#: Seconds :meth:`SharedSessions.close` waits for the aborted session connections to go.
CLOSE_WAIT = 10.0


def load_servers(path: str) -> List[ClientConfig]:
    """The servers an endpoint made from ``path`` uses, checked as ``twistd anytls-client``
    checks them; ``ValueError`` with one line naming the file when they cannot be used."""
    try:
        configs = load_file(path)  # ConfigFileError names the file
    except ValueError as e:
        raise ValueError(f"anytls endpoint: {e}") from None
    for config in configs:
        if not config.tls:
            continue
        try:
            tls_creator(config)
        except ValueError as e:
            raise ValueError(f"anytls endpoint: {path}: {e}") from None
        except OSError as e:
            raise ValueError(
                f"anytls endpoint: {path}: cannot read certificate file "
                f"{config.certificate_path}: {e.strerror or e}"
            ) from None
    return configs


def make_manager(reactor: Any, configs: Sequence[ClientConfig]) -> SessionManager:
    """A session manager for ``configs`` (every server, round robin with failover), with the
    first one's pool settings, as the client's service does."""
    first = configs[0]
    pool: Pool[Any] = Pool(
        first.idle_session_check_interval, first.idle_session_timeout, first.min_idle_session
    )
    return SessionManager(None, "", reactor, pool, routes=[route(reactor, c) for c in configs])


class SharedSessions:
    """One :class:`~.sessions.SessionManager` per configuration file, for one reactor.

    The file is read once, the first time it is named; its manager starts then and is stopped
    by :meth:`close`, which runs at reactor shutdown ("before", "shutdown") or when called.

    @ivar managers: the managers by the file's absolute path.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.managers: Dict[str, SessionManager] = {}
        self._trigger: Any = reactor.addSystemEventTrigger("before", "shutdown", self.close)
        self._closed = False

    def manager(self, config_path: str) -> SessionManager:
        """The running manager for ``config_path``; ``ValueError`` (one line) for a file that
        cannot be used."""
        if self._closed:
            raise ValueError("anytls endpoint: the shared sessions are closed")
        key = os.path.abspath(config_path)
        manager = self.managers.get(key)
        if manager is None:
            configs = load_servers(config_path)
            manager = make_manager(self.reactor, configs)
            manager.startService()
            self.managers[key] = manager
            for config in configs:
                for warning in config.warnings:
                    _log.warn("{path}: {warning}", path=config_path, warning=warning)
        return manager

    def close(self) -> Deferred[None]:
        """Stop every manager (their sessions are aborted); fires once the connections are
        gone, or after :data:`CLOSE_WAIT` seconds."""
        if _registries.get(self.reactor) is self:
            del _registries[self.reactor]
        if self._closed:
            return succeed(None)
        self._closed = True
        trigger, self._trigger = self._trigger, None
        if trigger is not None:  # called by hand, not by the shutdown it was waiting for
            try:
                self.reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass
        waits = []
        for manager in self.managers.values():
            manager.stopService()
            wait = manager.wait_closed()
            wait.addTimeout(CLOSE_WAIT, self.reactor)
            waits.append(wait)
        done: Deferred[Any] = DeferredList(waits, consumeErrors=True)
        return done.addCallback(lambda _: None)


_registries: Dict[Any, SharedSessions] = {}


def shared_sessions(reactor: Any) -> SharedSessions:
    """The :class:`SharedSessions` of ``reactor`` (made on first use): every endpoint made
    from the same file with this reactor shares one session manager, so one pool."""
    registry = _registries.get(reactor)
    if registry is None:
        registry = _registries[reactor] = SharedSessions(reactor)
    return registry
