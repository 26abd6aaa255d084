"""TLS applied by the server itself, with an ALPN rule that never fails a handshake, and
``--port`` parsing.

ALPN decision. By default (``ALPN_NONE``) the server negotiates no protocol, even when the
client offers some: that is what Go's TLS server with no ``NextProtos`` does, i.e. the anytls-go
and sing-box reference servers, so we look like them. An operator may give a list (``--alpn
h2,http/1.1``) to select from as a web server would: our most preferred protocol that the client
also offers (RFC 7301's rule, and Go's, nginx's and Twisted's). Either way a client whose list
shares nothing with ours still completes the handshake, with no protocol selected; it never gets
a fatal alert.

Why this needs code: Twisted 26.10's ``CertificateOptions._makeContext`` always installs an ALPN
select callback (``setupForALPN``) that answers "no overlap" with an empty selection, which
OpenSSL turns into a fatal ``internal_error`` alert, so sing-box clients with ``tls.alpn`` set
cannot connect to a plain ``ssl:`` endpoint. ``_ServerOptions`` replaces that callback with one
that returns ``NO_OVERLAPPING_PROTOCOLS``. For the same reason ``ssl:`` ports are listened on as
``tcp:`` and wrapped in a ``TLSMemoryBIOFactory`` here. The same wrapping puts TLS on any other
endpoint (``tls:systemd:...``, ``tls:unix:...``) and after the PROXY header of Twisted's
``haproxy:`` wrapper (``haproxy:ssl:...``): that wrapper works on the protocol level, so it wraps
our TLS factory and strips the header before TLS sees the ClientHello.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Dict, List, Optional, Sequence, Tuple

import attr
from OpenSSL import SSL
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory

from .certs import TLSMaterial
from .endpoints import HAPROXY, EndpointString
from .tls_transport import BulkTLSFactory

ALPN_NONE: Tuple[str, ...] = ()


#: TLS 1.3 suites in the order Go's servers (sing-box's among them) choose on hardware with
#: AES instructions: AES-128-GCM first. With OpenSSL's default order and the server's preference
#: (Twisted sets it) we chose AES-256-GCM for clients that asked for AES-128-GCM first; the
#: suite shows in the clear in the ServerHello, so now we answer as sing-box's server does. No
#: CPU difference was measurable (docs/performance.md, "Why the code is shaped this way").
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

#: TLS 1.2: the same order for Go's suites, then Twisted's default list.
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    b"ECDH+AESGCM:ECDH+CHACHA20:DH+AESGCM:DH+CHACHA20:ECDH+AES256:DH+AES256:"
    b"ECDH+AES128:DH+AES:RSA+AESGCM:RSA+AES:!aNULL:!MD5:!DSS"
)

#: OpenSSL's ``SSL_OP_PRIORITIZE_CHACHA`` (pyOpenSSL has no name for it): a client that lists
#: ChaCha20-Poly1305 first (no AES instructions) gets it, as Go's servers do.
OP_PRIORITIZE_CHACHA = 0x00200000


class _ServerOptions(CertificateOptions):
    """``CertificateOptions`` that installs the certificate itself and whose ALPN select
    callback selects from ``alpn`` and otherwise selects nothing, instead of failing.

    The ALPN list is kept here rather than passed as ``acceptableProtocols``, so Twisted
    neither applies its own rule nor advertises the list on connections. The certificate and
    key go to OpenSSL as cryptography objects: pyOpenSSL 26 deprecates its own X509/PKey
    types, which is what Twisted's ``privateKey``/``certificate`` arguments expect.
    """

    def __init__(self, material: TLSMaterial, alpn: Sequence[bytes], **kwargs) -> None:
        super().__init__(**kwargs)
        self._material = material
        self._alpn = tuple(alpn)

    def _makeContext(self, *args, **kwargs) -> SSL.Context:
        context = super()._makeContext(*args, **kwargs)
        context.use_certificate(self._material.certificate)
        context.use_privatekey(self._material.private_key)
        for extra in self._material.chain:
            context.add_extra_chain_cert(extra)
        context.check_privatekey()
        context.set_alpn_select_callback(self._select)  # replaces Twisted's setupForALPN one
        context.set_tls13_ciphersuites(TLS13_SUITES)
        context.set_cipher_list(TLS12_CIPHERS)
        context.set_options(OP_PRIORITIZE_CHACHA)
        return context

    def _select(self, connection: SSL.Connection, offered: List[bytes]):
        for protocol in self._alpn:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS


def server_tls_options(
    material: TLSMaterial, alpn: Sequence[str] = ALPN_NONE
) -> CertificateOptions:
    """Server-side TLS options (an ``IOpenSSLServerConnectionCreator``): TLS 1.2 minimum,
    the cipher order above, ``material``'s certificate and chain, ALPN as described above."""
    return _ServerOptions(
        material, [p.encode("ascii") for p in alpn], raiseMinimumTo=TLSVersion.TLSv1_2
    )


