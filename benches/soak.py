"""Soak: our ``twistd anytls`` server under held load and session churn, through real clients.

    ./scripts/bench.sh --soak [--short] [...]      # or: .venv/bin/python benches/soak.py [--short]

Phases, each with fresh client processes that are stopped when the phase's load ends (so the
server sees every session close at once, not 30 to 60 s later when a client's pool reaps it):

* **warm-up**: a few held streams and churned sessions (lazily imported modules, first-use
  caches); the baseline is taken after it, before any full-size load (``--warmup-rounds``, 0,
  adds full rounds before it).
* The server runs as the shipped systemd units run it: with ``PYTHONMALLOC=malloc``
  (``--server-env``; ``--server-env PYTHONMALLOC=pymalloc`` for Python's default allocator,
  which keeps about 7 MiB of arenas after a load of 1000 sessions: docs/performance.md,
  "Soak").
* **held**: ``--streams`` (1000) concurrent streams through ``--clients`` (4) sing-box 1.14
  clients. A sing-box client carries one stream per session (docs/client.md), so this is also
  about 1000 sessions. Each stream echoes ``--size`` bytes, waits until every stream is open
  at once, then echoes ``--size`` more; both checked by SHA-256.
* **mux**: ``--mux-streams`` (1000) concurrent streams over ``--mux-sessions`` (100) sessions,
  ten streams per session, opened with our client's session machine
  (``anytls_twisted.client.session.ClientSessionProtocol``) in this process: no stock client
  opens more than one stream per session at a time, and this is the shape the protocol allows.
* held and mux are repeated ``--rounds`` (2) times. After each round the server's sessions
  must be closed (its ``anytls_sessions_open`` gauge at 0) and its RSS is read at rest; after
  the last, RSS must be within ``--rss-tolerance`` (10%) of the baseline and the fds back.
* **churn**: ``--churn`` (10 000) short sessions through ``twistd anytls-client
  --disable-reuse`` (one session per stream: connect, TLS, authenticate, one echoed stream,
  close), ``--churn-parallel`` at a time. The server's open fds (``/proc/PID/fd``) and RSS are
  sampled every ``--sample-every`` sessions; after the load they must be back to the
  pre-churn figures (fds plus ``--fd-slack``; RSS within ``--churn-rss-tolerance``, 5%).

RSS "at rest" is VmRSS from ``/proc/PID/status`` as an operator sees it: when its last session
closes after a load, the server itself runs a full collection and glibc's ``malloc_trim(0)``
(``anytls_twisted.memory``). ``--trim on`` also calls ``malloc_trim(0)`` in the server with gdb
before each reading, as earlier versions of this soak had to.

Writes ``.cache/bench/soak-<timestamp>.json`` (logs in ``.cache/bench/soak-<timestamp>/``) and
prints a summary table; exit status 1 if a check failed. See docs/performance.md, "Soak".

The workload functions (``hold``, ``mux``, ``churn``, ``settle``) take ports and a pid, so
tests/test_soak.py runs the short version with its own harness.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import time
import urllib.request
from typing import Callable, Dict, List, Optional

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20


class SoakError(AssertionError):
    pass


# --------------------------------------------------------------------------------------------
# the server's process, from /proc, and its metrics


def proc_status(pid: int) -> dict:
    """VmRSS and VmHWM in MiB and the number of open fds of ``pid``."""
    out: dict = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0].lower()] = int(line.split()[1]) / 1024.0
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def scrape(metrics_port: int) -> Dict[str, float]:
    """The server's /metrics as ``{"name{labels}": value}`` (a blocking read of a few KiB)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    values: Dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def gauge(values: Dict[str, float], name: str) -> float:
    """The sum of every series of ``name`` (e.g. ``anytls_streams_open`` over its kinds)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def poll(check: Callable[[], bool], seconds: float, interval: float = 0.05) -> defer.Deferred:
    """Fire with the seconds it took once ``check()`` is true, or with None after ``seconds``."""
    started = time.monotonic()

    @defer.inlineCallbacks
    def loop():
        while True:
            if check():
                return time.monotonic() - started
            if time.monotonic() - started > seconds:
                return None
            yield task.deferLater(reactor, interval, lambda: None)

    return loop()


@defer.inlineCallbacks
def settle(metrics_port: int, seconds: float = 30.0):
    """Wait until the server reports no session and no stream open; fire with the seconds
    it took. Raises SoakError if that does not happen within ``seconds``."""
    last: Dict[str, float] = {}

    def closed() -> bool:
        last.update(scrape(metrics_port))
        return gauge(last, "anytls_sessions_open") == 0 and gauge(last, "anytls_streams_open") == 0

    took = yield poll(closed, seconds, 0.1)
    if took is None:
        raise SoakError(
            f"the server still had {gauge(last, 'anytls_sessions_open'):g} sessions and "
            f"{gauge(last, 'anytls_streams_open'):g} streams open after {seconds:g}s"
        )
    return took


def malloc_trim(pid: int) -> dict:
    """Call glibc's ``malloc_trim(0)`` inside ``pid`` with gdb (a diagnosis: how much of the RSS
    is memory the allocator holds free); fire with RSS before and after."""
    import subprocess

    before = proc_status(pid)["vmrss"]
    done = subprocess.run(
        ["gdb", "-p", str(pid), "-batch", "-ex", "call (int) malloc_trim(0)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    after = proc_status(pid)["vmrss"]
    return {"rss_before_mib": before, "rss_after_mib": after, "gdb_exit": done.returncode}


def gdb_works(pid: int) -> bool:
    """True if gdb can attach to ``pid`` and call a function in it."""
    import shutil
    import subprocess

    if shutil.which("gdb") is None:
        return False
    done = subprocess.run(
        ["gdb", "-p", str(pid), "-batch", "-ex", "call (int) getpid()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode == 0 and f"= {pid}" in done.stdout


@defer.inlineCallbacks
def rss_back(pid: int, limit_mib: float, seconds: float):
    """Poll VmRSS until it is at most ``limit_mib`` or ``seconds`` pass; fire with
    ``(rss_mib, seconds_waited or None)``."""
    seen = {}

    def low() -> bool:
        seen["rss"] = proc_status(pid)["vmrss"]
        return seen["rss"] <= limit_mib

    took = yield poll(low, seconds, 0.1)
    return seen["rss"], took


# --------------------------------------------------------------------------------------------
# payloads, the echo origin and SOCKS5 streams


def payload(tag: str, i: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes for stream ``i`` of a phase."""
    return random.Random(f"{tag}-{i}").randbytes(size)


