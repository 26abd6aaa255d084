"""Reloading the client (SIGHUP): new streams use the files as they are now, live streams
are never cut, idle sessions to a server that changed are closed, and a reload that fails keeps
the configuration it had, with one line saying why."""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.client.pool import Pool
from anytls_twisted.client.sessions import Route, SessionManager
from anytls_twisted.client.stream import ClientStream
from anytls_twisted.client.tap import makeService
from anytls_twisted.protocol.address import Destination
from anytls_twisted.protocol.codec import Command

from .helpers import capture_events
from .test_client_session import LOW, PASSWORD, FakeEndpoint, Local, Transport, set_endpoint
from .test_client_tap import parse


def answered(endpoint, index, stream):
    """The server behind session ``index`` says v2 and acknowledges ``stream``."""
    server = endpoint.sessions[index]
    server.send(Command.SERVER_SETTINGS, 0, b"v=2")
    server.send(Command.SYNACK, stream.sid)


class ReconfigureTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.old, self.new = FakeEndpoint(), FakeEndpoint()
        self.route = Route("old.example:443", lambda: self.old, PASSWORD)
        self.m = SessionManager(None, "", self.clock, Pool(), randrange=LOW, routes=[self.route])

    def stream(self):
        local = Local()
        s = ClientStream(local, Destination("example.com", 80), self.clock)
        self.m.open(s)
        return s, local

    def reconfigure(self, server_changed=True, **pool):
        settings = dict(check_interval=30.0, idle_timeout=30.0, min_idle=0)
        settings.update(pool)
        route = (
            Route("new.example:443", lambda: self.new, "new-secret")
            if server_changed
            else Route("old.example:443", lambda: self.new, PASSWORD)
        )
        return self.m.reconfigure([route], **settings)

    def test_server_changed_closes_idle_keeps_busy_until_its_stream_ends(self):
        idle, _ = self.stream()
        answered(self.old, 0, idle)
        busy, busy_local = self.stream()
        answered(self.old, 1, busy)
        idle.local_closed()  # session 0 goes back to the pool
        self.assertEqual(len(self.m.pool), 1)

        self.assertEqual(self.reconfigure(), (1, 1))
        self.assertTrue(self.old.sessions[0].transport.disconnecting)
        self.assertEqual(len(self.m.pool), 0)
        # The busy stream still relays both ways.
        self.assertFalse(self.old.sessions[1].transport.disconnecting)
        self.old.sessions[1].send(Command.PSH, busy.sid, b"still here")
        self.assertEqual(busy_local.transport.value(), b"still here")
        # A new stream goes to the new endpoint, with the new password.
        fresh, _ = self.stream()
        self.assertEqual(len(self.new.sessions), 1)
        self.assertEqual(self.new.sessions[0].session._password, "new-secret")
        # When the busy stream ends, its session is closed, not pooled.
        busy.local_closed()
        self.assertTrue(self.old.sessions[1].transport.disconnecting)
        self.assertNotIn(self.old.sessions[1].session, self.m.pool.idle_sessions())

    def test_server_unchanged_keeps_sessions(self):
        s, _ = self.stream()
        answered(self.old, 0, s)
        s.local_closed()
        self.assertEqual(self.reconfigure(server_changed=False), (0, 0))
        self.assertFalse(self.old.sessions[0].transport.disconnecting)
        again, _ = self.stream()
        self.assertEqual((len(self.old.sessions), len(self.new.sessions)), (1, 0))

    def test_a_dial_in_flight_during_the_reload_is_retired_after_its_stream(self):
        pending = PendingEndpoint()
        set_endpoint(self.m, lambda: pending)
        s, _ = self.stream()
        self.reconfigure()
        session = pending.finish()
        self.assertEqual(s.context.session_id, session.session_id)
        s.local_closed()
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(len(self.m.pool), 0)

    def test_pool_settings_apply_to_the_reaper(self):
        self.m.startService()
        self.addCleanup(self.m.stopService)
        s, _ = self.stream()
        answered(self.old, 0, s)
        s.local_closed()
        self.reconfigure(server_changed=False, check_interval=10.0, idle_timeout=10.0)
        self.assertEqual(self.m.pool.idle_session_timeout, 10.0)
        self.clock.advance(10)
        self.assertFalse(self.old.sessions[0].transport.disconnecting)
        self.clock.advance(10)
        self.assertTrue(self.old.sessions[0].transport.disconnecting)
        self.old.sessions[0].session.connectionLost(Failure(ConnectionError("closed")))
        self.assertEqual(self.m.pool.live, 0)


