"""The client's configuration: anytls:// URIs and sing-box outbounds (client/config.py)."""

import ipaddress
import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import clientconfig
from anytls_twisted.client.config import (
    ClientConfig,
    ConfigFileError,
    format_duration,
    load_outbound,
    parse_duration,
    parse_uri,
)
from anytls_twisted.protocol.address import parse_ip

PIN = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


def endpoint(server="proxy.example", port=8443, name="proxy.example", pin=None):
    return clientconfig.ClientEndpoint(
        port_description=f"ssl:{port}",
        server=server,
        server_port=port,
        server_name=name,
        pin=pin,
        tls=True,
    )


class URITests(SynchronousTestCase):
    def test_full(self):
        """Every parameter, a percent-encoded password, IPv6 in brackets and a #name."""
        config = parse_uri(
            "anytls://p%40ss%3Aw%2Fd@[2001:DB8::1]:8443/?sni=example.com&insecure=1"
            "&alpn=h2,http/1.1&fp=chrome#My%20node"
        )
        self.assertEqual(config.server, "2001:db8::1")
        self.assertEqual(config.server_port, 8443)
        self.assertEqual(config.password, "p@ss:w/d")
        self.assertEqual(config.server_name, "example.com")
        self.assertTrue(config.insecure)
        self.assertEqual(config.alpn, ("h2", "http/1.1"))
        self.assertEqual(config.fingerprint, "chrome")
        self.assertEqual(config.tag, "My node")
        self.assertIn("fingerprint", config.warnings[0])

    def test_defaults(self):
        """Port 443, SNI the host name, verification on, no path needed."""
        config = parse_uri("anytls://secret@proxy.example")
        self.assertEqual(
            config,
            ClientConfig(
                server="proxy.example",
                server_port=443,
                password="secret",
                server_name="proxy.example",
            ),
        )

    def test_ip_means_no_sni(self):
        """An IP server gets no SNI by default, and an IP as sni means none."""
        self.assertIsNone(parse_uri("anytls://p@192.0.2.1:443/").server_name)
        self.assertIsNone(parse_uri("anytls://p@a.example/?sni=192.0.2.1").server_name)
        self.assertIsNone(parse_uri("anytls://p@[::1]/?sni=[::1]").server_name)

    def test_insecure_spellings(self):
        """insecure (or allowInsecure) takes 0, 1, true and false."""
        for value, expected in [("0", False), ("1", True), ("true", True), ("FALSE", False)]:
            self.assertEqual(parse_uri(f"anytls://p@h/?insecure={value}").insecure, expected)
            self.assertEqual(parse_uri(f"anytls://p@h/?allowInsecure={value}").insecure, expected)

    def test_empty_password(self):
        """An empty password is an error unless a password file will supply one."""
        self.assertRaises(ConfigFileError, parse_uri, "anytls://@h:1")
        self.assertRaises(ConfigFileError, parse_uri, "anytls://h:1")
        self.assertEqual(parse_uri("anytls://h:1", password_file=True).password, "")

    def test_errors(self):
        """Bad URIs fail naming the part, with a hint for a misspelt key; never the password."""
        cases = [
            ("http://p@h", "scheme"),
            ("anytls://secret@h/path", "path"),
            ("anytls://secret@h:0", "host"),
            ("anytls://secret@h:99999", "host"),
            ("anytls://secret@::1:443", "host"),
            ("anytls://secret@h/?insecure=yes", "insecure"),
            ("anytls://secret@h/?alpn=h2,,x", "alpn"),
            ("anytls://secret@h/?sni=a&sni=b", "given twice"),
            ("anytls://%ff@h", "UTF-8"),
        ]
        for uri, part in cases:
            error = self.assertRaises(ConfigFileError, parse_uri, uri)
            self.assertIn(part, str(error), uri)
            self.assertNotIn("secret", str(error), uri)
        error = self.assertRaises(ConfigFileError, parse_uri, "anytls://p@h/?snii=x")
        self.assertIn("did you mean 'sni'?", str(error))

    def test_not_utf8_argument(self):
        """Found by fuzz/client_config.py: a --server argument that is not UTF-8 reaches
        parse_uri with surrogate escapes, which made urllib raise UnicodeEncodeError; it is
        the password error now."""
        for uri in ["anytls://s\udcffcret@h", "anytls://\ud800@h"]:
            error = self.assertRaises(ConfigFileError, parse_uri, uri)
            self.assertIn("password: is not UTF-8", str(error))

    def test_error_is_one_line(self):
        """Found by fuzz/client_config.py: an unknown query key with a line break made a
        two-line error; the key is quoted instead."""
        error = self.assertRaises(ConfigFileError, parse_uri, "anytls://p@h/?a%0Ab=1")
        self.assertEqual(
            str(error),
            "anytls URI: 'a\\nb': unknown query parameter; "
            "known: sni, insecure, allowInsecure, alpn, fp",
        )

    def test_server_uri_parses_back(self):
        """What the server prints (clientconfig.uri) parses to the same server, port, SNI and
        insecure flag, the placeholder password included."""
        for ep, password in [
            (endpoint(), None),
            (endpoint(pin=PIN), "s3cret/with:odd@chars %"),
            (endpoint(server="2001:db8::5", name="proxy.example", pin=PIN), "x"),
            (endpoint(server=clientconfig.ADDRESS_PLACEHOLDER, port=443), None),
        ]:
            config = parse_uri(clientconfig.uri(ep, password))
            self.assertEqual(config.server, ep.server)
            self.assertEqual(config.server_port, ep.server_port)
            self.assertEqual(config.server_name, ep.server_name)
            self.assertEqual(config.insecure, ep.insecure)
            self.assertEqual(
                config.password, clientconfig.PASSWORD_PLACEHOLDER if password is None else password
            )


