"""What the ``twistd`` plugins' option parsers share."""

from __future__ import annotations

import math
from typing import Any, Callable

from twisted.python import usage


def number_option(kind: Callable[[str], Any], noun: str, ok: Callable[[Any], bool]) -> Callable:
    """A coerce maker: ``_seconds("auth-timeout")`` converts that option's value, and a bad one
    is an error naming the option (``--auth-timeout: must be a positive number, got '-1'``)."""

    def for_option(name: str) -> Callable[[str], Any]:
        def coerce(text: str) -> Any:
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or not math.isfinite(value) or not ok(value):
                raise usage.UsageError(f"--{name}: must be {noun}, got {text!r}")
            return value

        coerce.coerceDoc = "" if ok(0) else "A positive number."  # type: ignore[attr-defined]
        return coerce

    return for_option
