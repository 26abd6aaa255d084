"""``--workers N``: N processes serve the same listening sockets, each with its own reactor.

The parent (the twistd process) binds every TCP-based ``--port`` once, serves the sockets
itself with ``reactor.adoptStreamPort`` and starts N-1 workers with ``reactor.spawnProcess``,
handing them the sockets as inherited descriptors (``childFDs``). A worker runs the same command
line plus the internal ``--worker-fds``/``--worker-index`` options and adopts the descriptors.
Its stdin is a pipe from the parent: when the parent dies the pipe closes and the worker stops.
The parent forwards SIGHUP, stops workers with SIGTERM (then SIGKILL after a bounded wait) and
restarts a worker that exits unexpectedly, with an exponential backoff.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.python import reflect

from ..endpoints import HAPROXY, EndpointString
from ..logs import get_logger
from ..tls import DEFAULT_BACKLOG
from .settings import Workers

_log = get_logger("anytls_twisted.workers")

FIRST_FD = 3
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
STOP_TIMEOUT = 10.0


class TCPListen:
    """A plain ``tcp:``/``tcp6:`` endpoint (optionally under ``haproxy:``), as we bind it."""

    def __init__(self, host: str, port: int, backlog: int, family: int, haproxy: bool) -> None:
        self.host, self.port, self.backlog, self.family, self.haproxy = (
            host,
            port,
            backlog,
            family,
            haproxy,
        )


def parse_tcp(endpoint: str) -> TCPListen:
    """``[haproxy:]tcp[6]:PORT[:interface=X][:backlog=N]`` -> TCPListen; else ValueError."""
    try:
        parsed = EndpointString.parse(endpoint)
    except ValueError as e:
        raise ValueError(f"--workers cannot bind {endpoint}: {e}") from None
    inner = parsed.unwrap(HAPROXY)
    tcp = inner or parsed
    if tcp.kind not in ("tcp", "tcp6"):
        raise ValueError(
            f"--workers supports only TCP ports (tcp:, ssl:, haproxy:ssl:), not {endpoint}"
        )
    if len(tcp.args) > 1:
        raise ValueError(f"unexpected {tcp.args[1]!r} in {endpoint}")
    for name, _ in tcp.kwargs:
        if name not in ("port", "interface", "backlog"):
            raise ValueError(f"--workers cannot bind {endpoint}: unsupported option {name}")
    port = tcp.argument(0, "port")
    if port is None or not re.fullmatch(r"[0-9]+", port):
        raise ValueError(f"no port number in {endpoint}")
    backlog = tcp.keyword("backlog")
    if backlog is None:
        backlog = str(DEFAULT_BACKLOG)
    elif not re.fullmatch(r"[0-9]+", backlog):
        raise ValueError(f"--workers cannot bind {endpoint}: backlog {backlog!r} is not a number")
    host = tcp.keyword("interface")
    if host is None:
        host = "::" if tcp.kind == "tcp6" else ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return TCPListen(host, int(port), int(backlog), family, inner is not None)


def bind(spec: TCPListen) -> socket.socket:
    """One listening, non-blocking, inheritable socket for ``spec``."""
    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((spec.host or ("::" if spec.family == socket.AF_INET6 else "0.0.0.0"), spec.port))
    sock.listen(spec.backlog)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def parse_worker_fds(text: str) -> List[Tuple[int, int]]:
    """``--worker-fds 3:4,4:10`` (fd:family) -> [(3, AF_INET), (4, AF_INET6)]."""
    out = []
    for item in text.split(","):
        fd, _, family = item.partition(":")
        if not fd.isdigit() or int(family or 0) not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"bad --worker-fds item {item!r}")
        out.append((int(fd), int(family)))
    return out


def child_fds(fds: Sequence[int]) -> Dict[int, object]:
    """The childFDs for a worker: stdin a pipe from us (its parent-death watch), our stdout and
    stderr, then the listening sockets at 3, 4, ..."""
    mapping: Dict[int, object] = {0: "w", 1: 1, 2: 2}
    for i, fd in enumerate(fds):
        mapping[FIRST_FD + i] = fd
    return mapping


def worker_fds_arg(families: Sequence[int]) -> str:
    return ",".join(f"{FIRST_FD + i}:{family}" for i, family in enumerate(families))


def strip_workers(argv: Sequence[str]) -> List[str]:
    """The command line without ``--workers N``/``--workers=N`` and any internal options."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--worker-fds", "--worker-index"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--worker-fds=", "--worker-index=")):
            continue
        out.append(arg)
    return out


def worker_argv(
    executable: str,
    twistd_argv: Sequence[str],
    anytls_argv: Sequence[str],
    index: int,
    families: Sequence[int],
) -> List[str]:
    """The worker's command line: twistd (run by the same Python) with twistd's own options (minus
    pidfile, logfile, daemonizing), ``anytls``, ours, and the internal options."""
    return [
        executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        *twistd_argv,
        "anytls",
        *strip_workers(anytls_argv),
        "--worker-index",
        str(index),
        "--worker-fds",
        worker_fds_arg(families),
    ]