class EchoOrigin(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.open += 1
        self.factory.accepted += 1
        self.factory.peak = max(self.factory.peak, self.factory.open)
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.open -= 1


class EchoFactory(protocol.Factory):
    protocol = EchoOrigin

    def __init__(self) -> None:
        self.open = self.accepted = self.peak = 0


def listen_echo():
    """An echo origin on 127.0.0.1 in this process: ``(factory, port)``."""
    factory = EchoFactory()
    port = reactor.listenTCP(0, factory, backlog=4096, interface="127.0.0.1")
    factory.port = port.getHost().port
    return factory, port


class StreamFailed(SoakError):
    pass


class EchoStream(protocol.Protocol):
    """SOCKS5 CONNECT (no authentication) to ``host:port``, then echo exchanges, each checked
    by SHA-256 and length. ``ready`` fires after the SOCKS reply, ``lost`` when closed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.ready: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self.state = "greeting"
        self.buf = b""
        self.done: Optional[defer.Deferred] = None
        self.want = self.got = 0
        self.digest = hashlib.sha256()
        self.expect = b""
        self.exchanged = 0

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(b"\x05\x01\x00")

    def dataReceived(self, data: bytes) -> None:
        if self.state == "open":
            self._echoed(data)
            return
        self.buf += data
        if self.state == "greeting":
            if len(self.buf) < 2:
                return
            if self.buf[:2] != b"\x05\x00":
                return self._fail(f"SOCKS greeting answered {self.buf[:2]!r}")
            self.buf = self.buf[2:]
            self.state = "request"
            self.transport.write(
                b"\x05\x01\x00\x01" + socket.inet_aton(self.host) + struct.pack(">H", self.port)
            )
        if self.state == "request":
            if len(self.buf) < 5:
                return
            atyp = self.buf[3]
            need = 4 + {1: 6, 4: 18}.get(atyp, 1 + self.buf[4] + 2)
            if len(self.buf) < need:
                return
            if self.buf[1] != 0:
                return self._fail(f"SOCKS CONNECT refused with code {self.buf[1]}")
            rest, self.buf = self.buf[need:], b""
            self.state = "open"
            self.ready.callback(self)
            if rest:
                self._echoed(rest)

    def exchange(self, data: bytes) -> defer.Deferred:
        """Write ``data``; fire once exactly the same bytes came back."""
        self.done = defer.Deferred()
        self.want, self.got = len(data), 0
        self.digest = hashlib.sha256()
        self.expect = hashlib.sha256(data).digest()
        self.transport.write(data)
        return self.done

    def _echoed(self, data: bytes) -> None:
        if self.done is None:
            return self._fail(f"{len(data)} bytes arrived when none were due")
        self.got += len(data)
        self.digest.update(data)
        if self.got > self.want:
            return self._fail(f"{self.got} bytes echoed for {self.want} sent")
        if self.got == self.want:
            if self.digest.digest() != self.expect:
                return self._fail(f"echo of {self.want} bytes: SHA-256 differs")
            done, self.done = self.done, None
            self.exchanged += 1
            done.callback(self.want)

    def _fail(self, why: str) -> None:
        self.state = "failed"
        error = StreamFailed(why)
        for d in (self.ready, self.done):
            if d is not None and not d.called:
                d.errback(error)
        self.done = None
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        why = f"the connection closed ({self.state}, {self.got}/{self.want} echoed)"
        for d in (self.ready, self.done):
            if d is not None and not d.called:
                d.errback(StreamFailed(why))
        self.done = None
        self.lost.callback(None)


@defer.inlineCallbacks
def open_stream(socks_port: int, origin_port: int, seconds: float = 30.0):
    stream = EchoStream("127.0.0.1", origin_port)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port, timeout=seconds)
    yield connectProtocol(endpoint, stream)
    yield stream.ready.addTimeout(seconds, reactor)
    return stream


def gather(ds: List[defer.Deferred]) -> defer.Deferred:
    """All of ``ds``; the first failure fails it (the others' errors are consumed)."""
    d = defer.gatherResults(ds, consumeErrors=True)
    d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
    return d


def _abort(streams) -> None:
    for s in streams:
        if s.transport is not None and s.transport.connected:
            s.transport.abortConnection()


# --------------------------------------------------------------------------------------------
# held streams through SOCKS clients (sing-box)


@defer.inlineCallbacks
def hold(
    socks_ports: List[int],
    origin_port: int,
    streams: int,
    size: int,
    on_held: Optional[Callable[[], object]] = None,
    opening: int = 100,
    seconds: float = 120.0,
    tag: str = "held",
):
    """``streams`` concurrent streams, spread round robin over the SOCKS ports: each opens and
    echoes ``size`` bytes (at most ``opening`` being opened at once); once all are open at the
    same time ``on_held()`` runs (it may return a Deferred); then each echoes ``size`` bytes
    more and closes. Fires with a summary dict; raises on any failure or after ``seconds``."""
    started = time.monotonic()
    live: list = []
    sem = defer.DeferredSemaphore(opening)

    @defer.inlineCallbacks
    def one(i: int):
        s = yield open_stream(socks_ports[i % len(socks_ports)], origin_port)
        live.append(s)
        yield s.exchange(payload(tag, i, size))
        return s

    try:
        opened = yield gather([sem.run(one, i) for i in range(streams)]).addTimeout(
            seconds, reactor
        )
        held_at = time.monotonic() - started
        if on_held is not None:
            yield on_held()
        yield gather(
            [s.exchange(payload(tag + "-2", i, size)) for i, s in enumerate(opened)]
        ).addTimeout(seconds, reactor)
        for s in opened:
            s.transport.loseConnection()
        yield gather([s.lost for s in opened]).addTimeout(30, reactor)
    except BaseException:
        _abort(live)
        raise
    verified = sum(s.exchanged for s in opened)
    if verified != 2 * streams:
        raise SoakError(f"{verified} of {2 * streams} echo exchanges verified")
    return {
        "streams": streams,
        "bytes_each_way": 2 * size * streams,
        "exchanges_verified": verified,
        "all_open_after_s": round(held_at, 3),
        "duration_s": round(time.monotonic() - started, 3),
    }


# --------------------------------------------------------------------------------------------
# many streams per session: our client's session machine, in this process


class _Sink:
    """A stand-in for the local application's connection of one ClientStream."""

    connected = True

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.got = 0
        self.closed: defer.Deferred = defer.Deferred()
        self.waiting: Optional[defer.Deferred] = None
        self.want = 0

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.got += len(data)
        if self.waiting is not None and self.got >= self.want:
            d, self.waiting = self.waiting, None
            d.callback(self.got)

    def until(self, total: int) -> defer.Deferred:
        self.want = total
        if self.got >= total:
            return defer.succeed(self.got)
        self.waiting = defer.Deferred()
        return self.waiting

    def loseConnection(self) -> None:
        self.connected = False
        if not self.closed.called:
            self.closed.callback(None)
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.errback(StreamFailed(f"the stream closed after {self.got} of {self.want} bytes"))

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def registerProducer(self, producer, streaming) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@defer.inlineCallbacks
def mux(
    server_port: int,
    password: str,
    cert_path: str,
    origin_port: int,
    sessions: int,
    per_session: int,
    size: int,
    on_held: Optional[Callable[[], object]] = None,
    seconds: float = 120.0,
):
    """``sessions`` AnyTLS sessions from this process (our client's ClientSessionProtocol over
    TLS that trusts ``cert_path``), each opening ``per_session`` streams to the echo origin at
    once. Each stream echoes ``size`` bytes; once all streams have, ``on_held()`` runs; then each
    echoes ``size`` more and is closed, then the sessions are closed."""
    from twisted.internet.endpoints import wrapClientTLS
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    from anytls_twisted.client.session import ClientSessionProtocol
    from anytls_twisted.client.stream import ClientStream, LocalSide
    from anytls_twisted.protocol.address import Destination
    from anytls_twisted.protocol.padding import DEFAULT_SCHEME

    with open(cert_path, "rb") as f:
        trust = Certificate.loadPEM(f.read())
    options = optionsForClientTLS("localhost", trustRoot=trust)
    started = time.monotonic()
    protos: list = []
    established: List[defer.Deferred] = []
    pairs: list = []

    class Local(LocalSide):
        def __init__(self, ready: defer.Deferred) -> None:
            self.transport = _Sink()
            self._ready = ready

        def established(self) -> None:
            self._ready.callback(None)

        def refused(self, error: str) -> None:
            if not self._ready.called:
                self._ready.errback(StreamFailed(f"stream refused: {error}"))

    @defer.inlineCallbacks
    def one_session(n: int):
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", server_port))
        proto = ClientSessionProtocol(password, DEFAULT_SCHEME, reactor)
        protos.append(proto)
        yield connectProtocol(endpoint, proto)
        for k in range(per_session):
            ready: defer.Deferred = defer.Deferred()
            local = Local(ready)
            stream = ClientStream(local, Destination("127.0.0.1", origin_port), reactor)
            proto.open(stream)
            i = n * per_session + k
            data = payload("mux", i, size)
            stream.send(data)
            pairs.append((i, stream, local, hashlib.sha256(data).digest()))
            established.append(ready)

    def check(local, total: int, expect: bytes) -> None:
        if local.transport.got != total or local.transport.digest.digest() != expect:
            raise SoakError(f"mux stream: {local.transport.got} bytes, want {total}, or bad hash")

    try:
        yield gather([one_session(n) for n in range(sessions)]).addTimeout(seconds, reactor)
        yield gather(established).addTimeout(seconds, reactor)
        yield gather([local.transport.until(size) for _, _, local, _ in pairs]).addTimeout(
            seconds, reactor
        )
        for _, _, local, expect in pairs:
            check(local, size, expect)
        held_at = time.monotonic() - started
        if on_held is not None:
            yield on_held()
        second = []
        for i, stream, local, _ in pairs:
            data = payload("mux-2", i, size)
            local.transport.digest = hashlib.sha256()
            local.transport.got = 0
            stream.send(data)
            second.append((local, hashlib.sha256(data).digest()))
        yield gather([local.transport.until(size) for local, _ in second]).addTimeout(
            seconds, reactor
        )
        for local, expect in second:
            check(local, size, expect)
        for _, stream, _, _ in pairs:
            stream.local_closed()
        yield gather([local.transport.closed for _, _, local, _ in pairs]).addTimeout(30, reactor)
    finally:
        for proto in protos:
            if proto.transport is not None:
                proto.close("the soak's mux phase is over")
    return {
        "sessions": sessions,
        "streams": sessions * per_session,
        "bytes_each_way": 2 * size * sessions * per_session,
        "exchanges_verified": 2 * len(pairs),
        "all_open_after_s": round(held_at, 3),
        "duration_s": round(time.monotonic() - started, 3),
    }


# --------------------------------------------------------------------------------------------
# churn: one short session per stream


@defer.inlineCallbacks
def churn(
    socks_port: int,
    origin_port: int,
    sessions: int,
    parallel: int,
    size: int,
    on_sample: Optional[Callable[[int], None]] = None,
    sample_every: int = 1000,
    seconds: float = 600.0,
):
    """``sessions`` streams through ``socks_port`` (a client that opens one session per
    stream), ``parallel`` at a time: open, echo ``size`` bytes, close and wait for the close.
    ``on_sample(done)`` runs every ``sample_every`` completed streams."""
    started = time.monotonic()
    state = {"next": 0, "done": 0}
    live: list = []

    @defer.inlineCallbacks
    def worker():
        while state["next"] < sessions:
            i = state["next"]
            state["next"] += 1
            s = yield open_stream(socks_port, origin_port)
            live.append(s)
            yield s.exchange(payload("churn", i, size))
            s.transport.loseConnection()
            yield s.lost
            live.remove(s)
            state["done"] += 1
            if on_sample is not None and state["done"] % sample_every == 0:
                on_sample(state["done"])

    try:
        yield gather([worker() for _ in range(parallel)]).addTimeout(seconds, reactor)
    except BaseException:
        _abort(live)
        raise
    took = time.monotonic() - started
    return {
        "sessions": sessions,
        "parallel": parallel,
        "duration_s": round(took, 3),
        "sessions_per_s": round(sessions / took, 1),
    }


# --------------------------------------------------------------------------------------------
# the bench: processes (benches/bench.py's helpers), phases, checks, report


#: The sitecustomize that --memory-dump puts on the server's sys.path.
#: The allocator the server runs with, as contrib/systemd's units set it: Python's own
#: (pymalloc) keeps arenas after a peak that glibc's malloc gives back (docs/performance.md).
SERVER_MALLOC = "malloc"
MEMDUMP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memdump")


def memory_dump(pid: int, prefix: str, seconds: float = 120.0) -> Optional[str]:
    """Have the server write benches/memdump's report (SIGUSR2) and wait for it: its path, or
    None if it did not come. The report is written while the server's reactor is stopped in the
    handler; it runs a full collection, so RSS read after it is not the server's own."""
    n = len([f for f in os.listdir(os.path.dirname(prefix)) if f.endswith(".done")]) + 1
    os.kill(pid, signal.SIGUSR2)
    done = f"{prefix}-{n}.done"
    deadline = time.monotonic() + seconds
    while not os.path.exists(done):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return f"{prefix}-{n}.txt"


def _bench():
    sys.path.insert(0, HERE)
    import bench

    return bench


def start_server(procs, rundir: str, env: dict):
    b = _bench()
    build = b.current_build()
    state = os.path.join(rundir, "state")
    os.makedirs(state, exist_ok=True)
    port, metrics_port = b.free_port(), b.free_port()
    argv = [build.twistd, "-n", "--pidfile=", "anytls"]
    argv += ["--port", f"ssl:{port}:interface=127.0.0.1", "--password", b.PASSWORD]
    argv += ["--state-dir", state, "--allow-private", "--log-level", "warn"]
    # The held phase opens 1000 sessions from 127.0.0.1 at once: the per-source rate limit
    # (burst 100) is for floods from one address, which this is by design.
    argv += ["--connection-rate", "0"]
    argv += ["--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"]
    server_env = dict(build.env)
    server_env.update(env)
    if server_env.get("ANYTLS_DEBUG_MEMORY"):  # --memory-dump: benches/memdump's sitecustomize
        path = server_env.get("PYTHONPATH")
        server_env["PYTHONPATH"] = MEMDUMP + (os.pathsep + path if path else "")
    proc = procs.spawn("server", argv, env=server_env, cwd=build.cwd)
    b.wait_for_port(port, proc, 60.0)
    b.wait_for_port(metrics_port, proc, 30.0)
    cert = os.path.join(state, "self-signed-cert.pem")
    return proc, port, metrics_port, cert, build


def start_server_checked(procs, rundir: str, env: dict):
    return started(procs, lambda: start_server(procs, rundir, env))


def start_singbox_clients(procs, rundir: str, count: int, server_port: int, cert: str, tag: str):
    start = functools.partial(_singbox_client, procs, rundir, server_port=server_port, cert=cert)
    return [started(procs, functools.partial(start, k=k, tag=tag)) for k in range(count)]


def _singbox_client(procs, rundir: str, server_port: int, cert: str, k: int, tag: str):
    name = f"{tag}-singbox-{k}"
    return _bench().start_client(procs, rundir, server_port, cert, name, role=name)


def start_our_client(procs, rundir: str, server_port: int, cert: str, build, tag: str):
    return started(procs, lambda: _our_client(procs, rundir, server_port, cert, build, tag))


def _our_client(procs, rundir: str, server_port: int, cert: str, build, tag: str):
    b = _bench()
    socks = b.free_port()
    uri = f"anytls://{b.PASSWORD}@127.0.0.1:{server_port}/?sni=localhost"
    argv = [build.twistd, "-n", "--pidfile=", "anytls-client"]
    argv += ["--listen", f"tcp:{socks}:interface=127.0.0.1", "--server", uri]
    argv += ["--certificate", cert, "--disable-reuse", "--log-level", "warn"]
    proc = procs.spawn(f"{tag}-anytls-client", argv, env=build.env, cwd=build.cwd)
    b.wait_for_port(socks, proc, 60.0)
    return proc, socks


def holds_listener(pid: int, port: int) -> bool:
    """True if process ``pid`` holds the listening TCP socket on 127.0.0.1:``port``: a free
    port picked here may be taken by another process before the child binds it."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(target[8:-1])
    return bool(inodes & held)


def started(procs, start: Callable[[], tuple], attempts: int = 3) -> tuple:
    """``start()`` returns ``(proc, port, ...)``; retried with a new port if ``proc`` lost
    its port to another process (it exits, or someone else answers on the port)."""
    for attempt in range(attempts):
        try:
            out = start()
        except _bench().BenchError:
            if attempt == attempts - 1:
                raise
            continue
        if out[0].poll() is None and holds_listener(out[0].pid, out[1]):
            return out
        procs.stop(out[0])
    raise SoakError(f"could not start a process on a free port in {attempts} attempts")


def stop(procs, items) -> None:
    for proc, _ in items:
        procs.stop(proc)


@defer.inlineCallbacks
def run(cfg, procs, rundir: str, result: dict):
    env = dict(item.split("=", 1) for item in cfg.server_env)
    result["server_env"] = env
    dumps = os.path.join(rundir, "memory") if cfg.memory_dump else None
    if dumps:
        os.makedirs(os.path.dirname(dumps), exist_ok=True)
        env = dict(env, ANYTLS_DEBUG_MEMORY=dumps)
    server, port, mport, cert, build = start_server_checked(procs, rundir, env)
    pid = server.pid
    result["build"] = build.info
    echo, _ = listen_echo()
    checks = result["checks"] = {}
    trim = cfg.trim == "on" or (cfg.trim == "auto" and gdb_works(pid))
    result["trim"] = trim

    def snap(where: str) -> dict:
        s = proc_status(pid)
        s["at"] = where
        return s

    def rest(where: str) -> dict:
        """The server at rest: VmRSS as is, then (with trim) after malloc_trim(0)."""
        s = snap(where)
        s["vmrss_untrimmed"] = s["vmrss"]
        if trim:
            s["vmrss"] = malloc_trim(pid)["rss_after_mib"]
        if dumps:
            s["memory_dump"] = memory_dump(pid, dumps)
            print(f"memory report at {where}: {s['memory_dump']}", flush=True)
        return s

    result["idle"] = snap("started")

    # warm-up
    t0 = time.monotonic()
    clients = start_singbox_clients(procs, rundir, cfg.clients, port, cert, "warmup")
    yield hold([s for _, s in clients], echo.port, cfg.warmup_streams, cfg.size, tag="warmup")
    stop(procs, clients)
    ours = [start_our_client(procs, rundir, port, cert, build, "warmup")]
    yield churn(ours[0][1], echo.port, cfg.warmup_churn, cfg.churn_parallel, cfg.churn_size)
    stop(procs, ours)
    yield settle(mport)
    result["warmup_s"] = round(time.monotonic() - t0, 2)
    first = result["after_small_warmup"] = rest("after the small warm-up, sessions closed")
    print(f"after the small warm-up: RSS {first['vmrss']:.1f} MiB", flush=True)

    rounds = result["rounds"] = []
    peak: dict = {}

    def at_hold(key: str):
        def measure():
            m = scrape(mport)
            peak[key] = snap(f"{key}: all streams open")
            peak[key]["sessions_open"] = gauge(m, "anytls_sessions_open")
            peak[key]["streams_open"] = gauge(m, "anytls_streams_open")
            peak[key]["origin_connections_open"] = echo.open

        return measure

    for r in range(cfg.warmup_rounds + cfg.rounds):
        if r == cfg.warmup_rounds:
            base = result["baseline"] = rest("baseline: after warm-up, sessions closed")
            print(f"baseline: RSS {base['vmrss']:.1f} MiB, {base['fds']} fds", flush=True)
        # held: sing-box clients, one session per stream
        clients = start_singbox_clients(procs, rundir, cfg.clients, port, cert, f"held{r + 1}")
        held = yield hold(
            [s for _, s in clients],
            echo.port,
            cfg.streams,
            cfg.size,
            on_held=at_hold("held"),
            seconds=cfg.timeout,
        )
        held["clients"] = cfg.clients
        held["at_peak"] = peak["held"]
        stop(procs, clients)
        held["sessions_closed_after_s"] = round((yield settle(mport)), 3)
        print(f"round {r + 1} held: {json.dumps(held)}", flush=True)
        this = {"held": held, "warm_up": r < cfg.warmup_rounds}

        # mux: many streams per session, our session machine in this process
        if cfg.mux_sessions:
            m = yield mux(
                port,
                _bench().PASSWORD,
                cert,
                echo.port,
                cfg.mux_sessions,
                cfg.mux_streams // cfg.mux_sessions,
                cfg.size,
                on_held=at_hold("mux"),
                seconds=cfg.timeout,
            )
            m["at_peak"] = peak["mux"]
            m["sessions_closed_after_s"] = round((yield settle(mport)), 3)
            print(f"round {r + 1} mux: {json.dumps(m)}", flush=True)
            this["mux"] = m
        this["after"] = rest(f"after round {r + 1}, sessions closed")
        rounds.append(this)
        print(
            f"round {r + 1}: RSS {this['after']['vmrss_untrimmed']:.1f} MiB, "
            f"{this['after']['vmrss']:.1f} trimmed",
            flush=True,
        )

    # after the load: RSS back, fds back
    limit = base["vmrss"] * (1 + cfg.rss_tolerance)
    rss, waited = yield rss_back(pid, limit, cfg.rss_wait)
    after = result["after_load"] = rest("after the held and mux load, sessions closed")
    if rounds:  # the last round's reading, before its malloc_trim
        after["vmrss_untrimmed"] = rounds[-1]["after"]["vmrss_untrimmed"]
    after["rss_wait_s"] = None if waited is None else round(waited, 2)
    after["rss_limit_mib"] = round(limit, 2)
    checks["load_rss_back"] = after["vmrss"] <= limit
    checks["load_fds_back"] = after["fds"] <= base["fds"] + cfg.fd_slack
    measured = [r for r in rounds if not r["warm_up"]]
    if len(measured) > 1:
        checks["load_rss_flat_over_rounds"] = all(
            r["after"]["vmrss"] <= measured[0]["after"]["vmrss"] * (1 + cfg.round_tolerance)
            for r in measured[1:]
        )
    print(
        f"after load: RSS {after['vmrss_untrimmed']:.1f} MiB, {after['vmrss']:.1f} trimmed "
        f"(limit {limit:.1f}), {after['fds']} fds",
        flush=True,
    )

    # churn: one session per stream through our client with --disable-reuse
    before = result["before_churn"] = after
    samples: list = []

    def sample(done: int) -> None:
        s = snap(f"{done} sessions")
        s["done"] = done
        samples.append(s)

    ours = [start_our_client(procs, rundir, port, cert, build, "churn")]
    m0 = scrape(mport)
    ch = yield churn(
        ours[0][1],
        echo.port,
        cfg.churn,
        cfg.churn_parallel,
        cfg.churn_size,
        on_sample=sample,
        sample_every=cfg.sample_every,
        seconds=cfg.timeout * 5,
    )
    stop(procs, ours)
    ch["sessions_closed_after_s"] = round((yield settle(mport)), 3)
    m1 = scrape(mport)
    ch["server_sessions_counted"] = gauge(m1, "anytls_sessions_total") - gauge(
        m0, "anytls_sessions_total"
    )
    ch["samples"] = samples
    churn_limit = before["vmrss"] * (1 + cfg.churn_rss_tolerance)
    rss, waited = yield rss_back(pid, churn_limit, cfg.rss_wait)
    end = result["after_churn"] = rest("after churn, sessions closed")
    end["rss_wait_s"] = None if waited is None else round(waited, 2)
    end["rss_limit_mib"] = round(churn_limit, 2)
    result["churn"] = ch
    checks["churn_sessions_counted"] = ch["server_sessions_counted"] == cfg.churn
    checks["churn_fds_back"] = end["fds"] <= before["fds"] + cfg.fd_slack
    checks["churn_rss_back"] = end["vmrss"] <= churn_limit
    result["peak_rss_mib"] = proc_status(pid)["vmhwm"]


def table(result: dict) -> str:
    rows = [("metric", "value")]
    base, after = result.get("baseline"), result.get("after_load")
    trimmed = " (after malloc_trim)" if result.get("trim") else ""
    if "idle" in result:
        rows.append(("server RSS idle (started)", f"{result['idle']['vmrss']:.1f} MiB"))
    if "after_small_warmup" in result:
        rows.append(
            (
                f"RSS{trimmed} after the small warm-up",
                f"{result['after_small_warmup']['vmrss']:.1f} MiB",
            )
        )
    if base:
        rows.append(
            (
                f"baseline RSS{trimmed} / fds, after warm-up",
                f"{base['vmrss']:.1f} MiB / {base['fds']}",
            )
        )
    rounds = result.get("rounds") or []
    for n, rnd in enumerate(rounds, 1):
        for key in ("held", "mux"):
            ph = rnd.get(key)
            if not ph:
                continue
            p = ph["at_peak"]
            what = f"{ph['streams']} streams"
            if key == "mux":
                what += f" over {ph['sessions']} sessions"
            rows.append((f"round {n} {key}: {what}, exchanges verified", ph["exchanges_verified"]))
            rows.append(
                (
                    f"round {n} {key}: at peak sessions / streams / RSS / fds",
                    f"{p['sessions_open']:g} / {p['streams_open']:g} / {p['vmrss']:.1f} MiB / "
                    f"{p['fds']}",
                )
            )
            rows.append(
                (
                    f"round {n} {key}: all open after / done after / sessions closed after",
                    f"{ph['all_open_after_s']} s / {ph['duration_s']} s / "
                    f"{ph['sessions_closed_after_s']} s",
                )
            )
        label = f"round {n}" + (" (warm-up)" if rnd.get("warm_up") else "")
        rows.append(
            (
                f"{label}: RSS / RSS{trimmed} after, sessions closed",
                f"{rnd['after'].get('vmrss_untrimmed', rnd['after']['vmrss']):.1f} / "
                f"{rnd['after']['vmrss']:.1f} MiB",
            )
        )
    if after:
        rows.append(
            (
                f"after load: RSS / RSS{trimmed} (limit) / fds",
                f"{after['vmrss_untrimmed']:.1f} / {after['vmrss']:.1f} MiB "
                f"({after['rss_limit_mib']:.1f}) / {after['fds']}",
            )
        )
    ch = result.get("churn")
    if ch:
        b, e = result["before_churn"], result["after_churn"]
        rows.append(
            (
                "churn: sessions / duration / rate",
                f"{ch['sessions']} / {ch['duration_s']} s / {ch['sessions_per_s']} per s",
            )
        )
        rows.append(("churn: sessions the server counted", f"{ch['server_sessions_counted']:g}"))
        rows.append(
            (
                f"churn: RSS{trimmed} before / after (limit)",
                f"{b['vmrss']:.1f} / {e['vmrss']:.1f} MiB ({e['rss_limit_mib']:.1f}); "
                f"untrimmed after {e['vmrss_untrimmed']:.1f}",
            )
        )
        rows.append(("churn: fds before / after", f"{b['fds']} / {e['fds']}"))
        if ch["samples"]:
            every = ch["samples"][0]["done"]
            rows.append(
                (
                    f"churn: RSS every {every} (MiB)",
                    " ".join(f"{s['vmrss']:.1f}" for s in ch["samples"]),
                )
            )
            rows.append(
                (
                    f"churn: fds every {every} (load on)",
                    " ".join(str(s["fds"]) for s in ch["samples"]),
                )
            )
    if "peak_rss_mib" in result:
        rows.append(("server peak RSS (VmHWM)", f"{result['peak_rss_mib']:.1f} MiB"))
    for name, ok in result.get("checks", {}).items():
        rows.append((f"check {name}", "pass" if ok else "FAIL"))
    width = max(len(str(r[0])) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def parse(argv: Optional[List[str]]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="100 held streams, 10x10 mux, 500 churn")
    p.add_argument("--clients", type=int, default=4, help="sing-box client processes (held)")
    p.add_argument("--streams", type=int, default=1000, help="held streams through sing-box")
    p.add_argument("--mux-sessions", type=int, default=100, help="0: no mux phase")
    p.add_argument("--mux-streams", type=int, default=1000)
    p.add_argument("--size", type=int, default=32 * 1024, help="bytes per echo exchange")
    p.add_argument("--churn", type=int, default=10000, help="short sessions")
    p.add_argument("--churn-parallel", type=int, default=8)
    p.add_argument("--churn-size", type=int, default=1024)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--warmup-streams", type=int, default=100)
    p.add_argument("--warmup-churn", type=int, default=300)
    p.add_argument("--rss-tolerance", type=float, default=0.10)
    p.add_argument("--churn-rss-tolerance", type=float, default=0.05)
    p.add_argument("--rss-wait", type=float, default=10.0, help="seconds to wait for RSS")
    p.add_argument("--fd-slack", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="held and mux phases, repeated")
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=0,
        help="rounds of the full held and mux load before the baseline",
    )
    p.add_argument("--round-tolerance", type=float, default=0.05)
    p.add_argument(
        "--trim",
        choices=("auto", "on", "off"),
        default="off",
        help="measure RSS at rest after malloc_trim(0) in the server, called with gdb "
        "(auto: if gdb can attach)",
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="an environment variable for the server; repeatable [default: PYTHONMALLOC=malloc, "
        "as the systemd units in contrib/systemd set it]",
    )
    p.add_argument(
        "--memory-dump",
        action="store_true",
        help="diagnosis: at each reading at rest, have the server write a memory report "
        "(benches/memdump: gc, garbage cycles, pymalloc arenas, RSS before and after a full "
        "collection) into the run's log directory; the collections change later readings",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="bound of each phase (s)")
    p.add_argument("--out", default=os.path.join(ROOT, ".cache", "bench"))
    cfg = p.parse_args(argv)
    if cfg.server_env is None:
        cfg.server_env = [f"PYTHONMALLOC={SERVER_MALLOC}"]
    if cfg.short:
        cfg.streams, cfg.mux_sessions, cfg.mux_streams = 100, 10, 100
        cfg.churn, cfg.sample_every, cfg.warmup_streams, cfg.warmup_churn = 500, 100, 20, 50
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    cfg = parse(argv)
    b = _bench()
    sys.path.insert(0, ROOT)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(cfg.out, exist_ok=True)
    rundir = os.path.join(cfg.out, f"soak-{stamp}")
    os.makedirs(rundir)
    procs = b.Procs(rundir)
    result: dict = {"config": vars(cfg), "machine": b.machine(), "complete": False}
    started = time.monotonic()
    outcome: dict = {}

    def body(_reactor):
        d = run(cfg, procs, rundir, result)
        d.addErrback(lambda f: outcome.setdefault("error", f))
        return d

    try:
        task.react(lambda r: body(r).addBoth(lambda _: None), [])
    except SystemExit:
        pass
    finally:
        procs.stop_all()
    result["duration_s"] = round(time.monotonic() - started, 1)
    error = outcome.get("error")
    if error is not None:
        result["error"] = error.getErrorMessage() or repr(error.value)
        print(error.getTraceback(), file=sys.stderr)
    else:
        result["complete"] = True
    path = os.path.join(cfg.out, f"soak-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"total {result['duration_s']} s; results: {path}; logs: {rundir}/")
    ok = result["complete"] and all(result["checks"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