def wrap_tls(factory, tls_options, clock: Optional[IReactorTime] = None) -> TLSMemoryBIOFactory:
    """The listening factory: server-side TLS around ``factory`` (Twisted's TLS transport with
    batched record writes, :mod:`.tls_transport`). ``clock`` (default: the reactor) schedules the TLS
    layer's write aggregation; tests pass their own."""
    return BulkTLSFactory(tls_options, False, factory, clock=clock)


def parse_alpn(text: str) -> Tuple[str, ...]:
    """``"h2,http/1.1"`` -> ``("h2", "http/1.1")``, most preferred first; empty -> no ALPN.

    Each protocol must be 1 to 255 printable ASCII characters (the wire limit is 255 bytes).
    """
    if not text.strip():
        return ALPN_NONE
    protocols: List[str] = []
    for item in text.split(","):
        protocol = item.strip()
        if not protocol:
            raise ValueError(f"empty protocol name in ALPN list {text!r}")
        if len(protocol) > 255 or not re.fullmatch(r"[\x21-\x7e]+", protocol):
            raise ValueError(
                f"ALPN protocol {protocol!r} must be 1 to 255 printable ASCII characters"
            )
        if protocol not in protocols:
            protocols.append(protocol)
    return tuple(protocols)


@attr.frozen(kw_only=True)
class PortSpec:
    """A ``--port`` as we listen on it: a plain endpoint string, and whether we add TLS (with
    which files; None means the ``--cert``/``--key`` or generated ones)."""

    endpoint: str
    tls: bool
    private_key: Optional[str] = None
    cert_key: Optional[str] = None
    extra_cert_chain: Optional[str] = None
    description: str


_FILE_OPTIONS = {
    "privateKey": "private_key",
    "certKey": "cert_key",
    "extraCertChain": "extra_cert_chain",
}
_SUPPORTED = "port, interface, backlog, privateKey, certKey, extraCertChain"


def _number(what: str, text: str, low: int, high: int) -> str:
    if not re.fullmatch(r"[0-9]+", text) or not low <= int(text) <= high:
        raise ValueError(f"{what} must be a number from {low} to {high}, got {text!r}")
    return str(int(text))


def _port_number(kind: str, endpoint: EndpointString) -> str:
    """The port of a ``tcp:``/``tcp6:``/``ssl:`` endpoint (positional or ``port=``)."""
    port = endpoint.argument(0, "port")
    if not port:
        article = "an" if kind == "ssl" else "a"
        raise ValueError(f"{article} {kind} port needs a port number, e.g. {kind}:8443")
    return _number(f"{kind} port", port, 0, 65535)


