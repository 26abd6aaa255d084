"""Padding schemes (parse, validate, hash) and the client's padding writer. Pure, no I/O.

The server never pads its own writes (anytls-protocol.md section 6.5). It only needs its scheme's
exact bytes, to send in UpdatePaddingScheme, and their MD5, to compare with the client's
``padding-md5``. A scheme is validated the way clients parse it, so a client can never reject
what we send. The client pads its first packets by the scheme: :class:`PaddingWriter`
(section 6.4).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from typing import Dict, Tuple

import attr

from .codec import HEADER, HEADER_SIZE, MAX_DATA, Command, parse_settings

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


#: A number as the reference clients read it (Go's ``strconv.Atoi`` and ``ParseInt(s, 10,
#: 64)``): ASCII digits with an optional sign. Python's ``int()`` also takes spaces,
#: underscores and non-ASCII digits, which the clients refuse.
_GO_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_INT64 = 1 << 63
#: Clients keep ``stop`` as a ``uint32``.
_MAX_STOP = (1 << 32) - 1


def _go_int(text: str) -> int:
    """``text`` as the clients parse a number; ``ValueError`` where they would fail."""
    if not _GO_INT.fullmatch(text) or not -_INT64 <= int(text) < _INT64:
        raise ValueError(f"not a number: {text!r}")
    return int(text)


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
            stop = _go_int(entries.get("stop", ""))
        except ValueError:
            raise PaddingSchemeError("scheme needs an integer 'stop=N' line") from None
        if stop < 0:
            raise PaddingSchemeError("'stop' must not be negative")
        if stop > _MAX_STOP:
            raise PaddingSchemeError(f"'stop' must be at most {_MAX_STOP}")
        plans: Dict[int, Tuple[Tuple[int, int], ...]] = {}
        for key, spec in entries.items():
            if key == "stop":
                continue
            try:
                packet = _go_int(key)
            except ValueError:
                packet = None
            if packet is None or str(packet) != key:  # clients look packets up as "0", "1"...
                raise PaddingSchemeError(f"unknown key {key!r}")
            items = []
            for item in spec.split(","):
                if item == "c":
                    items.append((CHECK_MARK, CHECK_MARK))
                    continue
                low, sep, high = item.partition("-")
                try:
                    a, b = _go_int(low), _go_int(high)
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


#: Picks a size in the half-open range ``[low, high)``, as ``random.Random.randrange`` does
#: (upstream draws ``rand.Int(high - low) + low``). Only called when ``low < high``.
RandRange = Callable[[int, int], int]


def _waste(total: int) -> bytes:
    """Waste frames (stream 0, zero data) that take exactly ``total`` bytes, ``total >= 7``.

    One frame unless the data would overflow the u16 length; then several, so a scheme with
    sizes past 64 KiB still gets the sizes it asks for instead of a corrupt length field.
    """
    out = []
    while total > HEADER_SIZE + MAX_DATA:
        size = HEADER_SIZE + MAX_DATA
        if total - size < HEADER_SIZE:  # keep room for the last frame's header
            size = total - HEADER_SIZE
        out.append(HEADER.pack(Command.WASTE, 0, size - HEADER_SIZE) + bytes(size - HEADER_SIZE))
        total -= size
    out.append(HEADER.pack(Command.WASTE, 0, total - HEADER_SIZE) + bytes(total - HEADER_SIZE))
    return b"".join(out)


def _end_of_first_syn(frames: bytes) -> int | None:
    """The offset just past the first SYN frame in ``frames`` (whole frames), else ``None``."""
    pos, end = 0, len(frames)
    cmd: int
    length: int
    while end - pos >= HEADER_SIZE:
        cmd, _sid, length = HEADER.unpack_from(frames, pos)
        pos += HEADER_SIZE + length
        if cmd == Command.SYN:
            return min(pos, end)
    return None


class PaddingWriter:
    """The client's session writer (anytls-protocol.md section 6.4): frames in, TLS writes out.

    Pure: :meth:`write` takes one or more complete frames and returns the byte strings to hand
    to TLS, in order, each meant as its own TLS write (record). Twisted's TLS transport merges
    writes made in one reactor turn, so a shell that wants the record sizes on the wire must
    spread them out (e.g. ``clock.callLater(0, ...)``); this class does not care.

    Buffering: a new writer buffers (the session's first write is Settings) until it has been
    given the first SYN frame; the first byte written after that SYN, in the same call or a
    later one (normally the PSH carrying the stream's destination), flushes everything held
    as one packet. The writer finds the SYN itself by walking frame headers, which it does
    only while buffering. This is what sing-anytls does (``OpenStream`` clears its buffering
    flag right after writing the SYN, so the next write flushes); the protocol document's
    "until the first PSH after the first SYN" is the same thing for a stock client. Pass
    ``buffering=False`` to start without it; :meth:`flush` ends buffering at once.

    Padding: each flushed write is one packet; the counter starts at 0 and is incremented
    before each packet, so the first is packet 1 (packet 0 is the auth preamble, see
    :func:`anytls_twisted.protocol.auth.encode_preamble`). From packet ``scheme.stop`` on,
    padding is off for good and writes pass through unchanged; the counter stays at ``stop``.

    Sizes: a plan item ``(low, high)`` is a size in ``[low, high)`` drawn with ``randrange``
    (``low`` itself when ``low == high``), as upstream's ``rand.Int(high - low) + low``; the
    default scheme's ``1=100-400`` thus gives 100 to 399. The default ``randrange`` is
    :class:`random.SystemRandom`'s; tests pass e.g. ``random.Random(seed).randrange``.

    Scheme updates (:meth:`update_scheme`, on UpdatePaddingScheme) apply from the next packet;
    the counter is **not** reset and keeps counting through the new plan, and padding that
    was already turned off stays off even if the new ``stop`` is larger. This matches
    sing-anytls v0.0.11, whose session keeps its packet counter and reloads the (per-client)
    scheme on every write. A client that shares one scheme between its sessions, as
    sing-anytls does, calls :meth:`update_scheme` on each live session's writer.

    @ivar scheme: the scheme in force.
    @ivar packets: the number of the last packet written (0 before the first).
    @ivar padding: whether packets are still padded (false from packet ``scheme.stop`` on).
    @ivar buffering: whether writes are still held back for packet 1.
    """

    def __init__(
        self,
        scheme: PaddingScheme,
        randrange: RandRange | None = None,
        buffering: bool = True,
    ) -> None:
        self.scheme = scheme
        self.packets = 0
        self.padding = True
        self.buffering = buffering
        self._randrange: RandRange = randrange or random.SystemRandom().randrange
        self._held: list[bytes] = []

    def update_scheme(self, scheme: PaddingScheme) -> None:
        """Use ``scheme`` from the next packet on; the packet counter carries on."""
        self.scheme = scheme

    def write(self, frames: bytes) -> list[bytes]:
        """Take one or more complete frames; return the TLS writes to make now, in order."""
        if self.buffering:
            end = _end_of_first_syn(frames)
            if end is None or end == len(frames):
                self._held.append(frames)
                if end is not None:
                    self.buffering = False
                return []
            self.buffering = False
        if self._held:
            self._held.append(frames)
            frames = b"".join(self._held)
            self._held = []
        return self._packet(frames)

    def flush(self) -> list[bytes]:
        """End buffering now: the bytes held so far become one packet (none if none are held)."""
        self.buffering = False
        if not self._held:
            return []
        frames = b"".join(self._held)
        self._held = []
        return self._packet(frames)

    def _packet(self, payload: bytes) -> list[bytes]:
        if self.padding:
            self.packets += 1
            if self.packets < self.scheme.stop:
                return self._pad(payload, self.scheme.plans.get(self.packets, ()))
            self.padding = False
        return [payload] if payload else []

    def _pad(self, payload: bytes, plan: tuple[tuple[int, int], ...]) -> list[bytes]:
        writes: list[bytes] = []
        view = memoryview(payload)
        pos, end = 0, len(payload)
        for low, high in plan:
            if low == CHECK_MARK:
                if pos == end:
                    break
                continue
            size = low if low == high else self._randrange(low, high)
            left = end - pos
            if left > size:  # all payload, cut at an arbitrary byte
                writes.append(bytes(view[pos : pos + size]))
                pos += size
            elif left > 0:  # the rest of the payload, filled up to ``size`` with Waste
                rest = bytes(view[pos:]) if pos else payload
                pad = size - left - HEADER_SIZE
                writes.append(rest + _waste(pad + HEADER_SIZE) if pad > 0 else rest)
                pos = end
            else:  # nothing left: Waste with ``size`` data bytes, ``size + 7`` in all
                writes.append(_waste(size + HEADER_SIZE))
        if pos < end:
            writes.append(bytes(view[pos:]) if pos else payload)
        return writes
