"""``twistd anytls`` command-line options, parsed and checked as strings and numbers only:
nothing here reads a file or keeps a derived value (:func:`.load.load` does). An error is one
line naming the option."""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from twisted.python import usage

from .. import logs
from .._version import __version__
from ..cli import number_option as _number
from ..clientconfig import CLIENT_CONFIG_FORMATS
from . import configfile, load
from . import settings as defaults

_seconds = _number(float, "a positive number", lambda value: value > 0)
_off_or_seconds = _number(float, "0 (off) or a positive number", lambda value: value >= 0)
_count = _number(int, "a positive integer", lambda value: value > 0)
_index = _number(int, "a whole number", lambda value: value >= 0)
_rate = _number(float, "a number, 0 or more", lambda value: value >= 0)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run an AnyTLS proxy server. Clients (sing-box, mihomo, anytls-go) authenticate with a "
        "password and relay TCP streams and UDP-over-TCP flows through it. With no certificate "
        "files, a long-lived self-signed certificate is generated in the state directory and "
        "its public-key pin is logged for the clients' certificate_public_key_sha256."
    )
    # One row per option, help text included (too long for the formatter's lines).
    # fmt: off
    optParameters = [
        ["config", None, None, "A JSON file in the shape of a sing-box anytls inbound (users, listen, listen_port, padding_scheme, tls), or a whole sing-box config whose first anytls inbound is used. Unknown fields are errors. Command-line options override it; SIGHUP reloads it."],
        ["password", None, None, "The password clients authenticate with (user 'default'; replaces the config file's users). Visible in ps; prefer --password-file."],
        ["password-file", None, None, "A file holding the password (first line; surrounding whitespace stripped)."],
        ["state-dir", None, None, "Where the generated certificate is kept. [default: $STATE_DIRECTORY, else $XDG_STATE_HOME/anytls-twisted, else ~/.local/state/anytls-twisted]"],
        ["server-name", None, None, "The name in the generated certificate (clients' tls.server_name). [default: the config file's tls.server_name, else localhost]"],
        ["cert", None, None, "Certificate file (PEM, chain after the leaf) for ssl: ports that name no certKey."],
        ["key", None, None, "Private key file (PEM) for ssl: ports that name no privateKey."],
        ["alpn", None, None, "ALPN protocols to select from, comma-separated (e.g. h2,http/1.1). [default: the config file's tls.alpn, else none: negotiate no ALPN, like the reference servers; clients offering ALPN are accepted either way]"],
        ["fallback", None, None, "A Twisted client endpoint (e.g. tcp:127.0.0.1:8080) that connections which are not AnyTLS clients (a wrong password, a browser) are relayed to, byte for byte, the bytes already read included: a decoy web site. The config file's fallback_for_alpn routes by negotiated ALPN. [default: the config file's fallback, else none: such connections are closed]"],
        ["padding-scheme", None, None, "A padding scheme file sent to clients whose scheme differs. [default: the protocol's default scheme]"],
        ["auth-timeout", None, defaults.AUTH_TIMEOUT, "Seconds allowed for the TLS handshake plus the auth preamble.", _seconds("auth-timeout")],
        ["connect-timeout", None, defaults.CONNECT_TIMEOUT, "Seconds allowed to resolve and connect to an origin.", _seconds("connect-timeout")],
        ["synack-guard", None, defaults.SYNACK_GUARD, "Seconds after which a still-pending connect is acknowledged anyway, so sing-box's 3 s watchdog does not close reused sessions; a later failure ends the stream with FIN.", _seconds("synack-guard")],
        ["idle-session-timeout", None, defaults.IDLE_SESSION_TIMEOUT, "Close sessions with no streams and no frames for this many seconds. Longer than clients' own pools (sing-box: 30-60 s), so clients normally close first.", _seconds("idle-session-timeout")],
        ["idle-session-check-interval", None, defaults.IDLE_SESSION_CHECK_INTERVAL, "Seconds between idle-session checks (with heartbeats on, at most half --heartbeat-interval and half --heartbeat-timeout).", _seconds("idle-session-check-interval")],
        ["heartbeat-interval", None, None, f"Ask idle sessions (no open streams) of protocol v2 clients that sent nothing for this many seconds with a heartbeat, and close those that do not answer within --heartbeat-timeout; 0: never. Stock clients answer and never send heartbeats themselves. [default: the config file's heartbeat_interval, else {defaults.HEARTBEAT_INTERVAL:g}]", _off_or_seconds("heartbeat-interval")],
        ["heartbeat-timeout", None, None, f"Seconds a heartbeat may wait for its answer before the session is closed. [default: the config file's heartbeat_timeout, else {defaults.HEARTBEAT_TIMEOUT:g}]", _seconds("heartbeat-timeout")],
        ["udp-timeout", None, defaults.UDP_TIMEOUT, "Close a UDP-over-TCP stream after this many seconds without datagrams.", _seconds("udp-timeout")],
        ["max-streams-per-session", None, defaults.MAX_STREAMS_PER_SESSION, "Concurrent streams one session may open.", _count("max-streams-per-session")],
        ["connection-rate", None, None, f"New connections a second one source address (an IPv6 /64) may open on TLS and haproxy: ports; more are closed at once, before any TLS. 0: no limit. [default: the config file's limits.connection_rate, else {defaults.CONNECTION_RATE:g}]", _rate("connection-rate")],
        ["connection-burst", None, None, f"New connections one source may open at once before --connection-rate applies. [default: the config file's limits.connection_burst, else {defaults.CONNECTION_BURST}]", _count("connection-burst")],
        ["max-sessions", None, None, f"Connections open at once (sessions, and connections still in the TLS handshake or authentication); more are closed at once. 0: no limit. [default: the config file's limits.max_sessions, else {defaults.MAX_SESSIONS}]", _index("max-sessions")],
        ["max-sessions-per-user", None, None, f"Sessions one user may have open at once; more are closed with an Alert after authentication. 0: no limit. [default: the config file's limits.max_sessions_per_user, else {defaults.MAX_SESSIONS_PER_USER}]", _index("max-sessions-per-user")],
        ["max-streams", None, None, f"Streams open at once over all sessions; more are refused with a SYNACK error and FIN. 0: no limit. [default: the config file's limits.max_streams, else {defaults.MAX_STREAMS}]", _index("max-streams")],
        ["shutdown-grace", None, defaults.SHUTDOWN_GRACE, "Seconds sessions get to close at shutdown before they are aborted.", _seconds("shutdown-grace")],
        ["certificate-check-interval", None, defaults.CERTIFICATE_CHECK_INTERVAL, "Seconds between checks of the certificate and key files; a change reloads them (as SIGHUP does).", _seconds("certificate-check-interval")],
        ["log-level", None, "info", "Lowest level logged: debug (per-stream events), info, warn or error."],
        ["log-format", None, "text", "text (twistd's lines) or json: one JSON object per line on stdout (for journald and log shippers; needs -n, refused with --logfile)."],
        ["public-address", None, None, "HOST or HOST:PORT clients dial ([IPV6]:PORT), for the client config logged at start. [default: the listening interface if specific, else a placeholder]"],
        ["metrics", None, None, "A Twisted endpoint serving Prometheus metrics at /metrics and a health check at /healthz, e.g. tcp:9095:interface=127.0.0.1. [default: off]"],
        ["workers", None, 1, "Processes serving the (TCP) ports, each with its own reactor; worker i serves --metrics on its port plus i (docs/scaling.md).", _count("workers")],
        ["worker-fds", None, None, "Internal (set by the parent for its workers)."],
        ["worker-index", None, 0, "Internal (set by the parent for its workers).", _index("worker-index")],
        ["client-config-format", None, "both", 'What --print-client-config prints: both (per port, the sing-box outbound as indented JSON, then its anytls:// URI), json (one JSON document, {"outbounds": [...]}, for jq and sing-box) or uri (one URI per line).'],
    ]
    optFlags = [
        ["allow-private", None, "Allow destinations on loopback, private, link-local and other non-global addresses (off by default: a proxy reaching its own host's services is a hole)."],
        ["version", None, "Print the version and exit."],
        ["show-password", None, "Put the real password (the first user's) in the client config logged at start or printed, instead of <password>."],
        ["print-client-config", None, "Print the client config for every port to stdout (see --client-config-format) and exit, without listening."],
    ]
    # fmt: on
    compData = usage.Completions(
        optActions={
            **dict.fromkeys(("config", "password-file", "cert", "key"), usage.CompleteFiles()),
            "padding-scheme": usage.CompleteFiles(),
            "state-dir": usage.CompleteDirs(),
        }
    )
    parent: Optional[usage.Options] = None

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []
        self.argv: List[str] = []

    def opt_port(self, description: str) -> None:
        """A Twisted endpoint to listen on; repeat for several. ssl:PORT gets our TLS (generated certificate unless privateKey/certKey or --cert/--key), as does tls:ENDPOINT for any other endpoint (e.g. tls:systemd:domain=INET:name=anytls); haproxy:ssl:PORT reads a PROXY header, then TLS. tcp:, unix:, systemd: are plain, for use behind a TLS-terminating proxy. [default: ssl:8443]"""
        self["port"].append(description)

    def opt_version(self) -> None:
        print(f"anytls-twisted {__version__}")
        sys.exit(0)

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Under twistd, turn a usage error into one line on stderr and exit status 2."""
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            sys.stderr.write(f"twistd anytls: error: {e} (see twistd anytls --help)\n")
            raise SystemExit(2) from None

    def postOptions(self) -> None:
        for name, choices in (
            ("log-level", logs.LEVELS),
            ("log-format", logs.FORMATS),
            ("client-config-format", CLIENT_CONFIG_FORMATS),
        ):
            if self[name] not in choices:
                raise usage.UsageError(f"--{name} must be one of {', '.join(choices)}")
        if self["password"] is not None and self["password-file"] is not None:
            raise usage.UsageError(configfile.ONE_PASSWORD)
        if (self["cert"] is None) != (self["key"] is None):
            raise usage.UsageError("--cert and --key go together")
        load.check_strings(self)
        self._twistd_options()

    def _twistd_options(self) -> None:
        """Under twistd: ``--print-client-config`` runs no server, so it needs no pid file
        (another server's would stop it); ``--log-format json`` sets twistd's ``--logger``."""
        twistd = self.parent
        if twistd is not None and self["print-client-config"]:
            twistd["pidfile"] = ""
        if twistd is not None and self["log-format"] == "json":
            try:
                logs.log_json_under_twistd(twistd)
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
