"""Fuzz the frame codec (anytls_twisted/protocol/codec.py).

Contract:

* :class:`FrameDecoder` takes any bytes, cut anywhere, and never raises.
* Split invariance: the frames do not depend on where the input is cut.
* Lossless: re-encoding the frames gives back the input, except the ``pending`` bytes at the end.
* Bounded: ``pending`` stays under one frame (7 + 65535 bytes), payloads are ``bytes`` of at
  most 65535 bytes, command and stream id fit their fields.
* Round trip: frames built from the input, encoded (``encode_frame``, ``data_frames``) and
  decoded with arbitrary cuts, come back unchanged.
"""

from __future__ import annotations

import sys

import _fuzzlib
import atheris
from _fuzzlib import check, splits

with _fuzzlib.instrumented():
    from anytls_twisted.protocol.codec import (
        HEADER_SIZE,
        MAX_DATA,
        Command,
        Frame,
        FrameDecoder,
        data_frames,
        encode_frame,
        format_settings,
        parse_settings,
    )


def decode(chunks: list) -> tuple:
    decoder = FrameDecoder()
    frames = []
    for chunk in chunks:
        frames += decoder.feed(chunk)
        check(decoder.pending < HEADER_SIZE + MAX_DATA, f"pending {decoder.pending}")
    return frames, decoder.pending


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, fdp = data[0] % 3, atheris.FuzzedDataProvider(data[1:])
    if mode == 0:  # arbitrary bytes as a session's byte stream
        stream = data[1:]
        whole, pending = decode([stream])
        cut, cut_pending = decode(splits(data[-16:], stream, 12))
        check(cut == whole and cut_pending == pending, "frames depend on the cuts")
        for frame in whole:
            check(type(frame.data) is bytes and len(frame.data) <= MAX_DATA, "bad payload")
            check(0 <= frame.cmd <= 0xFF and 0 <= frame.sid <= 0xFFFFFFFF, "bad header")
        again = b"".join(encode_frame(*frame) for frame in whole)
        check(again == stream[: len(stream) - pending], "re-encoding differs from the input")
        for frame in whole:  # the key=value parser takes any payload
            settings = parse_settings(frame.data)
            check(parse_settings(format_settings(settings)) == settings, "settings round trip")
    elif mode == 1:  # frames built from the input: encode, cut, decode
        frames = []
        for _ in range(fdp.ConsumeIntInRange(0, 8)):
            cmd = fdp.ConsumeIntInRange(0, 0xFF)
            sid = fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
            frames.append(Frame(cmd, sid, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))))
        wire = b"".join(encode_frame(*frame) for frame in frames)
        decoded, pending = decode(splits(data[-16:], wire, 16))
        check(decoded == frames and pending == 0, "frames do not round-trip")
    else:  # a large write: data_frames cuts it into PSH frames of at most 65535 bytes
        sid = fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
        size = fdp.ConsumeIntInRange(0, 3 * MAX_DATA + 2)
        payload = fdp.ConsumeBytes(64) * (size // 64 + 1)
        payload = payload[:size] if payload else bytes(size)
        wire = b"".join(data_frames(sid, payload))
        decoded, pending = decode(splits(data[-16:], wire, 6))
        check(pending == 0 and all(f.cmd == Command.PSH and f.sid == sid for f in decoded), "PSH")
        check(b"".join(f.data for f in decoded) == payload, "data_frames loses bytes")
        check(all(0 < len(f.data) <= MAX_DATA for f in decoded), "a PSH frame too large or empty")


if __name__ == "__main__":
    _fuzzlib.main("codec", test_one_input, sys.argv)
