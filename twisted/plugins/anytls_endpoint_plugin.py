"""Endpoint-string dropin: ``clientFromString(reactor, "anytls:HOST:PORT:config=FILE")`` in
any Twisted program. The client modules are imported only when such a string is parsed, so
scanning the plugins stays cheap."""

from typing import Any

from twisted.internet.interfaces import (
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class AnyTLSEndpointParser:
    """``anytls:HOST:PORT:config=FILE`` (or ``host=``/``port=``): a TCP connection made by the
    AnyTLS server the file names, on sessions shared by every endpoint of that file."""

    prefix = "anytls"

    def parseStreamClient(self, reactor: Any, *args: Any, **kwargs: Any) -> IStreamClientEndpoint:
        from anytls_twisted.client.endpoint import parse_endpoint

        return parse_endpoint(reactor, *args, **kwargs)


anytls_endpoint = AnyTLSEndpointParser()
