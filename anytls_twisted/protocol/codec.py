"""AnyTLS frame codec: pure bytes <-> frames, no I/O.

A frame is ``cmd u8 | stream id u32 BE | length u16 BE | data`` (anytls-protocol.md section 4).
The decoder is incremental because clients cut their writes at arbitrary byte positions.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

HEADER = struct.Struct(">BIH")
HEADER_SIZE = HEADER.size  # 7
MAX_DATA = 0xFFFF  # the u16 length field


class Command(enum.IntEnum):
    WASTE = 0
    SYN = 1
    PSH = 2
    FIN = 3
    SETTINGS = 4
    ALERT = 5
    UPDATE_PADDING_SCHEME = 6
    SYNACK = 7
    HEART_REQUEST = 8
    HEART_RESPONSE = 9
    SERVER_SETTINGS = 10


class Frame(NamedTuple):
    """One decoded frame.

    A named tuple rather than an attrs class: one is built per frame on the upload path, and a
    tuple is the cheapest object Python builds with named fields.

    @ivar cmd: The command byte; an int rather than a :class:`Command`, so that unknown
        commands survive decoding.
    @ivar sid: The stream id.
    @ivar data: The payload, up to 65535 bytes.
    """

    cmd: int
    sid: int
    data: bytes = b""


def encode_frame(cmd: int, sid: int, data: bytes = b"") -> bytes:
    """Encode one frame; refuses data that does not fit the u16 length field."""
    if len(data) > MAX_DATA:
        raise ValueError(f"frame data of {len(data)} bytes exceeds {MAX_DATA}")
    return HEADER.pack(cmd, sid, len(data)) + data


def data_frames(sid: int, data: bytes) -> List[bytes]:
    """PSH frames for ``data`` as a list for ``writeSequence``: the header and ``data`` itself
    when one frame holds it (no copy); else every frame joined in one piece (chunks of at most
    65535 bytes; the server reads origins four frames at a time), the one copy the TLS layer
    would otherwise make joining them."""
    if not data:
        return []
    if len(data) <= MAX_DATA:
        return [HEADER.pack(Command.PSH, sid, len(data)), data]
    parts: List[Any] = []
    view = memoryview(data)
    for offset in range(0, len(data), MAX_DATA):
        chunk = view[offset : offset + MAX_DATA]
        parts.append(HEADER.pack(Command.PSH, sid, len(chunk)))
        parts.append(chunk)
    return [b"".join(parts)]  # one copy of the payload, as the TLS layer would make anyway


class FrameDecoder:
    """Incremental frame parser that copies each payload byte once.

    TLS hands the session at most 16 KiB of plaintext per record, and clients write frames of
    up to 64 KiB, so most payloads span several ``feed`` calls. A payload split that way is kept
    as views of the fed chunks and joined once, when its last byte arrives; a payload that
    arrives whole is sliced out of the chunk. Nothing is concatenated ahead of need.

    Memory is bounded by one partial frame (7 + 65535 bytes) plus the chunks it is a view of.

    @ivar _head: The start of a header cut short by the end of a chunk: fewer than
        ``HEADER_SIZE`` bytes, completed by the next ``feed``.
    @ivar _frame: ``(cmd, sid, length)`` of the frame whose payload is arriving, or ``None``
        between frames.
    @ivar _parts: Views of the fed chunks that hold the payload received so far.
    @ivar _have: How many payload bytes ``_parts`` holds.
    """

    def __init__(self) -> None:
        self._head = b""
        self._frame: Optional[Tuple[int, int, int]] = None
        self._parts: List[memoryview] = []
        self._have = 0

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._head) + (HEADER_SIZE if self._frame is not None else 0) + self._have

    def feed(self, data: bytes) -> List[Frame]:
        """Return every frame completed by ``data``; keep the incomplete rest."""
        frames: List[Frame] = []
        end = len(data)
        pos = 0
        if self._head:
            pos = HEADER_SIZE - len(self._head)
            head = self._head + bytes(data[:pos])
            if len(head) < HEADER_SIZE:
                self._head = head
                return frames
            self._head = b""
            self._frame = HEADER.unpack(head)
        if self._frame is not None:
            cmd, sid, length = self._frame
            need = length - self._have
            if end - pos < need:
                if end > pos:
                    self._parts.append(memoryview(data)[pos:])
                    self._have += end - pos
                return frames
            self._parts.append(memoryview(data)[pos : pos + need])
            frames.append(Frame(cmd, sid, b"".join(self._parts)))
            pos += need
            self._frame = None
            self._parts = []
            self._have = 0
        unpack = HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            cmd, sid, length = unpack(data, pos)
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                self._frame = (cmd, sid, length)
                if end > start:
                    self._parts.append(memoryview(data)[start:])
                    self._have = end - start
                return frames
            frames.append(Frame(cmd, sid, data[start:stop]))
            pos = stop
        if pos < end:
            self._head = bytes(data[pos:])
        return frames


def parse_settings(data: bytes) -> Dict[str, str]:
    """Parse ``key=value`` lines (Settings, ServerSettings, padding schemes).

    Split on LF, split each line at its first ``=``, skip lines without one; later keys win.
    Invalid UTF-8 is replaced rather than trusted.
    """
    result: Dict[str, str] = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            result[key] = value
    return result


def format_settings(settings: Mapping[str, object]) -> bytes:
    """The inverse of :func:`parse_settings`: LF-joined lines, no trailing newline."""
    return "\n".join(f"{k}={v}" for k, v in settings.items()).encode("utf-8")
