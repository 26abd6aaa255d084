"""``twistd anytls``: the options (:mod:`.options`) and ``makeService``, the composition root:
load the settings, print the client configuration if asked, else build the server.

Configuration errors end twistd with one clear line and a non-zero status, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from .. import clientconfig, logs
from .app import AnyTLSServer, client_endpoints
from .load import ConfigError, load
from .options import Options
from .settings import Settings

__all__ = ["Options", "makeService"]

_log = logs.get_logger("anytls_twisted.tap")


def makeService(options: Options, reactor: Optional[Any] = None) -> AnyTLSServer:
    """Build the service; ``reactor`` is injectable for tests. Reloads call :func:`.load.load`
    again on these parsed options."""
    if reactor is None:
        from twisted.internet import reactor
    settings = _load(options)
    if settings.client.print_and_exit:
        _print_client_config(settings)
    logs.set_level(settings.log_level)
    for warning in settings.warnings:
        _log.warn("{warning}", warning=warning)
    return AnyTLSServer(settings, reactor, lambda: load(options))


def _load(options: Options) -> Settings:
    """Under twistd, a configuration error is one line on stderr and exit status 2."""
    try:
        return load(options)
    except ConfigError as e:
        if options.parent is None:
            raise
        sys.stderr.write(f"twistd anytls: error: {e}\n")
        raise SystemExit(2) from None


def _print_client_config(settings: Settings) -> None:
    """``--print-client-config``: the configuration on stdout, the hints (and the config
    file's warnings) on stderr; exit without listening."""
    for warning in settings.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    password = clientconfig.shown_password(settings.users, settings.client.show_password)
    raise SystemExit(
        clientconfig.print_client_config(
            client_endpoints(settings),
            password,
            settings.client.format,
            sys.stdout,
            sys.stderr,
        )
    )
