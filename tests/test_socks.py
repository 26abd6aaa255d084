"""The local proxy's SOCKS5/SOCKS4a server machine, UDP datagram header and sniffing."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.client.socks import (
    MAX_MESSAGE_SIZE,
    Authenticated,
    ConnectRequest,
    Data,
    Failed,
    Reply,
    Send,
    SocksError,
    SocksServer,
    State,
    UdpAssociateRequest,
    encode_reply,
    encode_socks4_reply,
    encode_udp_datagram,
    parse_udp_datagram,
    reply_code_for_error,
    sniff,
)
from anytls_twisted.protocol.address import Destination, encode_socks_address, parse_socks_address

from .helpers import unhex

NO_AUTH = unhex("05 01 00")
#: CONNECT example.com:80 by name.
CONNECT_NAME = b"\x05\x01\x00\x03\x0bexample.com\x00\x50"
CONNECT_V4 = unhex("05 01 00 01 5d b8 d8 22 01 bb")
CONNECT_V6 = unhex("05 01 00 04 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 01 00 35")
ASSOCIATE = unhex("05 03 00 01 00 00 00 00 00 00")
LOGIN = b"\x01\x05alice\x06secret"
#: A SOCKS4a CONNECT to example.com:80, user id "u".
SOCKS4A = b"\x04\x01\x00\x50\x00\x00\x00\x01u\x00example.com\x00"
FAILURE_REPLY = unhex("05 01 00 01 00 00 00 00 00 00")


def check(user, password):
    return (user, password) == ("alice", "secret")


def feed(server, data, step=None):
    """All events from ``data`` fed whole or ``step`` bytes at a time, Data merged."""
    events = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        events.extend(server.receive(chunk))
    return merge(events)


def merge(events):
    """Consecutive Data events as one: how bytes split is not an event."""
    merged = []
    for event in events:
        if isinstance(event, Data) and merged and isinstance(merged[-1], Data):
            merged[-1] = Data(merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged


class Socks5HandshakeTests(SynchronousTestCase):
    def test_connect_no_auth(self):
        """RFC 1928: method 0 chosen, CONNECT by name asked; success opens the relay."""
        server = SocksServer()
        self.assertEqual(server.receive(NO_AUTH), [Send(b"\x05\x00")])
        self.assertEqual(
            server.receive(CONNECT_NAME),
            [ConnectRequest(Destination("example.com", 80), 5)],
        )
        self.assertEqual(server.state, State.PENDING)
        bound = Destination("127.0.0.1", 1080)
        self.assertEqual(
            server.reply(Reply.SUCCEEDED, bound), unhex("05 00 00 01 7f 00 00 01 04 38")
        )
        self.assertEqual(server.state, State.OPEN)
        self.assertEqual(server.receive(b"GET /"), [Data(b"GET /")])

    def test_address_types(self):
        """IPv4 and IPv6 destinations parse to their canonical text."""
        for wire, dest in [
            (CONNECT_V4, Destination("93.184.216.34", 443)),
            (CONNECT_V6, Destination("2001:db8::1", 53)),
        ]:
            server = SocksServer()
            self.assertEqual(
                server.receive(NO_AUTH + wire), [Send(b"\x05\x00"), ConnectRequest(dest, 5)]
            )

    def test_pipelined_bytes_follow_the_request(self):
        """Greeting, request and payload in one segment: the payload is a Data event."""
        server = SocksServer()
        self.assertEqual(
            server.receive(NO_AUTH + CONNECT_NAME + b"hello"),
            [
                Send(b"\x05\x00"),
                ConnectRequest(Destination("example.com", 80), 5),
                Data(b"hello"),
            ],
        )
        self.assertEqual(server.buffered, 0)
        self.assertEqual(server.receive(b" more"), [Data(b" more")])

    def test_byte_at_a_time(self):
        """One byte per receive gives the same events as one segment."""
        data = NO_AUTH + CONNECT_NAME + b"xyz"
        self.assertEqual(feed(SocksServer(), data, 1), feed(SocksServer(), data))

    def test_udp_associate(self):
        """UDP ASSOCIATE is an event; the reply carries the relay's UDP address."""
        server = SocksServer()
        events = server.receive(NO_AUTH + ASSOCIATE)
        self.assertEqual(events[-1], UdpAssociateRequest(Destination("0.0.0.0", 0)))
        relay = Destination("::1", 5353)
        self.assertEqual(
            server.reply(Reply.SUCCEEDED, relay), b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x14\xe9"
        )

    def test_failure_reply_closes(self):
        """A failure reply ends the machine: later bytes are ignored."""
        server = SocksServer()
        server.receive(NO_AUTH + CONNECT_NAME)
        self.assertEqual(
            server.reply(Reply.CONNECTION_REFUSED), unhex("05 05 00 01 00 00 00 00 00 00")
        )
        self.assertEqual(server.state, State.CLOSED)
        self.assertEqual(server.receive(b"late"), [])

    def test_reply_without_request(self):
        """reply() before a request, or twice, is a bug in the shell."""
        server = SocksServer()
        self.assertRaises(RuntimeError, server.reply, Reply.SUCCEEDED)
        server.receive(NO_AUTH + CONNECT_NAME)
        server.reply(Reply.SUCCEEDED)
        self.assertRaises(RuntimeError, server.reply, Reply.SUCCEEDED)

    def test_no_acceptable_method(self):
        """Only method 2 offered to a server without users: 0xFF, then close."""
        server = SocksServer()
        self.assertEqual(
            server.receive(unhex("05 01 02") + CONNECT_NAME),
            [
                Send(b"\x05\xff"),
                Failed("no acceptable authentication method (offered 0x02, need 0x00)"),
            ],
        )
        self.assertEqual(server.receive(b"more"), [])
        self.assertEqual(server.buffered, 0)

    def test_zero_methods(self):
        events = SocksServer().receive(unhex("05 00"))
        self.assertEqual(events[0], Send(b"\x05\xff"))
        self.assertIsInstance(events[1], Failed)

    def test_bind_not_supported(self):
        """BIND: reply 7 and close, before its address even arrives."""
        events = SocksServer().receive(NO_AUTH + unhex("05 02 00"))
        self.assertEqual(
            events[1:],
            [Send(unhex("05 07 00 01 00 00 00 00 00 00")), Failed("BIND is not supported")],
        )

    def test_unknown_command(self):
        events = SocksServer().receive(NO_AUTH + unhex("05 09 00 01"))
        self.assertEqual(events[1], Send(encode_reply(Reply.COMMAND_NOT_SUPPORTED)))
        self.assertIsInstance(events[2], Failed)

    def test_unknown_address_type(self):
        """ATYP 2: reply 8, address type not supported."""
        events = SocksServer().receive(NO_AUTH + unhex("05 01 00 02 00 00"))
        self.assertEqual(events[1], Send(unhex("05 08 00 01 00 00 00 00 00 00")))
        self.assertEqual(events[2], Failed("address type 2 is not supported"))

    def test_bad_name(self):
        """An empty domain name is a general failure."""
        events = SocksServer().receive(NO_AUTH + unhex("05 01 00 03 00 00 50"))
        self.assertEqual(events[1], Send(FAILURE_REPLY))
        self.assertIsInstance(events[2], Failed)

    def test_bad_versions(self):
        """Neither SOCKS4 nor 5, or a request of another version: close without a reply."""
        self.assertEqual(
            SocksServer().receive(b"\x06\x01\x00"),
            [Failed("not a SOCKS4 or SOCKS5 client (first byte 6)")],
        )
        self.assertEqual(
            SocksServer().receive(NO_AUTH + b"\x04\x01\x00\x01"),
            [Send(b"\x05\x00"), Failed("bad request version 4")],
        )

    def test_longest_messages(self):
        """255 methods and a 255-byte name: the longest valid greeting and request pass."""
        server = SocksServer()
        name = b"a" * 255
        events = feed(
            server, bytes([5, 255, *range(255)]) + b"\x05\x01\x00\x03\xff" + name + b"\x00\x50", 7
        )
        self.assertEqual(events[-1], ConnectRequest(Destination(name.decode(), 80), 5))

    def test_empty_receive(self):
        self.assertEqual(SocksServer().receive(b""), [])


