"""``load(options)``: the parsed command line and the files it names, as frozen Settings.

Start-up and every reload call it on the same parsed options. It reads the config, password,
padding and certificate files (generating the self-signed certificate a TLS port may need),
prints nothing, and returns the config file's warnings in ``Settings.warnings``. A problem is a
:class:`ConfigError`: one line naming the option or the file."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import attr
from twisted.python import usage

from .. import certs, clientconfig, nullmetrics, tls
from ..protocol.address import DestinationPolicy
from ..protocol.auth import UserTable
from ..protocol.fallback import FallbackRoutes
from . import configfile, fallback, workers
from .settings import DEFAULT_PORT, ClientChoices, Limits, Port, ServerConfig, Settings, Workers

if TYPE_CHECKING:
    from .options import Options

#: ServerConfig's fields given by the option of the same name (``--auth-timeout``).
_SAME_NAMED = "auth_timeout connect_timeout synack_guard udp_timeout shutdown_grace".split()
_SAME_NAMED += ["idle_session_timeout", "idle_session_check_interval"]


class ConfigError(usage.UsageError):
    """A configuration that cannot be used; the message is one line naming the option or file."""


@contextlib.contextmanager
def _reported(prefix: str = "") -> Iterator[None]:
    """Turn the ``ValueError`` or ``CertificateError`` of a parser or reader into a ConfigError."""
    try:
        yield
    except (ValueError, certs.CertificateError) as e:
        raise ConfigError(f"{prefix}{e}") from None


def check_strings(options: Options) -> None:
    """What can be checked in the options' own values, without reading a file."""
    _ports(options["port"])
    _alpn(options["alpn"] or "")
    if options["fallback"] is not None:
        _fallback_endpoint("--fallback", options["fallback"])
    _public_address(options["public-address"])
    _metrics(options["metrics"], 0)
    _workers(options, [])


def load(options: Options) -> Settings:
    """Build the settings from parsed ``twistd anytls`` options."""
    with _reported():
        file = configfile.load(options["config"]) if options["config"] else None
        users = configfile.users(options["password"], options["password-file"], file)
        padding = configfile.padding(options["padding-scheme"], file)
    specs = _ports(options["port"] or [(file and file.port_description()) or DEFAULT_PORT])
    cert, key = options["cert"], options["key"]
    if cert is None and file and file.certificate_path:
        cert, key = file.certificate_path, file.key_path
    client = ClientChoices(
        server_name=options["server-name"] or (file and file.server_name) or "localhost",
        public_address=_public_address(options["public-address"]),
        show_password=bool(options["show-password"]),
        print_and_exit=bool(options["print-client-config"]),
        format=options["client-config-format"],
    )
    alpn = _alpn(
        options["alpn"] if options["alpn"] is not None else ",".join(file.alpn if file else ())
    )
    routes = _fallback(options["fallback"], file)
    state_dir = options["state-dir"] or certs.default_state_dir()
    store = certs.Certificates(state_dir, client.server_name)
    ports = tuple(_port(spec, cert, key, store, alpn) for spec in specs)
    process = _workers(options, specs)
    return Settings(
        config=ServerConfig(
            users=UserTable(users),
            padding=padding,
            policy=DestinationPolicy(allow_private=bool(options["allow-private"])),
            max_streams=options["max-streams-per-session"],
            **_heartbeats(options, file),
            fallback=routes,
            limits=_limits(options, file),
            **{field: options[field.replace("_", "-")] for field in _SAME_NAMED},
        ),
        users=users,
        ports=ports,
        alpn=alpn,
        metrics=_metrics(options["metrics"], process.index),
        workers=process,
        log_level=options["log-level"],
        client=client,
        certificate_check_interval=options["certificate-check-interval"],
        watched=store.files(),
        generated_certificate=store.generated,
        warnings=(file.warnings if file else ()) + _fallback_warnings(routes, alpn, file),
    )


def _fallback_endpoint(where: str, endpoint: str) -> str:
    with _reported(f"{where}: "):
        fallback.check_endpoint(endpoint)
    return endpoint


