"""The systemd units in contrib/systemd, and socket activation for real.

* ``systemd-analyze verify`` on all three units must print nothing at all: it exits 0 on most
  mistakes (unknown keys, unparsable values are "ignoring" warnings), so its silence is the
  check, and deliberately broken copies must fail the very same check.
* ``systemd-analyze security --offline`` rates the services' sandbox.
* The units' ExecStart command lines are parsed by our own options, with a credentials
  directory, ``$STATE_DIRECTORY`` and (for the socket unit) a socket named as the .socket unit
  names it, of the family systemd creates for its ListenStream=.
* MemoryDenyWriteExecute= is left out of the units because pyOpenSSL cannot work under it; a
  test shows why (the kernel's equivalent, prctl PR_SET_MDWE) and fails once that changes.
* ``systemd-socket-activate`` passes a listening socket to ``twistd anytls --port
  tls:systemd:...`` the way systemd does, and a sing-box client relays a stream through it.

Skipped only when the tools are missing (``scripts/test.sh`` installs Debian's systemd).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys

from twisted.internet.endpoints import _SystemdParser
from twisted.python import usage
from twisted.python.systemd import ListenFDs
from twisted.trial import unittest

from anytls_twisted.server import tap
from anytls_twisted.server.load import load

from .e2e_support import (
    REPO_ROOT,
    Harness,
    e2e_test,
    free_port,
    label,
    payload_bytes,
    twistd_executable,
    wait_for_port,
    within,
)

UNIT_DIR = os.path.join(REPO_ROOT, "contrib", "systemd")
UNITS = ("anytls.service", "anytls-socket.service", "anytls.socket")
INSTALLED_TWISTD = "/opt/anytls/venv/bin/twistd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
#: systemd-analyze security's scale is 0-100 here (it prints 0.0-10.0): 20 is "OK" (2.0).
EXPOSURE_THRESHOLD = 20


def read_unit(name: str) -> str:
    with open(os.path.join(UNIT_DIR, name), encoding="utf-8") as f:
        return f.read()


def unit_values(text: str, key: str):
    """The values of ``key=`` in a unit file (continuation lines joined, comments skipped)."""
    text = re.sub(r"\\\n", " ", text)
    return [
        line.split("=", 1)[1].strip()
        for line in text.splitlines()
        if not line.lstrip().startswith(("#", ";")) and line.split("=", 1)[0].strip() == key
    ]


def exec_start_args(text: str):
    """The arguments after ``anytls`` in the unit's ExecStart=."""
    [command] = unit_values(text, "ExecStart")
    argv = shlex.split(command)
    return argv[argv.index("anytls") + 1 :]


