"""Fetch a URL through an AnyTLS server with Twisted's HTTP client, and print the body.

    python examples/endpoint_agent.py CONFIG URL

CONFIG is a client config file (a sing-box or v2ray JSON outbound, or anytls:// URIs). Every
connection the Agent makes is an ``anytls:`` endpoint; those made from one file share its
pooled sessions, which stop when the reactor does.
"""

import sys

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString, quoteStringArgument, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
class ThroughAnyTLS:
    """Connections to ``host:port`` made by the AnyTLS server; TLS on top for https URLs."""

    def __init__(self, reactor, config):
        self.reactor = reactor
        self.config = config
        self.tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii")
        endpoint = clientFromString(
            self.reactor,
            f"anytls:{quoteStringArgument(host)}:{uri.port}"
            f":config={quoteStringArgument(self.config)}",
        )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


async def main(reactor, config, url):
    agent = Agent.usingEndpointFactory(reactor, ThroughAnyTLS(reactor, config))
    try:
        response = await agent.request(b"GET", url.encode("ascii"))
        body = await readBody(response)
    except (ConnectError, ValueError) as e:  # refused, unreachable, a bad config file
        sys.exit(f"endpoint_agent: {e}")
    sys.stdout.buffer.write(body)
    sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python examples/endpoint_agent.py CONFIG URL")
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, *sys.argv[1:])))
