"""End to end: the ``anytls:`` endpoint inside a Twisted program. Twisted's HTTP ``Agent``
fetches pages from an in-process web origin through our server (``twistd anytls``) on
loopback, on one shared session; ``examples/endpoint_agent.py`` does the same as a separate
process. Every wait is bounded."""

from __future__ import annotations

import os
import sys
import urllib.parse

from twisted.internet import defer, reactor
from twisted.internet.endpoints import clientFromString
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from zope.interface import implementer

from anytls_twisted.client.endpoint import StreamRefused, shared_sessions

from .e2e_support import (
    PASSWORD,
    REPO_ROOT,
    Harness,
    e2e_test,
    free_port,
    poll_until,
    within,
)

PAGE = b"hello through an AnyTLS stream\n" * 100
EXAMPLE = os.path.join(REPO_ROOT, "examples", "endpoint_agent.py")


@implementer(IAgentEndpointFactory)
class _ThroughAnyTLS:
    """Every connection the Agent makes goes to the origin through the anytls endpoint."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.descriptions = []

    def endpointForURI(self, uri):
        description = f"anytls:{uri.host.decode()}:{uri.port}:config={self.config_path}"
        self.descriptions.append(description)
        return clientFromString(reactor, description)


class _CountingSite(Site):
    """The origin; counts its open connections, so the test ends only once they closed."""

    open = 0

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.open += 1
        lost = protocol.connectionLost

        def connection_lost(reason):
            self.open -= 1
            return lost(reason)

        protocol.connectionLost = connection_lost
        return protocol


class EndpointEndToEndTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.h = Harness(self)

    def origin(self):
        root = Resource()
        root.putChild(b"page", Data(PAGE, "text/plain"))
        site = _CountingSite(root)
        site.displayTracebacks = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")

        @defer.inlineCallbacks
        def stop():
            yield port.stopListening()
            yield poll_until(lambda: site.open == 0, 10.0, "the origin's connections to close")

        self.addCleanup(stop)
        return port.getHost().port

    @e2e_test
    def test_agent_through_the_endpoint(self):
        """Agent GETs a page twice through ``anytls:127.0.0.1:PORT:config=FILE`` (a URI file
        with insecure=1): both bodies arrive whole, on one session to the server; a closed
        destination fails the request with StreamRefused carrying the server's reason; and
        examples/endpoint_agent.py, run as a program, prints the page."""
        server = yield self.h.start_server(kind="twistd")
        origin_port = self.origin()
        config = os.path.join(self.h.base, "client.txt")
        with open(config, "w") as f:
            f.write("# the test's server\n")
            f.write(
                f"anytls://{urllib.parse.quote(PASSWORD)}@127.0.0.1:{server.port}/"
                "?sni=localhost&insecure=1\n"
            )
        self.addCleanup(shared_sessions(reactor).close)  # runs before the harness's cleanup

        factory = _ThroughAnyTLS(config)
        agent = Agent.usingEndpointFactory(reactor, factory)
        url = f"http://127.0.0.1:{origin_port}/page".encode()
        for attempt in range(2):
            response = yield within(agent.request(b"GET", url), 20.0, f"response {attempt}")
            self.assertEqual(response.code, 200)
            body = yield within(readBody(response), 20.0, f"body {attempt}")
            self.assertEqual(body, PAGE)
        self.assertEqual(factory.descriptions[0], f"anytls:127.0.0.1:{origin_port}:config={config}")
        self.assertEqual(server.sessions_opened(), 1)

        closed = free_port("127.0.0.1")
        failure = yield within(
            self.assertFailure(
                agent.request(b"GET", f"http://127.0.0.1:{closed}/".encode()), StreamRefused
            ),
            20.0,
            "the refusal",
        )
        self.assertIn("refused", failure.reason)
        self.assertEqual(server.sessions_opened(), 1)

        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        example = self.h.spawn(
            "endpoint-agent",
            sys.executable,
            [EXAMPLE, config, url.decode()],
            short_lived=True,
            env=env,
            cwd=REPO_ROOT,
        )
        try:
            yield within(example.ended.wait(), 60.0, "examples/endpoint_agent.py to finish")
        finally:
            yield example.stop(grace=1.0)
        self.assertEqual(example.exit_code, 0, example.tail())
        self.assertIn(PAGE.decode(), example.tail(len(PAGE) * 2))
        self.assertEqual(server.sessions_opened(), 2)  # the example's own session
        self.h.assert_alive(server.process)