class PasswordTests(SynchronousTestCase):
    """RFC 1929 username/password sub-negotiation."""

    def test_accepted(self):
        server = SocksServer(check)
        self.assertEqual(server.receive(unhex("05 02 00 02")), [Send(b"\x05\x02")])
        self.assertEqual(server.receive(LOGIN), [Send(b"\x01\x00"), Authenticated("alice")])
        self.assertEqual(server.user, "alice")
        self.assertEqual(
            server.receive(CONNECT_NAME), [ConnectRequest(Destination("example.com", 80), 5)]
        )

    def test_rejected(self):
        """A wrong password: status 1, then close."""
        server = SocksServer(check)
        events = server.receive(unhex("05 01 02") + b"\x01\x05alice\x05wrong" + CONNECT_NAME)
        self.assertEqual(
            events, [Send(b"\x05\x02"), Send(b"\x01\x01"), Failed("bad password for user 'alice'")]
        )
        self.assertIsNone(server.user)

    def test_no_auth_offered(self):
        """A server with users does not accept method 0."""
        self.assertEqual(SocksServer(check).receive(NO_AUTH)[0], Send(b"\x05\xff"))

    def test_bad_subnegotiation_version(self):
        events = SocksServer(check).receive(unhex("05 01 02") + b"\x05\x01\x00")
        self.assertEqual(events[1], Send(b"\x01\x01"))
        self.assertIsInstance(events[2], Failed)

    def test_non_utf8_credentials(self):
        """Undecodable bytes reach the check as surrogates, and never match a str password."""
        seen = []
        server = SocksServer(lambda u, p: seen.append((u, p)) or False)
        server.receive(unhex("05 01 02") + b"\x01\x01\xff\x01\xfe")
        self.assertEqual(seen, [("\udcff", "\udcfe")])

    def test_longest_credentials(self):
        """255-byte user and password are whole messages, even fed in pieces."""
        seen = []
        server = SocksServer(lambda u, p: seen.append((u, p)) or True)
        events = feed(
            server, unhex("05 01 02") + b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255, 100
        )
        self.assertEqual(events[-1], Authenticated("u" * 255))
        self.assertEqual(seen, [("u" * 255, "p" * 255)])

    def test_byte_at_a_time(self):
        data = unhex("05 01 02") + LOGIN + CONNECT_V4 + b"abc"
        self.assertEqual(feed(SocksServer(check), data, 1), feed(SocksServer(check), data))


