"""``--config FILE``: a JSON object in the shape of a sing-box ``anytls`` inbound.

Operators can paste the inbound they run today (or a whole sing-box config, whose first
``anytls`` inbound is used). Fields we do not implement are reported as warnings, never silently
dropped; invalid values fail with the file, the field and the reason.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

import attr

from ..endpoints import EndpointString
from ..protocol.padding import PaddingScheme, PaddingSchemeError

#: Fields of a sing-box inbound that make no difference here (informational or defaults).
_IGNORED_QUIETLY = {"type", "tag"}
_KNOWN = {"listen", "listen_port", "users", "padding_scheme", "tls"} | _IGNORED_QUIETLY
_TLS_KNOWN = {"enabled", "server_name", "certificate_path", "key_path", "alpn"}


class ConfigFileError(ValueError):
    """An unusable config file; the message names the file and the field."""


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
    warnings: Tuple[str, ...] = ()

    def port_description(self) -> Optional[str]:
        """The ``--port`` equivalent of ``listen``/``listen_port``, if a port is given."""
        if self.listen_port is None:
            return None
        kind = "ssl" if self.tls_enabled else "tcp"
        interface = (("interface", self.listen),) if self.listen else ()
        return EndpointString(kind, (str(self.listen_port),), interface).format()


def _fail(path: str, field: str, reason: str) -> ConfigFileError:
    return ConfigFileError(f"{path}: {field}: {reason}")


def _string(path: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, field, "must be a non-empty string")
    return value


def _pick_inbound(path: str, document: Any) -> dict:
    if not isinstance(document, dict):
        raise _fail(path, "(top level)", "must be a JSON object")
    if "inbounds" in document:
        inbounds = document["inbounds"]
        if not isinstance(inbounds, list):
            raise _fail(path, "inbounds", "must be a list")
        for inbound in inbounds:
            if isinstance(inbound, dict) and inbound.get("type") == "anytls":
                return inbound
        raise _fail(path, "inbounds", "no inbound of type anytls")
    if document.get("type", "anytls") != "anytls":
        raise _fail(path, "type", f"is {document.get('type')!r}, not 'anytls'")
    return document


def _users(path: str, value: Any) -> Tuple[Tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _fail(path, "users", "must be a non-empty list of {name, password}")
    users: List[Tuple[str, str]] = []
    for index, entry in enumerate(value):
        field = f"users[{index}]"
        if not isinstance(entry, dict):
            raise _fail(path, field, "must be an object with name and password")
        name = entry.get("name", f"user{index + 1}")
        users.append(
            (
                _string(path, field + ".name", name),
                _string(path, field + ".password", entry.get("password")),
            )
        )
    return tuple(users)


def _padding(path: str, value: Any) -> PaddingScheme:
    if isinstance(value, str):
        lines = [value]
    elif isinstance(value, list) and all(isinstance(line, str) for line in value):
        lines = value
    else:
        raise _fail(path, "padding_scheme", "must be a list of strings (or one string)")
    try:
        return PaddingScheme.parse("\n".join(lines).encode("utf-8"))
    except PaddingSchemeError as e:
        raise _fail(path, "padding_scheme", str(e)) from None


def load(path: str) -> FileSettings:
    """Read and validate ``path``; raise :class:`ConfigFileError` naming the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: not valid JSON: {e}") from None
    inbound = _pick_inbound(path, document)
    warnings = [
        f"{path}: field {key!r} is not supported by anytls-twisted and is ignored"
        for key in inbound
        if key not in _KNOWN
    ]
    values: dict = {"path": path}
    if "users" in inbound:
        values["users"] = _users(path, inbound["users"])
    if "listen" in inbound:
        values["listen"] = _string(path, "listen", inbound["listen"])
    if "listen_port" in inbound:
        port = inbound["listen_port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise _fail(path, "listen_port", "must be a port number (0 to 65535)")
        values["listen_port"] = port
    if inbound.get("padding_scheme"):
        values["padding"] = _padding(path, inbound["padding_scheme"])
    tls = inbound.get("tls")
    if tls is None:
        values["tls_enabled"] = False  # as in sing-box: no tls object, plain AnyTLS
    else:
        if not isinstance(tls, dict):
            raise _fail(path, "tls", "must be an object")
        warnings += [
            f"{path}: field 'tls.{key}' is not supported by anytls-twisted and is ignored"
            for key in tls
            if key not in _TLS_KNOWN
        ]
        values["tls_enabled"] = bool(tls.get("enabled", False))
        for key in ("server_name", "certificate_path", "key_path"):
            if key in tls:
                values[key] = _string(path, f"tls.{key}", tls[key])
        if "alpn" in tls:
            alpn = tls["alpn"]
            if isinstance(alpn, str):
                alpn = [alpn]
            if not isinstance(alpn, list) or not all(isinstance(a, str) and a for a in alpn):
                raise _fail(path, "tls.alpn", "must be a list of strings")
            values["alpn"] = tuple(alpn)
        if bool(values.get("certificate_path")) != bool(values.get("key_path")):
            raise _fail(path, "tls", "certificate_path and key_path go together")
    values["warnings"] = tuple(warnings)
    return FileSettings(**values)
