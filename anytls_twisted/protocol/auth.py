"""Authentication: the client's preamble and the digest-to-user table. Pure, no I/O.

The preamble is ``sha256(password)`` (32 bytes), ``padding0_len`` (u16 BE) and that many
padding bytes (anytls-protocol.md section 3). Unlike the reference servers we accept it split
across reads, and hand back the session bytes that follow it. The digest can be judged as soon
as its 32 bytes are in (:attr:`PreambleReader.digest`), before the padding has arrived.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Dict, Iterable, Optional, Tuple

DIGEST_SIZE = 32
PREAMBLE_FIXED = DIGEST_SIZE + 2


def password_digest(password: str) -> bytes:
    """What a client sends for ``password``: the raw SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(password.encode("utf-8")).digest()


def encode_preamble(password: str, padding_length: int = 0) -> bytes:
    """A client's preamble (used by tests and, later, the client side)."""
    return password_digest(password) + struct.pack(">H", padding_length) + bytes(padding_length)


class PreambleReader:
    """Collects the preamble across reads.

    ``feed`` returns ``None`` until the preamble is complete, then ``(digest, rest)`` where
    ``rest`` is whatever followed it. At most 34 + 65535 bytes are ever held.

    @ivar _buffer: The bytes fed since the last complete preamble.
    """

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def buffered(self) -> bytes:
        """The bytes fed since the last complete preamble."""
        return self._buffer

    @property
    def digest(self) -> Optional[bytes]:
        """The first 32 bytes once they are in, else None: what a server judges at once."""
        return self._buffer[:DIGEST_SIZE] if len(self._buffer) >= DIGEST_SIZE else None

    def feed(self, data: bytes) -> Optional[Tuple[bytes, bytes]]:
        self._buffer += data
        if len(self._buffer) < PREAMBLE_FIXED:
            return None
        (padding,) = struct.unpack_from(">H", self._buffer, DIGEST_SIZE)
        end = PREAMBLE_FIXED + padding
        if len(self._buffer) < end:
            return None
        digest, rest = self._buffer[:DIGEST_SIZE], self._buffer[end:]
        self._buffer = b""
        return digest, rest


class UserTable:
    """Maps a password digest to a user name without timing leaks about the secrets.

    Lookups go through a keyed hash: the dict is indexed by ``HMAC(k, digest)`` with a random
    per-process ``k``, so dictionary probing reveals nothing an attacker can steer, and the final
    match is confirmed with :func:`hmac.compare_digest`. Several users are supported; two users
    with the same password collapse into one entry and the later one wins, as in sing-box.

    @ivar _key: The random HMAC key of this table, drawn when it is built.
    @ivar _table: ``HMAC(_key, digest)`` -> ``(digest, user name)`` for every user.
    """

    def __init__(self, users: Iterable[Tuple[str, str]]) -> None:
        self._key = os.urandom(32)
        self._table: Dict[bytes, Tuple[bytes, str]] = {}
        for name, password in users:
            digest = password_digest(password)
            self._table[self._index(digest)] = (digest, name)
        if not self._table:
            raise ValueError("at least one user is required")

    def _index(self, digest: bytes) -> bytes:
        return hmac.new(self._key, digest, hashlib.sha256).digest()

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, digest: bytes) -> Optional[str]:
        """The user whose password has this digest, or ``None``."""
        entry = self._table.get(self._index(digest))
        if entry is None or not hmac.compare_digest(entry[0], digest):
            return None
        return entry[1]
