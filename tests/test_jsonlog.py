"""JSON log lines: the record of one event, the observer factory for ``twistd --logger``,
``--log-format json``, and a real ``twistd -n anytls`` whose stdout is JSON lines throughout,
including the session lines after a real authentication."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

from twisted.logger import Logger
from twisted.logger._legacy import publishToNewObserver
from twisted.python import log as legacy_log
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import logs
from anytls_twisted.protocol import codec
from anytls_twisted.server.tap import Options

from .e2e_support import REPO_ROOT, free_port
from .helpers import SETTINGS_V2

BASE_KEYS = {"time", "level", "namespace", "text"}


def _events():
    events = []
    return events, Logger(namespace="anytls_twisted.test", observer=events.append)


class RecordTests(SynchronousTestCase):
    def test_fields_and_text(self):
        """If an event has fields, then its JSON line has them as keys, plus time, level,
        namespace and the formatted text; log_* keys are dropped; one line, newline-ended."""
        events, log = _events()
        log.info(
            "session {session_id} open from {peer} user {user}",
            session_id="1a2b",
            peer="192.0.2.7:4000",
            user="alice",
        )
        line = logs.event_as_json(events[0])
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(
            {k: record[k] for k in ("level", "namespace", "text", "session_id", "peer", "user")},
            {
                "level": "info",
                "namespace": "anytls_twisted.test",
                "text": "session 1a2b open from 192.0.2.7:4000 user alice",
                "session_id": "1a2b",
                "peer": "192.0.2.7:4000",
                "user": "alice",
            },
        )
        self.assertFalse([k for k in record if k.startswith("log_")])
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertEqual(list(record)[:4], ["time", "level", "namespace", "text"])

    def test_levels(self):
        events, log = _events()
        log.debug("d")
        log.warn("w")
        log.error("e")
        log.critical("c")
        self.assertEqual(
            [json.loads(logs.event_as_json(e))["level"] for e in events],
            ["debug", "warn", "error", "critical"],
        )

    def test_failure_has_traceback(self):
        """If a failure is logged, then the record carries its traceback."""
        events, log = _events()
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("reaping session {session_id}", session_id="s1")
        record = json.loads(logs.event_as_json(events[0]))
        self.assertEqual(
            (record["level"], record["text"], record["session_id"]),
            ("critical", "reaping session s1", "s1"),
        )
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_legacy_event(self):
        """If an event comes from twisted.python.log, then its legacy keys are folded into
        text, system and traceback."""
        events = []
        legacy = {"message": ("hello", "world"), "isError": 0, "system": "-", "time": 1700000000.25}
        publishToNewObserver(events.append, legacy, legacy_log.textFromEventDict)
        record = json.loads(logs.event_as_json(events[0]))
        self.assertEqual(
            record,
            {
                "time": "2023-11-14T22:13:20.250+00:00",
                "level": "info",
                "namespace": "log_legacy",
                "text": "hello world",
                "system": "-",
            },
        )
        try:
            raise ValueError("bad")
        except ValueError:
            from twisted.python.failure import Failure

            error = {
                "message": (),
                "isError": 1,
                "system": "x",
                "time": 1.0,
                "failure": Failure(),
                "why": "while testing",
            }
        events = []
        publishToNewObserver(events.append, error, legacy_log.textFromEventDict)
        record = json.loads(logs.event_as_json(events[0]))
        self.assertEqual(record["level"], "critical")
        self.assertIn("while testing", record["text"])
        self.assertIn("ValueError: bad", record["traceback"])
        self.assertNotIn("failure", record)

    def test_odd_values(self):
        """If fields hold values JSON cannot express, then the line is still valid JSON."""
        events, log = _events()
        log.info(
            "odd {a}",
            a=math.nan,
            b=object(),
            c={(1, 2): "tuple key"},
            d=b"\xff",
            e=math.inf,
            f=[1, "x"],
        )
        record = json.loads(logs.event_as_json(events[0]))
        self.assertEqual(record["a"], "nan")
        self.assertEqual(record["e"], "inf")
        self.assertEqual(record["c"], {"(1, 2)": "tuple key"})
        self.assertEqual(record["f"], [1, "x"])
        self.assertIn("object", record["b"])

    def test_field_named_like_ours(self):
        events, log = _events()
        log.warn("x {text}", text="mine", namespace="theirs")
        record = json.loads(logs.event_as_json(events[0]))
        self.assertEqual((record["text"], record["namespace"]), ("x mine", "anytls_twisted.test"))

    def test_observer_factory(self):
        """If json_observer is given a stream, then each event is one line on it."""
        stream = io.StringIO()
        observer = logs.json_observer(stream)
        events, log = _events()
        log.info("one {n}", n=1)
        log.info("two\nlines")
        for event in events:
            observer(event)
        lines = stream.getvalue().splitlines()
        self.assertEqual([json.loads(line)["text"] for line in lines], ["one 1", "two\nlines"])


class OptionTests(SynchronousTestCase):
    def twistd_options(self, *args):
        config = ServerOptions()
        config.parseOptions(
            [
                "-n",
                "--pidfile=",
                "anytls",
                "--password",
                "x",
                "--state-dir",
                self.mktemp(),
                "--port",
                "ssl:0",
            ]
            + list(args)
        )
        return config

    def test_default_is_text(self):
        config = self.twistd_options()
        self.assertEqual(config.subOptions["log-format"], "text")
        self.assertIsNone(config["logger"])

    def test_json_sets_twistd_logger(self):
        """If --log-format json is given under twistd, then twistd's --logger becomes our
        observer factory (resolved by twistd itself)."""
        config = self.twistd_options("--log-format", "json")
        self.assertIs(config["logger"], logs.json_observer)
        # The same factory by name, as documented, is fine too.
        config = ServerOptions()
        config.parseOptions(
            [
                "-n",
                "--logger",
                logs.JSON_OBSERVER,
                "anytls",
                "--password",
                "x",
                "--state-dir",
                self.mktemp(),
                "--port",
                "ssl:0",
                "--log-format",
                "json",
            ]
        )
        self.assertIs(config["logger"], logs.json_observer)

    def test_conflicts(self):
        """If --log-format json meets --logfile or another --logger, or the format is unknown,
        then twistd stops with one line (exit 2)."""
        self.patch(sys, "stderr", io.StringIO())
        for twistd_args, sub_args in [
            (["--logfile", "x.log"], ["--log-format", "json"]),
            (["--logger", "twisted.logger.textFileLogObserver"], ["--log-format", "json"]),
            ([], ["--log-format", "xml"]),
        ]:
            config = ServerOptions()
            with self.assertRaises(SystemExit) as raised:
                config.parseOptions(
                    ["-n"]
                    + twistd_args
                    + ["anytls", "--password", "x", "--state-dir", self.mktemp(), "--port", "ssl:0"]
                    + sub_args
                )
            self.assertEqual(raised.exception.code, 2)
        self.assertIn("--log-format", sys.stderr.getvalue())

    def test_outside_twistd(self):
        options = Options()
        options.parseOptions(
            [
                "--password",
                "x",
                "--state-dir",
                self.mktemp(),
                "--port",
                "ssl:0",
                "--log-format",
                "json",
            ]
        )
        self.assertEqual(options["log-format"], "json")
        self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--password", "x", "--log-format", "yaml"]
        )


# --------------------------------------------------------------------------------------------
# A real twistd


class Twistd:
    """``twistd -n anytls`` in the background, stdout and stderr in separate files."""

    def __init__(self, case, twistd_args, args):
        self.base = os.path.abspath(case.mktemp())
        os.makedirs(self.base)
        self.port = free_port()
        self.stdout_path = os.path.join(self.base, "stdout")
        self.stderr_path = os.path.join(self.base, "stderr")
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
        ]
        argv += (
            list(twistd_args)
            + [
                "anytls",
                "--port",
                f"ssl:{self.port}:interface=127.0.0.1",
                "--state-dir",
                os.path.join(self.base, "state"),
            ]
            + list(args)
        )
        env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO_ROOT)
        case.addCleanup(self.stop)

    def stdout(self) -> str:
        with open(self.stdout_path, encoding="utf-8") as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8") as f:
            return f.read()

    def wait_until(self, check, seconds, what):
        deadline = time.monotonic() + seconds
        delay = 0.01
        while True:
            value = check()
            if value:
                return value
            if self.process.poll() is not None:
                raise AssertionError(
                    f"twistd exited ({self.process.returncode}) before {what}:\n{self.stdout()}\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {seconds}s waiting for {what}:\n{self.stdout()}\n{self.stderr()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def wait_listening(self):
        def accepts():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        self.wait_until(accepts, 60, f"port {self.port} to accept")

    def wait_for_text(self, needle, seconds=15):
        self.wait_until(lambda: needle in self.stdout(), seconds, f"{needle!r} on stdout")

    def stop(self):
        """SIGTERM, then SIGKILL after 15 s; the exit status. twistd ends a clean shutdown
        by re-raising the signal, so a clean stop is -SIGTERM, reported here as 0."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        code = self.process.returncode
        return 0 if code == -signal.SIGTERM else code