def metrics_for(description: Optional[str], index: int) -> Optional[str]:
    """Worker i serves metrics on the ``--metrics`` port plus i (tcp: endpoints only)."""
    if description is None or index == 0:
        return description
    try:
        parsed = EndpointString.parse(description)
        port = parsed.argument(0, "port") if parsed.kind in ("tcp", "tcp6") else None
    except ValueError:
        port = None
    if port is None or not re.fullmatch(r"[0-9]+", port):
        raise ValueError(f"--metrics {description}: with --workers give a tcp:PORT endpoint")
    return parsed.with_argument(0, "port", str(int(port) + index)).format()


def plan(
    count: int,
    index: int,
    worker_fds: Optional[str],
    endpoints: Sequence[str],
    metrics: Optional[str],
    argv: Sequence[str],
    logger: Any,
) -> Workers:
    """This process's part (``ValueError`` if the ports cannot be shared): a worker adopts
    ``--worker-fds``; the parent of ``count`` > 1 processes binds every (TCP) port itself.
    ``logger`` is twistd's ``--logger``, which the workers get too."""
    twistd = ["--nodaemon", "--pidfile="]
    if logger:  # twistd's parsing replaces the name by the observer factory
        twistd.append(f"--logger={logger if isinstance(logger, str) else reflect.qual(logger)}")
    common: Dict[str, Any] = {"argv": tuple(argv), "twistd_argv": tuple(twistd)}
    if worker_fds is not None:
        return Workers(index=index, inherited=tuple(parse_worker_fds(worker_fds)), **common)
    if count == 1:
        return Workers(**common)
    metrics_for(metrics, 1)
    return Workers(count=count, shared=tuple(parse_tcp(e) for e in endpoints), **common)


class AdoptedPort(service.Service):
    """A listener on an inherited or pre-bound socket (``reactor.adoptStreamPort``)."""

    def __init__(self, fd: int, family: int, factory, reactor) -> None:
        self.fd, self.family, self.factory, self.reactor = fd, family, factory, reactor
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        accept_one_at_a_time(self.port)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class SharedPort(AdoptedPort):
    """The parent's listener for one port shared with the workers: bound in
    ``privilegedStartService`` (a busy port ends twistd with one line, before anything is
    logged about the ports), then served here like the workers serve it. The socket stays open
    while the process runs: workers restarted later inherit it."""

    def __init__(self, listen: TCPListen, factory, reactor) -> None:
        super().__init__(-1, listen.family, factory, reactor)
        self.listen = listen
        self.socket: Optional[socket.socket] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind()

    def startService(self) -> None:
        self.bind()
        super().startService()

    def bind(self) -> None:
        if self.socket is not None:
            return
        try:
            self.socket = bind(self.listen)
        except OSError as e:
            where = f"{self.listen.host or '*'}:{self.listen.port}"
            raise SystemExit(f"twistd anytls: error: cannot listen on {where}: {e}") from None
        self.fd = self.socket.fileno()


Listen = Callable[[Any], service.Service]


def listeners(plan: Workers, endpoints: Sequence[str], reactor) -> Optional[List[Listen]]:
    """With ``--workers``, for each port what makes its listener from the (TLS) factory: the
    parent shares the port it binds, a worker adopts the descriptor it inherited; a PROXY
    header wrapper goes outside for ``haproxy:`` ports. None without ``--workers``."""

    def adopt(fd: int, family: int, proxied: bool) -> Listen:
        return lambda factory: AdoptedPort(
            fd, family, wrap_haproxy(factory) if proxied else factory, reactor
        )

    def share(listen: TCPListen) -> Listen:
        return lambda factory: SharedPort(
            listen, wrap_haproxy(factory) if listen.haproxy else factory, reactor
        )

    if plan.inherited is not None:
        haproxy = [endpoint.startswith("haproxy:") for endpoint in endpoints]
        return [adopt(fd, family, p) for (fd, family), p in zip(plan.inherited, haproxy)]
    return [share(listen) for listen in plan.shared] if plan.shared else None


def supervisor(plan: Workers, shared: Sequence[SharedPort], reactor) -> Optional[WorkerSupervisor]:
    """The parent's supervisor of workers 1 to N-1 (None unless ``--workers`` N > 1): each runs
    our command line with the shared sockets as inherited descriptors."""
    if not plan.shared:
        return None
    families = [int(listen.family) for listen in plan.shared]
    return WorkerSupervisor(
        plan.count,
        lambda i: worker_argv(sys.executable, plan.twistd_argv, plan.argv, i, families),
        lambda: [port.fd for port in shared],
        lambda *args, **kwargs: reactor.spawnProcess(*args, **kwargs),
        reactor,
    )


def accept_one_at_a_time(port) -> None:
    """Make a shared listening port accept one connection per readiness event.

    Twisted's port accepts a whole burst per wakeup, so the first process awake took most of it;
    one at a time, the processes take turns (docs/performance.md has the figures).
    """
    read = port.doRead

    def doRead():
        port.numberAccepts = 1
        return read()

    port.doRead = doRead


