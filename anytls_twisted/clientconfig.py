"""What a client needs to connect: a sing-box outbound and an ``anytls://`` URI per port.

At start the server logs, for every TLS port, a ready sing-box ``anytls`` outbound (one line of
JSON) and the matching URI; ``--print-client-config`` prints the same to stdout and exits
(``--client-config-format``: both, or one JSON document, or the URIs). Everything here is a
pure function of the settings and the loaded certificates, except :func:`log_client_configs`
and :func:`print_client_config`, which log or write what the others build.

Choices (docs/configuration.md, "Client configuration"):

* ``server``: ``--public-address`` if given, else the listening interface when it is a specific
  address, else the placeholder ``YOUR_SERVER_ADDRESS``. ``server_port``: the port of
  ``--public-address HOST:PORT`` if given, else the listening port.
* ``tls.server_name``: a name the certificate holds: the public address when the certificate
  names it, else its first DNS name (then IP address, then common name), else
  ``--server-name``.
* A self-signed certificate (the generated one, or an operator's) is trusted by its public-key
  pin (``tls.certificate_public_key_sha256``, sing-box 1.13+). The URI has no field for a pin,
  so for such a certificate it says ``insecure=1``. A CA-issued certificate gets neither.
* The password is the placeholder ``<password>`` unless the operator asks (``--show-password``).
* Plain (non-TLS) ports sit behind a TLS-terminating proxy: their block names no pin, and its
  port is only known from ``--public-address HOST:PORT`` or the endpoint.

The URI follows anytls-go's ``docs/uri_scheme.md``:
``anytls://PASSWORD@HOST:PORT/?sni=NAME&insecure=1``, the password percent-encoded, IPv6
literals in brackets.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from typing import IO, Iterable, List, Optional, Sequence, Tuple

import attr
from cryptography import x509
from cryptography.x509.oid import NameOID

from .certs import TLSMaterial
from .endpoints import HAPROXY, EndpointString
from .logs import get_logger

_log = get_logger("anytls_twisted.banner")

#: What ``--print-client-config`` prints (``--client-config-format``).
CLIENT_CONFIG_FORMATS = ("both", "json", "uri")
ADDRESS_PLACEHOLDER = "YOUR_SERVER_ADDRESS"
PASSWORD_PLACEHOLDER = "<password>"
_WILDCARD_INTERFACES = ("", "0.0.0.0", "::", "0:0:0:0:0:0:0:0", "::0")


class JSONText(dict):
    """A dict that formats as compact JSON, so a log line's ``{outbound}`` is copyable JSON
    while a JSON log observer still gets a nested object."""

    def __format__(self, spec: str) -> str:
        return format(to_json(self), spec)

    def __str__(self) -> str:
        return to_json(self)


@attr.frozen(kw_only=True)
class ClientEndpoint:
    """What a client dials for one ``--port``."""

    port_description: str  # the --port as given
    server: str  # host name, IP literal, or ADDRESS_PLACEHOLDER
    server_port: int  # the port the client dials: --public-address's, else the listening one
    server_name: str  # tls.server_name
    pin: Optional[str]  # tls.certificate_public_key_sha256 (self-signed certificates only)
    tls: bool  # False: a plain port behind a TLS-terminating proxy
    certificate_path: Optional[str] = None  # the pinned certificate's file, for sing-box 1.12

    @property
    def placeholder(self) -> bool:
        return self.server == ADDRESS_PLACEHOLDER

    @property
    def insecure(self) -> bool:
        """The URI's ``insecure=1``: it cannot carry the pin of a self-signed certificate."""
        return self.pin is not None


# --------------------------------------------------------------------------------------------
# Addresses


def parse_public_address(text: str) -> Tuple[str, Optional[int]]:
    """``HOST``, ``HOST:PORT``, ``IPV6`` or ``[IPV6]:PORT`` -> ``(host, port or None)``."""
    text = text.strip()
    port_text: Optional[str] = None
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", text)
        if not match:
            raise ValueError(f"{text!r} is not [IPV6] or [IPV6]:PORT")
        host, port_text = match.group(1), match.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{text!r} is neither HOST[:PORT] nor an IPv6 address") from None
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"{text!r} has no valid host")
    if port_text is None:
        return host, None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} must be a number from 1 to 65535")
    return host, int(port_text)


def listen_address(endpoint: str) -> Tuple[Optional[str], Optional[int]]:
    """``(interface or None, port or None)`` of a ``tcp:``/``tcp6:``/``ssl:`` endpoint string,
    also under ``haproxy:``; ``(None, None)`` for kinds without a port (unix, systemd)."""
    try:
        parsed = EndpointString.parse(endpoint).innermost(HAPROXY)
    except ValueError:
        return None, None
    if parsed.kind not in ("tcp", "tcp6", "ssl"):
        return None, None
    port = parsed.argument(0, "port")
    return (
        parsed.keyword("interface"),
        int(port) if port is not None and re.fullmatch(r"[0-9]{1,5}", port) else None,
    )


