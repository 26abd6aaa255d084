"""Loggers for the package, behind one level filter the operator controls (``--log-level``).

twistd's own observer shows every level; per-stream events are logged at debug so they stay quiet
unless asked for. Events carry their values as fields (see docs/logging.md).
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

LEVELS = ("debug", "info", "warn", "error")


def get_logger(namespace: str) -> Logger:
    """A Logger whose events pass through the package's level filter."""
    return Logger(namespace=namespace, observer=_observer)


def set_level(name: str) -> None:
    """Set the lowest level that is logged, by name (``debug``, ``info``, ``warn``, ``error``)."""
    _predicate.setLogLevelForNamespace("anytls_twisted", LogLevel.levelWithName(name))
