"""TLS applied by the server itself, with our own ALPN rule, and ``--port`` parsing.

ALPN decision: by default the server negotiates **no** ALPN, even when the client offers some.
That is what the reference servers do (Go's TLS server with no ``NextProtos`` ignores the
client's list), so we look like them on the wire. An operator may give a list (``--alpn
h2,http/1.1``) to select from, as a web server would. In both cases a client whose list shares
nothing with ours still completes the handshake, with no protocol selected.

Why not Twisted's ``ssl:`` endpoint: ``CertificateOptions`` (Twisted 26.10) always installs an
ALPN select callback that answers "no overlap" with an empty selection, which OpenSSL turns into
a fatal ``internal_error`` alert, so sing-box clients configured with ``tls.alpn`` cannot
connect. We replace that callback. Applying TLS ourselves (``TLSMemoryBIOFactory`` over a plain
listener) also lets TLS sit under ``haproxy:`` or ``systemd:`` ports later.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import attr
from OpenSSL import SSL, crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory

from .certs import TLSMaterial


class _ServerOptions(CertificateOptions):
    """``CertificateOptions`` whose ALPN callback never fails the handshake."""

    def __init__(self, alpn: Sequence[bytes], **kwargs) -> None:
        super().__init__(**kwargs)
        self._alpn = tuple(alpn)

    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:
        context = super()._makeContext(skipCiphers)
        context.set_alpn_select_callback(self._select)
        return context

    def _select(self, connection, offered: Sequence[bytes]):
        for protocol in self._alpn:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS


def _to_openssl(cert):
    return crypto.X509.from_cryptography(cert)


def server_tls_options(material: TLSMaterial, alpn: Sequence[str] = ()) -> CertificateOptions:
    """Server TLS options (TLS 1.2 minimum) for ``material``, selecting from ``alpn``."""
    return _ServerOptions(
        [p.encode("ascii") for p in alpn],
        privateKey=crypto.PKey.from_cryptography_key(material.private_key),
        certificate=_to_openssl(material.certificate),
        extraCertChain=[_to_openssl(c) for c in material.chain],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def wrap_tls(factory, options) -> TLSMemoryBIOFactory:
    """The listening factory: TLS (server side) around the session factory."""
    return TLSMemoryBIOFactory(options, False, factory)


def parse_alpn(text: str) -> Tuple[str, ...]:
    """``h2,http/1.1`` -> ``("h2", "http/1.1")``; empty -> no ALPN."""
    protocols = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in protocols:
        if not p.isascii() or len(p) > 255:
            raise ValueError(f"ALPN protocol {p!r} must be 1 to 255 ASCII characters")
    return protocols


@attr.frozen
class PortSpec:
    """A ``--port`` as we listen on it: a plain endpoint, and whether we add TLS to it."""

    endpoint: str
    tls: bool
    description: str
    private_key: Optional[str] = None
    cert_key: Optional[str] = None
    extra_cert_chain: Optional[str] = None


_SSL_LISTEN_KEYS = ("port", "interface", "backlog")
_SSL_FILE_KEYS = {"privateKey": "private_key", "certKey": "cert_key", "extraCertChain": "extra_cert_chain"}


def _split(description: str) -> List[str]:
    """Split an endpoint string at unescaped colons, keeping escapes (as Twisted's parser)."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return text.replace("\\:", ":").replace("\\\\", "\\")


def parse_port(description: str) -> PortSpec:
    """``ssl:PORT[:k=v...]`` (or a bare number) -> a ``tcp:`` listener plus our TLS.

    Any other endpoint type is listened on as it is, without TLS.
    """
    if description.isdigit():
        description = f"ssl:{description}"
    parts = _split(description)
    if parts[0] != "ssl":
        return PortSpec(endpoint=description, tls=False, description=description)
    listen: Dict[str, str] = {}
    files: Dict[str, str] = {}
    positional = []
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            positional.append(part)
        elif key in _SSL_LISTEN_KEYS:
            listen[key] = value
        elif key in _SSL_FILE_KEYS:
            files[_SSL_FILE_KEYS[key]] = _unescape(value)
        else:
            raise ValueError(
                f"ssl port option {key} is not supported; use port, interface, backlog, "
                "privateKey, certKey and extraCertChain"
            )
    if positional:
        if len(positional) > 1 or "port" in listen:
            raise ValueError("give the port once")
        listen["port"] = positional[0]
    if not listen.get("port", "").isdigit():
        raise ValueError("an ssl port needs a port number")
    if "private_key" in files or "cert_key" in files:
        files.setdefault("cert_key", files.get("private_key"))
        files.setdefault("private_key", files.get("cert_key"))
    endpoint = ":".join(["tcp", listen.pop("port")] + [f"{k}={v}" for k, v in listen.items()])
    return PortSpec(endpoint=endpoint, tls=True, description=description, **files)