hosts = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
passwords = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1)


class URIRoundTripTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        hosts,
        st.integers(min_value=1, max_value=65535),
        hosts,
        passwords,
        st.booleans(),
    )
    def test_round_trip(self, server, port, name, password, pinned):
        """Any password, host, port and name survive clientconfig.uri -> parse_uri (an IP as
        the name meaning no SNI)."""
        ep = endpoint(server, port, name, PIN if pinned else None)
        config = parse_uri(clientconfig.uri(ep, password))
        # IPv4-mapped IPv6 is unwrapped, as for every Destination.
        canonical = str(parse_ip(server)) if _is_ip(server) else server
        self.assertEqual(config.server, canonical)
        self.assertEqual(config.server_port, port)
        self.assertEqual(config.password, password)
        expected_sni = None if _is_ip(name) else name
        self.assertEqual(config.server_name, expected_sni)
        self.assertEqual(config.insecure, pinned)


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class DurationTests(SynchronousTestCase):
    def test_valid(self):
        for text, seconds in [
            ("30s", 30.0),
            ("1m30s", 90.0),
            ("500ms", 0.5),
            ("1h", 3600.0),
            ("1.5s", 1.5),
            (".5m", 30.0),
            ("0", 0.0),
            ("0s", 0.0),
            ("100us", 1e-4),
            ("1µs", 1e-6),
        ]:
            self.assertAlmostEqual(parse_duration(text), seconds)

    def test_invalid(self):
        """Go's syntax, strictly: a unit on every number, no sign, no spaces."""
        for text in ["", "30", "-1s", "+1s", "1 s", "1d", "s", "1.s5", "1m 30s", "1S", "."]:
            self.assertRaises(ValueError, parse_duration, text)
        # Longer than Go's int64 nanoseconds (ParseDuration's "invalid duration"), or inf.
        for text in ["2562048h", "1" + "0" * 400 + "s"]:
            self.assertRaises(ValueError, parse_duration, text)
        self.assertAlmostEqual(parse_duration("2562047h"), 2562047 * 3600.0)

    def test_format_reads_back(self):
        """format_duration (what --print-config prints) reads back to the same seconds. It
        used :g, which printed 1e+06s (refused) and cut 1.23456789s to 1.23457s; seen
        reviewing for fuzz/client_config.py, whose round-trip contract it breaks."""
        for seconds, text in [
            (30.0, "30s"),
            (0.5, "500ms"),
            (1.5, "1.5s"),
            (0.0, "0s"),
            (1e6, "1000000s"),
            (1.23456789, "1.23456789s"),
            (1e-9, "0.000001ms"),
            (0.0015, "1.5ms"),
            (parse_duration("2562047h"), "9223369200s"),
        ]:
            self.assertEqual(format_duration(seconds), text)
            self.assertAlmostEqual(parse_duration(text), seconds, delta=seconds * 1e-12)


