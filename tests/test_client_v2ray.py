"""The client's config files: the v2ray-core shape (the seed design's), a file of URIs, and
the dispatcher that tells them and sing-box's shape apart (client/v2ray.py, configfile.py)."""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.client.config import ConfigFileError
from anytls_twisted.client.configfile import load_file
from anytls_twisted.client.v2ray import is_v2ray, load_v2ray


def seed(**changes):
    """The seed design's example outbound, whole config shape."""
    outbound = {
        "protocol": "anytls",
        "tag": "proxy",
        "settings": {
            "servers": [
                {"address": "a.example", "port": 8443, "password": "pa"},
                {"address": "192.0.2.7", "port": 443, "password": "pb"},
            ],
            "idle_session_check_interval": 15,
            "idle_session_timeout": 30,
            "min_idle_session": 10,
        },
        "streamSettings": {
            "network": "tcp",
            "security": "tls",
            "tlsSettings": {
                "serverName": "front.example",
                "allowInsecure": False,
                "alpn": ["h2", "http/1.1"],
                "fingerprint": "chrome",
            },
        },
    }
    outbound.update(changes)
    return {"outbounds": [{"protocol": "freedom", "tag": "direct"}, outbound]}


class V2RayTests(SynchronousTestCase):
    def test_seed_example(self):
        a, b = load_v2ray("v2.json", seed())
        self.assertEqual((a.server, a.server_port, a.password), ("a.example", 8443, "pa"))
        self.assertEqual((b.server, b.server_port, b.password), ("192.0.2.7", 443, "pb"))
        for config in (a, b):
            self.assertEqual(config.server_name, "front.example")
            self.assertEqual(config.alpn, ("h2", "http/1.1"))
            self.assertEqual(config.fingerprint, "chrome")
            self.assertTrue(config.tls)
            self.assertFalse(config.insecure)
            self.assertEqual(
                (
                    config.idle_session_check_interval,
                    config.idle_session_timeout,
                    config.min_idle_session,
                ),
                (15.0, 30.0, 10),
            )
        self.assertEqual((a.tag, b.tag), ("proxy[0]", "proxy[1]"))
        self.assertEqual(len(a.warnings), 1)
        self.assertIn("fingerprint", a.warnings[0])
        self.assertEqual(b.warnings, ())

    def test_defaults_are_the_seeds_balanced_profile_and_sni_from_the_address(self):
        (config,) = load_v2ray(
            "v2.json",
            {
                "protocol": "anytls",
                "settings": {"servers": [{"address": "b.example", "password": "p"}]},
            },
        )
        self.assertEqual(config.server_port, 443)
        self.assertEqual(config.server_name, "b.example")
        self.assertEqual(
            (
                config.idle_session_check_interval,
                config.idle_session_timeout,
                config.min_idle_session,
            ),
            (30.0, 30.0, 5),
        )
        (ip,) = load_v2ray(
            "v2.json",
            {"protocol": "anytls", "settings": {"servers": [{"address": "::1", "password": "p"}]}},
        )
        self.assertIsNone(ip.server_name)  # an IP address means no SNI

    def test_security_none_and_insecure(self):
        (plain,) = load_v2ray(
            "v2.json",
            seed(streamSettings={"security": "none"})["outbounds"][1]
            | {"settings": {"servers": [{"address": "a.example", "password": "p"}]}},
        )
        self.assertFalse(plain.tls)
        document = seed()
        document["outbounds"][1]["streamSettings"]["tlsSettings"]["allowInsecure"] = True
        self.assertTrue(all(c.insecure for c in load_v2ray("v2.json", document)))

    def test_errors_name_the_file_and_field(self):
        cases = [
            (seed(settings={"servers": []}), "settings.servers"),
            (seed(settings={"server": [1]}), "did you mean 'settings.servers'"),
            (
                seed(settings={"servers": [{"adress": "a", "password": "p"}]}),
                "did you mean 'settings.servers[0].address'",
            ),
            (seed(settings={"servers": [{"address": "a", "port": 0}]}), "port"),
            (seed(settings={"servers": [{"address": "a"}]}), "password"),
            (seed(settings={"servers": [{"address": "a:1", "password": "p"}]}), "address"),
            (seed(streamSettings={"security": "reality"}), "security"),
            (seed(streamSettings={"network": "ws"}), "network"),
            (seed(streamSettings={"tlsSettings": {"serverNmae": "x"}}), "serverName"),
            ({"outbounds": [{"protocol": "vmess"}]}, "no outbound"),
        ]
        for document, fragment in cases:
            error = self.assertRaises(ConfigFileError, load_v2ray, "v2.json", document)
            self.assertIn("v2.json", str(error))
            self.assertIn(fragment, str(error))
            self.assertNotIn("\n", str(error))

    def test_password_file_allows_empty_passwords(self):
        document = seed(settings={"servers": [{"address": "a.example"}]})
        (config,) = load_v2ray("v2.json", document, password_file=True)
        self.assertEqual(config.password, "")

    def test_ignored_fields_warn(self):
        document = seed()
        document["outbounds"][1]["mux"] = {"enabled": False}
        (first, _) = load_v2ray("v2.json", document)
        self.assertTrue(any("'mux'" in w for w in first.warnings), first.warnings)

    def test_shape_detection(self):
        self.assertTrue(is_v2ray(seed()))
        self.assertTrue(is_v2ray({"protocol": "anytls"}))
        self.assertFalse(is_v2ray({"type": "anytls", "server": "x", "server_port": 1}))
        self.assertFalse(is_v2ray({"outbounds": [{"type": "anytls"}]}))


