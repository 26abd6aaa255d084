"""Who may use the local proxy port: ``--proxy-user-file``, one ``user:password`` per line.

The same table answers SOCKS5 username/password (RFC 1929) and HTTP ``Proxy-Authorization:
Basic``. Passwords are compared as SHA-256 digests with :func:`hmac.compare_digest`, so the time
a check takes says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Dict, Iterable, Tuple

#: The longest name or password RFC 1929 can carry (one length byte each).
MAX_FIELD = 255


class ProxyUsersError(ValueError):
    """An unusable user file; the message names the file and the line."""


class ProxyUsers:
    """A callable ``(name, password) -> bool`` over a fixed table of users.

    @ivar names: the user names, for the start-up log (never the passwords).
    """

    def __init__(self, users: Iterable[Tuple[str, str]]) -> None:
        self._digests: Dict[str, bytes] = {
            name: hashlib.sha256(password.encode("utf-8")).digest() for name, password in users
        }
        if not self._digests:
            raise ValueError("no users")
        self.names = tuple(sorted(self._digests))

    def __call__(self, name: str, password: str) -> bool:
        wanted = self._digests.get(name)
        given = hashlib.sha256(password.encode("utf-8", "surrogateescape")).digest()
        if wanted is None:
            hmac.compare_digest(given, given)  # the same work for an unknown name
            return False
        return hmac.compare_digest(wanted, given)

    @classmethod
    def from_file(cls, path: str) -> ProxyUsers:
        """Read ``path``: ``user:password`` lines (the first colon splits), blank lines and
        ``#`` comments skipped."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ProxyUsersError(f"cannot read proxy user file {path}: {e}") from None
        users = []
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            name, colon, password = text.partition(":")
            if not colon or not name or not password:
                raise ProxyUsersError(f"{path}:{number}: expected user:password")
            if len(name.encode()) > MAX_FIELD or len(password.encode()) > MAX_FIELD:
                raise ProxyUsersError(f"{path}:{number}: user and password: at most 255 bytes each")
            users.append((name, password))
        if not users:
            raise ProxyUsersError(f"{path}: no users")
        return cls(users)