class Socks4Tests(SynchronousTestCase):
    def test_socks4a(self):
        """4a: DSTIP 0.0.0.1 means the name follows the user id; it is not resolved here."""
        server = SocksServer()
        self.assertEqual(
            server.receive(SOCKS4A), [ConnectRequest(Destination("example.com", 80), 4)]
        )
        self.assertEqual(server.reply(Reply.SUCCEEDED), unhex("00 5a 00 00 00 00 00 00"))
        self.assertEqual(server.receive(b"x"), [Data(b"x")])

    def test_socks4_ip(self):
        server = SocksServer()
        self.assertEqual(
            server.receive(unhex("04 01 00 50 5d b8 d8 22") + b"\x00rest"),
            [ConnectRequest(Destination("93.184.216.34", 80), 4), Data(b"rest")],
        )
        bound = Destination("127.0.0.1", 1080)
        self.assertEqual(
            server.reply(Reply.HOST_UNREACHABLE, bound), unhex("00 5b 04 38 7f 00 00 01")
        )
        self.assertEqual(server.state, State.CLOSED)

    def test_byte_at_a_time(self):
        self.assertEqual(
            feed(SocksServer(), SOCKS4A + b"ab", 1), feed(SocksServer(), SOCKS4A + b"ab")
        )

    def test_bind_rejected(self):
        events = SocksServer().receive(unhex("04 02 00 50 01 02 03 04 00"))
        self.assertEqual(
            events, [Send(unhex("00 5b 00 00 00 00 00 00")), Failed("SOCKS4 BIND is not supported")]
        )

    def test_refused_with_users(self):
        """SOCKS4 carries no password, so a server with users refuses it."""
        events = SocksServer(check).receive(SOCKS4A)
        self.assertEqual(events[0], Send(encode_socks4_reply(False)))
        self.assertIsInstance(events[1], Failed)

    def test_long_user_id(self):
        """A user id without its NUL past 255 bytes fails instead of growing the buffer."""
        server = SocksServer()
        self.assertEqual(server.receive(unhex("04 01 00 50 01 02 03 04") + b"u" * 255), [])
        events = server.receive(b"u")
        self.assertEqual(events[-1], Failed("SOCKS4 user id longer than 255 bytes"))
        self.assertEqual(server.buffered, 0)

    def test_long_host(self):
        server = SocksServer()
        events = server.receive(unhex("04 01 00 50 00 00 00 01 00") + b"h" * 256)
        self.assertEqual(events[-1], Failed("SOCKS4 4a host name longer than 255 bytes"))

    def test_empty_host(self):
        events = SocksServer().receive(unhex("04 01 00 50 00 00 00 01 00 00"))
        self.assertEqual(events[0], Send(encode_socks4_reply(False)))
        self.assertEqual(events[1], Failed("bad SOCKS4a host name: empty domain name"))