def parse_port(description: str) -> PortSpec:
    """A ``--port`` string -> what we listen on, and whether we add TLS ourselves:

    * ``ssl:PORT[:interface=X][:backlog=N][:privateKey=K][:certKey=C][:extraCertChain=F]`` (or a
      bare ``PORT``): the matching ``tcp:`` endpoint, wrapped in our TLS.
    * ``tls:ENDPOINT``: any other Twisted endpoint (``systemd:``, ``unix:``, ``tcp6:``, ...),
      wrapped in our TLS. ``privateKey``/``certKey``/``extraCertChain`` keywords anywhere in it
      are ours (they name certificate files, as for ``ssl:``) and are removed from the endpoint.
    * ``haproxy:ssl:...`` and ``haproxy:tls:...``: the same inside Twisted's ``haproxy:``
      wrapper, which reads the PROXY header from the socket before our TLS sees a byte (the
      order HAProxy's ``send-proxy``/``send-proxy-v2`` use).

    As in Twisted, ``certKey`` defaults to ``privateKey`` (and here also the other way round).
    Other ``ssl:`` options are refused rather than ignored; so is TLS twice (``tls:ssl:...``).
    Any other endpoint string is listened on unchanged, without TLS; a ``tcp:``/``tcp6:`` one
    must name its port.
    """
    text = f"ssl:{description}" if re.fullmatch(r"[0-9]+", description) else description
    try:
        endpoint = EndpointString.parse(text)
    except ValueError:
        if text.startswith(("ssl:", "tls:", "haproxy:ssl:", "haproxy:tls:")):
            raise
        return PortSpec(endpoint=description, tls=False, description=description)
    ours = _with_tls(endpoint)
    if ours is None:
        plain = endpoint.innermost(HAPROXY)
        if plain.kind in ("tcp", "tcp6"):
            _port_number(plain.kind, plain)
        return PortSpec(endpoint=description, tls=False, description=description)
    listened, files = ours
    return PortSpec(endpoint=listened.format(), tls=True, description=description, **files)


def _with_tls(endpoint: EndpointString) -> Optional[Tuple[EndpointString, Dict[str, str]]]:
    """For a port we put TLS on, the endpoint to listen on and the certificate files."""
    if endpoint.kind == "ssl":
        return _parse_ssl(endpoint)
    if endpoint.kind == "tls":
        return _parse_tls(endpoint)
    inner = endpoint.unwrap(HAPROXY)
    if inner is not None and inner.kind in ("ssl", "tls"):
        listened, files = _parse_ssl(inner) if inner.kind == "ssl" else _parse_tls(inner)
        return listened.wrap(HAPROXY), files
    return None


#: The listen backlog of TCP ports that give none: Twisted's 50 overflows when a client opens
#: many sessions at once, so we ask for the maximum, as Go servers do (docs/performance.md).
DEFAULT_BACKLOG = 65535


def listen_endpoint(endpoint: str) -> str:
    """``endpoint`` with ``backlog=DEFAULT_BACKLOG`` added when it is a (``haproxy:``) ``tcp:``
    or ``tcp6:`` endpoint that gives no backlog; any other endpoint unchanged."""
    try:
        parsed = EndpointString.parse(endpoint)
    except ValueError:
        return endpoint
    inner = parsed.unwrap(HAPROXY) or parsed
    if inner.kind not in ("tcp", "tcp6") or inner.argument(2, "backlog") is not None:
        return endpoint
    return parsed.with_keyword("backlog", str(DEFAULT_BACKLOG)).format()


def _parse_ssl(endpoint: EndpointString) -> Tuple[EndpointString, Dict[str, str]]:
    if len(endpoint.args) > 1:
        raise ValueError(
            "an ssl port takes one positional argument, the port number; "
            f"give the others as key=value ({_SUPPORTED})"
        )
    options: Dict[str, str] = {}
    for key, value in endpoint.kwargs:
        if key not in ("port", "interface", "backlog") and key not in _FILE_OPTIONS:
            raise ValueError(
                f"ssl port option {key} is not supported; supported options: {_SUPPORTED}"
            )
        if key in options or (key == "port" and endpoint.args):
            raise ValueError(f"ssl port option {key} is given twice")
        if not value and key in _FILE_OPTIONS:
            raise ValueError(f"ssl port option {key} is empty")
        options[key] = value
    listened = EndpointString("tcp", (_port_number("ssl", endpoint),))
    if options.get("interface"):
        listened = listened.with_keyword("interface", options["interface"])
    if "backlog" in options:
        backlog = _number("ssl port backlog", options["backlog"], 1, 65535)
        listened = listened.with_keyword("backlog", backlog)
    files = {_FILE_OPTIONS[k]: v for k, v in options.items() if k in _FILE_OPTIONS}
    return listened, _paired(files)


