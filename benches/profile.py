"""Profile our server on one workload with py-spy, native frames included.

Starts the loopback origins, our server and a sing-box client as ``bench.py`` does, then runs
py-spy (``record --native --format raw``) on the server while a driver moves data, and prints
where the server's samples fall: by function (self and inclusive) and by layer (OpenSSL, the
kernel's socket calls, pyOpenSSL's wrappers, Twisted's TLS and reactor, our package). The raw
collapsed stacks are kept in ``.cache/bench/profile-<timestamp>/`` for flame graphs.

    .venv/bin/pip install py-spy
    .venv/bin/python benches/profile.py download --size 1024
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import shutil
import sys
import time

import bench

#: Our package's module names: py-spy shows our frames as ``name.py`` (no package path).
OURS = {
    name[:-3]
    for name in os.listdir(os.path.join(bench.ROOT, "anytls_twisted"))
    if name.endswith(".py")
}
SYSCALLS = (
    "send",
    "sendmsg",
    "recv",
    "sendto",
    "recvfrom",
    "epoll_wait",
    "epoll_ctl",
    "connect",
    "accept4",
    "accept",
    "close",
    "shutdown",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "getpeername",
    "socket",
    "bind",
)


def _ours(frame: str) -> bool:
    match = re.search(r"\((\w+)\.py:", frame)
    return bool(match) and match.group(1) in OURS


#: (layer, test on "function (file)" frame text); each sample goes to the layer of its
#: innermost frame that matches one.
LAYERS = [
    ("system calls (socket I/O, epoll)", lambda f: f.split(" (")[0] in SYSCALLS and "libc" in f),
    (
        "OpenSSL (libssl/libcrypto)",
        lambda f: "_rust.abi3" in f or "libssl" in f or "libcrypto" in f,
    ),
    ("libc (memcpy, malloc)", lambda f: "libc.so" in f),
    ("pyOpenSSL and cffi", lambda f: "OpenSSL/SSL.py" in f or "_cffi_backend" in f),
    ("Twisted TLS (protocols/tls.py)", lambda f: "twisted/protocols/tls.py" in f),
    ("anytls_twisted", _ours),
    ("Twisted reactor, TCP, logging", lambda f: "twisted/" in f),
]


def classify(stack):
    """The layer of a sample: its innermost frame that belongs to a known layer."""
    for frame in reversed(stack):
        for name, test in LAYERS:
            if test(frame):
                return name
    return "other (interpreter, zope.interface, ...)"


def report(raw_path: str, top: int) -> str:
    own = collections.Counter()
    inclusive = collections.Counter()
    layers = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack_text, _, count = line.rstrip("\n").rpartition(" ")
            if not stack_text:
                continue
            n = int(count)
            stack = stack_text.split(";")
            total += n
            own[stack[-1]] += n
            for frame in set(stack):
                inclusive[frame] += n
            layers[classify(stack)] += n
    out = [f"{total} samples"]
    out.append("\nby layer (innermost known frame of each sample):")
    for name, n in layers.most_common():
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    out.append(f"\ntop {top} by own samples:")
    for frame, n in own.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {frame}")
    out.append(f"\ntop {top} by inclusive samples:")
    for frame, n in inclusive.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {frame}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workload", choices=["download", "upload", "parallel", "udp", "latency"])
    parser.add_argument("--size", type=int, default=1024, help="MiB moved (default 1024)")
    parser.add_argument(
        "--count", type=int, default=20000, help="datagrams or new streams (udp, latency)"
    )
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy", path=os.path.dirname(bench.PY)) or shutil.which("py-spy")
    if not spy:
        print("error: py-spy not found; .venv/bin/pip install py-spy", file=sys.stderr)
        return 1
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(bench.ROOT, ".cache", "bench", f"profile-{stamp}")
    os.makedirs(base, exist_ok=True)
    procs = bench.Procs(base)
    raw = os.path.join(base, f"{args.workload}.raw")
    try:
        origins = bench.start_origins(procs)
        server, port, cert = bench.start_ours(procs, base, "server", bench.current_build())
        client, socks = bench.start_client(procs, base, port, cert, "client")
        size = args.size * bench.MiB
        # A warm-up stream, so the session exists before sampling starts.
        bench.drive(
            procs,
            "warmup",
            [
                "--socks",
                str(socks),
                "download",
                "--origin",
                str(origins["source"]),
                "--size",
                str(bench.MiB),
            ],
            30,
        )
        spy_proc = procs.spawn(
            "py-spy",
            [
                spy,
                "record",
                "--native",
                "--format",
                "raw",
                "--rate",
                str(args.rate),
                "--pid",
                str(server.pid),
                "--output",
                raw,
            ],
        )
        time.sleep(1.0)  # py-spy attaches; nothing here is timed
        cpu0 = bench.cpu_seconds(server.pid)
        if args.workload == "parallel":
            driver = [
                "parallel",
                "--origin",
                str(origins["source"]),
                "--size",
                str(size // 100),
                "--streams",
                "100",
            ]
        elif args.workload in ("udp", "latency"):
            origin = origins["udp" if args.workload == "udp" else "echo"]
            driver = [args.workload, "--origin", str(origin), "--count", str(args.count)]
        else:
            origin = origins["source" if args.workload == "download" else "sink"]
            driver = [args.workload, "--origin", str(origin), "--size", str(size)]
        result = bench.drive(
            procs,
            args.workload,
            ["--socks", str(socks)] + driver,
            60 + args.size + args.count / 100,
        )
        cpu = bench.cpu_seconds(server.pid) - cpu0
        os.kill(spy_proc.pid, 2)  # SIGINT: py-spy writes its output and exits
        spy_proc.wait(30)
    except bench.BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    if args.workload in ("udp", "latency"):
        print(
            f"{args.workload} x{args.count}: p50 {result['p50_ms']} ms, server CPU {cpu:.2f} s "
            f"({1e6 * cpu / args.count:.0f} us each, py-spy attached)"
        )
    else:
        print(
            f"{args.workload} {args.size} MiB: {result.get('mib_s', 0):.1f} MiB/s, server CPU {cpu:.2f} s "
            f"({cpu / (args.size / 1024):.2f} s/GiB, py-spy attached)"
        )
    print(report(raw, args.top))
    print(f"\nraw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
