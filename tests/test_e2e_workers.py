"""End to end: ``twistd -n anytls --workers 2`` with real sing-box clients, over loopback."""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.python import log
from twisted.trial import unittest

from .e2e_support import (
    SERVER_KIND,
    TCP_ESTABLISHED,
    Harness,
    _proc_tcp_rows,
    e2e_test,
    label,
    payload_bytes,
    poll_until,
    socket_inodes,
    within,
)


def children_of(pid: int):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def accepted_by(pids, port: int):
    """{pid: number of established server-side connections on ``port`` it holds}."""
    inodes = {row[5] for row in _proc_tcp_rows() if row[1] == port and row[4] == TCP_ESTABLISHED}
    return {pid: len(inodes & (socket_inodes(pid) or set())) for pid in pids}


class WorkersEndToEndTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        if SERVER_KIND != "twistd":
            raise unittest.SkipTest("--workers is ours")
        self.h = Harness(self)

    @e2e_test
    def test_two_workers_share_the_port_and_stop_together(self):
        server = yield self.h.start_server(extra_args=["--workers", "2"])
        parent = server.process.pid
        yield server.process.wait_for_line(r"worker 1 serving", 30.0, what="worker 1 to start")
        workers = children_of(parent)
        self.assertEqual(len(workers), 1, f"children of {parent}: {workers}")
        # Several clients, 24 streams live at once: sessions land on both processes.
        clients = []
        for _ in range(4):
            clients.append((yield self.h.start_client(server)))
        echo = self.h.tcp_echo()
        count = 24
        streams = yield defer.gatherResults(
            [
                self.h.socks_connect(clients[i % len(clients)], echo.host, echo.port)
                for i in range(count)
            ],
            consumeErrors=True,
        )
        payloads = [
            b"w%d " % i + payload_bytes(label(f"w{i}"), 2000 + 31 * i) for i in range(count)
        ]
        for s, p in zip(streams, payloads):
            s.write(p)
        replies = yield within(
            defer.gatherResults(
                [s.read(len(p)) for s, p in zip(streams, payloads)], consumeErrors=True
            ),
            30.0,
            f"{count} parallel echoes",
        )
        for i, (got, want) in enumerate(zip(replies, payloads)):
            self.assertEqual(got, want, f"stream {i}")
        held = accepted_by([parent] + workers, server.port)
        log.msg(f"e2e workers: established sessions per process {held}")
        self.assertTrue(all(n > 0 for n in held.values()), f"sessions per process: {held}")
        yield within(
            defer.gatherResults([s.close() for s in streams], consumeErrors=True),
            15.0,
            "streams to close",
        )

        # SIGTERM to the parent: it stops the workers; none is left alive.
        yield server.process.stop(grace=20.0)
        yield poll_until(lambda: not any(alive(w) for w in workers), 10.0, "workers to exit")
        self.assertFalse([w for w in workers if alive(w)], "workers alive after the parent stopped")
