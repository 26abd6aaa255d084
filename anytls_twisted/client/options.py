"""``twistd anytls-client`` command-line options, checked as strings and numbers (the URI is
parsed here; files are read by :func:`.tap.load`). An error is one line naming the option."""

from __future__ import annotations

import base64
import sys
from typing import List, Optional, Sequence

from twisted.python import usage

from .. import endpoints, logs, nullmetrics
from .._version import __version__
from ..cli import number_option
from ..singbox import ConfigFileError
from .config import parse_uri
from .servers import STRATEGIES

DEFAULT_LISTEN = "tcp:1080:interface=127.0.0.1"


_seconds = number_option(float, "a positive number", lambda value: value > 0)
_whole = number_option(int, "a whole number", lambda value: value >= 0)


_ABOUT = (
    "Run an AnyTLS client: a local SOCKS5/SOCKS4a/HTTP proxy port whose connections are "
    "carried to an AnyTLS server (anytls-twisted, sing-box, mihomo, anytls-go) over pooled TLS "
    "sessions. Give the server as --server URI or --config FILE."
)


class Options(usage.Options):
    """``twistd anytls-client`` options."""

    longdesc = _ABOUT
    # fmt: off
    optParameters = [

        ["password-file", None, None, "A file holding the password (first line; surrounding whitespace stripped); replaces the URI's or config's."],
        ["idle-session-check-interval", None, None, "Seconds between checks for idle sessions to close (values of 5 or less mean 30, as in sing-box). [default: the config's, else 30]", _seconds("idle-session-check-interval")],
        ["idle-session-timeout", None, None, "Close an idle session after this many seconds (5 or less means 30). [default: the config's, else 30]", _seconds("idle-session-timeout")],
        ["min-idle-session", None, None, "Idle sessions every check keeps open regardless of age (it never opens any). [default: the config's, else 0]", _whole("min-idle-session")],
        ["client-metadata", None, "", "The client= value sent in the session's Settings (servers may log it)."],
        ["strategy", None, "round-robin", "Which healthy server a new session goes to: round-robin, first (the first healthy one in order: a primary with fall-backs) or least-latency (lowest measured round trip)."],
        ["heartbeat-idle", None, 15.0, "Seconds of silence from the server after which a session is asked with a heartbeat: before reusing an idle one, and while streams use it.", _seconds("heartbeat-idle")],
        ["heartbeat-timeout", None, 5.0, "Seconds a heartbeat may wait for its answer before the session is given up (the stream waiting for it goes to another session).", _seconds("heartbeat-timeout")],
        ["prewarm", None, 0, "Sessions kept open and answered per healthy server, ready for the next stream (0: none; unlike --min-idle-session, these are opened in advance).", _whole("prewarm")],
        ["certificate", None, None, "Trust only this PEM certificate file (the server's own self-signed one works) instead of the system CAs. [default: the config's tls.certificate_path, else the system CAs]"],
        ["alpn", None, None, "ALPN protocols to offer, comma-separated (e.g. h2,http/1.1). [default: the URI's or config's, else none]"],
        ["proxy-user-file", None, None, "A file of user:password lines: the local port then asks for them (SOCKS5 username/password, HTTP Proxy-Authorization Basic). [default: no authentication]"],
        ["metrics", None, None, "A Twisted endpoint serving Prometheus metrics at /metrics and a health check at /healthz, e.g. tcp:9101:interface=127.0.0.1. [default: none]"],
        ["log-format", None, "text", "text (twistd's lines) or json: one JSON object per line on stdout (needs -n)."],
        ["log-level", None, "info", "Lowest level logged: debug, info, warn or error."],
    ]
    optFlags = [
        ["insecure", None, "Do not verify the server's certificate (testing only)."],
        ["disable-reuse", None, "One session per stream, never reused (anytls-go -dr, mihomo disable-reuse): for servers with reuse bugs."],
        ["print-config", None, "Print the effective configuration (files and options applied) as a sing-box client config and exit."],
        ["show-password", None, "With --print-config: print the password instead of <password>."],
        ["version", None, "Print the version and exit."],
    ]
    # fmt: on
    compData = usage.Completions(
        optActions={
            name: usage.CompleteFiles() for name in ("config", "password-file", "proxy-user-file")
        }
    )
    parent: Optional[usage.Options] = None

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["server"] = []
        self["config"] = []
        self["certificate-pin"] = []

    def opt_certificate_pin(self, pin: str) -> None:
        """Trust the server's certificate by its public-key pin (base64 SHA-256 of the public key, as the server logs and sing-box's certificate_public_key_sha256 takes); repeat for several. Replaces --certificate. [default: the config's pins, else none]"""
        try:
            if len(base64.b64decode(pin, validate=True)) != 32:
                raise ValueError
        except ValueError:
            raise usage.UsageError(
                f"--certificate-pin {pin!r}: not a base64 SHA-256 digest (44 characters)"
            ) from None
        self["certificate-pin"].append(pin)

    def opt_listen(self, description: str) -> None:
        """A Twisted endpoint for the local SOCKS5/HTTP proxy port; repeat for several. [default: tcp:1080:interface=127.0.0.1]"""
        self["listen"].append(description)

    def opt_server(self, uri: str) -> None:
        """A server as an anytls:// URI (anytls://PASSWORD@HOST[:PORT]/?sni=NAME&insecure=1); repeat for several (after those of --config). The password may be left out with --password-file."""
        self["server"].append(uri)

    def opt_config(self, path: str) -> None:
        """A config file: a sing-box anytls outbound (or a whole sing-box config: its first anytls outbound), a v2ray-shaped outbound (all its servers), or anytls:// URIs one per line; repeat for several."""
        self["config"].append(path)

    def opt_version(self) -> None:
        print(f"anytls-twisted {__version__}")
        sys.exit(0)

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Under twistd, turn a usage error into one line on stderr and exit status 2."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            sys.stderr.write(
                f"twistd anytls-client: error: {e} (see twistd anytls-client --help)\n"
            )
            raise SystemExit(2) from None

    def postOptions(self) -> None:
        for name, choices in (("log-level", logs.LEVELS), ("log-format", logs.FORMATS)):
            if self[name] not in choices:
                raise usage.UsageError(f"--{name} must be one of {', '.join(choices)}")
        if self.parent is not None and self["log-format"] == "json":
            try:
                logs.log_json_under_twistd(self.parent)
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for description in self["listen"]:
            try:
                endpoints.parse(description)
            except ValueError as e:
                raise usage.UsageError(f"--listen {description!r}: {e}") from None
        if self["metrics"] is not None:
            try:
                nullmetrics.check_endpoint(self["metrics"])
            except ValueError as e:
                raise usage.UsageError(f"--metrics {self['metrics']}: {e}") from None
        if not self["server"] and not self["config"]:
            raise usage.UsageError("give a server: --server URI or --config FILE")
        for uri in self["server"]:
            try:
                parse_uri(uri, password_file=self["password-file"] is not None)
            except (ConfigFileError, ValueError) as e:
                raise usage.UsageError(f"--server: {e}") from None
        if self["strategy"] not in STRATEGIES:
            raise usage.UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}")


__all__: List[str] = ["DEFAULT_LISTEN", "Options"]
