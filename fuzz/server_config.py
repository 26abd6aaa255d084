"""Fuzz the server's config file loader (anytls_twisted/server/configfile.py).

The input is the file's bytes (JSON, or anything else).

Contract:

* :func:`configfile.load` returns :class:`FileSettings` or raises :class:`ConfigFileError`:
  one line, naming the file. Never another exception (a traceback instead of a message).
* What it returns is usable: every user's name and password encode as UTF-8 (the password's
  SHA-256 is what clients send), the port is 0 to 65535, the padding scheme is a parsed one,
  and ``port_description()`` gives an endpoint string; ``users()`` and ``padding()`` take it.
"""

from __future__ import annotations

import os
import sys
import tempfile

import _fuzzlib
from _fuzzlib import check

with _fuzzlib.instrumented():
    from anytls_twisted.protocol.auth import password_digest
    from anytls_twisted.protocol.padding import PaddingScheme
    from anytls_twisted.server import configfile
    from anytls_twisted.singbox import ConfigFileError

PATH = os.path.join(tempfile.mkdtemp(prefix="anytls-fuzz-server-config-"), "config.json")


def test_one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        settings = configfile.load(PATH)
    except ConfigFileError as e:
        _fuzzlib.one_line(e)
        check(str(e).startswith(PATH), f"error does not name the file: {e}")
        return
    check(settings.listen_port is None or 0 <= settings.listen_port <= 0xFFFF, "port")
    check(settings.padding is None or isinstance(settings.padding, PaddingScheme), "padding")
    for name, password in settings.users:
        name.encode("utf-8")
        password_digest(password)
    settings.port_description()
    if settings.users:
        check(configfile.users(None, None, settings) == settings.users, "users")
    configfile.padding(None, settings)


if __name__ == "__main__":
    _fuzzlib.main("server_config", test_one_input, sys.argv)
