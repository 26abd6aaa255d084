"""Unit tests for ``--workers``: options, worker command lines, fd mapping, supervision."""

import signal
import socket

from twisted.internet import task
from twisted.python import failure, usage
from twisted.trial import unittest

from anytls_twisted.server import workers
from anytls_twisted.server.load import load
from anytls_twisted.server.tap import Options


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, sig):
        self.signals.append(sig)


class FakeSpawner:
    def __init__(self):
        self.calls = []

    def __call__(self, proto, executable, argv, env=None, childFDs=None):
        proc = FakeProcess(1000 + len(self.calls))
        self.calls.append((proto, executable, argv, childFDs, proc))
        return proc


def _ended(proto):
    proto.processEnded(failure.Failure(RuntimeError("exit 1")))


class OptionTests(unittest.TestCase):
    def parse(self, *args):
        """Parse, then load: this process's part in --workers is a loaded setting."""
        o = Options()
        o.parseOptions(["--password", "x", "--state-dir", self.mktemp(), *args])
        return load(o).workers

    def test_default_one(self):
        o = self.parse("--port", "tcp:0")
        self.assertEqual(o.count, 1)
        self.assertEqual(o.shared, ())

    def test_workers_must_be_positive(self):
        self.assertRaises(usage.UsageError, self.parse, "--workers", "0")
        self.assertRaises(usage.UsageError, self.parse, "--workers", "x")

    def test_tcp_ports_accepted(self):
        o = self.parse(
            "--workers",
            "3",
            "--port",
            "tcp:8000:interface=127.0.0.1",
            "--port",
            r"ssl:8443:interface=\:\:1",
        )
        listen = o.shared
        self.assertEqual(
            [(w.host, w.port, w.family) for w in listen],
            [("127.0.0.1", 8000, socket.AF_INET), ("::1", 8443, socket.AF_INET6)],
        )

    def test_haproxy(self):
        o = self.parse("--workers", "2", "--port", "haproxy:ssl:8443")
        self.assertTrue(o.shared[0].haproxy)

    def test_unix_refused(self):
        self.assertRaises(
            usage.UsageError, self.parse, "--workers", "2", "--port", "unix:/tmp/x.sock"
        )
        self.assertRaises(
            usage.UsageError,
            self.parse,
            "--workers",
            "2",
            "--port",
            "tls:systemd:domain=INET:index=0",
        )

    def test_unix_fine_with_one_worker(self):
        self.parse("--port", "unix:/tmp/x.sock")

    def test_metrics_must_be_tcp(self):
        self.assertRaises(
            usage.UsageError,
            self.parse,
            "--workers",
            "2",
            "--port",
            "tcp:1",
            "--metrics",
            "unix:/tmp/m",
        )
        self.parse("--workers", "2", "--port", "tcp:1", "--metrics", "tcp:9095:interface=127.0.0.1")

    def test_worker_fds(self):
        o = self.parse(
            "--port", "tcp:1", "--worker-fds", f"3:{int(socket.AF_INET)}", "--worker-index", "2"
        )
        self.assertEqual(o.inherited, ((3, socket.AF_INET),))
        self.assertEqual(o.index, 2)
        self.assertRaises(usage.UsageError, self.parse, "--worker-fds", "3:99")


class ParentServiceTests(unittest.TestCase):
    """makeService with --workers: the parent binds when the service starts, not before."""

    def test_shared_ports_bound_at_start(self):
        from twisted.internet.testing import MemoryReactorClock

        from anytls_twisted.server.tap import makeService

        o = Options()
        o.parseOptions(
            ["--password", "x", "--state-dir", self.mktemp(), "--workers", "3"]
            + ["--port", "tcp:0:interface=127.0.0.1"]
        )
        reactor = MemoryReactorClock()
        self.patch(workers, "accept_one_at_a_time", lambda port: None)  # a memory port
        top = makeService(o, reactor=reactor)
        [shared] = top.listeners
        self.assertIsInstance(shared, workers.SharedPort)
        self.assertIsNone(shared.socket)  # makeService binds nothing
        spawn = FakeSpawner()
        top.supervisor.spawn = spawn
        top.privilegedStartService()
        self.addCleanup(shared.socket.close)
        self.assertEqual(shared.socket.getsockname()[0], "127.0.0.1")
        top.startService()
        self.assertEqual(reactor.adoptedPorts[0][:2], (shared.fd, socket.AF_INET))
        self.assertEqual([call[3][3] for call in spawn.calls], [shared.fd, shared.fd])
        argv = spawn.calls[0][2]
        self.assertEqual(argv[argv.index("--worker-fds") + 1], f"3:{int(socket.AF_INET)}")
        stopped = top.stopService()
        for call in spawn.calls:
            self.assertEqual(call[4].signals, ["TERM"])
            _ended(call[0])
        self.successResultOf(stopped)

    def test_twistd_logger_passed_by_name(self):
        """twistd has replaced --logger by the observer factory before makeService: workers
        get its name, not its repr."""
        from anytls_twisted import logs

        plan = workers.plan(2, 0, None, ["tcp:1"], None, ["--workers", "2"], logs.json_observer)
        self.assertEqual(
            plan.twistd_argv,
            ("--nodaemon", "--pidfile=", "--logger=anytls_twisted.logs.json_observer"),
        )


