"""Loggers for the package, behind one level filter the operator controls (``--log-level``).

twistd's own observer shows every level; per-stream events are logged at debug so they stay quiet
unless asked for. Events carry their values as fields (see docs/logging.md).

:func:`json_observer` is an observer factory for ``twistd --logger`` (``--log-format json``
installs it): every event, ours and Twisted's, becomes one JSON object per line on stdout.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from typing import IO, Any, Dict, MutableMapping, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

LEVELS = ("debug", "info", "warn", "error")


def get_logger(namespace: str) -> Logger:
    """A Logger whose events pass through the package's level filter."""
    return Logger(namespace=namespace, observer=_observer)


#: Whether debug events pass the filter. Per-stream call sites check it first, so that at the
#: usual levels they do not build and publish events only to have them dropped (cost measured
#: in docs/performance.md).
DEBUG = False


def set_level(name: str) -> None:
    """Set the lowest level that is logged, by name (``debug``, ``info``, ``warn``, ``error``)."""
    global DEBUG
    level = LogLevel.levelWithName(name)
    _predicate.setLogLevelForNamespace("anytls_twisted", level)
    DEBUG = level is LogLevel.debug


def plural(count: int, noun: str) -> str:
    """``1 user``, ``0 users``, ``2 users``: a count in a message's text (events also carry the
    number itself as a field)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# --------------------------------------------------------------------------------------------
# JSON lines

FORMATS = ("text", "json")
JSON_OBSERVER = "anytls_twisted.logs.json_observer"

#: Keys of events from twisted.python.log (legacy) that repeat what the record already says.
_LEGACY_KEYS = frozenset(
    {"message", "isError", "system", "time", "format", "failure", "why", "printed"}
)


def event_record(event: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON form of one event: ``time`` (ISO 8601, UTC), ``level``, ``namespace``,
    ``text`` (the formatted message, as in the text log), then the event's own fields (``log_*``
    keys dropped), ``system`` if the event names one, and ``traceback`` for a logged failure.
    A field with one of those names is shadowed by them."""
    legacy = "isError" in event and "message" in event
    when = event.get("log_time")
    if when is None:
        when = event.get("time")
    level = event.get("log_level")
    record: Dict[str, Any] = {
        "time": (
            datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            )
            if isinstance(when, (int, float))
            else None
        ),
        "level": getattr(level, "name", None) or "info",
        "namespace": event.get("log_namespace", "-"),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY_KEYS) or key in record:
            continue
        record[key] = value
    if event.get("log_system") is not None:
        record["system"] = str(event["log_system"])
    failure = event.get("log_failure") or (event.get("failure") if legacy else None)
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    return record


def _plain(value: Any) -> Any:
    """A JSON-safe version of a value json.dumps refused (odd keys, NaN, objects)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def event_as_json(event: Dict[str, Any]) -> str:
    """One event as one line of JSON (ASCII only, newline-terminated)."""
    record = event_record(event)
    try:
        text = json.dumps(record, separators=(",", ":"), default=str, allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps(_plain(record), separators=(",", ":"), default=str)
    return text + "\n"


def json_observer(stream: Optional[IO[str]] = None) -> FileLogObserver:
    """An observer writing :func:`event_as_json` lines to ``stream`` (default: stdout as it
    is now, before twistd redirects ``sys.stdout`` into the log). For
    ``twistd --logger=anytls_twisted.logs.json_observer``, which calls it with no argument."""
    return FileLogObserver(stream if stream is not None else sys.stdout, event_as_json)


def log_json_under_twistd(twistd: MutableMapping[str, Any]) -> None:
    """``--log-format json`` under twistd: make twistd's own ``--logger`` our observer factory
    (twistd reads it after our options, and starts logging after makeService). ``ValueError``
    when twistd's options cannot write JSON lines to stdout."""
    if twistd.get("logfile") not in (None, "", "-"):
        raise ValueError("--log-format json writes to stdout; drop twistd's --logfile")
    if twistd.get("logger") not in (None, JSON_OBSERVER):
        raise ValueError("--log-format json and twistd's --logger are two observers; give one")
    if not twistd.get("nodaemon"):
        raise ValueError(
            "--log-format json writes to stdout, which a daemon does not have; "
            "add twistd's -n (--nodaemon)"
        )
    twistd["logger"] = JSON_OBSERVER
