"""The files the configuration names: ``--config FILE`` (a JSON object in the shape of a
sing-box ``anytls`` inbound), ``--password-file`` and ``--padding-scheme``.

Operators can paste the inbound they run today (or a whole sing-box config, whose first
``anytls`` inbound is used). sing-box fields we do not implement are reported in one warning
per object, never silently dropped; any other field is an error (a misspelt ``listen_port``
must not fall back to the default port), with the closest known name as a hint. Invalid values
fail with the file, the field and the reason.
"""

from __future__ import annotations

import json
import math
from typing import Any, List, Optional, Tuple

import attr

from ..endpoints import EndpointString
from ..protocol.padding import DEFAULT_SCHEME, PaddingScheme, PaddingSchemeError
from ..singbox import (
    QUIET,
    SOCKET_FIELDS,
    ConfigFileError,
    check_fields,
    fail,
    parse_duration,
    pick_anytls,
    string,
)

#: The inbound's fields we use, and those that make no difference here.
_USED = {
    "listen",
    "listen_port",
    "users",
    "padding_scheme",
    "tls",
    "fallback",
    "fallback_for_alpn",
    "limits",
}
#: Our own fields (sing-box's inbound has no heartbeats): sing-box durations, like the
#: outbound's ``idle_session_timeout``.
_OURS = {"heartbeat_interval", "heartbeat_timeout"}
#: sing-box's listen fields that we do not implement.
_IGNORED = SOCKET_FIELDS | {
    "udp_timeout",
    "sniff",
    "sniff_override_destination",
    "sniff_timeout",
    "udp_disable_domain_unmapping",
}
_TLS_USED = {"enabled", "server_name", "certificate_path", "key_path", "alpn"}
#: sing-box's inbound TLS fields (docs: configuration/shared/tls) that we do not implement.
_TLS_IGNORED = {
    "min_version",
    "max_version",
    "cipher_suites",
    "curve_preferences",
    "client_authentication",
    "client_certificate",
    "client_certificate_path",
    "client_certificate_public_key_sha256",
    "kernel_tx",
    "kernel_rx",
    "acme",
    "ech",
    "reality",
}
#: Our own ``limits`` object (not sing-box's): the abuse limits, as the options of the same
#: names (``max_sessions`` is ``--max-sessions``); each is a number, 0 meaning no limit
#: except for the burst.
_LIMITS = {
    "connection_rate": (float, 0),
    "connection_burst": (int, 1),
    "max_sessions": (int, 0),
    "max_sessions_per_user": (int, 0),
    "max_streams": (int, 0),
}
#: sing-box TLS fields refused: ignoring them would silently serve another certificate.
_TLS_INLINE = {"certificate", "key"}


@attr.frozen
class FileSettings:
    """What a config file says; ``None`` where it says nothing."""

    path: str
    users: Tuple[Tuple[str, str], ...] = ()
    listen: Optional[str] = None
    listen_port: Optional[int] = None
    padding: Optional[PaddingScheme] = None
    tls_enabled: bool = True
    server_name: Optional[str] = None
    certificate_path: Optional[str] = None
    key_path: Optional[str] = None
    alpn: Tuple[str, ...] = ()
    heartbeat_interval: Optional[float] = None
    heartbeat_timeout: Optional[float] = None
    fallback: Optional[str] = None  # a Twisted client endpoint string
    fallback_for_alpn: Tuple[Tuple[str, str], ...] = ()
    limits: Tuple[Tuple[str, float], ...] = ()  # (field, value) as given in ``limits``
    warnings: Tuple[str, ...] = ()

    def port_description(self) -> Optional[str]:
        """The ``--port`` equivalent of ``listen``/``listen_port``, if a port is given."""
        if self.listen_port is None:
            return None
        kind = "ssl" if self.tls_enabled else "tcp"
        interface = (("interface", self.listen),) if self.listen else ()
        return EndpointString(kind, (str(self.listen_port),), interface).format()