class OutboundTests(SynchronousTestCase):
    def write(self, document):
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            json.dump(document, f)
        return path

    def test_server_outbound_loads(self):
        """The outbound the server prints (clientconfig.outbound) loads as is, pin included,
        from a file and as a parsed document."""
        ep = endpoint(pin=PIN)
        printed = clientconfig.outbound(ep, "pw", tag="anytls-2")
        path = self.write(json.loads(clientconfig.to_json(printed)))
        for source in (path, printed):
            config = load_outbound(source)
            self.assertEqual(
                config,
                ClientConfig(
                    server="proxy.example",
                    server_port=8443,
                    password="pw",
                    server_name="proxy.example",
                    certificate_pins=(PIN,),
                    tag="anytls-2",
                ),
            )

    def test_server_json_document_loads(self):
        """--client-config-format json ({"outbounds": [...]}) loads: the first outbound."""
        eps = [endpoint(), endpoint(server="192.0.2.7", port=443, name="192.0.2.7", pin=PIN)]
        document = json.loads(clientconfig.render_json(eps))
        config = load_outbound(self.write(document))
        self.assertEqual(config.server, "proxy.example")
        self.assertEqual(config.password, clientconfig.PASSWORD_PLACEHOLDER)
        config = load_outbound({"outbounds": document["outbounds"][1:]})
        self.assertIsNone(config.server_name)  # an IP: no SNI
        self.assertEqual(config.certificate_pins, (PIN,))

    def test_whole_singbox_config(self):
        """A whole sing-box client config: its first anytls outbound, other types skipped."""
        document = {
            "log": {"level": "info"},
            "inbounds": [{"type": "mixed", "listen_port": 1080}],
            "outbounds": [
                {"type": "direct", "tag": "direct"},
                {
                    "type": "anytls",
                    "tag": "proxy",
                    "server": "2001:DB8::1",
                    "server_port": 443,
                    "password": "pw",
                    "idle_session_check_interval": "1m",
                    "idle_session_timeout": "1m30s",
                    "min_idle_session": 2,
                    "detour": "direct",
                    "tcp_fast_open": True,
                    "tls": {
                        "enabled": True,
                        "server_name": "proxy.example",
                        "insecure": True,
                        "alpn": "h2",
                        "certificate": ["-----BEGIN CERTIFICATE-----", "AA=="],
                        "certificate_path": "/etc/ca.pem",
                        "min_version": "1.2",
                        "utls": {"enabled": True, "fingerprint": "firefox"},
                    },
                },
            ],
        }
        config = load_outbound(self.write(document))
        self.assertEqual(config.server, "2001:db8::1")
        self.assertEqual(config.tag, "proxy")
        self.assertEqual(config.idle_session_check_interval, 60.0)
        self.assertEqual(config.idle_session_timeout, 90.0)
        self.assertEqual(config.min_idle_session, 2)
        self.assertTrue(config.tls and config.insecure)
        self.assertEqual(config.alpn, ("h2",))
        self.assertEqual(config.certificate, "-----BEGIN CERTIFICATE-----\nAA==")
        self.assertEqual(config.certificate_path, "/etc/ca.pem")
        self.assertEqual(config.fingerprint, "firefox")
        warnings = "\n".join(config.warnings)
        self.assertIn("'detour', 'tcp_fast_open' are not supported", warnings)
        self.assertIn("'tls.min_version'", warnings)
        self.assertIn("fingerprint", warnings)

    def test_no_tls_object_dials_plain(self):
        """As in sing-box, an outbound without tls speaks plain AnyTLS (behind a proxy)."""
        config = load_outbound({"server": "h", "server_port": 1, "password": "p"})
        self.assertFalse(config.tls)
        self.assertEqual(config.tag, "anytls")

    def test_disable_sni(self):
        """tls.disable_sni without a server_name means no SNI (what to_outbound prints for a
        URI's empty sni=); with one, it is ignored with a warning: the name is sent."""
        base = {"server": "h.example", "server_port": 1, "password": "p"}
        config = load_outbound({**base, "tls": {"enabled": True, "disable_sni": True}})
        self.assertIsNone(config.server_name)
        self.assertEqual(config.warnings, ())
        tls = {"enabled": True, "disable_sni": True, "server_name": "n.example"}
        config = load_outbound({**base, "tls": tls})
        self.assertEqual(config.server_name, "n.example")
        self.assertIn("tls.disable_sni is ignored", config.warnings[0])
        error = self.assertRaises(
            ConfigFileError, load_outbound, {**base, "tls": {"disable_sni": "yes"}}
        )
        self.assertIn("tls.disable_sni: must be true or false", str(error))

    def test_password_file(self):
        """An outbound without a password loads only when a password file will supply it."""
        document = {"server": "h", "server_port": 1}
        self.assertRaises(ConfigFileError, load_outbound, document)
        self.assertEqual(load_outbound(document, password_file=True).password, "")

    def test_errors(self):
        """One line naming the file and the field, with a hint for a misspelt one."""
        path = "outbound"
        base = {"type": "anytls", "server": "h", "server_port": 1, "password": "p"}
        cases = [
            ({"server_prot": 1}, "server_prot: unknown field; did you mean 'server_port'?"),
            (
                {"tls": {"insecur": True}},
                "tls.insecur: unknown field; did you mean 'tls.insecure'?",
            ),
            (
                {"tls": {"utls": {"fingerprnt": "x"}}},
                "tls.utls.fingerprnt: unknown field; did you mean 'tls.utls.fingerprint'?",
            ),
            ({"type": "vless"}, "type: is 'vless', not 'anytls'"),
            ({"server": ""}, "server:"),
            ({"server": "h:443"}, "server: must be a host name or IP address, without a port"),
            ({"server_port": 0}, "server_port:"),
            ({"server_port": "443"}, "server_port: must be a port number"),
            ({"server_port": True}, "server_port: must be a port number"),
            ({"idle_session_timeout": 30}, "idle_session_timeout: must be a duration string"),
            ({"idle_session_timeout": "30"}, "idle_session_timeout: '30' is not a duration"),
            ({"min_idle_session": -1}, "min_idle_session: must not be negative"),
            ({"tls": []}, "tls: must be an object"),
            ({"tls": {"enabled": "yes"}}, "tls.enabled: must be true or false"),
            ({"tls": {"alpn": [1]}}, "tls.alpn: must be a list of strings"),
            (
                {"tls": {"certificate_public_key_sha256": ["abc"]}},
                "tls.certificate_public_key_sha256: 'abc' is not a base64 SHA-256",
            ),
        ]
        for change, message in cases:
            document = {**base, **change}
            error = self.assertRaises(ConfigFileError, load_outbound, document)
            self.assertIn(f"{path}: {message}", str(error), change)
            self.assertNotIn("\n", str(error))
        error = self.assertRaises(
            ConfigFileError, load_outbound, {"outbounds": [base | {"type": "x"}]}
        )
        self.assertEqual(str(error), "outbound: outbounds: no outbound of type anytls")
        self.assertRaises(ConfigFileError, load_outbound, {"server": "h"})

    def test_file_errors(self):
        """Missing files and bad JSON name the file."""
        missing = self.mktemp()
        error = self.assertRaises(ConfigFileError, load_outbound, missing)
        self.assertIn(missing, str(error))
        bad = self.mktemp()
        with open(bad, "w") as f:
            f.write("{not json")
        error = self.assertRaises(ConfigFileError, load_outbound, bad)
        self.assertIn(f"{bad}: not valid JSON", str(error))
        self.assertTrue(os.path.exists(bad))
        with open(bad, "w") as f:  # past the recursion limit json raised RecursionError
            f.write('{"a":' * 100_000)
        error = self.assertRaises(ConfigFileError, load_outbound, bad)
        self.assertEqual(str(error), f"{bad}: not valid JSON: nested too deeply")