class CommandLineTests(unittest.TestCase):
    def test_worker_argv(self):
        argv = workers.worker_argv(
            "/py",
            ["--nodaemon", "--pidfile="],
            ["--port", "ssl:1", "--workers", "4", "--workers=4", "--password", "x"],
            2,
            [socket.AF_INET, socket.AF_INET6],
        )
        self.assertEqual(argv[0], "/py")
        tail = argv[argv.index("anytls") + 1 :]
        self.assertEqual(
            tail,
            [
                "--port",
                "ssl:1",
                "--password",
                "x",
                "--worker-index",
                "2",
                "--worker-fds",
                f"3:{int(socket.AF_INET)},4:{int(socket.AF_INET6)}",
            ],
        )
        self.assertIn("--pidfile=", argv)

    def test_child_fds(self):
        self.assertEqual(workers.child_fds([7, 9]), {0: "w", 1: 1, 2: 2, 3: 7, 4: 9})

    def test_metrics_ports(self):
        self.assertEqual(workers.metrics_for("tcp:9095", 0), "tcp:9095")
        self.assertEqual(
            workers.metrics_for("tcp:9095:interface=127.0.0.1", 2), "tcp:9097:interface=127.0.0.1"
        )
        self.assertEqual(workers.metrics_for("tcp:port=9095", 1), "tcp:port=9096")
        self.assertIsNone(workers.metrics_for(None, 3))
        self.assertRaises(ValueError, workers.metrics_for, "unix:/x", 1)

    def test_parse_tcp(self):
        t = workers.parse_tcp("tcp:8443:interface=127.0.0.1:backlog=7")
        self.assertEqual((t.host, t.port, t.backlog, t.haproxy), ("127.0.0.1", 8443, 7, False))
        self.assertEqual(workers.parse_tcp("tcp:8443").backlog, workers.DEFAULT_BACKLOG)
        self.assertRaises(ValueError, workers.parse_tcp, "tcp:8443:reuse=1")
        self.assertRaises(ValueError, workers.parse_tcp, "unix:/x")


class SupervisorTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.spawn = FakeSpawner()
        self.sup = workers.WorkerSupervisor(
            3,
            lambda i: ["/py", "w", str(i)],
            lambda: [5, 6],
            self.spawn,
            self.clock,
            stop_timeout=10,
        )

    def test_starts_n_minus_one(self):
        self.sup.startService()
        self.assertEqual([c[2][-1] for c in self.spawn.calls], ["1", "2"])
        self.assertEqual(self.spawn.calls[0][3], {0: "w", 1: 1, 2: 2, 3: 5, 4: 6})

    def test_restart_backoff(self):
        self.sup.startService()
        proto = self.spawn.calls[0][0]
        delays = []
        for _ in range(7):
            _ended(proto)
            before = len(self.spawn.calls)
            delay = self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds()
            delays.append(delay)
            self.clock.advance(delay)
            self.assertEqual(len(self.spawn.calls), before + 1)
            proto = self.spawn.calls[-1][0]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 30, 30])
        # A worker that ran stably gets the short delay again.
        self.clock.advance(workers.STABLE_AFTER)
        _ended(proto)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds(), 1)

    def test_stop_terms_then_kills(self):
        self.sup.startService()
        d = self.sup.stopService()
        procs = [c[4] for c in self.spawn.calls]
        self.assertEqual([p.signals for p in procs], [["TERM"], ["TERM"]])
        _ended(self.spawn.calls[0][0])
        self.assertNoResult(d)
        self.clock.advance(10)
        self.assertEqual(procs[1].signals, ["TERM", "KILL"])
        _ended(self.spawn.calls[1][0])
        self.successResultOf(d)
        self.assertEqual(len(self.spawn.calls), 2)  # no restart while stopping
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_pending_restart(self):
        self.sup.startService()
        _ended(self.spawn.calls[0][0])
        d = self.sup.stopService()
        _ended(self.spawn.calls[1][0])
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(self.spawn.calls), 2)

    def test_sighup_forwarded(self):
        self.sup.signal_all(signal.SIGHUP)
        self.sup.startService()
        self.sup.signal_all(signal.SIGHUP)
        self.assertEqual(
            [c[4].signals for c in self.spawn.calls], [[signal.SIGHUP], [signal.SIGHUP]]
        )


class FakeReactor:
    running = True

    def __init__(self):
        self.stopped = 0
        self.readers = []

    def callWhenRunning(self, f, *a):
        f(*a)

    def addReader(self, r):
        self.readers.append(r)

    def removeReader(self, r):
        self.readers.remove(r)

    def stop(self):
        self.stopped += 1


class ParentWatchTests(unittest.TestCase):
    def test_eof_stops_the_worker(self):
        import os

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        reactor = FakeReactor()
        watch = workers.watch_parent(reactor, r)
        os.write(w, b"x")
        watch.doRead()
        self.assertEqual(reactor.stopped, 0)
        os.close(w)
        watch.doRead()
        self.assertEqual(reactor.stopped, 1)
        watch.connectionLost(None)  # the reactor's hang-up path: still one stop
        self.assertEqual(reactor.stopped, 1)


class SharedAcceptTests(unittest.TestCase):
    """An adopted (shared) port accepts one connection per readiness event, so processes
    sharing the socket take turns instead of the first one awake taking a whole burst."""

    def test_one_accept_per_read(self):
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        built = []

        class Record(Protocol):
            def connectionMade(self):
                built.append(self)

        adopted = workers.AdoptedPort(
            listener.fileno(), socket.AF_INET, Factory.forProtocol(Record), reactor
        )
        adopted.startService()
        self.addCleanup(adopted.stopService)
        self.addCleanup(listener.close)
        clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(3)]
        for c in clients:
            self.addCleanup(c.close)
        # The kernel completed all three handshakes; each doRead takes exactly one of them.
        adopted.port.doRead()
        self.assertEqual(len(built), 1)
        adopted.port.doRead()
        adopted.port.doRead()
        self.assertEqual(len(built), 3)
        for proto in built:
            proto.transport.abortConnection()