def _parse_tls(endpoint: EndpointString) -> Tuple[EndpointString, Dict[str, str]]:
    files: Dict[str, str] = {}
    for key, value in endpoint.kwargs:
        if key not in _FILE_OPTIONS:
            continue
        if _FILE_OPTIONS[key] in files:
            raise ValueError(f"tls port option {key} is given twice")
        if not value:
            raise ValueError(f"tls port option {key} is empty")
        files[_FILE_OPTIONS[key]] = value
    inner = endpoint.without_keywords(*_FILE_OPTIONS).unwrap("tls")
    innermost = inner.innermost(HAPROXY) if inner is not None else None
    if inner is None or innermost is None or innermost.kind == HAPROXY or not innermost.kind:
        raise ValueError(
            "tls: needs an endpoint to put TLS on, e.g. tls:tcp:8443 or "
            "tls:systemd:domain=INET:name=anytls"
        )
    if innermost.kind in ("ssl", "tls"):
        raise ValueError(
            f"tls: on an {innermost.kind}: endpoint would apply TLS twice; use ssl:PORT, or tls: "
            "with a plain endpoint such as tls:tcp:PORT"
        )
    return inner, _paired(files)


def _paired(files: Dict[str, str]) -> Dict[str, str]:
    if "private_key" in files or "cert_key" in files:
        files.setdefault("cert_key", files.get("private_key", ""))
        files.setdefault("private_key", files.get("cert_key", ""))
    return files


def check_endpoint(endpoint: str) -> None:
    """Parse ``endpoint`` as Twisted will when listening, without listening, so that an unknown
    endpoint type, a bad argument or a socket that systemd did not pass fails at start with
    one line (``ValueError``) instead of a traceback. A socket passed by systemd must also be
    of the ``domain=`` family: Twisted adopts an IPv6 socket declared ``INET`` without
    complaint, then reports every client's address as nonsense."""
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString

    try:
        parsed = serverFromString(None, endpoint)  # parsers only store the reactor
    except Exception as e:
        if endpoint.startswith(("systemd:", "haproxy:systemd:")) and isinstance(
            e, (IndexError, KeyError)
        ):
            hint = ""
            if "LISTEN_FDNAMES" not in os.environ:
                hint = (
                    " (no LISTEN_FDNAMES: Twisted ignores sockets passed without names; "
                    "systemd-socket-activate needs --fdname=NAME)"
                )
            raise ValueError(
                f"systemd passed no socket matching {endpoint}; start the service through its "
                f".socket unit (FileDescriptorName= there is the name= here){hint}"
            ) from None
        raise ValueError(
            f"Twisted cannot use endpoint {endpoint}: {type(e).__name__}: {e}"
        ) from None
    while hasattr(parsed, "_wrappedEndpoint"):  # haproxy:
        parsed = parsed._wrappedEndpoint
    if isinstance(parsed, AdoptedStreamServerEndpoint):
        duplicate = None
        try:
            duplicate = os.dup(parsed.fileno)
            with socket.socket(fileno=duplicate) as inherited:  # closes the duplicate only
                family = inherited.family
        except OSError as e:
            if duplicate is not None:
                os.close(duplicate)
            raise ValueError(
                f"the socket for {endpoint} (fd {parsed.fileno}) is unusable: {e}"
            ) from None
        if family != parsed.addressFamily:
            expected = {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}
            raise ValueError(
                f"the socket systemd passed for {endpoint} is {family.name}: say "
                f"domain={expected.get(family, family.name[3:])} (ListenStream=PORT alone and "
                "[::]:PORT are INET6, 0.0.0.0:PORT is INET)"
            )
