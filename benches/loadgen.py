"""Loopback origins and load drivers for scripts/bench.sh. Plain blocking sockets, 256 KiB
buffers, one thread per connection; no Twisted, so nothing here shares a process with a server
under test.

    python benches/loadgen.py origins                 # prints {"source": port, ...}, serves until killed
    python benches/loadgen.py download --size N [--socks PORT] --origin PORT
    python benches/loadgen.py upload   --size N [--socks PORT] --origin PORT
    python benches/loadgen.py parallel --size N --streams 100 [--socks PORT] --origin PORT
    python benches/loadgen.py latency  --count 200 [--socks PORT] --origin PORT
    python benches/loadgen.py udp      --count 1000 [--socks PORT] --origin PORT
    python benches/loadgen.py quiet    --socks P1,P2,P3 --origin ECHO --quiet 13 --count 4

Without --socks a driver talks straight to the origin (the "ceiling" measurement). Each driver
prints one JSON object on stdout and exits 0, or prints a message on stderr and exits 1.

quiet: per port in turn, waits until the port has been quiet for --quiet seconds, then times a
new stream as latency does (the first after quiet) and at once a second one (pooled); --count
such pairs per port, never two ports at once.

Payload and its check: the stream is a sequence of 256 KiB blocks; block i is a fixed
pseudo-random template whose first 8 bytes are replaced by i (big-endian). The receiver (driver
for downloads, sink origin for uploads) compares every received block with the expected one
(a memcmp of all bytes, cheaper than sha256), so the check is complete: length, order and
content of every byte.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import socket
import struct
import sys
import threading
import time
from typing import List, Optional, Tuple

BLOCK = 256 * 1024
TEMPLATE = random.Random(0xA11715).randbytes(BLOCK)
IO_TIMEOUT = 60.0


class CheckFailed(Exception):
    pass


# --------------------------------------------------------------------------------------------
# helpers


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise CheckFailed(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def receive_blocks(sock: socket.socket, total: int) -> int:
    """Receive ``total`` payload bytes, comparing each block with the expected one. Returns the
    number of bytes received; raises CheckFailed on a short stream or a mismatch."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    expected = bytearray(TEMPLATE)
    got = 0
    index = 0
    while got < total:
        want = min(BLOCK, total - got)
        filled = 0
        while filled < want:
            n = sock.recv_into(view[filled:want])
            if n == 0:
                raise CheckFailed(f"stream ended after {got + filled} of {total} bytes")
            filled += n
        struct.pack_into(">Q", expected, 0, index)
        if want == BLOCK:
            ok = buf == expected
        else:
            ok = view[:want] == memoryview(expected)[:want]
        if not ok:
            raise CheckFailed(f"payload mismatch in block {index} (bytes {got}..{got + want})")
        got += want
        index += 1
    return got


def send_blocks(sock: socket.socket, total: int) -> None:
    buf = bytearray(TEMPLATE)
    view = memoryview(buf)
    sent = 0
    index = 0
    while sent < total:
        k = min(BLOCK, total - sent)
        struct.pack_into(">Q", buf, 0, index)
        sock.sendall(view[:k])
        sent += k
        index += 1


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def read_socks_reply(sock: socket.socket) -> Tuple[str, int]:
    head = recv_exact(sock, 4)
    if head[0] != 5:
        raise CheckFailed(f"bad SOCKS reply version {head[0]}")
    if head[1] != 0:
        raise CheckFailed(f"SOCKS request failed with code {head[1]}")
    atyp = head[3]
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exact(sock, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(sock, 16))
    elif atyp == 3:
        host = recv_exact(sock, recv_exact(sock, 1)[0]).decode()
    else:
        raise CheckFailed(f"bad SOCKS address type {atyp}")
    port = struct.unpack(">H", recv_exact(sock, 2))[0]
    return host, port