class UnitVerifyTests(unittest.TestCase):
    def setUp(self):
        if SYSTEMD_ANALYZE is None:
            raise unittest.SkipTest("systemd-analyze is not installed (Debian package systemd)")

    def copy_units(self, edits=None):
        """The units in a temporary directory, ExecStart pointed at a twistd that exists here
        (verify checks the binary), with ``edits`` ({unit: (old, new)}) applied."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        twistd = twistd_executable()[0]
        for name in UNITS:
            text = read_unit(name).replace(INSTALLED_TWISTD, twistd)
            if edits and name in edits:
                old, new = edits[name]
                self.assertIn(old, text, f"the mutation's text is not in {name}")
                text = text.replace(old, new)
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(text)
        return directory

    def verify(self, directory):
        """Problems systemd-analyze verify reports for all three units: its whole output, and
        its status when not 0. Empty means clean."""
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", "--man=no"]
            + [os.path.join(directory, name) for name in UNITS],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=directory,
        )
        problems = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            problems += f"\n(exit status {result.returncode})"
        return problems.strip()

    def test_units_verify_clean(self):
        self.assertEqual(self.verify(self.copy_units()), "")

    def test_broken_units_fail_the_same_check(self):
        """Each mistake below is caught by the check the real units pass (several of them only
        by the output, as systemd-analyze exits 0 on them)."""
        for edits, expected in [
            ({"anytls.service": ("ProtectSystem=strict", "ProtectSystm=strict")}, "Unknown key"),
            ({"anytls.service": ("ProtectSystem=strict", "ProtectSystem=strictly")}, "strictly"),
            ({"anytls.service": ("LimitNOFILE=65536", "LimitNOFILE=lots")}, "lots"),
            ({"anytls.service": ("AF_INET AF_INET6", "AF_INET AF_INET7")}, "AF_INET7"),
            (
                {
                    "anytls-socket.service": (
                        "SystemCallFilter=@system-service",
                        "SystemCallFilter=@system-servic",
                    )
                },
                "@system-servic",
            ),
            ({"anytls-socket.service": ("[Service]", "[Servic]")}, "Servic"),
            (
                {
                    "anytls.socket": (
                        "Service=anytls-socket.service",
                        "Service=anytls-sockets.service",
                    )
                },
                "anytls-sockets.service",
            ),
            ({"anytls.socket": ("ListenStream=8443", "ListenStream=84433")}, "84433"),
        ]:
            problems = self.verify(self.copy_units(edits))
            self.assertNotEqual(problems, "", f"{edits} passed the check")
            self.assertIn(expected, problems, edits)

    def test_security_exposure(self):
        """The sandbox keeps systemd's exposure rating at OK (2.0 or less) for both services."""
        directory = self.copy_units()
        for name in ("anytls.service", "anytls-socket.service"):
            result = subprocess.run(
                [
                    SYSTEMD_ANALYZE,
                    "security",
                    "--offline=true",
                    f"--threshold={EXPOSURE_THRESHOLD}",
                    "--no-pager",
                    name,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=directory,
            )
            if "--offline" in result.stderr and "unrecognized" in result.stderr:
                raise unittest.SkipTest(
                    "this systemd-analyze has no security --offline (systemd < 250)"
                )
            self.assertEqual(result.returncode, 0, f"{name}:\n{result.stdout}{result.stderr}")
            self.assertRegex(result.stdout, r"Overall exposure level for \S+: [0-9.]+ OK")


class UnitContentTests(unittest.SynchronousTestCase):
    """What the units say, checked against the server's own options (no systemd needed)."""

    def parse(self, unit: str, sockets=None):
        credentials = os.path.abspath(self.mktemp())
        state = os.path.abspath(self.mktemp())
        os.makedirs(credentials)
        with open(os.path.join(credentials, "password"), "w") as f:
            f.write("from-the-credential\n")
        args = [
            a.replace("${CREDENTIALS_DIRECTORY}", credentials)
            for a in exec_start_args(read_unit(unit))
        ]
        self.patch(
            os,
            "environ",
            dict(os.environ, STATE_DIRECTORY=state, CREDENTIALS_DIRECTORY=credentials),
        )
        if sockets is not None:
            self.patch(_SystemdParser, "_sddaemon", sockets)
        options = tap.Options()
        options.parseOptions(args)
        return load(options), state

    def test_service_command_line(self):
        """ExecStart parses; the password comes from the credential; the certificate is
        generated in $STATE_DIRECTORY (StateDirectory=)."""
        text = read_unit("anytls.service")
        self.assertEqual(unit_values(text, "StateDirectory"), ["anytls"])
        self.assertEqual(unit_values(text, "LoadCredential"), ["password:/etc/anytls/password"])
        settings, state = self.parse("anytls.service")
        self.assertEqual(settings.users, (("default", "from-the-credential"),))
        self.assertEqual(
            settings.generated_certificate, os.path.join(state, "self-signed-cert.pem")
        )
        self.assertTrue(os.path.exists(os.path.join(state, "self-signed-cert.pem")))
        [spec] = [port.spec for port in settings.ports]
        self.assertEqual((spec.endpoint, spec.tls), ("tcp:8443", True))

    def test_socket_service_command_line(self):
        """The socket service asks for the socket by the .socket unit's FileDescriptorName=, with
        the family systemd creates for its ListenStream= (a port alone: IPv6, dual-stack)."""
        socket_unit = read_unit("anytls.socket")
        [name] = unit_values(socket_unit, "FileDescriptorName")
        self.assertEqual(unit_values(socket_unit, "ListenStream"), ["8443"])
        self.assertEqual(unit_values(socket_unit, "Service"), ["anytls-socket.service"])
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            raise unittest.SkipTest("no IPv6 sockets here")
        self.addCleanup(sock.close)
        settings, _ = self.parse("anytls-socket.service", ListenFDs([sock.fileno()], (name,)))
        [spec] = [port.spec for port in settings.ports]
        self.assertTrue(spec.tls)
        self.assertEqual(spec.endpoint, f"systemd:domain=INET6:name={name}")
        # The same command line with an IPv4 socket is refused, with the fix in the message.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as v4:
            e = self.assertRaises(
                usage.UsageError,
                self.parse,
                "anytls-socket.service",
                ListenFDs([v4.fileno()], (name,)),
            )
            self.assertIn("say domain=INET", str(e))

    def test_reload_and_hardening(self):
        for unit in ("anytls.service", "anytls-socket.service"):
            text = read_unit(unit)
            self.assertEqual(unit_values(text, "ExecReload"), ["/bin/kill -HUP $MAINPID"], unit)
            self.assertEqual(unit_values(text, "CapabilityBoundingSet"), [""], unit)
            self.assertEqual(unit_values(text, "DynamicUser"), ["yes"], unit)
            self.assertEqual(unit_values(text, "MemoryDenyWriteExecute"), [], unit)  # see below
            argv = shlex.split(unit_values(text, "ExecStart")[0])
            self.assertEqual(
                argv[:4], [INSTALLED_TWISTD, "--nodaemon", "--pidfile=", "anytls"], unit
            )


MDWE_PROBE = r"""
import ctypes, os, sys
if sys.argv[1] == "mdwe":
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print("unsupported", os.strerror(ctypes.get_errno()))
        sys.exit(3)
from anytls_twisted import certs
from anytls_twisted import tls
cert, key = certs.ensure_self_signed(sys.argv[2], "localhost")
tls.server_tls_options(certs.load_certificate_files(cert, key)).getContext()
print("context ok")
"""


class MemoryDenyWriteExecuteTests(unittest.SynchronousTestCase):
    def probe(self, mode):
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        return subprocess.run(
            [sys.executable, "-c", MDWE_PROBE, mode, os.path.abspath(self.mktemp())],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    def test_pyopenssl_needs_write_execute_memory(self):
        """Why the units leave MemoryDenyWriteExecute= out: with write+execute memory refused
        (the kernel's PR_SET_MDWE, what that setting enforces with seccomp), building our TLS
        context fails. If this starts passing, the setting can go back into the units."""
        normal = self.probe("normal")
        self.assertEqual(
            (normal.returncode, normal.stdout.strip()), (0, "context ok"), normal.stderr
        )
        refused = self.probe("mdwe")
        if refused.returncode == 3:
            raise unittest.SkipTest(
                f"this kernel has no PR_SET_MDWE (Linux 6.3+): {refused.stdout.strip()}"
            )
        self.assertNotEqual(refused.returncode, 0, refused.stdout)
        self.assertIn("Cannot allocate write+execute memory for ffi.callback()", refused.stderr)


class SocketActivationTests(unittest.TestCase):
    """``twistd anytls --port tls:systemd:...`` under systemd-socket-activate, which passes a
    listening socket as systemd does (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES) and execs the
    server on the first connection, in the same process."""

    timeout = 180

    def setUp(self):
        if not os.access(SOCKET_ACTIVATE, os.X_OK):
            raise unittest.SkipTest(f"{SOCKET_ACTIVATE} is missing (Debian package systemd)")
        self.h = Harness(self)

    def launcher(self, *extra):
        return [
            SOCKET_ACTIVATE,
            "-l",
            "127.0.0.1:{port}",
            *extra,
            # systemd-socket-activate passes on only the environment it is told to.
            "-E",
            f"PYTHONPATH={REPO_ROOT}",
            "-E",
            "PYTHONUNBUFFERED=1",
            "--",
        ]

    def check_session(self, server):
        lines = server.process.matching_lines(r"session \S+ open from")
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, r"open from 127\.0\.0\.1:\d+ user")

    @e2e_test
    def test_stream_through_activated_socket_by_name(self):
        """As anytls.socket + anytls-socket.service do it: the socket found by its name."""
        server = yield self.h.start_server(
            kind="twistd",
            ports=["tls:systemd:domain=INET:name=anytls"],
            launcher=self.launcher("--fdname=anytls"),
        )
        yield server.process.wait_for_line(
            r"listening on tls:systemd:domain=INET:name=anytls with TLS",
            10.0,
            what="the listening line",
        )
        client = yield self.h.start_client(server)
        echo = self.h.tcp_echo()
        yield self.h.echo_once(client, echo, payload_bytes(label("socket activation"), 50_000))
        self.assertEqual(echo.accepted, 1)
        self.check_session(server)
        # The server listened on nothing of its own: the one listening socket is the inherited.
        self.assertEqual(len(listening_sockets(server.process.pid)), 1)
        self.h.assert_alive(server.process)

    @e2e_test
    def test_stream_through_activated_socket_by_index(self):
        server = yield self.h.start_server(
            kind="twistd",
            ports=["tls:systemd:domain=INET:index=0"],
            launcher=self.launcher("--fdname=x"),
        )
        client = yield self.h.start_client(server)
        echo = self.h.tcp_echo()
        yield self.h.echo_once(client, echo, b"by index")
        self.check_session(server)

    def run_activated(self, port_description, *extra):
        """Start the server under systemd-socket-activate, trigger it, and wait for it to end."""
        port = free_port("127.0.0.1")
        command = twistd_executable()
        args = (
            self.launcher(*extra)[1:]
            + command
            + [
                "-n",
                "--pidfile=",
                "anytls",
                "--password",
                "x",
                "--state-dir",
                os.path.abspath(self.mktemp()),
                "--port",
                port_description,
            ]
        )
        proc = self.h.spawn(
            "activated", SOCKET_ACTIVATE, [a.format(port=port) for a in args], short_lived=True
        )
        d = wait_for_port("127.0.0.1", port, 30.0, proc)  # the first connection starts it
        d.addCallback(lambda _: within(proc.ended.wait(), 60.0, "the server to exit"))
        return d

    @e2e_test
    def test_wrong_domain_fails_clearly(self):
        """A socket of another family than domain= says ends the start with one line naming
        the right domain (Twisted would adopt it and log nonsense addresses)."""
        proc = yield self.run_activated("tls:systemd:domain=INET6:name=anytls", "--fdname=anytls")
        self.assertNotEqual(proc.exit_code, 0)
        output = proc.tail()
        self.assertNotIn("Traceback", output)
        self.assertIn("is AF_INET: say domain=INET", output)

    @e2e_test
    def test_unnamed_sockets_fail_clearly(self):
        """Without LISTEN_FDNAMES Twisted sees no socket at all, even by index; say so."""
        proc = yield self.run_activated("tls:systemd:domain=INET:index=0")
        self.assertNotEqual(proc.exit_code, 0)
        output = proc.tail()
        self.assertNotIn("Traceback", output)
        self.assertIn("systemd passed no socket matching systemd:domain=INET:index=0", output)
        self.assertIn("--fdname", output)


def listening_sockets(pid: int):
    """Inodes of the TCP sockets in LISTEN state that process ``pid`` holds."""
    from .e2e_support import TCP_LISTEN, _proc_tcp_rows, socket_inodes

    listening = {inode for _, _, _, _, state, inode in _proc_tcp_rows() if state == TCP_LISTEN}
    return listening & (socket_inodes(pid) or set())