def _users(path: str, value: Any) -> Tuple[Tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise fail(path, "users", "must be a non-empty list of {name, password}")
    users: List[Tuple[str, str]] = []
    for index, entry in enumerate(value):
        field = f"users[{index}]"
        if not isinstance(entry, dict):
            raise fail(path, field, "must be an object with name and password")
        name = entry.get("name", f"user{index + 1}")
        users.append(
            (
                string(path, field + ".name", name),
                string(path, field + ".password", entry.get("password")),
            )
        )
    return tuple(users)


def _server(path: str, field: str, value: Any) -> str:
    """A sing-box server object (``{server, server_port}``) as a Twisted client endpoint."""
    if not isinstance(value, dict):
        raise fail(path, field, "must be an object with server and server_port")
    check_fields(path, value, field + ".", {"server", "server_port"}, ())
    server = string(path, field + ".server", value.get("server"))
    port = value.get("server_port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise fail(path, field + ".server_port", "must be a port number (1 to 65535)")
    return EndpointString("tcp", (), (("host", server), ("port", str(port)))).format()


def _fallback_for_alpn(path: str, value: Any) -> Tuple[Tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise fail(path, "fallback_for_alpn", "must be an object: ALPN protocol -> server")
    routes = []
    for protocol, server in value.items():
        if not protocol:
            raise fail(path, "fallback_for_alpn", "an ALPN protocol name is empty")
        routes.append((protocol, _server(path, f"fallback_for_alpn.{protocol}", server)))
    return tuple(routes)


def _padding(path: str, value: Any) -> PaddingScheme:
    if isinstance(value, str):
        lines = [value]
    elif isinstance(value, list) and all(isinstance(line, str) for line in value):
        lines = value
    else:
        raise fail(path, "padding_scheme", "must be a list of strings (or one string)")
    try:
        return PaddingScheme.parse("\n".join(lines).encode("utf-8"))
    except PaddingSchemeError as e:
        raise fail(path, "padding_scheme", str(e)) from None


def _duration(path: str, field: str, value: Any, zero: bool) -> float:
    what = 'a duration such as "60s"' + (' ("0s": off)' if zero else "")
    if not isinstance(value, str):
        raise fail(path, field, f"must be {what}")
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise fail(path, field, str(e)) from None
    if seconds <= 0 and not zero:
        raise fail(path, field, f"must be {what}, not zero")
    return seconds


def _limits(path: str, value: Any) -> Tuple[Tuple[str, float], ...]:
    if not isinstance(value, dict):
        raise fail(path, "limits", "must be an object")
    check_fields(path, value, "limits.", _LIMITS, ())
    limits = []
    for key, number in value.items():
        kind, low = _LIMITS[key]
        ok = isinstance(number, (int, float)) and not isinstance(number, bool)
        ok = ok and math.isfinite(number)
        if not ok or number < low or (kind is int and number != int(number)):
            noun = "a whole number" if kind is int else "a number"
            raise fail(path, f"limits.{key}", f"must be {noun}, at least {low}")
        limits.append((key, kind(number)))
    return tuple(limits)


def load(path: str) -> FileSettings:
    """Read and validate ``path``; raise :class:`ConfigFileError` naming the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:  # json's C parser, on arrays or objects nested too deeply
        raise ConfigFileError(f"{path}: not valid JSON: nested too deeply") from None
    inbound = pick_anytls(path, document)
    warnings = check_fields(path, inbound, "", _USED | _OURS, QUIET | _IGNORED)
    values: dict = {"path": path}
    if "users" in inbound:
        values["users"] = _users(path, inbound["users"])
    if "listen" in inbound:
        values["listen"] = string(path, "listen", inbound["listen"])
    if "listen_port" in inbound:
        port = inbound["listen_port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise fail(path, "listen_port", "must be a port number (0 to 65535)")
        values["listen_port"] = port
    for field in sorted(_OURS):
        if field in inbound:
            zero = field == "heartbeat_interval"
            values[field] = _duration(path, field, inbound[field], zero)
    if inbound.get("fallback") is not None:
        values["fallback"] = _server(path, "fallback", inbound["fallback"])
    if inbound.get("fallback_for_alpn"):
        values["fallback_for_alpn"] = _fallback_for_alpn(path, inbound["fallback_for_alpn"])
    if inbound.get("padding_scheme"):
        values["padding"] = _padding(path, inbound["padding_scheme"])
    if "limits" in inbound:
        values["limits"] = _limits(path, inbound["limits"])
    tls = inbound.get("tls")
    if tls is None:
        values["tls_enabled"] = False  # as in sing-box: no tls object, plain AnyTLS
    else:
        if not isinstance(tls, dict):
            raise fail(path, "tls", "must be an object")
        for key in sorted(_TLS_INLINE & set(tls))[:1]:
            raise fail(path, f"tls.{key}", f"inline PEM is not supported; use tls.{key}_path")
        warnings += check_fields(path, tls, "tls.", _TLS_USED | _TLS_INLINE, _TLS_IGNORED)
        values["tls_enabled"] = bool(tls.get("enabled", False))
        for key in ("server_name", "certificate_path", "key_path"):
            if key in tls:
                values[key] = string(path, f"tls.{key}", tls[key])
        if "alpn" in tls:
            alpn = tls["alpn"]
            if isinstance(alpn, str):
                alpn = [alpn]
            if not isinstance(alpn, list) or not all(isinstance(a, str) and a for a in alpn):
                raise fail(path, "tls.alpn", "must be a list of strings")
            values["alpn"] = tuple(alpn)
        if bool(values.get("certificate_path")) != bool(values.get("key_path")):
            raise fail(path, "tls", "certificate_path and key_path go together")
    values["warnings"] = tuple(warnings)
    return FileSettings(**values)


ONE_PASSWORD = "give exactly one of --password or --password-file (or users in --config)"


def users(
    password: Optional[str], password_file: Optional[str], file: Optional[FileSettings]
) -> Tuple[Tuple[str, str], ...]:
    """The users: the command line's one password (user ``default``, from ``--password`` or
    the first line of ``--password-file``) wins over the config file's users."""
    if password is None and password_file is None and file and file.users:
        return file.users
    if (password is None) == (password_file is None):
        raise ConfigFileError(ONE_PASSWORD)
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigFileError(f"cannot read password file {password_file}: {e}") from None
    if not password:
        raise ConfigFileError("the password is empty")
    return (("default", password),)


def padding(path: Optional[str], file: Optional[FileSettings]) -> PaddingScheme:
    """The padding scheme: ``--padding-scheme``'s file, else the config file's, else the
    protocol's default."""
    if path is None:
        return (file and file.padding) or DEFAULT_SCHEME
    try:
        with open(path, "rb") as f:
            return PaddingScheme.parse(f.read(1 << 17))
    except OSError as e:
        raise ConfigFileError(f"cannot read padding scheme {path}: {e}") from None
    except PaddingSchemeError as e:
        raise ConfigFileError(f"invalid padding scheme {path}: {e}") from None
