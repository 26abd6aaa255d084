"""Reloading users, padding scheme and certificates without dropping anyone.

SIGHUP, or a change to a certificate or key file (checked every ``--certificate-check-interval``
seconds), loads the settings again from the saved command line (:func:`.load.load`: the same
parsed options, the files re-read) and makes them current in the server's :class:`LiveConfig`.
Established sessions keep running; new sessions and new TLS handshakes use the new values;
sessions of users who are gone (or whose password changed) are closed. A reload that fails
keeps the old configuration and says why. A reload that names other listening ports (a config
file's ``listen``/``listen_port`` changed) fails as a whole: ports need a restart. Timeouts
and the destination policy come from the command line, which a reload does not change; the
file's ``fallback``/``fallback_for_alpn`` are part of the configuration and apply to the next
connections handed to the fallback.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from twisted.application import service
from twisted.internet import task

from .. import sighup
from ..logs import get_logger, plural
from .service import SessionRegistry
from .settings import LiveConfig, Settings

_log = get_logger("anytls_twisted.reload")


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
    """Owns the SIGHUP handler and the certificate-file watch; makes what ``rebuild`` loads
    current in ``live`` and closes the sessions of removed users found in ``registry``.

    @ivar live: the :class:`~.settings.LiveConfig` a reload updates.
    @ivar registry: the live sessions, checked against the new users.
    @ivar rebuild: ``() -> Settings``: ``load`` on the options parsed at start.
    @ivar interval: seconds between certificate-file checks.
    @ivar reloads: reloads applied.
    @ivar failures: reloads that failed (the configuration was kept).
    """

    def __init__(
        self,
        reactor: Any,
        live: LiveConfig,
        registry: SessionRegistry,
        rebuild: Callable[[], Settings],
        watched: Sequence[str],
        interval: float,
    ) -> None:
        self.reactor = reactor
        self.live = live
        self.registry = registry
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
        self._previous_handler = sighup.install(self.reactor, self.reload)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        sighup.restore(self._previous_handler)
        self._previous_handler = None

    def check_files(self) -> None:
        """Reload when a watched certificate or key file has changed since the last look."""
        stamps = _stamp(list(self._stamps))
        if stamps != self._stamps:
            self._stamps = stamps
            self.reload("certificate file changed")

    def reload(self, why: str) -> bool:
        try:
            new = self.rebuild()
            self.live.update(new.config, new.ports)
        except Exception as e:
            self.failures += 1
            sighup.reload_failed(_log, why, e)
            return False
        for warning in new.warnings:
            _log.warn("{warning}", warning=warning)
        self._stamps = _stamp(new.watched)
        users = new.config.users
        closed = 0
        for session in list(self.registry.sessions):
            if session.user is not None and not session.still_authorised(users):
                closed += 1
                session.close("user removed or password changed by reload")
        self.reloads += 1
        pins = [port.material.pin for port in new.ports if port.material is not None]
        _log.info(
            "reloaded ({why}): {users_text}, padding md5 {padding_md5}, certificate pins "
            "{pins}; closed {closed_text} of removed users",
            why=why,
            users=len(users),
            users_text=plural(len(users), "user"),
            padding_md5=new.config.padding.md5,
            pins=", ".join(pins) or "none",
            closed=closed,
            closed_text=plural(closed, "session"),
        )
        return True
