"""Idle memory of our server (or client), and of sing-box's anytls inbound beside it.

    .venv/bin/python benches/idle_rss.py inprocess anytls --port ssl:18445:interface=127.0.0.1 \\
        --password x --state-dir /tmp/x --allow-private --log-level warn [--importers PKG,...]
    .venv/bin/python benches/idle_rss.py pair [--sessions 100] [--rounds 3] [--env K=V ...]
    .venv/bin/python benches/idle_rss.py floor

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

``floor`` prints what Twisted and twistd hold before any of our code, in two fresh interpreters:
as installed, and with pyOpenSSL hidden (Twisted then loads no TLS, as if it were not
installed); the standard library's ``ssl`` is loaded in both. The difference is what a TLS
layer on ``ssl`` instead of pyOpenSSL would leave out.

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


def _bench():
    """benches/bench.py: its process group handling, ports, sing-box and anchor config."""
    sys.path.insert(0, HERE)
    import bench

    return bench


def open_sessions(port: int, n: int) -> List[ssl.SSLSocket]:
    """``n`` authenticated idle sessions: TLS, the preamble, a Settings frame; no stream."""
    import socket
    import ssl

    sys.path.insert(0, ROOT)
    from anytls_twisted.protocol.auth import encode_preamble
    from anytls_twisted.protocol.codec import Command, encode_frame, format_settings

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    settings = {"v": 2, "client": "idle-rss/1", "padding-md5": "0" * 32}
    hello = encode_preamble(PASSWORD) + encode_frame(Command.SETTINGS, 0, format_settings(settings))
    socks = []
    for _ in range(n):
        raw = socket.create_connection(("127.0.0.1", port))
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(hello)
        socks.append(s)
    time.sleep(3)
    return socks


def one_round(
    sessions: int, env_extra: Dict[str, str], checkout: str
) -> Dict[str, Dict[str, float]]:
    import glob
    import shutil
    import tempfile

    b = _bench()
    rundir = tempfile.mkdtemp(prefix="idle-rss-")
    procs = b.Procs(rundir)
    try:
        ours_port, anchor_port = b.free_port(), b.free_port()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        argv = [twistd, "-n", "--pidfile=", "anytls"]
        argv += ["--port", f"ssl:{ours_port}:interface=127.0.0.1", "--password", PASSWORD]
        argv += ["--state-dir", rundir, "--allow-private", "--log-level", "warn"]
        argv += ["--connection-rate", "0"]
        env = dict(os.environ, PYTHONPATH=checkout, **env_extra)
        ours = procs.spawn("ours", argv, env=env, cwd=rundir)
        b.wait_for_port(ours_port, ours, 30.0)
        (cert,) = glob.glob(os.path.join(rundir, "*cert*.pem"))
        (key,) = glob.glob(os.path.join(rundir, "*key*.pem"))
        config = b.anchor_config(anchor_port, cert, key, PASSWORD)
        anchor = b.run_singbox(procs, rundir, "anchor", config, "anchor", anchor_port)
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
        procs.stop_all()
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


# -- floor ---------------------------------------------------------------------------------

#: What twistd imports before it loads a plugin, and the standard library's TLS.
_FLOOR = """
import sys
if sys.argv[1] == "hidden":
    sys.modules["OpenSSL"] = None  # an import of it fails, as if it were not installed
from twisted.internet import reactor
import twisted.application.app, twisted.internet.endpoints, twisted.scripts.twistd
import gc, ssl
gc.collect()
print(sys.argv[1], "cryptography" in sys.modules, open("/proc/self/status").read())
"""


def floor() -> None:
    import subprocess

    figures = {}
    for mode in ("installed", "hidden"):
        out = subprocess.run(
            [sys.executable, "-c", _FLOOR, mode], check=True, capture_output=True, text=True
        ).stdout
        first, _, rest = out.partition("\n")
        lines = dict(line.partition(":")[::2] for line in rest.splitlines())
        figures[mode] = int(lines["VmRSS"].split()[0]) / 1024
        print(
            f"pyOpenSSL {mode}: {figures[mode]:.1f} MiB (cryptography loaded: {first.split()[1]})"
        )
    print(f"pyOpenSSL and cryptography: {figures['installed'] - figures['hidden']:.1f} MiB")


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
    sub.add_parser("floor", help="Twisted and twistd alone, with and without pyOpenSSL")
    args = parser.parse_args()
    if args.mode == "inprocess":
        sys.path.insert(0, ROOT)
        names = [n for n in args.importers.split(",") if n]
        inprocess(args.tapname, args.args, names)
    elif args.mode == "floor":
        floor()
    else:
        env = dict(item.split("=", 1) for item in args.env)
        pair(args.sessions, args.rounds, env, os.path.abspath(args.checkout))


if __name__ == "__main__":
    main()
