"""Where the client connects, from an ``anytls://`` URI or a sing-box ``anytls`` outbound.

Users paste what they already have: a share link, or the outbound block of a sing-box client
config (or the whole config, whose first ``anytls`` outbound is used). Both are read strictly,
like the server's ``--config`` (both use :mod:`anytls_twisted.singbox`): an unknown field or query key is an error naming the closest known one, since a
misspelt ``insecure`` silently ignored would change what is verified. sing-box dial and TLS
fields that do not apply here are accepted and reported in one warning.

The server prints both formats (:mod:`anytls_twisted.clientconfig`); what it prints loads here
unchanged. Formats: docs client-behaviour.md section 8; anytls-go ``docs/uri_scheme.md``.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import difflib
import json
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import attr

from ..protocol.address import AddressError, parse_host_port, parse_ip
from ..singbox import (
    SOCKET_FIELDS,
    ConfigFileError,
    check_fields,
    fail,
    parse_duration,
    pick_anytls,
)

__all__ = [
    "ClientConfig",
    "ConfigFileError",
    "load_outbound",
    "parse_duration",
    "parse_uri",
    "to_outbound",
]

DEFAULT_PORT = 443
#: sing-box's defaults for the session pool (docs/configuration/outbound/anytls).
DEFAULT_CHECK_INTERVAL = 30.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MIN_IDLE = 0

#: What a URI's query may say; ``allowInsecure`` is the converters' spelling of ``insecure``.
_URI_KEYS = ("sni", "insecure", "allowInsecure", "alpn", "fp")

_USED = {
    "server",
    "server_port",
    "password",
    "idle_session_check_interval",
    "idle_session_timeout",
    "min_idle_session",
    "tls",
}
_QUIET = {"type", "tag"}
#: sing-box's dial fields (docs: configuration/shared/dial) and newer outbound fields, which
#: make no difference here.
_IGNORED = SOCKET_FIELDS | {
    "inet4_bind_address",
    "inet6_bind_address",
    "bind_address_no_port",
    "connect_timeout",
    "domain_resolver",
    "network_strategy",
    "network_type",
    "fallback_network_type",
    "fallback_delay",
    "client_metadata",
}
_TLS_USED = {
    "enabled",
    "server_name",
    "insecure",
    "certificate",
    "certificate_path",
    "certificate_public_key_sha256",
    "alpn",
    "utls",
    "disable_sni",
}
#: sing-box's outbound TLS fields (docs: configuration/shared/tls) not implemented here.
_TLS_IGNORED = {
    "min_version",
    "max_version",
    "cipher_suites",
    "curve_preferences",
    "client_certificate",
    "client_certificate_path",
    "client_key",
    "client_key_path",
    "fragment",
    "fragment_fallback_delay",
    "record_fragment",
    "ech",
    "reality",
}
_UTLS_USED = {"enabled", "fingerprint"}


@attr.frozen(kw_only=True)
class ClientConfig:
    """One AnyTLS server as the client dials it.

    @ivar server: Host name or IP literal (canonical, no brackets).
    @ivar server_port: TCP port.
    @ivar password: The password; empty only when a password file will supply it.
    @ivar server_name: The SNI to send, or ``None`` for none (the server is an IP literal, or
        the configuration names an IP).
    @ivar insecure: Skip certificate verification.
    @ivar tls: Whether to speak TLS (a sing-box outbound without ``tls`` dials plain, as
        sing-box does); URIs always mean TLS.
    @ivar alpn: ALPN protocols to offer.
    @ivar fingerprint: The uTLS browser fingerprint asked for (not reproduced: the ClientHello
        stays OpenSSL's), or ``None``.
    @ivar certificate: Inline PEM trusted instead of the system's CAs, or ``None``.
    @ivar certificate_path: A PEM file trusted instead of the system's CAs, or ``None``.
    @ivar certificate_pins: base64 SHA-256 public-key pins
        (``tls.certificate_public_key_sha256``), any of which is trusted.
    @ivar idle_session_check_interval: Seconds between idle-session checks.
    @ivar idle_session_timeout: Seconds an idle session lives past a check.
    @ivar min_idle_session: Idle sessions each check keeps regardless of age.
    @ivar tag: The outbound's tag, or the URI's fragment (its display name).
    @ivar warnings: Fields accepted but ignored, one sentence each, for the log.
    """

    server: str
    server_port: int = DEFAULT_PORT
    password: str
    server_name: Optional[str]
    insecure: bool = False
    tls: bool = True
    alpn: Tuple[str, ...] = ()
    fingerprint: Optional[str] = None
    certificate: Optional[str] = None
    certificate_path: Optional[str] = None
    certificate_pins: Tuple[str, ...] = ()
    idle_session_check_interval: float = DEFAULT_CHECK_INTERVAL
    idle_session_timeout: float = DEFAULT_IDLE_TIMEOUT
    min_idle_session: int = DEFAULT_MIN_IDLE
    tag: str = "anytls"
    warnings: Tuple[str, ...] = ()


def default_sni(host: str) -> Optional[str]:
    """SNI defaults to the server's name; an IP literal means no SNI (TLS forbids IPs there)."""
    return None if parse_ip(host) is not None else host


#: Said when a configuration asks for a browser's TLS fingerprint (docs: client-behaviour.md
#: section 10): the keys are accepted for compatibility, the ClientHello stays OpenSSL's.
FINGERPRINT_WARNING = (
    "{where}: {field} {value!r} asks for a browser's TLS fingerprint; anytls-twisted cannot "
    "reproduce one (the TLS ClientHello stays OpenSSL's)"
)


def password_check(where: str, password: str, password_file: bool) -> None:
    if not password and not password_file:
        raise fail(where, "password", "is empty (give one, or a password file)")


# --------------------------------------------------------------------------------------------
# The URI


def _uri_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true"):
        return True
    if lowered in ("0", "false"):
        return False
    raise ValueError("must be 0, 1, true or false")


def parse_uri(text: str, password_file: bool = False) -> ClientConfig:
    """``anytls://PASSWORD@HOST[:PORT][/][?sni=NAME&insecure=0|1&alpn=A,B&fp=NAME][#TAG]``.

    The password is percent-decoded (UTF-8); ``password_file`` allows it to be empty. Errors
    name the part of the URI, never repeat it (it holds the password)."""
    where = "anytls URI"
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme.lower() != "anytls":
        raise fail(where, "scheme", "must start with anytls://")
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if path:
        raise fail(where, "path", "must be empty or /")
    userinfo, at, hostport = authority.rpartition("@")
    try:
        # A command-line argument that is not UTF-8 reaches us with surrogate escapes: turn
        # them back into its bytes (refused below as not UTF-8), rather than fail to encode.
        raw = urllib.parse.unquote_to_bytes(userinfo.encode("utf-8", "surrogateescape"))
        password = raw.decode("utf-8")
    except UnicodeError:
        raise fail(where, "password", "is not UTF-8 once percent-decoded") from None
    password_check(where, password, password_file)
    try:
        destination = parse_host_port(hostport, DEFAULT_PORT)
    except AddressError as e:
        raise fail(where, "host", str(e)) from None
    values: Dict[str, Any] = {
        "server": destination.host,
        "server_port": destination.port,
        "password": password,
        "server_name": default_sni(destination.host),
    }
    if fragment:
        values["tag"] = urllib.parse.unquote(fragment)
    seen = set()
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in _URI_KEYS:
            close = difflib.get_close_matches(key, _URI_KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(_URI_KEYS)}"
            raise fail(where, key, f"unknown query parameter; {hint}")
        if key in seen:
            raise fail(where, key, "given twice")
        seen.add(key)
        if key == "sni":
            values["server_name"] = default_sni(value) if value else None
        elif key in ("insecure", "allowInsecure"):
            try:
                values["insecure"] = _uri_bool(value)
            except ValueError as e:
                raise fail(where, key, str(e)) from None
        elif key == "alpn":
            protocols = tuple(value.split(","))
            if not all(protocols):
                raise fail(where, key, "must be a comma-separated list of protocol names")
            values["alpn"] = protocols
        elif key == "fp" and value:
            values["fingerprint"] = value
            values["warnings"] = (FINGERPRINT_WARNING.format(where=where, field=key, value=value),)
    return ClientConfig(**values)


# --------------------------------------------------------------------------------------------
# The sing-box outbound


def _typed(path: str, field: str, value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise fail(path, field, f"must be {what}")
    return value


def _strings(path: str, field: str, value: Any) -> Tuple[str, ...]:
    """A string or a list of non-empty strings, as sing-box's listable fields take."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail(path, field, "must be a list of strings")
    return tuple(value)


def _pins(path: str, value: Any) -> Tuple[str, ...]:
    field = "tls.certificate_public_key_sha256"
    pins = _strings(path, field, value)
    for pin in pins:
        try:
            if len(base64.b64decode(pin, validate=True)) != 32:
                raise ValueError
        except (binascii.Error, ValueError):
            raise fail(path, field, f"{pin!r} is not a base64 SHA-256 digest") from None
    return pins


def _tls(path: str, tls: Any, values: Dict[str, Any]) -> List[str]:
    """Read the ``tls`` object into ``values``; the warnings for ignored fields."""
    if not isinstance(tls, dict):
        raise fail(path, "tls", "must be an object")
    warnings = check_fields(path, tls, "tls.", _TLS_USED, _TLS_IGNORED)
    values["tls"] = _typed(path, "tls.enabled", tls.get("enabled", False), bool, "true or false")
    values["insecure"] = _typed(
        path, "tls.insecure", tls.get("insecure", False), bool, "true or false"
    )
    if "server_name" in tls:
        name = _typed(path, "tls.server_name", tls["server_name"], str, "a string")
        values["server_name"] = default_sni(name) if name else values["server_name"]
    if _typed(path, "tls.disable_sni", tls.get("disable_sni", False), bool, "true or false"):
        if tls.get("server_name"):  # sing-box would verify that name without sending it
            warnings.append(
                f"{path}: tls.disable_sni is ignored with a tls.server_name "
                "(anytls-twisted sends the name it verifies)"
            )
        else:  # no SNI, as a URI's empty sni= says (what to_outbound prints for one)
            values["server_name"] = None
    if "certificate" in tls:
        values["certificate"] = "\n".join(_strings(path, "tls.certificate", tls["certificate"]))
    if "certificate_path" in tls:
        values["certificate_path"] = _typed(
            path, "tls.certificate_path", tls["certificate_path"], str, "a file name"
        )
    if "certificate_public_key_sha256" in tls:
        values["certificate_pins"] = _pins(path, tls["certificate_public_key_sha256"])
    if "alpn" in tls:
        values["alpn"] = _strings(path, "tls.alpn", tls["alpn"])
    utls = tls.get("utls")
    if utls is not None:
        if not isinstance(utls, dict):
            raise fail(path, "tls.utls", "must be an object")
        warnings += check_fields(path, utls, "tls.utls.", _UTLS_USED, ())
        if _typed(path, "tls.utls.enabled", utls.get("enabled", False), bool, "true or false"):
            fingerprint = utls.get("fingerprint", "chrome")  # sing-box's default
            values["fingerprint"] = _typed(
                path, "tls.utls.fingerprint", fingerprint, str, "a string"
            )
            warnings.append(
                FINGERPRINT_WARNING.format(where=path, field="tls.utls", value=fingerprint)
            )
    return warnings


def load_outbound(
    source: Union[str, Mapping[str, Any]], password_file: bool = False, path: str = "outbound"
) -> ClientConfig:
    """A sing-box ``anytls`` outbound from a JSON file name, or an already parsed document
    (``path`` then names it in errors): the outbound itself or a whole config (its first
    ``anytls`` outbound). Raise :class:`ConfigFileError` naming the file and the field."""
    if isinstance(source, str):
        path = source
        try:
            with open(path, encoding="utf-8") as f:
                document: Any = json.load(f)
        except OSError as e:
            raise ConfigFileError(f"cannot read config file {path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigFileError(f"{path}: not valid JSON: {e}") from None
        except RecursionError:  # json's C parser, on arrays or objects nested too deeply
            raise ConfigFileError(f"{path}: not valid JSON: nested too deeply") from None
    else:
        document = dict(source)
    outbound = pick_anytls(path, document, "outbounds")
    warnings = check_fields(path, outbound, "", _USED, _QUIET | _IGNORED)
    for field in ("server", "server_port"):
        if field not in outbound:
            raise fail(path, field, "is required")
    server = _typed(path, "server", outbound["server"], str, "a host name or IP address")
    ip = parse_ip(server)
    if ip is not None:
        server = str(ip)
    elif ":" in server:
        raise fail(path, "server", "must be a host name or IP address, without a port")
    else:
        try:
            parse_host_port(server, DEFAULT_PORT)
        except AddressError as e:
            raise fail(path, "server", str(e)) from None
    port = _typed(path, "server_port", outbound["server_port"], int, "a port number")
    if not 1 <= port <= 65535:
        raise fail(path, "server_port", "must be a port number (1 to 65535)")
    password = _typed(path, "password", outbound.get("password", ""), str, "a string")
    password_check(path, password, password_file)
    values: Dict[str, Any] = {
        "server": server,
        "server_port": port,
        "password": password,
        "server_name": default_sni(server),
        "tls": False,  # as in sing-box: no tls object, plain AnyTLS
    }
    if "tag" in outbound:
        values["tag"] = _typed(path, "tag", outbound["tag"], str, "a string")
    for field in ("idle_session_check_interval", "idle_session_timeout"):
        if field in outbound:
            text = _typed(path, field, outbound[field], str, 'a duration string such as "30s"')
            try:
                values[field] = parse_duration(text)
            except ValueError as e:
                raise fail(path, field, str(e)) from None
    if "min_idle_session" in outbound:
        count = _typed(path, "min_idle_session", outbound["min_idle_session"], int, "a number")
        if count < 0:
            raise fail(path, "min_idle_session", "must not be negative")
        values["min_idle_session"] = count
    if "tls" in outbound:
        warnings += _tls(path, outbound["tls"], values)
    values["warnings"] = tuple(warnings)
    return ClientConfig(**values)


def format_duration(seconds: float) -> str:
    """Seconds as a sing-box duration string (``30s``, ``1.5s``, ``500ms``) that
    :func:`parse_duration` reads back: every digit of the float, never an exponent (``:g``
    gave ``1e+06s`` for 11.6 days, and ``1.23457s`` for 1.23456789)."""
    value, unit = decimal.Decimal(repr(seconds)), "s"
    if seconds and seconds < 1:
        value, unit = value * 1000, "ms"
    return format(value.normalize(), "f") + unit


def to_outbound(config: ClientConfig, show_password: bool = False) -> Dict[str, Any]:
    """``config`` as a sing-box ``anytls`` outbound that :func:`load_outbound` reads back to
    the same settings; the password is ``<password>`` unless ``show_password``."""
    outbound: Dict[str, Any] = {
        "type": "anytls",
        "tag": config.tag,
        "server": config.server,
        "server_port": config.server_port,
        "password": config.password if show_password else "<password>",
        "idle_session_check_interval": format_duration(config.idle_session_check_interval),
        "idle_session_timeout": format_duration(config.idle_session_timeout),
        "min_idle_session": config.min_idle_session,
    }
    if not config.tls:
        return outbound
    tls: Dict[str, Any] = {"enabled": True}
    # An IP address as server_name would mean "verify this IP", not "no SNI": leave it out.
    if config.server_name is not None:
        tls["server_name"] = config.server_name
    elif parse_ip(config.server) is None:  # no SNI to a named server (a URI's empty sni=)
        tls["disable_sni"] = True
    if config.insecure:
        tls["insecure"] = True
    if config.certificate is not None:
        tls["certificate"] = config.certificate.splitlines()
    if config.certificate_path is not None:
        tls["certificate_path"] = config.certificate_path
    if config.certificate_pins:
        tls["certificate_public_key_sha256"] = list(config.certificate_pins)
    if config.alpn:
        tls["alpn"] = list(config.alpn)
    if config.fingerprint is not None:
        tls["utls"] = {"enabled": True, "fingerprint": config.fingerprint}
    outbound["tls"] = tls
    return outbound
