"""The UDP-over-TCP codec against vectors V15-V17 (anytls-protocol.md section 14), in splits."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol.address import AddressError, Destination, parse_socks_address
from anytls_twisted.protocol.codec import Command, Frame, FrameDecoder
from anytls_twisted.protocol.uot import (
    MAGIC_V1,
    MAGIC_V2,
    MAX_HEADER_SIZE,
    MAX_PACKET_SIZE,
    UoTPacket,
    UoTReader,
    UoTRequest,
    encode_connect_packet,
    encode_packet,
    encode_request,
    magic_destination,
    uot_version,
)

from .helpers import unhex

DNS = Destination("8.8.8.8", 53)
DNS_V6 = Destination("2001:4860:4860::8888", 53)
DNS_NAME = Destination("dns.google", 53)

# Whole frames, as the document gives them.
V15 = unhex(
    """01 00 00 00 02 00 00
    02 00 00 00 02 00 1b 03 17 73 70 2e 76 32 2e 75 64 70 2d 6f 76 65 72 2d 74 63 70 2e 61 72
    70 61 00 00"""
)
V16 = unhex("02 00 00 00 02 00 0e 01 01 08 08 08 08 00 35 00 04 70 69 6e 67")
V16_PONG = unhex("00 04 70 6f 6e 67")
V17 = unhex("02 00 00 00 02 00 15 00 01 08 08 08 08 00 35 00 08 08 08 08 00 35 00 04 70 69 6e 67")
V17_PONG = unhex("02 00 00 00 02 00 0d 00 08 08 08 08 00 35 00 04 70 6f 6e 67")
V17_IPV6 = unhex(
    "01 20 01 48 60 48 60 00 00 00 00 00 00 00 00 88 88 00 35 00 04 70 69 6e 67",
)
V17_DOMAIN = unhex("02 0a 64 6e 73 2e 67 6f 6f 67 6c 65 00 35 00 04 70 69 6e 67")


def psh_data(frame):
    [decoded] = FrameDecoder().feed(frame)
    assert (decoded.cmd, decoded.sid) == (Command.PSH, 2), decoded
    return decoded.data


def read_all(version, *chunks):
    """Everything a reader gives for ``chunks`` fed one by one, draining after each."""
    reader = UoTReader(version)
    items = []
    for chunk in chunks:
        reader.feed(chunk)
        items += list(reader)
    return items, reader


class MagicTests(SynchronousTestCase):
    def test_v15(self):
        """The SYN and PSH of V15 open stream 2 to ``sp.v2.udp-over-tcp.arpa:0``: version 2."""
        syn, psh = FrameDecoder().feed(V15)
        self.assertEqual(syn, Frame(Command.SYN, 2))
        destination, end = parse_socks_address(psh.data)
        self.assertEqual(end, len(psh.data))
        self.assertEqual(destination, Destination(MAGIC_V2, 0))
        self.assertEqual(destination, magic_destination())
        self.assertEqual(uot_version(destination), 2)

    def test_legacy_and_others(self):
        """The legacy name is version 1; matching is exact and case-sensitive, any port."""
        legacy = parse_socks_address(unhex("03 14") + b"sp.udp-over-tcp.arpa" + unhex("00 00"))
        self.assertEqual(legacy[0], magic_destination(1))
        self.assertEqual(uot_version(Destination(MAGIC_V1, 0)), 1)
        self.assertEqual(uot_version(Destination(MAGIC_V2, 443)), 2)
        for host in ["SP.V2.UDP-OVER-TCP.ARPA", "x.sp.v2.udp-over-tcp.arpa", "example.com"]:
            self.assertIsNone(uot_version(Destination(host, 0)))
        self.assertRaises(ValueError, magic_destination, 3)
        self.assertRaises(ValueError, UoTReader, 3)


class VectorTests(SynchronousTestCase):
    def test_v16_connect_mode(self):
        """V16: the header (connect, 8.8.8.8:53), then ``ping`` to the header's destination."""
        data = psh_data(V16)
        items, reader = read_all(2, data)
        self.assertEqual(items, [UoTRequest(True, DNS), UoTPacket(DNS, b"ping")])
        self.assertTrue(reader.connect)
        self.assertEqual(reader.request, UoTRequest(True, DNS))
        self.assertEqual(encode_request(True, DNS) + encode_connect_packet(b"ping"), data)
        self.assertEqual(encode_connect_packet(b"pong"), V16_PONG)

    def test_v17_non_connect_mode(self):
        """V17: the header (non-connect), then ``ping`` with its own address; the reply too."""
        data = psh_data(V17)
        items, reader = read_all(2, data)
        self.assertEqual(items, [UoTRequest(False, DNS), UoTPacket(DNS, b"ping")])
        self.assertFalse(reader.connect)
        self.assertEqual(encode_request(False, DNS) + encode_packet(DNS, b"ping"), data)
        self.assertEqual(encode_packet(DNS, b"pong"), psh_data(V17_PONG))

    def test_v17_other_address_forms(self):
        """IPv6 (family 1) and domain (family 2) packet addresses, both ways."""
        items, _ = read_all(2, encode_request(False, DNS) + V17_IPV6 + V17_DOMAIN)
        self.assertEqual(items[1:], [UoTPacket(DNS_V6, b"ping"), UoTPacket(DNS_NAME, b"ping")])
        self.assertEqual(encode_packet(DNS_V6, b"ping"), V17_IPV6)
        self.assertEqual(encode_packet(DNS_NAME, b"ping"), V17_DOMAIN)

    def test_mapped_ipv4_reply_is_family_0(self):
        """A reply from an IPv4-mapped IPv6 source is written as IPv4."""
        self.assertEqual(
            encode_packet(Destination("::ffff:8.8.8.8", 53), b"pong"), psh_data(V17_PONG)
        )

    def test_v1_has_no_header(self):
        """v1: packets from the first byte, always with an address; the mode is non-connect."""
        items, reader = read_all(1, V17_IPV6 + psh_data(V17_PONG))
        self.assertEqual(items, [UoTPacket(DNS_V6, b"ping"), UoTPacket(DNS, b"pong")])
        self.assertIsNone(reader.request)
        self.assertFalse(reader.connect)

    def test_v1_first_byte_is_an_address(self):
        """A v2 connect header fed to v1 reads as the start of an IPv6 packet: it waits."""
        header = encode_request(True, DNS)
        items, reader = read_all(1, header)
        self.assertEqual(items, [])
        self.assertEqual(reader.buffered(), header)

    def test_reader_for_replies(self):
        """A client reads the server's replies with a connect-mode or v1 reader."""
        items, _ = read_all(1, psh_data(V17_PONG))
        self.assertEqual(items, [UoTPacket(DNS, b"pong")])