def wrap_haproxy(factory):
    """The PROXY header reader around a port's factory, asking the abuse limits about the
    client's address once the header is read."""
    from .admission import AdmittingProxyFactory

    return AdmittingProxyFactory(factory)


class _ParentWatch:
    """Reads the worker's stdin; EOF (the parent died or closed it) stops the reactor."""

    def __init__(self, reactor, fd: int = 0) -> None:
        self.reactor, self.fd = reactor, fd
        self.stopping = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "parent-watch"

    def doRead(self):
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.reactor.removeReader(self)
            self.connectionLost(None)
        return None

    def connectionLost(self, reason) -> None:
        """EOF or hang-up (the reactor reports a closed pipe here): stop this worker."""
        if self.stopping:
            return
        self.stopping = True
        _log.info("parent process gone; worker stopping")
        if self.reactor.running:
            self.reactor.stop()


def watch_parent(reactor, fd: int = 0) -> _ParentWatch:
    """Watch ``fd`` once the reactor runs (twistd sets the reactor up after makeService)."""
    watch = _ParentWatch(reactor, fd)

    def start() -> None:
        os.set_blocking(fd, False)
        reactor.addReader(watch)

    reactor.callWhenRunning(start)
    return watch


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor, self.index = supervisor, index

    def processEnded(self, reason) -> None:
        self.supervisor.ended(self.index, reason)


class WorkerSupervisor(service.Service):
    """Starts workers 1..N-1, restarts them with backoff, forwards SIGHUP, stops them.

    @ivar count: N, the worker count including this process.
    @ivar processes: worker index to its running process transport.
    @ivar started_at: worker index to when it last started (clock seconds).
    @ivar backoff: worker index to its current restart delay.
    @ivar pending: worker index to its scheduled restart.
    """

    def __init__(
        self,
        count: int,
        argv_for: Callable[[int], List[str]],
        fds: Callable[[], Sequence[int]],
        spawn: Callable,
        clock,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        """``fds``: the shared sockets' descriptors, asked for when a worker starts (the
        sockets are bound when the service starts)."""
        self.count = count
        self.argv_for = argv_for
        self.fds = fds
        self.spawn = spawn  # reactor.spawnProcess-like
        self.clock = clock
        self.stop_timeout = stop_timeout
        self.processes: Dict[int, Any] = {}
        self.started_at: Dict[int, float] = {}
        self.backoff: Dict[int, float] = {}
        self.pending: Dict[int, Any] = {}
        self._stopped: Dict[int, defer.Deferred] = {}
        self._previous_hup: Any = None

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count):
            self.start_worker(index)
        if (
            hasattr(signal, "SIGHUP")
            and self.clock is not None
            and hasattr(self.clock, "callFromThread")
        ):
            self._previous_hup = signal.getsignal(signal.SIGHUP)
            signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, signum, frame) -> None:
        self.signal_all(signal.SIGHUP)
        if callable(self._previous_hup):
            self._previous_hup(signum, frame)

    def start_worker(self, index: int) -> None:
        self.pending.pop(index, None)
        argv = self.argv_for(index)
        proc = self.spawn(
            _WorkerProtocol(self, index),
            argv[0],
            argv,
            env=os.environ.copy(),
            childFDs=child_fds(self.fds()),
        )
        self.processes[index] = proc
        self.started_at[index] = self.clock.seconds()
        _log.info(
            "started worker {worker} (pid {pid})", worker=index, pid=getattr(proc, "pid", None)
        )

    def signal_all(self, sig) -> None:
        for proc in list(self.processes.values()):
            try:
                proc.signalProcess(sig)
            except Exception:
                pass

    def ended(self, index: int, reason) -> None:
        self.processes.pop(index, None)
        waiting = self._stopped.pop(index, None)
        if waiting is not None:
            waiting.callback(None)
        if not self.running:
            return
        ran = self.clock.seconds() - self.started_at.get(index, 0.0)
        delay = self.backoff.get(index, 0.0)
        delay = BACKOFF_INITIAL if ran >= STABLE_AFTER or not delay else min(delay * 2, BACKOFF_MAX)
        self.backoff[index] = delay
        _log.warn(
            "worker {worker} exited unexpectedly ({reason}); restarting in {delay}s",
            worker=index,
            reason=str(reason.value),
            delay=delay,
        )
        self.pending[index] = self.clock.callLater(delay, self.start_worker, index)

    def stopService(self):
        super().stopService()
        if self._previous_hup is not None:
            if signal.getsignal(signal.SIGHUP) == self._on_sighup:
                signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        waits = []
        for index in list(self.processes):
            d: defer.Deferred[None] = defer.Deferred()
            self._stopped[index] = d
            waits.append(d)
        self.signal_all("TERM")
        if not waits:
            return defer.succeed(None)

        def kill() -> None:
            if self.processes:
                _log.warn("workers {workers} did not stop; killing", workers=sorted(self.processes))
                self.signal_all("KILL")

        timer = self.clock.callLater(self.stop_timeout, kill)
        done = defer.gatherResults(waits)
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done
