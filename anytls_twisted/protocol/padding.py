"""Padding schemes: parse, validate, hash. Pure, no I/O.

The server never pads its own writes (anytls-protocol.md section 6.5). It only needs its scheme's
exact bytes, to send in UpdatePaddingScheme, and their MD5, to compare with the client's
``padding-md5``. A scheme is validated the way clients parse it, so a client can never reject
what we send.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Tuple

import attr

from .codec import MAX_DATA, parse_settings

DEFAULT_SCHEME_BYTES = b"\n".join(
    [
        b"stop=8",
        b"0=30-30",
        b"1=100-400",
        b"2=400-500,c,500-1000,c,500-1000,c,500-1000,c,500-1000",
        b"3=9-9,500-1000",
        b"4=500-1000",
        b"5=500-1000",
        b"6=500-1000",
        b"7=500-1000",
    ]
)

#: Marks a check point in a packet plan ("c").
CHECK_MARK = -1


class PaddingSchemeError(ValueError):
    """A scheme that clients would reject."""


@attr.frozen
class PaddingScheme:
    """A validated scheme: its exact bytes, their MD5, and the parsed plan.

    @ivar raw: The scheme's exact bytes: what UpdatePaddingScheme sends and ``md5`` hashes.
    @ivar stop: How many of its first packets a client pads (the ``stop=N`` line).
    @ivar plans: Per packet number, its items in order: a size range ``(low, high)`` to pad to,
        or ``(CHECK_MARK, CHECK_MARK)`` for a check point ("c"). Not compared: ``raw``
        determines it.
    """

    raw: bytes
    stop: int
    plans: Dict[int, Tuple[Tuple[int, int], ...]] = attr.field(eq=False, repr=False)

    @property
    def md5(self) -> str:
        return hashlib.md5(self.raw).hexdigest()

    @classmethod
    def parse(cls, raw: bytes) -> PaddingScheme:
        """Validate ``raw`` as clients do; raise :class:`PaddingSchemeError` with the reason."""
        if len(raw) > MAX_DATA:
            raise PaddingSchemeError(f"scheme is {len(raw)} bytes; at most {MAX_DATA} fit a frame")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PaddingSchemeError("scheme is not UTF-8") from None
        if "\r" in text:
            raise PaddingSchemeError("scheme has CR characters; clients need LF line ends only")
        entries = parse_settings(raw)
        try:
            stop = int(entries.get("stop", ""))
        except ValueError:
            raise PaddingSchemeError("scheme needs an integer 'stop=N' line") from None
        if stop < 0:
            raise PaddingSchemeError("'stop' must not be negative")
        plans: Dict[int, Tuple[Tuple[int, int], ...]] = {}
        for key, spec in entries.items():
            if key == "stop":
                continue
            try:
                packet = int(key)
            except ValueError:
                raise PaddingSchemeError(f"unknown key {key!r}") from None
            items = []
            for item in spec.split(","):
                if item == "c":
                    items.append((CHECK_MARK, CHECK_MARK))
                    continue
                low, sep, high = item.partition("-")
                try:
                    a, b = int(low), int(high)
                except ValueError:
                    raise PaddingSchemeError(f"packet {packet}: bad size range {item!r}") from None
                if not sep or a <= 0 or b <= 0:
                    raise PaddingSchemeError(f"packet {packet}: bad size range {item!r}")
                items.append((min(a, b), max(a, b)))
            plans[packet] = tuple(items)
        first = plans.get(0, ())
        if first and first[0][1] > MAX_DATA:
            raise PaddingSchemeError("packet 0 padding must fit in 65535 bytes")
        return cls(raw=raw, stop=stop, plans=plans)


DEFAULT_SCHEME = PaddingScheme.parse(DEFAULT_SCHEME_BYTES)