def socks_greet(socks_port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", socks_port), timeout=IO_TIMEOUT)
    tune(sock)
    sock.sendall(b"\x05\x01\x00")
    if recv_exact(sock, 2) != b"\x05\x00":
        raise CheckFailed("SOCKS greeting refused")
    return sock


def connect_request(port: int, cmd: int = 1, host: str = "127.0.0.1") -> bytes:
    return b"\x05" + bytes([cmd]) + b"\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port)


def open_stream(socks_port: Optional[int], port: int) -> socket.socket:
    """A TCP stream to the origin on 127.0.0.1:port, via SOCKS5 CONNECT if socks_port."""
    if socks_port is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        tune(sock)
        return sock
    sock = socks_greet(socks_port)
    sock.sendall(connect_request(port))
    read_socks_reply(sock)
    return sock


def expect_eof(sock: socket.socket, seconds: float = 15.0) -> None:
    sock.settimeout(seconds)
    try:
        extra = sock.recv(65536)
    except TimeoutError:
        raise CheckFailed(f"the stream was not closed within {seconds:g}s after the last byte")
    except ConnectionResetError:
        return
    if extra:
        raise CheckFailed(f"{len(extra)}+ bytes arrived beyond the requested size")


def percentile(values: List[float], p: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --------------------------------------------------------------------------------------------
# origins


def _origin_source(conn: socket.socket) -> None:
    n = struct.unpack(">Q", recv_exact(conn, 8))[0]
    send_blocks(conn, n)


def _origin_sink(conn: socket.socket) -> None:
    n = struct.unpack(">Q", recv_exact(conn, 8))[0]
    try:
        got = receive_blocks(conn, n)
        ok = 1
    except CheckFailed as e:
        print(f"sink: {e}", file=sys.stderr, flush=True)
        got, ok = 0, 0
    conn.sendall(struct.pack(">QB", got, ok))
    # No half-close through AnyTLS: wait for the client to end the stream.
    while conn.recv(65536):
        pass


def _origin_echo(conn: socket.socket) -> None:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            return
        conn.sendall(view[:n])


def _serve_conn(handler, conn: socket.socket) -> None:
    try:
        conn.settimeout(IO_TIMEOUT * 5)
        tune(conn)
        handler(conn)
    except (OSError, CheckFailed):
        pass
    finally:
        conn.close()


def _accept_loop(listener: socket.socket, handler) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_conn, args=(handler, conn), daemon=True).start()


def _udp_echo(sock: socket.socket) -> None:
    while True:
        data, addr = sock.recvfrom(65535)
        sock.sendto(data, addr)


def run_origins() -> None:
    ports = {}
    threads = []
    for name, handler in (
        ("source", _origin_source),
        ("sink", _origin_sink),
        ("echo", _origin_echo),
    ):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        ports[name] = listener.getsockname()[1]
        threads.append(threading.Thread(target=_accept_loop, args=(listener, handler), daemon=True))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    ports["udp"] = udp.getsockname()[1]
    threads.append(threading.Thread(target=_udp_echo, args=(udp,), daemon=True))
    for t in threads:
        t.start()
    print(json.dumps(ports), flush=True)
    # Serve until killed, or until stdin closes (the orchestrator went away).
    try:
        while sys.stdin.read(1):
            pass
    except (KeyboardInterrupt, OSError):
        pass


# --------------------------------------------------------------------------------------------
# drivers


def drive_download(socks: Optional[int], origin: int, size: int) -> dict:
    sock = open_stream(socks, origin)
    started = time.monotonic()
    sock.sendall(struct.pack(">Q", size))
    receive_blocks(sock, size)
    elapsed = time.monotonic() - started
    expect_eof(sock)
    sock.close()
    return {"bytes": size, "seconds": elapsed, "mib_s": size / elapsed / 2**20}


def drive_upload(socks: Optional[int], origin: int, size: int) -> dict:
    sock = open_stream(socks, origin)
    started = time.monotonic()
    sock.sendall(struct.pack(">Q", size))
    send_blocks(sock, size)
    got, ok = struct.unpack(">QB", recv_exact(sock, 9))
    elapsed = time.monotonic() - started
    sock.close()
    if not ok or got != size:
        raise CheckFailed(f"the sink verified {got} of {size} uploaded bytes (ok={ok})")
    return {"bytes": size, "seconds": elapsed, "mib_s": size / elapsed / 2**20}


def _one_parallel_stream(socks, origin, size, out: list) -> None:
    started = time.monotonic()
    try:
        sock = open_stream(socks, origin)
        try:
            sock.sendall(struct.pack(">Q", size))
            receive_blocks(sock, size)
        finally:
            sock.close()
        out.append((started, time.monotonic(), None))
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        out.append((started, time.monotonic(), f"{type(e).__name__}: {e}"))


def _parallel_worker(args) -> list:
    socks, origin, size, count, start_at = args
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    out: list = []
    threads = [
        threading.Thread(target=_one_parallel_stream, args=(socks, origin, size, out), daemon=True)
        for _ in range(count)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + IO_TIMEOUT * 4
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    missing = count - len(out)
    out.extend((start_at, time.monotonic(), "did not finish in time") for _ in range(missing))
    return list(out)


def drive_parallel(socks: Optional[int], origin: int, size: int, streams: int, procs: int) -> dict:
    """``streams`` concurrent downloads of ``size`` bytes each, spread over ``procs`` processes
    of threads so one interpreter's lock does not cap the aggregate."""
    procs = max(1, min(procs, streams))
    shares = [streams // procs + (1 if i < streams % procs else 0) for i in range(procs)]
    start_at = time.monotonic() + 0.3
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as pool:
        parts = pool.map(_parallel_worker, [(socks, origin, size, n, start_at) for n in shares])
    results = [r for part in parts for r in part]
    done = [r for r in results if r[2] is None]
    failed = [r for r in results if r[2] is not None]
    first = min(r[0] for r in results)
    last = max(r[1] for r in done) if done else time.monotonic()
    elapsed = last - first
    moved = size * len(done)
    errors = sorted({r[2] for r in failed})[:5]
    return {
        "streams": streams,
        "bytes_each": size,
        "completed": len(done),
        "failed": len(failed),
        "errors": errors,
        "seconds": elapsed,
        "mib_s": moved / elapsed / 2**20 if elapsed > 0 else 0.0,
    }


def time_stream(socks: Optional[int], origin: int) -> float:
    """Milliseconds from sending the CONNECT request (after the SOCKS greeting, not timed) to
    the first echoed byte of one new stream; with no proxy, from connect() to that byte."""
    message = b"ping-0123456789abcdef-0123456789ab"  # 34 bytes
    if socks is None:
        started = time.perf_counter()
        sock = socket.create_connection(("127.0.0.1", origin), timeout=IO_TIMEOUT)
        tune(sock)
    else:
        sock = socks_greet(socks)
        started = time.perf_counter()
        sock.sendall(connect_request(origin))
        read_socks_reply(sock)
    try:
        sock.sendall(message)
        first = sock.recv(len(message))
        if not first:
            raise CheckFailed("the echo stream closed before any byte came back")
        t = time.perf_counter() - started
        rest = recv_exact(sock, len(message) - len(first)) if len(first) < len(message) else b""
        if first + rest != message:
            raise CheckFailed("echo mismatch")
    finally:
        sock.close()
    return t * 1000.0


def drive_latency(socks: Optional[int], origin: int, count: int, warmup: int) -> dict:
    """Sequential streams, each timed by time_stream."""
    samples = []
    for i in range(warmup + count):
        t = time_stream(socks, origin)
        if i >= warmup:
            samples.append(t)
    return {
        "count": count,
        "p50_ms": percentile(samples, 50),
        "p95_ms": percentile(samples, 95),
        "p99_ms": percentile(samples, 99),
        "mean_ms": sum(samples) / len(samples),
    }


def drive_quiet(ports: List[int], origin: int, quiet: float, count: int) -> dict:
    """Per port, ``count`` pairs: a stream after the port has been quiet for ``quiet`` seconds
    (an empty pool, unless the client pre-warms), then at once a second one (a pooled session).
    Ports take turns, one pair at a time, so no two ports' samples overlap in time.

    Port 0 is the control: straight to the origin, no proxy, which shows what waking from a
    quiet period costs on this machine alone. Before a proxy's first stream the origin is woken
    with an untimed connection of its own, so that the sample is the proxies' cost (their
    pools, and their own wake-up), not the origin's."""
    last_used = {port: time.monotonic() for port in ports}
    samples: dict = {port: {"first_ms": [], "pooled_ms": []} for port in ports}
    for _ in range(count):
        for port in ports:
            wait = last_used[port] + quiet - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            socks = port or None
            if socks is not None:
                time_stream(None, origin)  # wake the origin, untimed
            samples[port]["first_ms"].append(time_stream(socks, origin))
            samples[port]["pooled_ms"].append(time_stream(socks, origin))
            last_used[port] = time.monotonic()
    out = {}
    for port, s in samples.items():
        first, pooled = percentile(s["first_ms"], 50), percentile(s["pooled_ms"], 50)
        out[str(port)] = {
            **s,
            "first_p50_ms": first,
            "first_max_ms": max(s["first_ms"]),
            "pooled_p50_ms": pooled,
            "pooled_max_ms": max(s["pooled_ms"]),
            "ratio_p50": first / pooled if pooled else None,
        }
    return {"quiet_s": quiet, "count": count, "ports": out}


def drive_udp(socks: Optional[int], origin: int, count: int, warmup: int, wait: float) -> dict:
    """Sequential datagrams to the UDP echo; through SOCKS5 UDP ASSOCIATE if socks. A datagram
    with no reply within ``wait`` seconds counts as lost."""
    control = None
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    if socks is not None:
        control = socks_greet(socks)
        control.sendall(connect_request(0, cmd=3, host="0.0.0.0"))
        relay_host, relay_port = read_socks_reply(control)
        if relay_host in ("0.0.0.0", "::"):
            relay_host = "127.0.0.1"
        udp.connect((relay_host, relay_port))
        header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", origin)
    else:
        udp.connect(("127.0.0.1", origin))
        header = b""
    pad = bytes(56)

    def strip(data: bytes) -> Optional[bytes]:
        if socks is None:
            return data
        if len(data) < 4 or data[2] != 0:
            return None
        atyp = data[3]
        skip = {1: 4 + 4 + 2, 4: 4 + 16 + 2}.get(atyp)
        if atyp == 3 and len(data) > 4:
            skip = 4 + 1 + data[4] + 2
        return None if skip is None else data[skip:]

    samples = []
    lost = 0
    try:
        for i in range(warmup + count):
            payload = struct.pack(">Q", i) + pad
            limit = 10.0 if i == 0 else wait  # the first datagram opens the UoT stream
            started = time.perf_counter()
            udp.send(header + payload)
            deadline = started + limit
            answered = False
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                udp.settimeout(left)
                try:
                    data = udp.recv(65535)
                except TimeoutError:
                    break
                body = strip(data)
                if body == payload:
                    answered = True
                    break
                # a late reply to an earlier datagram, or garbage: keep waiting
            t = time.perf_counter() - started
            if i < warmup:
                if i == 0 and not answered:
                    raise CheckFailed("no reply to the first UDP datagram within 10s")
                continue
            if answered:
                samples.append(t * 1000.0)
            else:
                lost += 1
    finally:
        udp.close()
        if control is not None:
            control.close()
    return {
        "count": count,
        "lost": lost,
        "loss_pct": 100.0 * lost / count,
        "p50_ms": percentile(samples, 50),
        "p95_ms": percentile(samples, 95),
        "p99_ms": percentile(samples, 99),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "mode", choices=["origins", "download", "upload", "parallel", "latency", "udp", "quiet"]
    )
    parser.add_argument(
        "--socks", default=None, help="SOCKS5 port (quiet: a comma-separated list of ports)"
    )
    parser.add_argument("--origin", type=int, default=0)
    parser.add_argument(
        "--size", type=int, default=64 << 20, help="bytes (per stream for parallel)"
    )
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--quiet", type=float, default=13.0, help="quiet: seconds each port rests before a pair"
    )
    parser.add_argument(
        "--wait", type=float, default=1.0, help="UDP: seconds before a datagram counts as lost"
    )
    args = parser.parse_args(argv)
    if args.mode == "origins":
        run_origins()
        return 0
    if args.mode == "quiet":
        if not args.socks:
            parser.error("quiet needs --socks P1,P2,...")
        ports = [int(p) for p in args.socks.split(",")]
    elif args.socks is not None:
        args.socks = int(args.socks)
    try:
        if args.mode == "download":
            result = drive_download(args.socks, args.origin, args.size)
        elif args.mode == "upload":
            result = drive_upload(args.socks, args.origin, args.size)
        elif args.mode == "parallel":
            result = drive_parallel(args.socks, args.origin, args.size, args.streams, args.procs)
        elif args.mode == "latency":
            result = drive_latency(args.socks, args.origin, args.count, args.warmup)
        elif args.mode == "quiet":
            result = drive_quiet(ports, args.origin, args.quiet, args.count)
        else:
            result = drive_udp(args.socks, args.origin, args.count, args.warmup, args.wait)
    except (CheckFailed, OSError) as e:
        print(f"{args.mode}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
