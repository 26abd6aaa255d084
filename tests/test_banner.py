"""The client config shown at start: the sing-box outbound, the anytls:// URI, the hints,
``--print-client-config`` under a real twistd, ``sing-box check`` on the outbound, and the
printed outbound (with the real password) driving an echo through a running server."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, utils
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from anytls_twisted import certs, tls
from anytls_twisted import clientconfig as banner
from anytls_twisted.server.tap import Options, makeService

from .e2e_support import (
    PASSWORD,
    REPO_ROOT,
    SERVER_KIND,
    Harness,
    ProcessGone,
    SingBoxClient,
    e2e_test,
    free_port,
    singbox_binary,
    wait_for_port,
    within,
)
from .helpers import capture_events

PIN = "qQkVG6sdJt+K9xg8FdG04dvp4ThnnRICa8Pf583tqmI="


def _cert(name: str, issuer_key=None, sans=None, cn=True) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if cn else [])
    issuer = (
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]) if issuer_key else subject
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _dns(*names):
    return [x509.DNSName(n) for n in names]


def _full_config(outbound: dict, socks_port: int = 1080) -> dict:
    """The outbound inside a whole client config: a mixed inbound, everything to it."""
    return {
        "log": {"level": "warn", "timestamp": True},
        "inbounds": [
            {"type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1", "listen_port": socks_port}
        ],
        "outbounds": [outbound],
        "route": {"final": outbound["tag"]},
    }


def _split_printed(text: str):
    """``--print-client-config`` output -> [(outbound dict, uri)]."""
    decoder = json.JSONDecoder()
    blocks, position = [], 0
    text = text.strip()
    while position < len(text):
        outbound, end = decoder.raw_decode(text, position)
        line_end = text.find("\n", end + 1)
        line_end = len(text) if line_end < 0 else line_end
        blocks.append((outbound, text[end:line_end].strip()))
        position = line_end
        while position < len(text) and text[position].isspace():
            position += 1
    return blocks


class AddressTests(SynchronousTestCase):
    def test_public_address_forms(self):
        """If --public-address is HOST, HOST:PORT, IPV6 or [IPV6]:PORT, then it is split into
        host and optional port; anything else is refused."""
        cases = {
            "vpn.example.com": ("vpn.example.com", None),
            "vpn.example.com:443": ("vpn.example.com", 443),
            "203.0.113.5": ("203.0.113.5", None),
            "203.0.113.5:8443": ("203.0.113.5", 8443),
            "2001:db8::1": ("2001:db8::1", None),
            "[2001:db8::1]": ("2001:db8::1", None),
            "[2001:db8::1]:443": ("2001:db8::1", 443),
        }
        for text, expected in cases.items():
            self.assertEqual(banner.parse_public_address(text), expected, text)
        for bad in [
            "",
            ":443",
            "host:0",
            "host:65536",
            "host:http",
            "a:b:c",
            "[host]:1",
            "[::1",
            "a b",
            "u@h",
        ]:
            self.assertRaises(ValueError, banner.parse_public_address, bad)

    def test_listen_address(self):
        """If the endpoint is tcp/tcp6 (also under haproxy:), then its interface and port are
        found, escapes undone; unix and systemd endpoints have none."""
        self.assertEqual(banner.listen_address("tcp:8443:interface=127.0.0.1"), ("127.0.0.1", 8443))
        self.assertEqual(banner.listen_address("tcp:8443:interface=\\:\\:1"), ("::1", 8443))
        self.assertEqual(banner.listen_address("tcp6:port=443"), (None, 443))
        self.assertEqual(banner.listen_address("haproxy:tcp:443:backlog=5"), (None, 443))
        self.assertEqual(banner.listen_address("systemd:domain=INET:index=0"), (None, None))
        self.assertEqual(banner.listen_address("unix:/run/anytls.sock"), (None, None))
        # What tls.parse_port makes of an ssl: port.
        spec = tls.parse_port("ssl:8443:interface=\\:\\:1")
        self.assertEqual(banner.listen_address(spec.endpoint), ("::1", 8443))

    def test_specific_interface(self):
        for wildcard in [None, "", "0.0.0.0", "::", "0:0:0:0:0:0:0:0"]:
            self.assertIsNone(banner.specific_interface(wildcard))
        self.assertEqual(banner.specific_interface("192.0.2.1"), "192.0.2.1")
        self.assertEqual(banner.specific_interface("::1"), "::1")


class EndpointTests(SynchronousTestCase):
    def endpoint(self, port, cert, public=None, server_name="localhost"):
        spec = tls.parse_port(port)
        return banner.client_endpoint(
            spec, cert, certs.spki_pin(cert) if cert else None, server_name, public
        )

    def test_generated_certificate(self):
        """If the certificate is the generated one, then the outbound trusts it by its pin and
        names it by --server-name, and the URI says insecure=1."""
        state = self.mktemp()
        cert_path, key_path = certs.ensure_self_signed(state, "proxy.test")
        material = certs.load_certificate_files(cert_path, key_path)
        spec = tls.parse_port("ssl:8443")
        endpoint = banner.client_endpoint(spec, material.certificate, material.pin, "proxy.test")
        self.assertEqual(endpoint.server, banner.ADDRESS_PLACEHOLDER)
        self.assertEqual(
            (endpoint.server_port, endpoint.server_name, endpoint.pin),
            (8443, "proxy.test", material.pin),
        )
        self.assertEqual(
            banner.outbound(endpoint),
            {
                "type": "anytls",
                "tag": "anytls",
                "server": "YOUR_SERVER_ADDRESS",
                "server_port": 8443,
                "password": "<password>",
                "tls": {
                    "enabled": True,
                    "server_name": "proxy.test",
                    "certificate_public_key_sha256": [material.pin],
                },
            },
        )
        self.assertEqual(
            banner.uri(endpoint),
            "anytls://<password>@YOUR_SERVER_ADDRESS:8443/?sni=proxy.test&insecure=1",
        )

    def test_server_address_choice(self):
        """If --public-address is given, then it wins (with its port); else a specific
        listening interface; else the placeholder."""
        cert = _cert("localhost", sans=_dns("localhost"))
        self.assertEqual(self.endpoint("ssl:8443:interface=192.0.2.1", cert).server, "192.0.2.1")
        self.assertEqual(
            self.endpoint("ssl:8443:interface=0.0.0.0", cert).server, banner.ADDRESS_PLACEHOLDER
        )
        public = self.endpoint("ssl:8443:interface=192.0.2.1", cert, ("vpn.example.com", 443))
        self.assertEqual((public.server, public.server_port), ("vpn.example.com", 443))
        keep_port = self.endpoint("ssl:8443", cert, ("vpn.example.com", None))
        self.assertEqual((keep_port.server, keep_port.server_port), ("vpn.example.com", 8443))
        self.assertIsNone(self.endpoint("ssl:0", cert))  # port chosen by the system: unknown

    def test_ca_issued_certificate(self):
        """If the certificate is CA-issued, then there is no pin and no insecure=1, and the
        server name is the public address if the certificate covers it, else its first name."""
        ca_key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(
            "www.example.com", issuer_key=ca_key, sans=_dns("*.example.com", "www.example.com")
        )
        self.assertFalse(banner.is_self_signed(cert))
        plain = self.endpoint("ssl:443", cert)
        self.assertEqual(
            (plain.pin, plain.server_name, plain.insecure), (None, "www.example.com", False)
        )
        covered = self.endpoint("ssl:443", cert, ("vpn.example.com", None))
        self.assertEqual(covered.server_name, "vpn.example.com")
        other = self.endpoint("ssl:443", cert, ("203.0.113.5", None))
        self.assertEqual(other.server_name, "www.example.com")
        self.assertNotIn("certificate_public_key_sha256", banner.outbound(plain)["tls"])
        self.assertEqual(
            banner.uri(plain), "anytls://<password>@YOUR_SERVER_ADDRESS:443/?sni=www.example.com"
        )

    def test_names_from_certificate(self):
        """If the certificate has only a wildcard or only a common name, then the server name
        falls back sensibly; an IP SAN is a name too."""
        wildcard = _cert("x", sans=_dns("*.example.com"), cn=False)
        self.assertEqual(
            self.endpoint("ssl:1", wildcard, server_name="fallback").server_name, "fallback"
        )
        cn_only = _cert("cn.example.com")
        self.assertEqual(self.endpoint("ssl:1", cn_only).server_name, "cn.example.com")
        import ipaddress

        ip_cert = _cert("x", sans=[x509.IPAddress(ipaddress.ip_address("203.0.113.5"))], cn=False)
        self.assertEqual(self.endpoint("ssl:1", ip_cert).server_name, "203.0.113.5")
        self.assertTrue(banner.is_self_signed(ip_cert))

    def test_plain_port(self):
        """If the port is plain (behind a TLS-terminating proxy), then the block has no pin,
        and a public host name becomes the server name."""
        spec = tls.parse_port("tcp:8080:interface=127.0.0.1")
        endpoint = banner.client_endpoint(spec, None, None, "localhost", ("vpn.example.com", 443))
        self.assertEqual(
            (endpoint.server, endpoint.server_port, endpoint.server_name),
            ("vpn.example.com", 443, "vpn.example.com"),
        )
        self.assertFalse(endpoint.tls)
        self.assertIsNone(endpoint.pin)
        self.assertIsNone(
            banner.client_endpoint(tls.parse_port("unix:/tmp/x"), None, None, "localhost")
        )
        self.assertIn("plain ports", " ".join(banner.hints([endpoint], False)))

    def test_uri_escaping_and_ipv6(self):
        """If the password has reserved characters or the host is IPv6, then the URI stays
        parseable and gives them back exactly."""
        cert = _cert("localhost", sans=_dns("localhost"))
        endpoint = self.endpoint("ssl:8443:interface=\\:\\:1", cert)
        password = "p@ss:w/rd?#&= ü%"
        text = banner.uri(endpoint, password)
        parts = urllib.parse.urlsplit(text)
        self.assertEqual(parts.scheme, "anytls")
        self.assertEqual(urllib.parse.unquote(parts.username), password)
        self.assertEqual((parts.hostname, parts.port, parts.path), ("::1", 8443, "/"))
        self.assertEqual(
            urllib.parse.parse_qs(parts.query), {"sni": ["localhost"], "insecure": ["1"]}
        )
        self.assertEqual(banner.outbound(endpoint, password)["password"], password)

    def test_unique_and_tags(self):
        """If two ports look the same to a client (IPv4 and IPv6 wildcards), then one block is
        shown; different ones get tags anytls, anytls-2, ..."""
        cert = _cert("localhost", sans=_dns("localhost"))
        same = [self.endpoint("ssl:8443", cert), self.endpoint("ssl:8443:interface=\\:\\:", cert)]
        self.assertEqual(len(banner.unique(same)), 1)
        two = banner.unique(
            [
                self.endpoint("ssl:1:interface=127.0.0.1", cert),
                self.endpoint("ssl:1:interface=\\:\\:1", cert),
                None,
            ]
        )
        printed = _split_printed(banner.render(two, "pw"))
        self.assertEqual([o["tag"] for o, _ in printed], ["anytls", "anytls-2"])
        self.assertEqual([o["server"] for o, _ in printed], ["127.0.0.1", "::1"])
        self.assertEqual([u for _, u in printed], [banner.uri(e, "pw") for e in two])

    def test_json_text_formats_as_json(self):
        """If an outbound is formatted into a log message, then the text is compact JSON."""
        outbound = banner.outbound(
            self.endpoint("ssl:1", _cert("localhost", sans=_dns("localhost")))
        )
        self.assertEqual(json.loads(f"{outbound}"), outbound)
        self.assertEqual(json.loads(str(outbound)), outbound)
        self.assertNotIn("\n", str(outbound))


class OptionTests(SynchronousTestCase):
    def parse(self, *args):
        options = Options()
        options.parseOptions(["--state-dir", self.mktemp()] + list(args))
        return options

    def capture_events(self):
        return capture_events(self)

    def test_bad_public_address(self):
        self.assertRaises(
            usage.UsageError, self.parse, "--password", "x", "--public-address", "a:b:c"
        )

    def test_print_client_config_exits(self):
        """If --print-client-config is given, then makeService prints the blocks and exits
        0, before anything could listen."""
        out = []
        self.patch(sys, "stdout", _Writer(out))
        self.patch(sys, "stderr", _Writer([]))
        options = self.parse(
            "--password",
            "sekrit",
            "--port",
            "ssl:8443:interface=127.0.0.1",
            "--print-client-config",
        )
        reactor = MemoryReactorClock()
        with self.assertRaises(SystemExit) as raised:
            makeService(options, reactor=reactor)
        self.assertEqual(raised.exception.code, 0)
        self.assertEqual((reactor.tcpServers, reactor.adoptedPorts), ([], []))
        [(outbound, uri)] = _split_printed("".join(out))
        self.assertEqual(outbound["server"], "127.0.0.1")
        self.assertEqual(outbound["password"], "<password>")
        self.assertNotIn("sekrit", "".join(out))
        self.assertTrue(
            uri.startswith("anytls://<password>@127.0.0.1:8443/?sni=localhost&insecure=1")
        )

    def test_logged_at_start_without_password(self):
        """If the service starts, then it logs the outbound and URI for each port, with the
        password only when --show-password is given."""
        for show, expected in [((), "<password>"), (("--show-password",), "sekrit")]:
            events = self.capture_events()
            options = self.parse(
                "--password",
                "sekrit",
                "--port",
                "ssl:0:interface=127.0.0.1",
                "--port",
                "ssl:9443:interface=127.0.0.1",
                *show,
            )
            top = makeService(options, reactor=MemoryReactorClock())
            top.startService()
            self.addCleanup(top.stopService)
            ours = [e for e in events if e.get("log_namespace") == "anytls_twisted.banner"]
            outbounds = [e["outbound"] for e in ours if "outbound" in e]
            uris = [e["uri"] for e in ours if "uri" in e]
            self.assertEqual(len(outbounds), 1)  # ssl:0 has no port a client could dial
            self.assertEqual(outbounds[0]["password"], expected)
            self.assertEqual(outbounds[0]["server_port"], 9443)
            self.assertEqual(
                uris, [f"anytls://{expected}@127.0.0.1:9443/?sni=localhost&insecure=1"]
            )
            texts = " ".join(formatEvent(e) for e in ours)
            self.assertIn(json.dumps(outbounds[0], separators=(",", ":")), texts)
            if not show:
                self.assertNotIn("sekrit", texts)
                self.assertIn("--show-password", texts)

    def test_generated_certificate_named(self):
        """If the generated certificate is used, then the banner says where it is, and the
        sing-box 1.12 hint names that file."""
        state = os.path.abspath(self.mktemp())
        events = self.capture_events()
        options = Options()
        options.parseOptions(
            ["--state-dir", state, "--password", "x", "--port", "ssl:8443:interface=127.0.0.1"]
        )
        top = makeService(options, reactor=MemoryReactorClock())
        texts = " ".join(formatEvent(e) for e in events)
        self.assertNotIn("self-signed-cert.pem", texts)  # nothing before the ports listen
        top.startService()
        self.addCleanup(top.stopService)
        cert_path = os.path.join(state, "self-signed-cert.pem")
        texts = [formatEvent(e) for e in events]
        self.assertIn(f"generated self-signed certificate for localhost: {cert_path}", texts)
        self.assertIn(
            "client config: tls.certificate_public_key_sha256 needs sing-box 1.13 or later "
            f"(for 1.12 use tls.certificate_path with a copy of {cert_path}); the URI cannot "
            "carry the pin, so it says insecure=1",
            texts,
        )


class _Writer:
    def __init__(self, sink):
        self.sink = sink

    def write(self, text):
        self.sink.append(text)

    def flush(self):
        pass


def _twistd_argv(state, *args):
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "anytls",
        "--state-dir",
        state,
    ] + list(args)


class PrintClientConfigTwistdTests(SynchronousTestCase):
    """``--print-client-config`` under a real ``twistd`` process."""

    def run_twistd(self, *args):
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        state = os.path.abspath(self.mktemp())
        return subprocess.run(
            _twistd_argv(state, *args),
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=60,
            text=True,
        )

    def test_prints_and_exits_without_listening(self):
        """If twistd anytls gets --print-client-config, then stdout holds only the outbound
        and the URI, stderr the hints, it exits 0, and the port was never bound."""
        port = free_port()
        result = self.run_twistd(
            "--password", "pw", "--port", f"ssl:{port}:interface=127.0.0.1", "--print-client-config"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        [(outbound, uri)] = _split_printed(result.stdout)
        self.assertEqual(
            (outbound["type"], outbound["server"], outbound["server_port"]),
            ("anytls", "127.0.0.1", port),
        )
        self.assertEqual(uri, f"anytls://<password>@127.0.0.1:{port}/?sni=localhost&insecure=1")
        self.assertIn("--show-password", result.stderr)
        self.assertNotIn("starting up", result.stdout + result.stderr)  # no log, no reactor
        self.assertNotIn('pw"', result.stdout)

    def test_show_password_and_public_address(self):
        result = self.run_twistd(
            "--password",
            "pw:é",
            "--public-address",
            "[2001:db8::7]:443",
            "--show-password",
            "--print-client-config",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        [(outbound, uri)] = _split_printed(result.stdout)
        self.assertEqual(
            (outbound["server"], outbound["server_port"], outbound["password"]),
            ("2001:db8::7", 443, "pw:é"),
        )
        self.assertEqual(uri, "anytls://pw%3A%C3%A9@[2001:db8::7]:443/?sni=localhost&insecure=1")

    def test_json_format_is_one_document(self):
        """If --client-config-format json is given, then stdout is exactly one JSON document,
        {"outbounds": [...]}, one outbound per port (hints stay on stderr)."""
        result = self.run_twistd(
            "--password",
            "pw",
            "--port",
            "ssl:8443:interface=127.0.0.1",
            "--port",
            "ssl:9443:interface=\\:\\:1",
            "--print-client-config",
            "--client-config-format",
            "json",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        document = json.loads(result.stdout)
        self.assertEqual(list(document), ["outbounds"])
        self.assertEqual(
            [(o["tag"], o["server"], o["server_port"]) for o in document["outbounds"]],
            [("anytls", "127.0.0.1", 8443), ("anytls-2", "::1", 9443)],
        )
        self.assertIn("self-signed-cert.pem", result.stderr)  # the 1.12 hint names the file

    def test_uri_format(self):
        result = self.run_twistd(
            "--password",
            "pw",
            "--print-client-config",
            "--client-config-format",
            "uri",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout,
            "anytls://<password>@YOUR_SERVER_ADDRESS:8443/?sni=localhost&insecure=1\n",
        )

    def test_nothing_to_print(self):
        result = self.run_twistd(
            "--password",
            "pw",
            "--port",
            "unix:/tmp/anytls-banner-test.sock",
            "--print-client-config",
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("--public-address", result.stderr)


class SingBoxCheckTests(SynchronousTestCase):
    """Every shape of outbound the banner makes passes ``sing-box check`` inside a whole
    client config (1.14; 1.12 for the shapes without a pin, which 1.12 does not know)."""

    def check(self, version, outbound):
        binary = singbox_binary(version)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump(_full_config(outbound, free_port()), f)
        return subprocess.run(
            [binary, "check", "-c", path], capture_output=True, text=True, timeout=60
        )

    def test_outbounds_pass_check(self):
        state = self.mktemp()
        cert_path, key_path = certs.ensure_self_signed(state, "localhost")
        material = certs.load_certificate_files(cert_path, key_path)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _cert("vpn.example.com", issuer_key=ca_key, sans=_dns("vpn.example.com"))
        shapes = {
            "placeholder": (tls.parse_port("ssl:8443"), material.certificate, None),
            "ipv4": (tls.parse_port("ssl:8443:interface=127.0.0.1"), material.certificate, None),
            "ipv6": (tls.parse_port("ssl:8443:interface=\\:\\:1"), material.certificate, None),
            "public": (tls.parse_port("ssl:8443"), material.certificate, ("vpn.example.com", 443)),
            "ca": (tls.parse_port("ssl:443"), ca_cert, ("vpn.example.com", None)),
        }
        for name, (spec, cert, public) in shapes.items():
            endpoint = banner.client_endpoint(spec, cert, certs.spki_pin(cert), "localhost", public)
            for password in (None, 'a "quoted" pässword'):
                outbound = banner.outbound(endpoint, password)
                result = self.check("1.14", outbound)
                self.assertEqual(result.returncode, 0, f"{name}: {result.stderr}")
                if endpoint.pin is None:
                    result = self.check("1.12", outbound)
                    self.assertEqual(result.returncode, 0, f"{name} (1.12): {result.stderr}")
                else:
                    result = self.check("1.12", outbound)
                    self.assertNotEqual(
                        result.returncode, 0, "1.12 accepted certificate_public_key_sha256"
                    )


class PrintedConfigEndToEndTests(TestCase):
    """The printed outbound, with the real password, carries an echo through a running server."""

    timeout = 120

    def setUp(self):
        if SERVER_KIND != "twistd":
            raise SkipTest("the client config comes from our server")
        self.h = Harness(self)

    @defer.inlineCallbacks
    def start_client_from(self, outbound: dict, version: str = "1.14"):
        """Like Harness.start_client, with the given outbound instead of client_config's."""
        binary = singbox_binary(version)
        for attempt in range(3):
            socks_port = free_port("127.0.0.1")
            config_path = os.path.join(self.h.base, f"printed-client-{attempt}.json")
            with open(config_path, "w") as f:
                json.dump(_full_config(outbound, socks_port), f, indent=1)
            yield self.h.check_config(binary, config_path, "printed-client")
            proc = self.h.spawn("printed-client", binary, ["run", "-c", config_path])
            try:
                yield wait_for_port("127.0.0.1", socks_port, 30.0, proc)
                return SingBoxClient(proc.name, proc, socks_port, config_path, version)
            except ProcessGone:
                if attempt < 2 and "address already in use" in proc.tail():
                    continue
                raise

    @e2e_test
    def test_printed_outbound_works(self):
        """If the operator runs the server's own command line with --print-client-config
        --show-password, then the outbound it prints equals the one the server logged and a
        stock sing-box client built from it relays an echo (trusting the pin)."""
        server = yield self.h.start_server(extra_args=["--show-password"])
        match = yield server.process.wait_for_line(
            r"client config for \S+: sing-box outbound (\{.*\})$", 10.0, what="the logged outbound"
        )
        logged = json.loads(match.group(1))
        command = server.process.command
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        out, err, code = yield within(
            utils.getProcessOutputAndValue(
                command[0], command[1:] + ["--print-client-config"], env=env, path=REPO_ROOT
            ),
            60.0,
            "twistd anytls --print-client-config",
        )
        self.assertEqual(code, 0, err)
        [(printed, uri)] = _split_printed(out.decode("utf-8"))
        self.assertEqual(printed, logged)
        self.assertEqual(printed["password"], PASSWORD)
        self.assertEqual((printed["server"], printed["server_port"]), ("127.0.0.1", server.port))
        self.assertEqual(printed["tls"]["certificate_public_key_sha256"], [server.pin])
        self.assertEqual(
            uri, f"anytls://{PASSWORD}@127.0.0.1:{server.port}/?sni=localhost&insecure=1"
        )
        client = yield self.start_client_from(printed)
        echo = self.h.tcp_echo()
        yield self.h.echo_once(client, echo, b"through the printed client config")
        self.assertEqual(echo.accepted, 1)
        self.h.assert_alive(server.process)
