"""AnyTLS frame codec: pure bytes <-> frames, no I/O.

A frame is ``cmd u8 | stream id u32 BE | length u16 BE | data`` (anytls-protocol.md section 4).
The decoder is incremental because clients cut their writes at arbitrary byte positions.
"""

from __future__ import annotations

import enum
import struct
from typing import List

import attr

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


@attr.frozen
class Frame:
    """One decoded frame. ``cmd`` is an int so unknown commands survive decoding."""

    cmd: int
    sid: int
    data: bytes = b""


def encode_frame(cmd: int, sid: int, data: bytes = b"") -> bytes:
    """Encode one frame; refuses data that does not fit the u16 length field."""
    if len(data) > MAX_DATA:
        raise ValueError(f"frame data of {len(data)} bytes exceeds {MAX_DATA}")
    return HEADER.pack(cmd, sid, len(data)) + data


def data_frames(sid: int, data: bytes) -> List[bytes]:
    """PSH frames for ``data`` as a list for ``writeSequence``: header, chunk, header, chunk...

    Chunks are at most 65535 bytes; a Twisted read can be 65536 bytes, one too many.
    """
    out: List[bytes] = []
    view = memoryview(data)
    for offset in range(0, len(data), MAX_DATA):
        chunk = view[offset : offset + MAX_DATA]
        out.append(HEADER.pack(Command.PSH, sid, len(chunk)))
        out.append(bytes(chunk) if len(data) > MAX_DATA else data)
    return out


class FrameDecoder:
    """Incremental frame parser with one buffer and a moving offset.

    Memory is bounded by one partial frame (7 + 65535 bytes) plus the bytes of one ``feed``.
    """

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> List[Frame]:
        """Return every complete frame in the buffered bytes plus ``data``; keep the rest."""
        buf = self._buffer + data if self._buffer else data
        frames: List[Frame] = []
        offset = 0
        end = len(buf)
        while end - offset >= HEADER_SIZE:
            cmd, sid, length = HEADER.unpack_from(buf, offset)
            stop = offset + HEADER_SIZE + length
            if stop > end:
                break
            frames.append(Frame(cmd, sid, bytes(buf[offset + HEADER_SIZE : stop])))
            offset = stop
        self._buffer = bytes(buf[offset:])
        return frames


def parse_settings(data: bytes) -> dict:
    """Parse ``key=value`` lines (Settings, ServerSettings, padding schemes).

    Split on LF, split each line at its first ``=``, skip lines without one; later keys win.
    Invalid UTF-8 is replaced rather than trusted.
    """
    result = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            result[key] = value
    return result


def format_settings(settings: dict) -> bytes:
    """The inverse of :func:`parse_settings`: LF-joined lines, no trailing newline."""
    return "\n".join(f"{k}={v}" for k, v in settings.items()).encode("utf-8")