class SplitTests(SynchronousTestCase):
    STREAM = (
        encode_request(False, DNS)
        + psh_data(V17)[8:]
        + V17_IPV6
        + V17_DOMAIN
        + encode_packet(DNS, b"")
        + encode_packet(Destination("a" * 255, 65535), bytes(range(256)) * 80)
        + encode_packet(DNS, b"last")
    )
    CONNECT_STREAM = encode_request(True, DNS_NAME) + b"".join(
        encode_connect_packet(p) for p in [b"one", b"", b"three" * 1000]
    )

    def expected(self, stream):
        items, reader = read_all(2, stream)
        self.assertEqual(reader.pending, 0)
        return items

    def test_whole(self):
        items = self.expected(self.STREAM)
        self.assertEqual(len(items), 7)
        self.assertEqual(items[-1], UoTPacket(DNS, b"last"))
        self.assertEqual(items[-2].destination, Destination("a" * 255, 65535))

    def test_one_byte_at_a_time(self):
        """Fed a byte at a time, the reader gives the same items, each when its last byte comes."""
        for stream in [self.STREAM, self.CONNECT_STREAM]:
            chunks = [stream[i : i + 1] for i in range(len(stream))]
            items, reader = read_all(2, *chunks)
            self.assertEqual(items, self.expected(stream))
            self.assertEqual(reader.pending, 0)

    @settings(max_examples=150, deadline=None)
    @given(st.data())
    def test_random_splits(self, data):
        """Any split of the stream gives the same items."""
        for stream in [self.STREAM, self.CONNECT_STREAM]:
            cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
            cuts = sorted(set(cuts) | {0, len(stream)})
            items, _ = read_all(2, *[stream[a:b] for a, b in zip(cuts, cuts[1:])])
            self.assertEqual(items, self.expected(stream))

    def test_stopping_between_items(self):
        """Items not asked for stay in the reader and come out, in order, after later feeds."""
        reader = UoTReader(2)
        reader.feed(self.STREAM[:100])
        first = reader.next_item()
        reader.feed(self.STREAM[100:])
        self.assertEqual([first] + list(reader), self.expected(self.STREAM))

    def test_only_an_incomplete_item_is_held(self):
        """After draining, the reader holds just the incomplete item, at most one packet."""
        packet = encode_packet(DNS, b"ping")
        reader = UoTReader(2)
        reader.feed(encode_request(False, DNS) + packet * 3 + packet[:7])
        self.assertEqual(len(list(reader)), 4)
        self.assertEqual(reader.buffered(), packet[:7])
        self.assertEqual(reader.pending, 7)
        reader.feed(packet[7:])
        self.assertEqual(list(reader), [UoTPacket(DNS, b"ping")])
        self.assertEqual(reader.pending, 0)

    def test_bounds(self):
        """The longest header and packet are the documented bounds; one byte short, they wait."""
        name = Destination("n" * 255, 1)
        header = encode_request(False, name)
        packet = encode_packet(name, bytes(0xFFFF))
        self.assertEqual((len(header), len(packet)), (MAX_HEADER_SIZE, MAX_PACKET_SIZE))
        items, reader = read_all(2, header[:-1])
        self.assertEqual((items, reader.pending), ([], MAX_HEADER_SIZE - 1))
        items, reader = read_all(2, header, packet[:-1])
        self.assertEqual((len(items), reader.pending), (1, MAX_PACKET_SIZE - 1))
        reader.feed(packet[-1:])
        self.assertEqual(list(reader), [UoTPacket(name, bytes(0xFFFF))])


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=255),
)
destinations = st.builds(Destination, addresses, st.integers(0, 65535))
payloads = st.binary(max_size=300)


class RoundTripTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(destinations, st.lists(st.tuples(destinations, payloads), max_size=8), st.booleans())
    def test_encode_then_read(self, header, packets, connect):
        """What the encoders write, a reader gives back, in v2 (either mode) and v1."""
        if connect:
            stream = b"".join(encode_connect_packet(p) for _, p in packets)
            expected = [UoTPacket(header, p) for _, p in packets]
        else:
            stream = b"".join(encode_packet(d, p) for d, p in packets)
            expected = [UoTPacket(d, p) for d, p in packets]
            self.assertEqual(read_all(1, stream)[0], expected)
        items, reader = read_all(2, encode_request(connect, header) + stream)
        self.assertEqual(items, [UoTRequest(connect, header)] + expected)
        self.assertEqual(reader.pending, 0)

    def test_oversize_payload_refused(self):
        self.assertRaises(ValueError, encode_packet, DNS, bytes(0x10000))
        self.assertRaises(ValueError, encode_connect_packet, bytes(0x10000))


class BadDataTests(SynchronousTestCase):
    def test_unknown_packet_address_type(self):
        """Family 5 is no UoT address: AddressError, after the good packets before it."""
        reader = UoTReader(2)
        reader.feed(psh_data(V17) + unhex("05 01 02 03 04 00 35 00 01 78"))
        self.assertEqual(reader.next_item(), UoTRequest(False, DNS))
        self.assertEqual(reader.next_item(), UoTPacket(DNS, b"ping"))
        self.assertRaises(AddressError, reader.next_item)

    def test_unknown_header_address_type(self):
        """The header uses SOCKS types: 0x02 is not one."""
        reader = UoTReader(2)
        reader.feed(unhex("00 02 08 08 08 08 00 35"))
        self.assertRaises(AddressError, reader.next_item)

    def test_socks_types_are_not_packet_types(self):
        """SOCKS IPv6 (4) in a packet address is refused; UoT IPv6 (1) in a v1 stream is not."""
        reader = UoTReader(1)
        reader.feed(unhex("04") + bytes(16) + unhex("00 35 00 00"))
        self.assertRaises(AddressError, reader.next_item)

    def test_bad_domain(self):
        for name in [b"", b"caf\xc3\xa9", b"a b", b"a/b"]:
            reader = UoTReader(1)
            reader.feed(bytes([2, len(name)]) + name + unhex("00 35 00 00"))
            self.assertRaises(AddressError, reader.next_item)

    def test_any_nonzero_connect_byte(self):
        """Any non-zero connect byte means connect mode (Go reads it as a bool)."""
        items, reader = read_all(2, unhex("07") + psh_data(V16)[1:])
        self.assertEqual(items, [UoTRequest(True, DNS), UoTPacket(DNS, b"ping")])
