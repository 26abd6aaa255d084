"""Fuzz the padding scheme parser and the client's padding writer (protocol/padding.py).

The input is the scheme's bytes.

Contract:

* :meth:`PaddingScheme.parse` returns a scheme or raises :class:`PaddingSchemeError`.
* What it accepts, the reference clients accept and read the same way (the module's promise:
  "a client can never reject what we send"). They parse numbers with Go's ``strconv``: ASCII
  digits with an optional sign, within 64 bits (``stop`` becomes a ``uint32``), and look packets
  up by their canonical decimal name. So an accepted scheme's ``stop`` and sizes are such
  numbers, and every packet key is canonical.
* The scheme keeps its exact bytes (``raw``; ``md5`` is theirs); sizes are positive ranges.
* The writer (when the sizes are small enough to run): the frames given to it come out
  unchanged once its Waste frames are taken out, and padding stops at packet ``stop``.
"""

from __future__ import annotations

import random
import re
import sys

import _fuzzlib
from _fuzzlib import check

with _fuzzlib.instrumented():
    from anytls_twisted.protocol.codec import Command, FrameDecoder, encode_frame
    from anytls_twisted.protocol.padding import (
        CHECK_MARK,
        PaddingScheme,
        PaddingSchemeError,
        PaddingWriter,
    )

GO_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
INT64 = 2**63 - 1


def go_int(text: str, bits: int = 63) -> bool:
    """Whether Go's ``strconv.Atoi``/``ParseInt(s, 10, 64)`` takes ``text``, within ``bits``."""
    return bool(GO_INT.fullmatch(text)) and abs(int(text)) < 2**bits


def writer(scheme: PaddingScheme, seed: bytes) -> None:
    frames = [encode_frame(Command.SETTINGS, 0, b"v=2"), encode_frame(Command.SYN, 1)]
    frames += [encode_frame(Command.PSH, 1, seed[: i * 37]) for i in range(1, 12)]
    pad = PaddingWriter(scheme, random.Random(seed).randrange)
    out = []
    for frame in frames:
        out += pad.write(frame)
    out += pad.flush()
    decoded = FrameDecoder().feed(b"".join(out))
    kept = [f for f in decoded if f.cmd != Command.WASTE]
    check(b"".join(encode_frame(*f) for f in kept) == b"".join(frames), "the writer loses frames")
    check(all(f.sid == 0 for f in decoded if f.cmd == Command.WASTE), "Waste off stream 0")
    check(pad.packets <= max(scheme.stop, 1), "padding past stop")


def test_one_input(data: bytes) -> None:
    try:
        scheme = PaddingScheme.parse(data)
    except PaddingSchemeError as e:
        _fuzzlib.one_line(e)
        return
    check(scheme.raw == data and len(scheme.md5) == 32, "raw bytes changed")
    lines = dict(line.split("=", 1) for line in data.decode("utf-8").split("\n") if "=" in line)
    check(go_int(lines["stop"]) and 0 <= scheme.stop < 2**32, f"stop {lines['stop']!r}")
    for key, packet in ((k, k) for k in lines if k != "stop"):
        check(str(int(packet)) == key, f"packet key {key!r} is not a decimal name")
        for item in lines[key].split(","):
            if item != "c":
                low, high = item.split("-", 1)
                check(go_int(low) and go_int(high), f"size {item!r}")
    largest = 0
    for plan in scheme.plans.values():
        for low, high in plan:
            check((low, high) == (CHECK_MARK, CHECK_MARK) or 0 < low <= high, "bad range")
            largest = max(largest, high)
    if largest <= 200_000 and scheme.stop <= 64:
        writer(scheme, data)


if __name__ == "__main__":
    _fuzzlib.main("padding", test_one_input, sys.argv)