def specific_interface(interface: Optional[str]) -> Optional[str]:
    """The interface if clients could dial it, else None (the wildcard addresses)."""
    if interface is None or interface.strip() in _WILDCARD_INTERFACES:
        return None
    try:
        if ipaddress.ip_address(interface).is_unspecified:
            return None
    except ValueError:
        pass
    return interface


# --------------------------------------------------------------------------------------------
# Certificates


def is_self_signed(cert: x509.Certificate) -> bool:
    """Issuer equals subject and the certificate's own key verifies its signature."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:
        return False
    return True


def certificate_names(cert: x509.Certificate) -> List[str]:
    """DNS names, then IP addresses from the SAN, then the common name."""
    names: List[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names += [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value if isinstance(attribute.value, str) else ""
        if value and value not in names:
            names.append(value)
    return names


def _covers(name: str, host: str) -> bool:
    name, host = name.lower().rstrip("."), host.lower().rstrip(".")
    if name.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == name[2:]
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(host)
    except ValueError:
        return name == host


def choose_server_name(names: Sequence[str], public_host: Optional[str], fallback: str) -> str:
    """The public host if the certificate names it, else its first usable name, else
    ``fallback``; wildcards are only used through a public host they cover."""
    if public_host and any(_covers(name, public_host) for name in names):
        return public_host
    for name in names:
        if not name.startswith("*."):
            return name
    return fallback


# --------------------------------------------------------------------------------------------
# Building the blocks


def client_endpoint(
    spec,
    certificate: Optional[x509.Certificate],
    pin: Optional[str],
    server_name_option: str,
    public_address: Optional[Tuple[str, Optional[int]]] = None,
    certificate_path: Optional[str] = None,
) -> Optional[ClientEndpoint]:
    """The client's view of one ``--port`` (a ``tls.PortSpec``): ``certificate``, ``pin`` and
    ``certificate_path`` are its TLS material's (None for a plain port). None when no port can
    be named."""
    interface, listen_port = listen_address(spec.endpoint)
    public_host, public_port = public_address if public_address else (None, None)
    server = public_host or specific_interface(interface) or ADDRESS_PLACEHOLDER
    server_port = public_port or listen_port
    if not server_port:  # unix:, systemd:, or port 0 (chosen by the system)
        return None
    if certificate is not None:
        server_name = choose_server_name(
            certificate_names(certificate), public_host, server_name_option
        )
        pin = pin if is_self_signed(certificate) else None
    else:
        # Behind a TLS-terminating proxy: its certificate is unknown here.
        server_name, pin = server_name_option, None
        if public_host and not _is_ip(public_host):
            server_name = public_host
    return ClientEndpoint(
        port_description=spec.description,
        server=server,
        server_port=server_port,
        server_name=server_name,
        pin=pin,
        tls=certificate is not None,
        certificate_path=certificate_path if pin is not None else None,
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def unique(endpoints: Iterable[Optional[ClientEndpoint]]) -> List[ClientEndpoint]:
    """Drop Nones and endpoints a client would configure identically (e.g. the IPv4 and
    IPv6 wildcard ports of one server)."""
    seen, result = set(), []
    for endpoint in endpoints:
        if endpoint is None:
            continue
        key = (endpoint.server, endpoint.server_port, endpoint.server_name, endpoint.pin)
        if key not in seen:
            seen.add(key)
            result.append(endpoint)
    return result


def outbound(
    endpoint: ClientEndpoint, password: Optional[str] = None, tag: str = "anytls"
) -> JSONText:
    """A sing-box ``anytls`` outbound (1.12 to 1.14; a pin needs 1.13+)."""
    tls: dict = {"enabled": True, "server_name": endpoint.server_name}
    if endpoint.pin is not None:
        tls["certificate_public_key_sha256"] = [endpoint.pin]
    return JSONText(
        type="anytls",
        tag=tag,
        server=endpoint.server,
        server_port=endpoint.server_port,
        password=PASSWORD_PLACEHOLDER if password is None else password,
        tls=tls,
    )


def uri(endpoint: ClientEndpoint, password: Optional[str] = None) -> str:
    """``anytls://PASSWORD@HOST:PORT/?sni=NAME[&insecure=1]`` (anytls-go docs/uri_scheme.md)."""
    auth = PASSWORD_PLACEHOLDER if password is None else urllib.parse.quote(password, safe="")
    host = endpoint.server
    if ":" in host:
        host = f"[{host}]"
    query = [("sni", endpoint.server_name)]
    if endpoint.insecure:
        query.append(("insecure", "1"))
    return f"anytls://{auth}@{host}:{endpoint.server_port}/?{urllib.parse.urlencode(query)}"