class ErrorMappingTests(SynchronousTestCase):
    """SYNACK error texts (Go's wording, as our server and anytls-go send them)."""

    CASES = [
        ("", Reply.SUCCEEDED),
        ("dial tcp 1.2.3.4:80: connect: connection refused", Reply.CONNECTION_REFUSED),
        ("lookup nowhere.invalid: no such host", Reply.HOST_UNREACHABLE),
        ("dial tcp 1.2.3.4:80: i/o timeout", Reply.HOST_UNREACHABLE),
        ("dial tcp [2001:db8::1]:80: connect: no route to host", Reply.HOST_UNREACHABLE),
        ("dial tcp 1.2.3.4:80: connect: network is unreachable", Reply.NETWORK_UNREACHABLE),
        (
            "dial 10.0.0.1:22: destination 10.0.0.1 is not a public address "
            "(refused by server policy)",
            Reply.NOT_ALLOWED,
        ),
        ("dial tcp 1.2.3.4:25: connect: permission denied", Reply.NOT_ALLOWED),
        ("lookup x on 127.0.0.53:53: server misbehaving", Reply.HOST_UNREACHABLE),
        ("EOF", Reply.GENERAL_FAILURE),
        ("Connection Refused", Reply.CONNECTION_REFUSED),
    ]

    def test_cases(self):
        for text, code in self.CASES:
            self.assertEqual(reply_code_for_error(text), code, text)


class UdpDatagramTests(SynchronousTestCase):
    def test_rfc_layout(self):
        """RSV 0000, FRAG, ATYP address, port, then the payload."""
        wire = unhex("00 00 00 01 08 08 08 08 00 35") + b"query"
        self.assertEqual(parse_udp_datagram(wire), (0, Destination("8.8.8.8", 53), b"query"))
        self.assertEqual(encode_udp_datagram(Destination("8.8.8.8", 53), b"query"), wire)

    def test_fragment_is_reported(self):
        """A non-zero FRAG is exposed, for the caller to drop and count."""
        wire = encode_udp_datagram(Destination("example.com", 443), b"x", frag=1)
        self.assertEqual(parse_udp_datagram(wire).frag, 1)

    def test_bad_datagrams(self):
        for wire in [
            b"",
            b"\x00\x00\x00",
            unhex("00 00 00 01 08 08"),
            unhex("00 00 00 07 00 00"),
            unhex("00 00 00 03 00 00 35"),
        ]:
            self.assertRaises(SocksError, parse_udp_datagram, wire)

    def test_empty_payload(self):
        self.assertEqual(parse_udp_datagram(unhex("00 00 00 01 01 02 03 04 00 01")).payload, b"")


