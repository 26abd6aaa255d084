"""Giving memory back after a load, once the server is at rest.

Closed sessions are reference cycles, so the last ones of a load wait for a full collection
that a server at rest never reaches; and glibc keeps freed heap pages unless asked. When the
session registry empties after a load, :func:`release` runs both: a full ``gc.collect()`` and,
where the C library is glibc, ``malloc_trim(0)``. Measured in docs/performance.md, "Soak".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Any, Callable, List, Optional


def _find_malloc_trim() -> Optional[Callable[[int], Any]]:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


#: glibc's ``malloc_trim``, or None elsewhere (musl, macOS): then only the collection runs.
_malloc_trim = _find_malloc_trim()


def release() -> int:
    """A full collection, then heap pages handed back to the system; returns the number of
    unreachable objects the collection found."""
    found = gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    return found


__all__: List[str] = ["release"]
