"""SIGHUP as a reload request, for the server and the client alike.

The handler only schedules the reload on the reactor (``callFromThread`` is the one reactor
call that is safe from a signal handler); the reload itself runs as a normal reactor call.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, List


def install(reactor: Any, reload: Callable[[str], object]) -> Any:
    """Make SIGHUP call ``reload("SIGHUP")`` on the reactor; returns the previous handler for
    :func:`restore`, or None where there is no SIGHUP or not from the main thread."""
    if not hasattr(signal, "SIGHUP"):
        return None

    def on_sighup(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload, "SIGHUP")

    try:
        return signal.signal(signal.SIGHUP, on_sighup)
    except ValueError:  # not the main thread (some test runners)
        return None


def reload_failed(log: Any, why: str, error: BaseException) -> None:
    """The one line both sides log when a reload cannot be used and nothing changes."""
    log.error(
        "reload ({why}) failed, keeping the current configuration: {error}",
        why=why,
        error=str(error) or error.__class__.__name__,
    )


def restore(previous: Any) -> None:
    """Put back the handler :func:`install` replaced."""
    if previous is not None:
        signal.signal(signal.SIGHUP, previous)


__all__: List[str] = ["install", "reload_failed", "restore"]