def _fallback(option: Optional[str], file: Optional[configfile.FileSettings]) -> FallbackRoutes:
    """``--fallback`` (else the file's ``fallback``) and the file's ``fallback_for_alpn``."""
    path = file.path if file else ""
    default = option
    if default is None and file and file.fallback:
        default = _fallback_endpoint(f"{path}: fallback", file.fallback)
    by_alpn = tuple(
        (protocol, _fallback_endpoint(f"{path}: fallback_for_alpn.{protocol}", endpoint))
        for protocol, endpoint in (file.fallback_for_alpn if file else ())
    )
    return FallbackRoutes(default, by_alpn)


def _fallback_warnings(
    routes: FallbackRoutes, alpn: Tuple[str, ...], file: Optional[configfile.FileSettings]
) -> Tuple[str, ...]:
    unused = routes.unreachable(alpn)
    if not unused or file is None:
        return ()
    selected = ", ".join(alpn) or "none"
    return (
        f"{file.path}: fallback_for_alpn {', '.join(unused)} is never used: the server selects "
        f"ALPN only from --alpn or tls.alpn (now: {selected}), see docs/tls.md",
    )


def _heartbeats(options: Options, file: Optional[configfile.FileSettings]) -> Dict[str, Any]:
    """``heartbeat_interval``/``heartbeat_timeout``: the option if given, else the config
    file's field, else the default (so a reload applies a changed field)."""
    values = {}
    for field in ("heartbeat_interval", "heartbeat_timeout"):
        value = options[field.replace("_", "-")]
        if value is None and file is not None:
            value = getattr(file, field)
        if value is not None:
            values[field] = value
    return values


def _limits(options: Options, file: Optional[configfile.FileSettings]) -> Limits:
    """The abuse limits: each option given on the command line, else the config file's
    ``limits`` field of the same name, else the default."""
    values: Dict[str, Any] = dict(file.limits) if file else {}
    for field in attr.fields_dict(Limits):
        given = options[field.replace("_", "-")]
        if given is not None:
            values[field] = given
    return Limits(**values)


def _ports(descriptions: Sequence[str]) -> List[tls.PortSpec]:
    specs = []
    for description in descriptions:
        with _reported(f"--port {description}: "):
            specs.append(tls.parse_port(description))
            tls.check_endpoint(specs[-1].endpoint)
    return specs


def _alpn(text: str) -> Tuple[str, ...]:
    with _reported("--alpn: "):
        return tls.parse_alpn(text)


def _public_address(text: Optional[str]) -> Optional[Tuple[str, Optional[int]]]:
    with _reported("--public-address: "):
        return None if text is None else clientconfig.parse_public_address(text)


def _metrics(endpoint: Optional[str], index: int) -> Optional[str]:
    if endpoint is not None:
        with _reported(f"--metrics {endpoint}: "):
            nullmetrics.check_endpoint(endpoint)
    with _reported():
        return workers.metrics_for(endpoint, index)  # this process's: worker i, port plus i


def _port(
    spec: tls.PortSpec,
    cert: Optional[str],
    key: Optional[str],
    store: certs.Certificates,
    alpn: Tuple[str, ...],
) -> Port:
    """A port; a TLS one with its certificate (its own files, else ``cert``/``key``) and TLS."""
    if not spec.tls:
        return Port(spec=spec)
    with _reported():
        material = store.get(spec.cert_key or cert, spec.private_key or key, spec.extra_cert_chain)
    return Port(spec=spec, material=material, tls_options=tls.server_tls_options(material, alpn))


def _workers(options: Options, specs: Sequence[tls.PortSpec]) -> Workers:
    with _reported():  # the ports and --metrics are checked here for --workers
        return workers.plan(
            options["workers"],
            options["worker-index"],
            options["worker-fds"],
            [spec.endpoint for spec in specs],
            options["metrics"],
            options.argv,
            options.parent.get("logger") if options.parent is not None else None,
        )
