"""Fuzz the client's configuration loaders (client/config.py, client/configfile.py,
client/v2ray.py).

The first input byte picks what gets the rest: even, :func:`parse_uri` (as text decoded the way
Python decodes command-line arguments, so undecodable bytes become surrogates); odd,
:func:`load_file` (the bytes as a file: sing-box JSON, v2ray JSON or URI lines).

Contract:

* Only :class:`ConfigFileError` (what ``--server`` and ``--config`` turn into a usage message):
  one line, never another exception.
* What loads is usable: the password encodes as UTF-8 (the client sends its SHA-256), the
  port is 1 to 65535, and the server is a host name or a canonical IP literal.
* Round trip: :func:`to_outbound` (with the password) loads back with :func:`load_outbound`
  to the same settings (durations within a microsecond; with TLS off, the TLS fields, which
  it leaves out, do not count), as its docstring promises.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import _fuzzlib
import attr
from _fuzzlib import check

with _fuzzlib.instrumented():
    from anytls_twisted.client.config import ClientConfig, load_outbound, parse_uri, to_outbound
    from anytls_twisted.client.configfile import load_file
    from anytls_twisted.protocol.address import parse_ip
    from anytls_twisted.protocol.auth import password_digest
    from anytls_twisted.singbox import ConfigFileError

PATH = os.path.join(tempfile.mkdtemp(prefix="anytls-fuzz-client-config-"), "client.conf")
DURATIONS = ("idle_session_check_interval", "idle_session_timeout")
TLS_FIELDS = (
    "server_name",
    "insecure",
    "alpn",
    "fingerprint",
    "certificate",
    "certificate_path",
    "certificate_pins",
)


def usable(config: ClientConfig) -> None:
    password_digest(config.password)
    check(1 <= config.server_port <= 0xFFFF, f"port {config.server_port}")
    ip = parse_ip(config.server)
    check(config.server and (ip is None or str(ip) == config.server), f"server {config.server!r}")
    outbound = to_outbound(config, show_password=True)
    try:
        again = load_outbound(outbound, password_file=not config.password)
    except ConfigFileError as e:
        raise _fuzzlib.Violation(f"to_outbound gives what load_outbound refuses: {e}") from None
    for field in DURATIONS:
        a, b = getattr(config, field), getattr(again, field)
        check(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6), f"{field} {a} -> {b}")
    same = {field: getattr(config, field) for field in DURATIONS}
    if not config.tls:  # TLS off: what it would have verified or offered makes no difference
        same.update({field: getattr(config, field) for field in TLS_FIELDS})
    check(
        attr.evolve(again, warnings=config.warnings, **same) == config,
        f"to_outbound does not round-trip: {config} -> {again}",
    )


def test_one_input(data: bytes) -> None:
    if not data:
        return
    try:
        if data[0] & 1:
            with open(PATH, "wb") as f:
                f.write(data[1:])
            configs = load_file(PATH)
        else:
            text = data[1:].decode("utf-8", "surrogateescape")
            configs = [parse_uri(text, password_file=bool(data[0] & 2))]
    except ConfigFileError as e:
        _fuzzlib.one_line(e)
        return
    check(configs, "no servers and no error")
    for config in configs:
        usable(config)


if __name__ == "__main__":
    _fuzzlib.main("client_config", test_one_input, sys.argv)
