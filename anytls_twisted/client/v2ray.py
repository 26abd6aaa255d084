"""The client's servers from a v2ray-core-shaped JSON outbound (the seed design's format).

::

    {"outbounds": [{"protocol": "anytls",
                    "settings": {"servers": [{"address": "a.example", "port": 443,
                                              "password": "..."}],
                                 "idle_session_check_interval": 30,
                                 "idle_session_timeout": 30,
                                 "min_idle_session": 5},
                    "streamSettings": {"security": "tls",
                                       "tlsSettings": {"serverName": "a.example",
                                                       "allowInsecure": false,
                                                       "alpn": ["h2"],
                                                       "fingerprint": "chrome"}}}]}

Read as strictly as the sing-box shape (:mod:`.config`): unknown fields are errors naming the
closest known one; v2ray fields that make no difference here are accepted with one warning.
Durations are integer seconds, as in the seed. Facts: client-behaviour.md section 8.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from ..protocol.address import AddressError, parse_host_port, parse_ip
from ..singbox import check_fields, fail
from .config import DEFAULT_PORT, FINGERPRINT_WARNING, ClientConfig, default_sni, password_check

__all__ = ["SEED_DEFAULTS", "is_v2ray", "load_v2ray"]

#: The seed design's "balanced" profile, used for pool fields a v2ray file leaves out:
#: check interval 30 s, idle timeout 30 s, and 5 idle sessions spared by each check.
SEED_DEFAULTS = {
    "idle_session_check_interval": 30,
    "idle_session_timeout": 30,
    "min_idle_session": 5,
}

_OUTBOUND_USED = {"protocol", "settings", "streamSettings"}
_OUTBOUND_QUIET = {"tag"}
_OUTBOUND_IGNORED = {"sendThrough", "proxySettings", "mux", "domainStrategy"}
_SETTINGS_USED = {"servers"} | set(SEED_DEFAULTS)
_SERVER_USED = {"address", "port", "password"}
_SERVER_IGNORED = {"email", "level"}
_STREAM_USED = {"network", "security", "tlsSettings"}
_STREAM_IGNORED = {"sockopt", "tcpSettings", "rawSettings"}
_TLS_USED = {"serverName", "allowInsecure", "alpn", "fingerprint"}
_TLS_IGNORED = {
    "certificates",
    "disableSystemRoot",
    "enableSessionResumption",
    "pinnedPeerCertificateChainSha256",
    "pinnedPeerCertificatePublicKeySha256",
    "minVersion",
    "maxVersion",
    "cipherSuites",
    "curvePreferences",
    "masterKeyLog",
    "rejectUnknownSni",
    "verifyPeerCertInNames",
}


def is_v2ray(document: Any) -> bool:
    """Whether a parsed JSON document is v2ray-shaped: outbounds with ``protocol`` keys, or an
    outbound with one (sing-box's say ``type``)."""
    if not isinstance(document, dict):
        return False
    if "protocol" in document:
        return True
    outbounds = document.get("outbounds")
    return isinstance(outbounds, list) and any(
        isinstance(o, dict) and "protocol" in o for o in outbounds
    )


def _outbound(path: str, document: Mapping[str, Any]) -> Mapping[str, Any]:
    if "outbounds" not in document:
        if document.get("protocol") != "anytls":
            raise fail(path, "protocol", f"is {document.get('protocol')!r}, not 'anytls'")
        return document
    for block in document["outbounds"]:
        if isinstance(block, dict) and block.get("protocol") == "anytls":
            return block
    raise fail(path, "outbounds", 'no outbound with "protocol": "anytls"')


def _int(path: str, field: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise fail(path, field, f"must be a whole number from {low} to {high}")
    return value


def _object(path: str, field: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise fail(path, field, "must be an object")
    return value


def _tls(path: str, stream: Mapping[str, Any], warnings: List[str]) -> Dict[str, Any]:
    """The TLS values common to every server of the outbound."""
    values: Dict[str, Any] = {"tls": True}
    security = stream.get("security", "tls")
    if security not in ("tls", "none"):
        raise fail(path, "streamSettings.security", 'must be "tls" or "none"')
    network = stream.get("network", "tcp")
    if network not in ("tcp", "raw"):
        raise fail(path, "streamSettings.network", 'must be "tcp" (AnyTLS runs over TCP)')
    values["tls"] = security == "tls"
    tls = _object(path, "streamSettings.tlsSettings", stream.get("tlsSettings", {}))
    prefix = "streamSettings.tlsSettings."
    warnings += check_fields(path, dict(tls), prefix, _TLS_USED, _TLS_IGNORED)
    if "serverName" in tls:
        name = tls["serverName"]
        if not isinstance(name, str):
            raise fail(path, prefix + "serverName", "must be a string")
        values["server_name"] = name
    if "allowInsecure" in tls:
        if not isinstance(tls["allowInsecure"], bool):
            raise fail(path, prefix + "allowInsecure", "must be true or false")
        values["insecure"] = tls["allowInsecure"]
    if "alpn" in tls:
        alpn = tls["alpn"]
        if isinstance(alpn, str):
            alpn = alpn.split(",")
        if not isinstance(alpn, list) or not all(isinstance(a, str) and a for a in alpn):
            raise fail(path, prefix + "alpn", "must be a list of protocol names")
        values["alpn"] = tuple(alpn)
    fingerprint = tls.get("fingerprint")
    if fingerprint:
        if not isinstance(fingerprint, str):
            raise fail(path, prefix + "fingerprint", "must be a string")
        values["fingerprint"] = fingerprint
        warnings.append(
            FINGERPRINT_WARNING.format(
                where=path, field="streamSettings.tlsSettings.fingerprint", value=fingerprint
            )
        )
    return values


def _server(
    path: str, index: int, server: Any, password_file: bool
) -> Tuple[str, int, str, List[str]]:
    where = f"settings.servers[{index}]"
    if not isinstance(server, dict):
        raise fail(path, where, "must be an object")
    warnings = check_fields(path, server, where + ".", _SERVER_USED, _SERVER_IGNORED)
    if "address" not in server:
        raise fail(path, where + ".address", "is required")
    address = server["address"]
    if not isinstance(address, str):
        raise fail(path, where + ".address", "must be a host name or IP address")
    ip = parse_ip(address)
    if ip is not None:
        address = str(ip)
    else:
        try:
            if ":" in address:
                raise AddressError("must not carry a port (use port)")
            parse_host_port(address, DEFAULT_PORT)
        except AddressError as e:
            raise fail(path, where + ".address", str(e)) from None
    port = _int(path, where + ".port", server.get("port", DEFAULT_PORT), 1, 65535)
    password = server.get("password", "")
    if not isinstance(password, str):
        raise fail(path, where + ".password", "must be a string")
    password_check(path + f": {where}", password, password_file)
    return address, port, password, warnings


def load_v2ray(
    path: str, document: Mapping[str, Any], password_file: bool = False
) -> List[ClientConfig]:
    """Every server of the first ``anytls`` outbound of a v2ray-shaped document, in order.

    ``path`` names the file in errors; ``password_file`` allows empty passwords (one file then
    gives every server its password)."""
    outbound = _outbound(path, document)
    warnings = check_fields(
        path, dict(outbound), "", _OUTBOUND_USED | _OUTBOUND_QUIET, _OUTBOUND_IGNORED
    )
    settings = _object(path, "settings", outbound.get("settings"))
    warnings += check_fields(path, dict(settings), "settings.", _SETTINGS_USED, ())
    pool: Dict[str, Any] = {}
    for field, default in SEED_DEFAULTS.items():
        value = settings.get(field, default)
        pool[field] = _int(path, "settings." + field, value, 0, 86400)
    servers = settings.get("servers")
    if not isinstance(servers, list) or not servers:
        raise fail(path, "settings.servers", "must be a non-empty list of servers")
    stream = _object(path, "streamSettings", outbound.get("streamSettings", {}))
    warnings += check_fields(path, dict(stream), "streamSettings.", _STREAM_USED, _STREAM_IGNORED)
    tls = _tls(path, stream, warnings)
    tag = outbound.get("tag", "anytls")
    if not isinstance(tag, str):
        raise fail(path, "tag", "must be a string")
    configs = []
    for index, server in enumerate(servers):
        address, port, password, more = _server(path, index, server, password_file)
        values: Dict[str, Any] = dict(pool, **tls)
        name = values.pop("server_name", None)
        values.update(
            server=address,
            server_port=port,
            password=password,
            server_name=default_sni(name if name else address),
            tag=tag if len(servers) == 1 else f"{tag}[{index}]",
            warnings=tuple(warnings + more) if index == 0 else tuple(more),
        )
        for field in ("idle_session_check_interval", "idle_session_timeout"):
            values[field] = float(values[field])
        configs.append(ClientConfig(**values))
    return configs
