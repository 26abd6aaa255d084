"""Destination address encodings and the private-destination policy."""

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol.address import (
    AddressError,
    Destination,
    DestinationPolicy,
    encode_socks_address,
    encode_uot_address,
    is_public,
    parse_socks_address,
    parse_uot_address,
)

from .helpers import unhex


class SocksAddressTests(SynchronousTestCase):
    CASES = [
        (b"\x03\x0bexample.com\x00\x50", Destination("example.com", 80)),
        (unhex("01 7f 00 00 01 1f 90"), Destination("127.0.0.1", 8080)),
        (b"\x04" + bytes(15) + b"\x01\x01\xbb", Destination("::1", 443)),
        (b"\x03\x17sp.v2.udp-over-tcp.arpa\x00\x00", Destination("sp.v2.udp-over-tcp.arpa", 0)),
    ]

    def test_vectors_round_trip(self):
        """V7/V8/V9/V15 addresses parse, report their end, and encode back."""
        for wire, dest in self.CASES:
            self.assertEqual(parse_socks_address(wire + b"rest"), (dest, len(wire)))
            self.assertEqual(encode_socks_address(dest), wire)

    def test_incomplete_returns_none(self):
        """Every proper prefix of an address asks for more bytes."""
        for wire, _ in self.CASES:
            for i in range(len(wire)):
                self.assertIsNone(parse_socks_address(wire[:i]))

    def test_bad_type(self):
        self.assertRaises(AddressError, parse_socks_address, b"\x05\x00\x00")
        self.assertRaises(AddressError, parse_socks_address, b"\x00\x01\x02\x03\x04\x00\x00")

    def test_bad_names(self):
        """Empty, non-ASCII and control-character names are refused, port read or not."""
        for raw in [b"", "bü".encode(), b"a b", b"a\x00b"]:
            wire = bytes([3, len(raw)]) + raw + b"\x00\x50"
            self.assertRaises(AddressError, parse_socks_address, wire)

    def test_ip_literal_domain_and_mapped(self):
        """A domain holding an IP literal is an IP; IPv4-mapped IPv6 unwraps to IPv4."""
        self.assertEqual(
            parse_socks_address(b"\x03\x09127.0.0.1\x00\x01")[0], Destination("127.0.0.1", 1)
        )
        mapped = ipaddress.IPv6Address("::ffff:1.2.3.4").packed
        self.assertEqual(
            parse_socks_address(b"\x04" + mapped + b"\x00\x01")[0], Destination("1.2.3.4", 1)
        )


class UoTAddressTests(SynchronousTestCase):
    def test_forms(self):
        """V17's IPv4, IPv6 and domain per-packet address forms."""
        cases = [
            (unhex("00 08 08 08 08 00 35"), Destination("8.8.8.8", 53)),
            (
                unhex("01 20 01 48 60 48 60 00 00 00 00 00 00 00 00 88 88 00 35"),
                Destination("2001:4860:4860::8888", 53),
            ),
            (b"\x02\x0adns.google\x00\x35", Destination("dns.google", 53)),
        ]
        for wire, dest in cases:
            self.assertEqual(parse_uot_address(wire), (dest, len(wire)))
            self.assertEqual(encode_uot_address(dest), wire)
        self.assertRaises(AddressError, parse_uot_address, b"\x03\x00")


class PolicyTests(SynchronousTestCase):
    def test_non_global_refused(self):
        """Loopback, private, link-local, unspecified, multicast, CGNAT, mapped and NAT64 forms."""
        for text in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "224.0.0.1",
            "100.64.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "192.0.2.1",
        ]:
            ip = ipaddress.ip_address(text)
            self.assertFalse(is_public(ip), text)
            self.assertFalse(DestinationPolicy().permits(ip), text)
            self.assertTrue(DestinationPolicy(allow_private=True).permits(ip), text)

    def test_global_allowed(self):
        for text in ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "64:ff9b::808:808"]:
            self.assertTrue(DestinationPolicy().permits(ipaddress.ip_address(text)), text)


class CacheTests(SynchronousTestCase):
    def test_caches_stay_bounded(self):
        """Parsing and vetting many distinct addresses (a client spraying destinations) keeps
        every memoised table at its bound, and answers stay right for every address."""
        from anytls_twisted.protocol import address

        for i in range(3 * address.CACHE_SIZE):
            raw = bytes([address.UOT_IPV4, 10, i >> 16 & 255, i >> 8 & 255, i & 255, 0, 53])
            dest, end = address.parse_uot_address(raw)
            self.assertEqual(dest.host, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
            self.assertEqual(end, 7)
            self.assertFalse(address.is_public(dest.ip))
        for cached in (address.parse_ip, address._ip_text, address.is_public):
            self.assertLessEqual(cached.cache_info().currsize, address.CACHE_SIZE)
        self.assertTrue(address.is_public(address.parse_ip("1.1.1.1")))
        self.assertIsNone(address.parse_ip("not an address"))


class HostPortTests(SynchronousTestCase):
    def test_parse_host_port(self):
        """HOST:PORT and [IPV6]:PORT, the IP canonical; the default port only when given."""
        from anytls_twisted.protocol.address import parse_host_port

        self.assertEqual(parse_host_port("a.example:443"), Destination("a.example", 443))
        self.assertEqual(parse_host_port("[2001:DB8::1]:1"), Destination("2001:db8::1", 1))
        self.assertEqual(parse_host_port("[::1]", 80), Destination("::1", 80))
        self.assertEqual(parse_host_port("a:", 80), Destination("a", 80))
        for text in ["a", "a:0", "a:65536", "a:x", "::1", "[a]:1", "[::1]x", ":1", "a b:1"]:
            self.assertRaises(AddressError, parse_host_port, text)