class PendingEndpoint:
    """An endpoint whose one connection completes only when the test says so."""

    def connect(self, factory):
        self.factory, self.d = factory, Deferred()
        return self.d

    def finish(self):
        session = self.factory.buildProtocol(None)
        session.makeConnection(Transport())
        self.d.callback(session)
        return session


class ServiceReloadTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "outbound.json")
        self.password = os.path.join(self.dir, "password")
        self.users = os.path.join(self.dir, "users")
        self.write_outbound(server_port=8443)
        with open(self.password, "w") as f:
            f.write("first-secret\n")
        with open(self.users, "w") as f:
            f.write("alice:a-pass\n")

    def write_outbound(self, **changes):
        outbound = {
            "type": "anytls",
            "server": "proxy.example",
            "server_port": 8443,
            "tls": {"enabled": True, "server_name": "front.example"},
        }
        outbound.update(changes)
        with open(self.config, "w") as f:
            f.write(json.dumps(outbound) if "broken" not in changes else "{ not json")

    def service(self):
        events = capture_events(self)
        options = parse(
            "--config",
            self.config,
            "--password-file",
            self.password,
            "--proxy-user-file",
            self.users,
            "--listen",
            "tcp:0:interface=127.0.0.1",
        )
        service = makeService(options, MemoryReactorClock())
        service.startService()
        self.addCleanup(service.stopService)
        return service, events

    def test_reload_reads_the_files_again(self):
        service, events = self.service()
        self.write_outbound(server_port=9443, idle_session_timeout="45s")
        with open(self.password, "w") as f:
            f.write("second-secret\n")
        with open(self.users, "w") as f:
            f.write("bob:b-pass\n")
        self.assertTrue(service.reload("SIGHUP"))
        self.assertEqual(service.config.server_port, 9443)
        self.assertEqual(service.manager.password, "second-secret")
        self.assertEqual(service.manager.pool.idle_session_timeout, 45.0)
        self.assertEqual(service.manager.generation, 1)
        self.assertTrue(service.factory.users("bob", "b-pass"))
        self.assertFalse(service.factory.users("alice", "a-pass"))
        lines = [formatEvent(e) for e in events if "reloaded" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertIn("reloaded (SIGHUP): server proxy.example:9443", lines[0])
        self.assertIn("changed: closed 0 idle sessions", lines[0])
        self.assertIn("bob", lines[0])
        self.assertFalse(any("secret" in formatEvent(e) for e in events))

    def test_only_pool_settings_changed_keeps_the_sessions(self):
        service, events = self.service()
        self.write_outbound(min_idle_session=2)
        self.assertTrue(service.reload("SIGHUP"))
        self.assertEqual(service.manager.generation, 0)
        self.assertEqual(service.manager.pool.min_idle_session, 2)
        self.assertTrue(any("unchanged: sessions kept" in formatEvent(e) for e in events))

    def test_a_broken_file_keeps_the_configuration(self):
        service, events = self.service()
        endpoint = service.manager.endpoint
        self.write_outbound(broken=True)
        self.assertFalse(service.reload("SIGHUP"))
        with open(self.users, "w") as f:
            f.write("")
        self.write_outbound(server_port=9443)
        self.assertFalse(service.reload("SIGHUP"))  # an empty users file is refused too
        self.assertEqual(service.reload_failures, 2)
        self.assertEqual(service.config.server_port, 8443)
        self.assertIs(service.manager.endpoint, endpoint)
        self.assertTrue(service.factory.users("alice", "a-pass"))
        errors = [formatEvent(e) for e in events if "reload (SIGHUP) failed" in formatEvent(e)]
        self.assertEqual(len(errors), 2, errors)
        self.assertIn(self.config, errors[0])
        self.assertTrue(all("\n" not in line for line in errors))