class SniffTests(SynchronousTestCase):
    def test_sniff(self):
        self.assertEqual(sniff(5), "socks5")
        self.assertEqual(sniff(4), "socks4")
        for method in [b"GET", b"CONNECT", b"POST", b"OPTIONS"]:
            self.assertEqual(sniff(method[0]), "http")
        for other in [0, 3, 0x16, ord("g"), 0xFF]:
            self.assertIsNone(sniff(other))


# Strategies.
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,62}", fullmatch=True),
)
destinations = st.builds(Destination, hosts, st.integers(0, 65535))


def splits(data):
    """A strategy for ``data`` cut into consecutive pieces."""
    return st.lists(st.integers(0, len(data)), max_size=8).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)])]
    )


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.data(), destinations, st.binary(max_size=40), st.booleans())
    def test_random_splits(self, data, dest, payload, auth):
        """However the handshake is cut into segments, the events are the same."""
        prefix = unhex("05 02 00 02") + LOGIN if auth else NO_AUTH
        wire = prefix + b"\x05\x01\x00" + encode_socks_address(dest) + payload
        users = check if auth else None
        whole = feed(SocksServer(users), wire)
        self.assertEqual(
            whole[-1 if not payload else -2],
            ConnectRequest(Destination(str(dest.ip), dest.port) if dest.ip else dest, 5),
        )
        server = SocksServer(users)
        events = []
        for piece in data.draw(splits(wire)):
            events.extend(server.receive(piece))
        self.assertEqual(merge(events), whole)

    @settings(max_examples=400, deadline=None)
    @given(
        st.sampled_from([b"", NO_AUTH, b"\x05\x01\x02\x01", b"\x04\x01\x00\x50\x00\x00\x00\x01"]),
        st.lists(st.binary(max_size=700), max_size=6),
        st.booleans(),
    )
    def test_junk(self, prefix, chunks, auth):
        """Junk (also after a valid greeting, or inside auth or SOCKS4a) never raises, never
        keeps more than one message, and fails at most once, last."""
        server = SocksServer(check if auth else None)
        events = []
        for chunk in [prefix, *chunks]:
            events.extend(server.receive(chunk))
            self.assertLessEqual(server.buffered, MAX_MESSAGE_SIZE)
        failures = [e for e in events if isinstance(e, Failed)]
        self.assertLessEqual(len(failures), 1)
        if failures:
            self.assertIs(events[-1], failures[0])
            self.assertEqual(server.state, State.CLOSED)

    @settings(max_examples=200, deadline=None)
    @given(destinations, st.binary(max_size=100), st.integers(0, 255))
    def test_udp_round_trip(self, dest, payload, frag):
        parsed = parse_udp_datagram(encode_udp_datagram(dest, payload, frag))
        self.assertEqual(parsed.frag, frag)
        self.assertEqual(parsed.payload, payload)
        self.assertEqual(parsed.destination.port, dest.port)
        self.assertEqual(parsed.destination.ip, dest.ip)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_udp_junk(self, wire):
        """Any bytes parse or raise SocksError, nothing else."""
        try:
            parse_udp_datagram(wire)
        except SocksError:
            pass

    @settings(max_examples=100, deadline=None)
    @given(destinations, st.sampled_from(list(Reply)))
    def test_reply_round_trip(self, bound, code):
        """A reply's address parses back to the bound address."""
        wire = encode_reply(code, bound)
        self.assertEqual(wire[:3], bytes([5, code, 0]))
        parsed, end = parse_socks_address(wire, 3)
        self.assertEqual(end, len(wire))
        self.assertEqual((parsed.ip, parsed.port), (bound.ip, bound.port))
