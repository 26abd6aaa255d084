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
    pick_anytls,
    string,
)

#: The inbound's fields we use, and those that make no difference here.
_USED = {"listen", "listen_port", "users", "padding_scheme", "tls"}
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
    warnings = check_fields(path, inbound, "", _USED, QUIET | _IGNORED)
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
    if inbound.get("padding_scheme"):
        values["padding"] = _padding(path, inbound["padding_scheme"])
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