def raw_session(port: int, password: str, client: str = "jsonlog-test/1") -> bytes:
    """A TLS connection that authenticates as a stock client does (sha256(password), no
    padding, a Settings frame) and returns the first frame header the server answers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    settings = SETTINGS_V2.replace(b"client=sing-anytls/0.0.11", b"client=" + client.encode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            conn.sendall(
                hashlib.sha256(password.encode()).digest()
                + b"\x00\x00"
                + codec.encode_frame(codec.Command.SETTINGS, 0, settings)
            )
            answer = b""
            while len(answer) < codec.HEADER_SIZE:
                chunk = conn.recv(64)
                if not chunk:
                    break
                answer += chunk
            return answer


class TwistdJSONTests(SynchronousTestCase):
    PASSWORD = "json-log-correct-horse"

    def parse_lines(self, text):
        records = []
        for line in text.splitlines():
            self.assertTrue(line.strip(), "an empty line on stdout")
            record = json.loads(line)  # every line must be one JSON object
            self.assertIsInstance(record, dict)
            self.assertTrue(BASE_KEYS <= set(record), line)
            records.append(record)
        return records

    def test_json_lines_with_real_sessions(self):
        """If twistd anytls runs with --log-format json, then every stdout line is a JSON
        object: start-up, the client config, a refused wrong password, the session open and
        closed lines with their fields, shutdown; the password and its digest never appear."""
        server = Twistd(
            self, [], ["--password", self.PASSWORD, "--log-format", "json", "--log-level", "debug"]
        )
        server.wait_listening()
        self.assertEqual(raw_session(server.port, "wrong password"), b"")  # closed, nothing sent
        server.wait_for_text("authentication failed")
        answer = raw_session(server.port, self.PASSWORD)
        self.assertEqual(answer[0], codec.Command.SERVER_SETTINGS, answer)
        server.wait_for_text("jsonlog-test/1")  # the session's close line names the client
        self.assertEqual(server.stop(), 0)
        output = server.stdout()
        records = self.parse_lines(output)
        self.assertEqual(server.stderr(), "")
        by_text = {r["text"].split(" ")[0]: r for r in records}
        self.assertIn("listening", by_text)
        self.assertEqual(
            by_text["listening"]["pin"],
            by_text["listening"]["text"].split("certificate_public_key_sha256=")[1].split(" ")[0],
        )
        opened = [r for r in records if " open from " in r["text"]]
        self.assertEqual(len(opened), 1, output)
        self.assertEqual(opened[0]["namespace"], "anytls_twisted.session")
        self.assertEqual(opened[0]["user"], "default")
        self.assertTrue(opened[0]["peer"].startswith("127.0.0.1:"))
        self.assertEqual(
            opened[0]["text"],
            f"session {opened[0]['session_id']} open from {opened[0]['peer']} user default",
        )
        closed = [
            r
            for r in records
            if r.get("session_id") == opened[0]["session_id"] and " closed: " in r["text"]
        ]
        self.assertEqual(len(closed), 1, output)
        self.assertEqual(closed[0]["client"], "jsonlog-test/1")
        for key in ("duration", "bytes_in", "bytes_out", "streams", "reason", "peer", "user"):
            self.assertIn(key, closed[0])
        refused = [r for r in records if r.get("reason") == "authentication failed"]
        self.assertEqual(len(refused), 1, output)
        self.assertIn("closed before authentication", refused[0]["text"])
        outbound = [r for r in records if "outbound" in r]
        self.assertEqual(outbound[0]["outbound"]["password"], "<password>")
        self.assertIn("twistd", " ".join(r["text"] for r in records))
        self.assertEqual(records[-1]["text"], "Server Shut Down.")
        for secret in (self.PASSWORD, hashlib.sha256(self.PASSWORD.encode()).hexdigest()):
            self.assertNotIn(secret, output)

    def test_twistd_logger_option(self):
        """If twistd is given --logger=anytls_twisted.logs.json_observer (no option of ours),
        then the output is the same JSON lines."""
        server = Twistd(self, ["--logger=" + logs.JSON_OBSERVER], ["--password", self.PASSWORD])
        server.wait_listening()
        # the banner, logged once the reactor runs the service's start (the port is bound and
        # "starting up" logged before that)
        server.wait_for_text("listening on")
        self.assertEqual(server.stop(), 0)
        records = self.parse_lines(server.stdout())
        self.assertTrue(any(r["namespace"] == "anytls_twisted.tap" and "pin" in r for r in records))
        self.assertEqual(server.stderr(), "")

    def test_text_is_default(self):
        server = Twistd(self, [], ["--password", self.PASSWORD])
        server.wait_listening()
        server.wait_for_text("listening on")
        server.stop()
        first = server.stdout().splitlines()[0]
        self.assertRaises(ValueError, json.loads, first)
        self.assertIn("[anytls_twisted.tap#info] listening on", server.stdout())