def to_json(value, indent: Optional[int] = None) -> str:
    if indent is None:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(value, indent=indent, ensure_ascii=False)


def tags(count: int) -> List[str]:
    return ["anytls"] + [f"anytls-{i}" for i in range(2, count + 1)]


def hints(endpoints: Sequence[ClientEndpoint], password_shown: bool) -> List[str]:
    """What the operator still has to fill in or know, one sentence each."""
    notes = []
    if any(e.placeholder for e in endpoints):
        notes.append(
            f"replace {ADDRESS_PLACEHOLDER} with this server's public address (or start with "
            "--public-address HOST[:PORT])"
        )
    if not password_shown:
        notes.append(f"replace {PASSWORD_PLACEHOLDER} with the password (or add --show-password)")
    if any(e.pin is not None for e in endpoints):
        paths = sorted({e.certificate_path for e in endpoints if e.certificate_path})
        where = " or ".join(paths) or "the certificate file"
        notes.append(
            "tls.certificate_public_key_sha256 needs sing-box 1.13 or later (for 1.12 use "
            f"tls.certificate_path with a copy of {where}); the URI cannot carry the pin, "
            "so it says insecure=1"
        )
    if any(not e.tls for e in endpoints):
        notes.append(
            "plain ports: clients connect to your TLS-terminating proxy; match server, "
            "server_port and tls to it"
        )
    return notes


def render(endpoints: Sequence[ClientEndpoint], password: Optional[str] = None) -> str:
    """``--print-client-config``: per endpoint, the outbound as indented JSON, then the URI."""
    blocks = []
    for endpoint, tag in zip(endpoints, tags(len(endpoints))):
        blocks.append(
            to_json(outbound(endpoint, password, tag), indent=2)
            + "\n"
            + uri(endpoint, password)
            + "\n"
        )
    return "\n".join(blocks)


def render_json(endpoints: Sequence[ClientEndpoint], password: Optional[str] = None) -> str:
    """``--client-config-format json``: one JSON document, ``{"outbounds": [...]}`` (a sing-box
    config fragment; ``jq '.outbounds[0]'`` takes the first)."""
    outbounds = [outbound(e, password, t) for e, t in zip(endpoints, tags(len(endpoints)))]
    return to_json({"outbounds": outbounds}, indent=2) + "\n"


def render_uris(endpoints: Sequence[ClientEndpoint], password: Optional[str] = None) -> str:
    """``--client-config-format uri``: one ``anytls://`` URI per line."""
    return "".join(uri(endpoint, password) + "\n" for endpoint in endpoints)


def endpoints_for(
    ports: Iterable[Tuple[object, Optional[TLSMaterial]]],
    server_name: str,
    public_address: Optional[Tuple[str, Optional[int]]] = None,
) -> List[ClientEndpoint]:
    """What clients dial: one endpoint per ``(tls.PortSpec, its TLS material or None)``,
    without duplicates (docs/configuration.md, "Client configuration")."""
    return unique(
        client_endpoint(
            spec,
            material.certificate if material else None,
            material.pin if material else None,
            server_name,
            public_address,
            material.cert_path if material else None,
        )
        for spec, material in ports
    )


def shown_password(users: Sequence[Tuple[str, str]], show: bool) -> Optional[str]:
    """The first user's password with ``--show-password``, else None (the placeholder)."""
    return users[0][1] if show and users else None


def print_client_config(
    endpoints: Sequence[ClientEndpoint],
    password: Optional[str],
    form: str,
    out: IO[str],
    err: IO[str],
) -> int:
    """``--print-client-config``: the configuration on ``out`` in the ``form`` of
    ``--client-config-format``, the hints on ``err``; the exit status."""
    if not endpoints:
        err.write(
            "twistd anytls: no port has a port number clients could dial; "
            "give --public-address HOST:PORT\n"
        )
        return 1
    renderer = {"json": render_json, "uri": render_uris}.get(form, render)
    out.write(renderer(endpoints, password))
    out.flush()
    for hint in hints(endpoints, password is not None):
        err.write(f"note: {hint}\n")
    return 0


def log_client_configs(
    endpoints: Sequence[ClientEndpoint], password: Optional[str] = None, log=None
) -> None:
    """Log the outbound and the URI for every endpoint, then the hints (info level)."""
    log = log or _log
    for endpoint, tag in zip(endpoints, tags(len(endpoints))):
        log.info(
            "client config for {port}: sing-box outbound {outbound}",
            port=endpoint.port_description,
            outbound=outbound(endpoint, password, tag),
        )
        log.info(
            "client config for {port}: URI {uri}",
            port=endpoint.port_description,
            uri=uri(endpoint, password),
        )
    if endpoints:
        for note in hints(endpoints, password is not None):
            log.info("client config: {hint}", hint=note)
