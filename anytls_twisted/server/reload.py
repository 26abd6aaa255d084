"""Reloading users, padding scheme and certificates without dropping anyone.

SIGHUP, or a change to a certificate or key file (checked every ``--certificate-check-interval``
seconds), re-reads the command line's files. Established sessions keep running; new sessions
and new TLS handshakes use the new values; sessions of users who are gone (or whose password
changed) are closed. A reload that fails keeps the old configuration and says why. Listening
ports, timeouts and the destination policy are not reloaded: they need a restart.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from ..logs import get_logger
from ..protocol.auth import UserTable
from ..protocol.padding import PaddingScheme

_log = get_logger("anytls_twisted.reload")


@implementer(IOpenSSLServerConnectionCreator)
class SwappableTLS:
    """A TLS connection creator whose options can be replaced; new handshakes use the new ones."""

    def __init__(self, options) -> None:
        self.options = options

    def serverConnectionForTLS(self, protocol):
        return self.options.serverConnectionForTLS(protocol)


@attr.frozen
class Reloaded:
    """What a rebuild produces: the new user table and padding, TLS options per TLS port, and
    the files whose change should trigger a reload."""

    users: UserTable
    padding: PaddingScheme
    tls_options: Tuple[object, ...]
    pins: Tuple[str, ...]
    watched: Tuple[str, ...]


def _stamp(paths: Sequence[str]) -> Dict[str, Optional[Tuple[float, int, int]]]:
    stamps: Dict[str, Optional[Tuple[float, int, int]]] = {}
    for path in paths:
        try:
            st = os.stat(path)
            stamps[path] = (st.st_mtime, st.st_size, st.st_ino)
        except OSError:
            stamps[path] = None
    return stamps


class Reloader(service.Service):
    """Owns the SIGHUP handler and the certificate-file watch; applies rebuilds to the factory."""

    def __init__(
        self,
        reactor,
        factory,
        slots: List[SwappableTLS],
        rebuild: Callable[[], Reloaded],
        watched: Sequence[str],
        interval: float,
    ) -> None:
        self.reactor = reactor
        self.factory = factory
        self.slots = slots
        self.rebuild = rebuild
        self.interval = interval
        self.reloads = 0
        self.failures = 0
        self._stamps = _stamp(watched)
        self._loop = task.LoopingCall(self.check_files)
        self._loop.clock = reactor
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)
        if hasattr(signal, "SIGHUP"):
            try:
                self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
            except ValueError:  # not the main thread (some test runners)
                self._previous_handler = None

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _on_sighup(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload, "SIGHUP")

    def check_files(self) -> None:
        """Reload when a watched certificate or key file has changed since the last look."""
        stamps = _stamp(list(self._stamps))
        if stamps != self._stamps:
            self._stamps = stamps
            self.reload("certificate file changed")

    def reload(self, why: str) -> bool:
        try:
            new = self.rebuild()
        except Exception as e:
            self.failures += 1
            _log.error(
                "reload ({why}) failed, keeping the current configuration: {error}",
                why=why,
                error=str(e) or e.__class__.__name__,
            )
            return False
        factory = self.factory
        factory.config = attr.evolve(factory.config, users=new.users, padding=new.padding)
        for slot, options in zip(self.slots, new.tls_options):
            slot.options = options
        self._stamps = _stamp(new.watched)
        closed = 0
        for session in list(factory.registry.sessions):
            if session.user is not None and not session.still_authorised(new.users):
                closed += 1
                session.close("user removed or password changed by reload")
        self.reloads += 1
        _log.info(
            "reloaded ({why}): {users} users, padding md5 {padding_md5}, certificate pins {pins}; "
            "closed {closed} sessions of removed users",
            why=why,
            users=len(new.users),
            padding_md5=new.padding.md5,
            pins=", ".join(new.pins) or "none",
            closed=closed,
        )
        return True