class LoadFileTests(SynchronousTestCase):
    def write(self, text):
        path = os.path.join(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_each_shape(self):
        v2 = load_file(self.write(json.dumps(seed())))
        self.assertEqual([c.server for c in v2], ["a.example", "192.0.2.7"])
        singbox = load_file(
            self.write(
                json.dumps(
                    {"type": "anytls", "server": "s.example", "server_port": 1, "password": "p"}
                )
            )
        )
        self.assertEqual([c.server for c in singbox], ["s.example"])
        uris = load_file(
            self.write(
                "# my servers\n\nanytls://p1@one.example:8443/?sni=x.example\n"
                "  anytls://p2@[2001:db8::1]:443  \n"
            )
        )
        self.assertEqual(
            [(c.server, c.password) for c in uris], [("one.example", "p1"), ("2001:db8::1", "p2")]
        )

    def test_errors_are_one_line_naming_the_file(self):
        bad_uri = self.write(
            "anytls://secret@one.example:8443\nanytls://secret@two.example:99999\n"
        )
        error = str(self.assertRaises(ConfigFileError, load_file, bad_uri))
        self.assertIn(f"{bad_uri}: line 2:", error)
        self.assertNotIn("secret", error)
        for text, fragment in [
            ("{ not json", "not valid JSON"),
            ("[" * 100_000, "not valid JSON: nested too deeply"),  # json's RecursionError
            ("# nothing\n", "no servers"),
            ("", "no servers"),
        ]:
            path = self.write(text)
            error = str(self.assertRaises(ConfigFileError, load_file, path))
            self.assertIn(path, error)
            self.assertIn(fragment, error)
        missing = os.path.join(self.mktemp(), "nope.json")
        self.assertIn(
            "cannot read config file", str(self.assertRaises(ConfigFileError, load_file, missing))
        )
        binary = self.mktemp()
        with open(binary, "wb") as f:
            f.write(b"\xff\xfe\x00garbage")
        self.assertIn("not UTF-8", str(self.assertRaises(ConfigFileError, load_file, binary)))

    def test_our_servers_printed_outbound_loads(self):
        """What ``--print-client-config`` prints (a sing-box outbound) is one server here."""
        from anytls_twisted import clientconfig

        ep = clientconfig.ClientEndpoint(
            port_description="ssl:8443",
            server="vpn.example",
            server_port=8443,
            server_name="vpn.example",
            pin=None,
            tls=True,
        )
        path = self.write(json.dumps(clientconfig.outbound(ep, "pw")))
        (config,) = load_file(path)
        self.assertEqual(
            (config.server, config.server_port, config.password), ("vpn.example", 8443, "pw")
        )


class PrintConfigTests(SynchronousTestCase):
    def test_round_trip_through_the_singbox_shape(self):
        from anytls_twisted.client.config import load_outbound, parse_uri, to_outbound

        configs = load_v2ray("v2.json", seed()) + [
            parse_uri("anytls://p%40ss@[::1]:8443/?sni=x.example&insecure=1&alpn=h2#home"),
            # Found by fuzz/client_config.py: an empty sni= (no SNI) was printed without
            # saying so, and loaded back (and ran in sing-box) sending the server's name.
            parse_uri("anytls://p@named.example/?sni=&insecure=1"),
            load_outbound(
                {
                    "type": "anytls",
                    "server": "s.example",
                    "server_port": 1,
                    "password": "p",
                    "idle_session_timeout": "500ms",
                    "tls": {
                        "enabled": True,
                        "certificate_public_key_sha256": [
                            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
                        ],
                    },
                }
            ),
            load_outbound(
                {"type": "anytls", "server": "plain.example", "server_port": 2, "password": "p"}
            ),
        ]
        for config in configs:
            printed = to_outbound(config, show_password=True)
            again = load_outbound(json.loads(json.dumps(printed)))
            self.assertEqual(
                again, config.__class__(**{**_fields(config), "warnings": again.warnings})
            )
            self.assertEqual(to_outbound(config)["password"], "<password>")

    def test_print_config_option(self):
        import io
        import sys

        from anytls_twisted.client.tap import makeService

        from .test_client_tap import parse

        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write("anytls://s3cret@one.example:8443/?sni=x.example\n")
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        error = self.assertRaises(
            SystemExit,
            makeService,
            parse("--config", path, "--print-config", "--min-idle-session", "2"),
        )
        self.assertEqual(error.code, 0)
        document = json.loads(out.getvalue())
        (outbound,) = document["outbounds"]
        self.assertEqual(outbound["password"], "<password>")
        self.assertEqual(outbound["min_idle_session"], 2)
        self.assertEqual(outbound["tls"]["server_name"], "x.example")
        self.assertNotIn("s3cret", out.getvalue())


def _fields(config):
    import attr

    return attr.asdict(config, recurse=False)
