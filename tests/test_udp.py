"""UoT streams (anytls_twisted.udp) against a fake session, fake UDP ports and a fake resolver.

Vectors V15-V17 come from anytls-protocol.md section 14; the behaviour checked is that of
sections 10 and 15 (items 14-19).
"""

from __future__ import annotations

import ipaddress
import types

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error, task
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.metrics import NULL_METRICS
from anytls_twisted.protocol import codec
from anytls_twisted.protocol.address import Destination, DestinationPolicy
from anytls_twisted.protocol.auth import UserTable
from anytls_twisted.protocol.uot import MAGIC_V1, MAGIC_V2, uot_version
from anytls_twisted.server.settings import ServerConfig
from anytls_twisted.server.udp import NAME_CACHE_SECONDS, NAME_CACHE_SIZE, UoTStream


def unhex(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


UDP_TIMEOUT = 60.0
SID = 2

# Stream bytes after the magic address (V16, V17 and the other AddrParser forms of V17).
V16_HEADER = unhex("01 01 08 08 08 08 00 35")
V17_HEADER = unhex("00 01 08 08 08 08 00 35")
CONNECT_PING = unhex("00 04 70 69 6e 67")
V4_PING = unhex("00 08 08 08 08 00 35 00 04 70 69 6e 67")
V6_PING = unhex("01 20 01 48 60 48 60 00 00 00 00 00 00 00 00 88 88 00 35 00 04 70 69 6e 67")
DOMAIN_PING = unhex("02 0a 64 6e 73 2e 67 6f 6f 67 6c 65 00 35 00 04 70 69 6e 67")
CONNECT_PONG = unhex("00 04 70 6f 6e 67")
V4_PONG = unhex("00 08 08 08 08 00 35 00 04 70 6f 6e 67")
GOOGLE_V6 = "2001:4860:4860::8888"


def ips(*texts):
    return [ipaddress.ip_address(t) for t in texts]


class FakeResolver:
    """Answers from a dict of name -> list of ip_address; unknown names fail.

    With ``manual`` set, lookups return unfired Deferreds kept in ``pending``.
    """

    def __init__(self, names=None, manual=False) -> None:
        self.names = names or {}
        self.manual = manual
        self.queries = []
        self.pending = {}

    def resolve(self, host, port=0, udp=False):
        self.queries.append((host, udp))
        if self.manual:
            self.pending[host] = defer.Deferred()
            return self.pending[host]
        if host not in self.names:
            return defer.fail(error.DNSLookupError(host))
        return defer.succeed(list(self.names[host]))


class FakePort:
    """Stands in for ``reactor.listenUDP``'s port: records writes and stopListening."""

    def __init__(self, protocol, interface) -> None:
        self.protocol = protocol
        self.interface = interface
        self.written = []
        self.stopped = False

    def write(self, data, addr):
        self.written.append((data, addr))

    def stopListening(self):
        self.stopped = True

    def reply(self, data, addr):
        self.protocol.datagramReceived(data, addr)


class FakeFactory:
    def __init__(self) -> None:
        self.ports = []
        self.refuse = False

    def listen_udp(self, port, protocol, interface=""):
        assert port == 0 and isinstance(protocol, DatagramProtocol)
        if self.refuse:
            raise error.CannotListenError(interface, port, OSError("no sockets"))
        fake = FakePort(protocol, interface)
        protocol.makeConnection(fake)
        self.ports.append(fake)
        return fake


class FakeSession:
    """The stream context (IStreamContext) a stream uses, recording what the stream does."""

    def __init__(self, names=None, allow_private=False, manual=False) -> None:
        self.session_id = 1
        self.write_paused = False
        self.clock = task.Clock()
        self.config = ServerConfig(
            users=UserTable([("u", "p")]),
            udp_timeout=UDP_TIMEOUT,
            policy=DestinationPolicy(allow_private=allow_private),
        )
        self.resolver = FakeResolver(names, manual)
        self.dialer = types.SimpleNamespace(resolver=self.resolver)
        self.factory = FakeFactory()
        self.listen_udp = self.factory.listen_udp
        self.metrics = NULL_METRICS
        self.synacks = []
        self.data = []
        self.finished = []
        self.blocked = []
        self.refusals = []
        self._acknowledged = set()

    def acknowledge(self, stream, error=""):
        if stream.sid not in self._acknowledged:
            self._acknowledged.add(stream.sid)
            self.synacks.append((stream.sid, error))

    def write(self, stream, data):
        self.data.append((stream.sid, data))

    def end(self, stream, reason, error=None):
        if error is not None:
            self.acknowledge(stream, error)
        self.finished.append((stream, reason, True))
        stream.connectionLost(reason)

    def pausePeer(self, stream):
        self.blocked.append((stream, True))

    def resumePeer(self, stream):
        self.blocked.append((stream, False))

    def policy_refused(self, kind, why):
        self.refusals.append((kind, why))

    def peer_closed(self, stream, reason):
        """What the session does on a FIN from the client or its own close."""
        self.finished.append((stream, reason, False))
        stream.connectionLost(reason)

    # Conveniences for the tests.
    def port(self, interface):
        [port] = [p for p in self.factory.ports if p.interface == interface]
        return port

    def written(self):
        return [w for p in self.factory.ports for w in p.written]


def open_stream(version=2, data=b"", **kwargs):
    session = FakeSession(**kwargs)
    magic = MAGIC_V2 if version == 2 else MAGIC_V1
    stream = UoTStream(session, SID, Destination(magic, 0), session.clock.seconds(), version)
    stream.start(data)
    return session, stream


class VersionTests(SynchronousTestCase):
    def test_magic_names(self):
        self.assertEqual(uot_version(Destination(MAGIC_V2, 0)), 2)
        self.assertEqual(uot_version(Destination(MAGIC_V1, 0)), 1)
        self.assertEqual(uot_version(Destination(MAGIC_V2, 443)), 2)
        self.assertIsNone(uot_version(Destination("SP.V2.UDP-OVER-TCP.ARPA", 0)))
        self.assertIsNone(uot_version(Destination("x.sp.v2.udp-over-tcp.arpa", 0)))
        self.assertIsNone(uot_version(Destination("example.com", 0)))


class StartTests(SynchronousTestCase):
    def test_synack_before_header(self):
        """SYNACK success goes out at start, before any header byte and before any socket."""
        session, stream = open_stream()
        self.assertEqual(session.synacks, [(SID, "")])
        self.assertEqual(session.factory.ports, [])
        self.assertEqual(stream.kind, "udp")
        stream.dataReceived(V17_HEADER + V4_PING)
        self.assertEqual(session.synacks, [(SID, "")])


class ConnectModeTests(SynchronousTestCase):
    def test_v16(self):
        """V16: header plus first packet in one chunk; the reply is framed without an address."""
        session, stream = open_stream(data=V16_HEADER + CONNECT_PING)
        self.assertTrue(stream.connect)
        port = session.port("0.0.0.0")
        self.assertEqual(port.written, [(b"ping", ("8.8.8.8", 53))])
        port.reply(b"pong", ("8.8.8.8", 53))
        self.assertEqual(session.data, [(SID, CONNECT_PONG)])
        self.assertEqual((stream.datagrams_in, stream.datagrams_out), (1, 1))
        self.assertEqual(stream.bytes_in, len(V16_HEADER + CONNECT_PING))
        self.assertEqual(stream.bytes_out, len(CONNECT_PONG))

    def test_any_nonzero_connect_byte(self):
        session, stream = open_stream(data=b"\x07" + V16_HEADER[1:] + CONNECT_PING)
        self.assertTrue(stream.connect)
        self.assertEqual(session.written(), [(b"ping", ("8.8.8.8", 53))])

    def test_replies_only_from_destination(self):
        session, stream = open_stream(data=V16_HEADER + CONNECT_PING)
        port = session.port("0.0.0.0")
        port.reply(b"x", ("8.8.4.4", 53))
        port.reply(b"y", ("8.8.8.8", 54))
        self.assertEqual(session.data, [])
        self.assertEqual(stream.datagrams_out, 0)

    def test_replies_are_flushed_at_once(self):
        """A reply is pushed through the TLS layer as it is relayed (a context that can flush
        is asked to, once per reply), not held for the reactor's next turn."""
        session = FakeSession()
        flushed = []
        session.flush = lambda: flushed.append(len(session.data))
        stream = UoTStream(session, SID, Destination(MAGIC_V2, 0), 0.0, 2)
        stream.start(V16_HEADER + CONNECT_PING)
        port = session.port("0.0.0.0")
        port.reply(b"pong", ("8.8.8.8", 53))
        port.reply(b"pong", ("8.8.8.8", 53))
        self.assertEqual(flushed, [1, 2])

    def test_domain_destination(self):
        header = unhex("01 03 0a") + b"dns.google" + unhex("00 35")
        session, stream = open_stream(
            data=header + CONNECT_PING, names={"dns.google": ips(GOOGLE_V6, "8.8.8.8")}
        )
        self.assertEqual(session.resolver.queries, [("dns.google", True)])
        self.assertEqual(session.written(), [(b"ping", ("8.8.8.8", 53))])
        session.port("0.0.0.0").reply(b"pong", ("8.8.8.8", 53))
        self.assertEqual(session.data, [(SID, CONNECT_PONG)])

    def test_private_destination_ends_stream(self):
        session, stream = open_stream(data=unhex("01 01 7f 00 00 01 00 35") + CONNECT_PING)
        self.assertEqual(session.written(), [])
        [(finished, reason, send_fin)] = session.finished
        self.assertIs(finished, stream)
        self.assertTrue(send_fin)
        self.assertIn("refused", reason)
        self.assertEqual(session.synacks, [(SID, "")])

    def test_domain_resolving_private_ends_stream(self):
        header = unhex("01 03 09") + b"localhost" + unhex("00 35")
        session, stream = open_stream(data=header, names={"localhost": ips("127.0.0.1")})
        self.assertTrue(stream.closed)
        self.assertTrue(session.finished[0][2])

    def test_unresolvable_destination_ends_stream(self):
        header = unhex("01 03 07") + b"nowhere" + unhex("00 35")
        session, stream = open_stream(data=header + CONNECT_PING)
        self.assertTrue(stream.closed)
        self.assertIn("nowhere", session.finished[0][1])
        self.assertEqual(session.written(), [])

    def test_private_allowed(self):
        session, stream = open_stream(
            data=unhex("01 01 7f 00 00 01 00 35") + CONNECT_PING, allow_private=True
        )
        self.assertEqual(session.written(), [(b"ping", ("127.0.0.1", 53))])
        self.assertFalse(stream.closed)


class NonConnectModeTests(SynchronousTestCase):
    def test_v17(self):
        """V17 byte for byte: header plus an IPv4 packet; the reply carries its source."""
        session, stream = open_stream(data=V17_HEADER + V4_PING)
        self.assertFalse(stream.connect)
        self.assertEqual(stream.header, Destination("8.8.8.8", 53))
        port = session.port("0.0.0.0")
        self.assertEqual(port.written, [(b"ping", ("8.8.8.8", 53))])
        port.reply(b"pong", ("8.8.8.8", 53))
        self.assertEqual(session.data, [(SID, V4_PONG)])

    def test_ipv6_packet(self):
        session, stream = open_stream(data=V17_HEADER + V6_PING)
        port = session.port("::")
        self.assertEqual(port.written, [(b"ping", (GOOGLE_V6, 53))])
        port.reply(b"pong", (GOOGLE_V6, 53))
        self.assertEqual(session.data, [(SID, V6_PING[:19] + unhex("00 04") + b"pong")])

    def test_domain_packet(self):
        session, stream = open_stream(
            data=V17_HEADER + DOMAIN_PING, names={"dns.google": ips(GOOGLE_V6, "8.8.8.8")}
        )
        self.assertIn(("dns.google", True), session.resolver.queries)
        self.assertEqual(session.written(), [(b"ping", ("8.8.8.8", 53))])
        # The header names an IP, so replies report the IP (sing-box, protocol 10.5).
        session.port("0.0.0.0").reply(b"pong", ("8.8.8.8", 53))
        self.assertEqual(session.data, [(SID, V4_PONG)])

    def test_reply_mapped_to_header_domain(self):
        header = unhex("00 03 0a") + b"dns.google" + unhex("00 35")
        session, stream = open_stream(
            data=header + V4_PING, names={"dns.google": ips("8.8.8.8", GOOGLE_V6)}
        )
        port = session.port("0.0.0.0")
        self.assertEqual(port.written, [(b"ping", ("8.8.8.8", 53))])
        port.reply(b"pong", ("8.8.8.8", 53))
        port.reply(b"pong", ("8.8.4.4", 53))
        port.reply(b"pong", ("8.8.8.8", 5353))
        self.assertEqual(
            [data for _, data in session.data],
            [
                DOMAIN_PING[:16] + b"pong",
                unhex("00 08 08 04 04 00 35 00 04") + b"pong",
                unhex("00 08 08 08 08 14 e9 00 04") + b"pong",
            ],
        )

    def test_ipv4_mapped_source_reported_as_ipv4(self):
        session, stream = open_stream(data=V17_HEADER + V6_PING)
        session.port("::").reply(b"pong", ("::ffff:8.8.8.8", 53))
        self.assertEqual(session.data, [(SID, V4_PONG)])

    def test_ipv4_mapped_destination_uses_ipv4_socket(self):
        packet = unhex("01") + ipaddress.ip_address("::ffff:8.8.8.8").packed + V4_PING[5:]
        session, stream = open_stream(data=V17_HEADER + packet)
        self.assertEqual(session.port("0.0.0.0").written, [(b"ping", ("8.8.8.8", 53))])

    def test_several_packets_in_one_chunk(self):
        session, stream = open_stream(
            data=V17_HEADER + V4_PING + V6_PING + DOMAIN_PING + V4_PING,
            names={"dns.google": ips("8.8.4.4")},
        )
        self.assertEqual(
            session.port("0.0.0.0").written,
            [(b"ping", ("8.8.8.8", 53)), (b"ping", ("8.8.4.4", 53)), (b"ping", ("8.8.8.8", 53))],
        )
        self.assertEqual(session.port("::").written, [(b"ping", (GOOGLE_V6, 53))])
        self.assertEqual(len(session.factory.ports), 2)
        self.assertEqual(stream.datagrams_in, 4)
        self.assertEqual(stream._reader.pending, 0)

    def test_partial_packet_is_all_that_is_buffered(self):
        session, stream = open_stream(data=V17_HEADER + V4_PING * 3 + V4_PING[:7])
        self.assertEqual(len(session.written()), 3)
        self.assertEqual(stream._reader.buffered(), V4_PING[:7])
        stream.dataReceived(V4_PING[7:])
        self.assertEqual(len(session.written()), 4)
        self.assertEqual(stream._reader.pending, 0)

    def test_empty_and_large_payloads(self):
        big = (bytes(range(256)) * 256)[:65535]  # the largest length a packet can carry
        packet = V4_PING[:7] + unhex("ff ff") + big
        session, stream = open_stream(data=V17_HEADER + V4_PING[:7] + unhex("00 00") + packet)
        self.assertEqual(session.written(), [(b"", ("8.8.8.8", 53)), (big, ("8.8.8.8", 53))])

    def test_private_destination_dropped(self):
        packet = unhex("00 7f 00 00 01 00 35 00 04") + b"ping"
        session, stream = open_stream(data=V17_HEADER + packet + V4_PING)
        self.assertEqual(session.written(), [(b"ping", ("8.8.8.8", 53))])
        self.assertEqual(stream.dropped, 1)
        self.assertFalse(stream.closed)

    def test_private_domain_dropped(self):
        packet = unhex("02 09") + b"localhost" + unhex("00 35 00 04") + b"ping"
        session, stream = open_stream(
            data=V17_HEADER + packet, names={"localhost": ips("::1", "127.0.0.1")}
        )
        self.assertEqual(session.written(), [])
        self.assertEqual(stream.dropped, 1)
        self.assertFalse(stream.closed)

    def test_private_allowed(self):
        packet = unhex("00 7f 00 00 01 00 35 00 04") + b"ping"
        session, stream = open_stream(data=V17_HEADER + packet, allow_private=True)
        self.assertEqual(session.written(), [(b"ping", ("127.0.0.1", 53))])
        self.assertEqual(stream.dropped, 0)

    def test_unresolvable_name_dropped(self):
        session, stream = open_stream(data=V17_HEADER + DOMAIN_PING + V4_PING)
        self.assertEqual(session.written(), [(b"ping", ("8.8.8.8", 53))])
        self.assertEqual(stream.dropped, 1)
        self.assertFalse(stream.closed)

    def test_datagrams_wait_for_resolution_in_order(self):
        session, stream = open_stream(manual=True)
        other = unhex("02 0a") + b"dns.google" + unhex("00 36 00 04") + b"pang"
        stream.dataReceived(V17_HEADER + DOMAIN_PING + V4_PING + other)
        self.assertEqual(session.written(), [(b"ping", ("8.8.8.8", 53))])
        self.assertEqual([q for q, _ in session.resolver.queries], ["dns.google"])
        session.resolver.pending["dns.google"].callback(ips("8.8.4.4"))
        self.assertEqual(
            session.written()[1:], [(b"ping", ("8.8.4.4", 53)), (b"pang", ("8.8.4.4", 54))]
        )

    def test_name_cache(self):
        session, stream = open_stream(
            data=V17_HEADER + DOMAIN_PING * 3, names={"dns.google": ips("8.8.8.8")}
        )
        self.assertEqual(len(session.resolver.queries), 1)
        session.clock.advance(NAME_CACHE_SECONDS / 2)
        stream.dataReceived(DOMAIN_PING)
        self.assertEqual(len(session.resolver.queries), 1)
        session.clock.advance(NAME_CACHE_SECONDS / 2)
        session.resolver.names["dns.google"] = ips("8.8.4.4")
        stream.dataReceived(DOMAIN_PING)
        self.assertEqual(len(session.resolver.queries), 2)
        self.assertEqual(
            session.written()[-2:], [(b"ping", ("8.8.8.8", 53)), (b"ping", ("8.8.4.4", 53))]
        )

    def test_failed_refresh_keeps_previous_answer(self):
        session, stream = open_stream(
            data=V17_HEADER + DOMAIN_PING, names={"dns.google": ips("8.8.8.8")}
        )
        session.clock.advance(NAME_CACHE_SECONDS / 2)
        stream.dataReceived(DOMAIN_PING)
        session.clock.advance(NAME_CACHE_SECONDS / 2)
        del session.resolver.names["dns.google"]
        stream.dataReceived(DOMAIN_PING)
        stream.dataReceived(DOMAIN_PING)
        self.assertEqual(len(session.resolver.queries), 2)
        self.assertEqual(session.written(), [(b"ping", ("8.8.8.8", 53))] * 4)
        self.assertEqual(stream.dropped, 0)

    def test_name_cache_bounded(self):
        names = {f"h{i}.example": ips("8.8.8.8") for i in range(NAME_CACHE_SIZE + 10)}
        session, stream = open_stream(data=V17_HEADER, names=names)
        for name in names:
            stream.dataReceived(bytes([2, len(name)]) + name.encode() + unhex("00 35 00 01 78"))
        self.assertEqual(len(session.written()), len(names))
        self.assertLessEqual(len(stream._names), NAME_CACHE_SIZE)

    def test_header_name_survives_cache_eviction(self):
        others = [f"h{i}.example" for i in range(NAME_CACHE_SIZE + 10)]
        names = {"dns.google": ips("8.8.8.8"), **{name: ips("8.8.4.4") for name in others}}
        header = unhex("00 03 0a") + b"dns.google" + unhex("00 35")
        session, stream = open_stream(data=header, names=names)
        for name in others:
            stream.dataReceived(bytes([2, len(name)]) + name.encode() + unhex("00 35 00 01 78"))
        self.assertIn("dns.google", stream._names)
        session.port("0.0.0.0").reply(b"pong", ("8.8.8.8", 53))
        self.assertEqual(session.data, [(SID, DOMAIN_PING[:16] + b"pong")])


class SplitTests(SynchronousTestCase):
    NAMES = {"dns.google": ips("8.8.4.4")}
    STREAM = V17_HEADER + V4_PING + V6_PING + DOMAIN_PING + V4_PING[:7] + unhex("00 00")

    def expected(self):
        session, _ = open_stream(data=self.STREAM, names=self.NAMES)
        return session.written()

    def test_one_byte_at_a_time(self):
        session, stream = open_stream(names=self.NAMES)
        for i in range(len(self.STREAM)):
            stream.dataReceived(self.STREAM[i : i + 1])
        self.assertEqual(session.written(), self.expected())
        self.assertEqual(len(session.written()), 4)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
    def test_random_splits(self, cuts):
        cuts = sorted(set(cuts) | {0, len(self.STREAM)})
        session, stream = open_stream(names=self.NAMES)
        for a, b in zip(cuts, cuts[1:]):
            stream.dataReceived(self.STREAM[a:b])
        self.assertEqual(session.written(), self.expected())

    def test_connect_mode_one_byte_at_a_time(self):
        data = V16_HEADER + CONNECT_PING * 3
        session, stream = open_stream()
        for i in range(len(data)):
            stream.dataReceived(data[i : i + 1])
        self.assertEqual(session.written(), [(b"ping", ("8.8.8.8", 53))] * 3)


class LegacyTests(SynchronousTestCase):
    def test_v1_has_no_header(self):
        session, stream = open_stream(version=1, data=V4_PING + V6_PING)
        self.assertIsNone(stream.header)
        self.assertEqual(
            session.written(), [(b"ping", ("8.8.8.8", 53)), (b"ping", (GOOGLE_V6, 53))]
        )
        session.port("0.0.0.0").reply(b"pong", ("8.8.8.8", 53))
        self.assertEqual(session.data, [(SID, V4_PONG)])

    def test_v1_first_byte_is_an_address(self):
        """A v2 connect header would be misread as an IPv6 packet; it must not be skipped."""
        session, stream = open_stream(version=1, data=V16_HEADER)
        self.assertEqual(session.written(), [])
        self.assertEqual(stream._reader.buffered(), V16_HEADER)


class BadDataTests(SynchronousTestCase):
    def assertFinishedWithFin(self, session, stream):
        self.assertTrue(stream.closed)
        [(finished, reason, send_fin)] = session.finished
        self.assertIs(finished, stream)
        self.assertTrue(send_fin)
        self.assertIn("bad udp-over-tcp data", reason)
        self.assertEqual(session.synacks, [(SID, "")])

    def test_unknown_packet_address_type(self):
        session, stream = open_stream(data=V17_HEADER + V4_PING)
        stream.dataReceived(unhex("05 01 02 03 04 00 35 00 01 78"))
        self.assertFinishedWithFin(session, stream)
        self.assertTrue(session.port("0.0.0.0").stopped)
        stream.dataReceived(V4_PING)
        self.assertEqual(len(session.written()), 1)

    def test_unknown_header_address_type(self):
        """The header uses SOCKS types: 0x02 is not one."""
        session, stream = open_stream(data=unhex("00 02 08 08 08 08 00 35"))
        self.assertFinishedWithFin(session, stream)

    def test_bad_domain(self):
        session, stream = open_stream(data=V17_HEADER + unhex("02 00 00 35 00 00"))
        self.assertFinishedWithFin(session, stream)

    def test_cannot_listen(self):
        session = FakeSession()
        session.factory.refuse = True
        stream = UoTStream(session, SID, Destination(MAGIC_V2, 0), 0.0, 2)
        stream.start(V17_HEADER + V4_PING)
        self.assertTrue(stream.closed)
        self.assertTrue(session.finished[0][2])


class TimeoutTests(SynchronousTestCase):
    def test_idle_timeout_sends_fin(self):
        session, stream = open_stream(data=V17_HEADER + V4_PING)
        session.clock.advance(UDP_TIMEOUT - 1)
        self.assertFalse(stream.closed)
        session.clock.advance(1)
        self.assertTrue(stream.closed)
        self.assertEqual(session.finished, [(stream, "udp idle timeout", True)])
        self.assertTrue(session.port("0.0.0.0").stopped)

    def test_timeout_without_any_datagram(self):
        session, stream = open_stream()
        session.clock.advance(UDP_TIMEOUT)
        self.assertEqual(session.finished, [(stream, "udp idle timeout", True)])

    def test_reset_by_traffic_both_ways(self):
        session, stream = open_stream(data=V17_HEADER + V4_PING)
        session.clock.advance(UDP_TIMEOUT - 1)
        stream.dataReceived(V4_PING)
        session.clock.advance(UDP_TIMEOUT - 1)
        session.port("0.0.0.0").reply(b"pong", ("8.8.8.8", 53))
        session.clock.advance(UDP_TIMEOUT - 1)
        self.assertFalse(stream.closed)
        session.clock.advance(1)
        self.assertTrue(stream.closed)

    def test_partial_packet_is_not_traffic(self):
        session, stream = open_stream(data=V17_HEADER)
        session.clock.advance(UDP_TIMEOUT - 1)
        stream.dataReceived(V4_PING[:5])
        session.clock.advance(1)
        self.assertTrue(stream.closed)


class FlowTests(SynchronousTestCase):
    def test_dropped_while_paused(self):
        session, stream = open_stream(data=V17_HEADER + V4_PING)
        port = session.port("0.0.0.0")
        stream.pauseProducing()
        port.reply(b"pong", ("8.8.8.8", 53))
        port.reply(b"pong", ("8.8.8.8", 53))
        self.assertEqual(session.data, [])
        self.assertEqual(stream.dropped, 2)
        stream.resumeProducing()
        port.reply(b"pong", ("8.8.8.8", 53))
        self.assertEqual(session.data, [(SID, V4_PONG)])
        self.assertEqual((stream.dropped, stream.datagrams_out), (2, 1))
        self.assertEqual(session.blocked, [])

    def test_sending_continues_while_paused(self):
        session, stream = open_stream()
        stream.pauseProducing()
        stream.dataReceived(V17_HEADER + V4_PING)
        self.assertEqual(len(session.written()), 1)


class TeardownTests(SynchronousTestCase):
    def test_close_stops_ports_and_timer(self):
        session, stream = open_stream(data=V17_HEADER + V4_PING + V6_PING)
        session.peer_closed(stream, "client closed the stream")
        self.assertEqual(session.finished, [(stream, "client closed the stream", False)])
        self.assertTrue(all(p.stopped for p in session.factory.ports))
        self.assertEqual(len(session.factory.ports), 2)
        self.assertEqual(session.clock.getDelayedCalls(), [])
        session.factory.ports[0].reply(b"pong", ("8.8.8.8", 53))
        stream.dataReceived(V4_PING)
        self.assertEqual(session.data, [])
        self.assertEqual(len(session.written()), 2)

    def test_resolution_after_close_is_ignored(self):
        session, stream = open_stream(manual=True)
        stream.dataReceived(V17_HEADER + DOMAIN_PING)
        session.peer_closed(stream, "session closed")
        session.resolver.pending["dns.google"].callback(ips("8.8.8.8"))
        self.assertEqual(session.factory.ports, [])


class SessionWiringTests(SynchronousTestCase):
    """V15 to V17 as frames through the real session and factory."""

    def test_v15_v17_frames(self):
        from tests.helpers import Server

        server = Server(allow_private=False)
        client = server.connect()
        client.auth()
        client.received()
        client.send(unhex("01 00 00 00 02 00 00"))  # V15: SYN for stream 2
        client.send(
            unhex(
                "02 00 00 00 02 00 1b 03 17 73 70 2e 76 32 2e 75"
                "64 70 2d 6f 76 65 72 2d 74 63 70 2e 61 72 70 61 00 00"
            )
        )
        self.assertEqual(client.received(), [codec.Frame(codec.Command.SYNACK, 2, b"")])
        client.send(
            unhex(
                "02 00 00 00 02 00 15 00 01 08 08 08 08 00 35 0008 08 08 08 00 35 00 04 70 69 6e 67"
            )
        )
        [port] = server.udp_ports
        self.assertEqual(port.written, [(b"ping", ("8.8.8.8", 53))])
        port.protocol.datagramReceived(b"pong", ("8.8.8.8", 53))
        self.assertEqual(
            client.transport.value(),
            unhex("02 00 00 00 02 00 0d 00 08 08 08 08 00 35 00 04 70 6f 6e 67"),
        )


class QuietPortTests(SynchronousTestCase):
    """UDP-over-TCP sockets open and close without Twisted's per-port info lines."""

    def test_no_port_lines(self):
        from twisted.internet import reactor
        from twisted.logger import formatEvent, globalLogPublisher

        from anytls_twisted.server.udp import MAX_DATAGRAM, listen_udp

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        port = listen_udp(reactor)(0, DatagramProtocol(), interface="127.0.0.1")
        self.assertEqual(port.maxPacketSize, MAX_DATAGRAM)
        self.assertTrue(port.getHost().port)
        port.connectionLost()  # what stopListening schedules on the reactor
        texts = [formatEvent(e) for e in events]
        self.assertFalse([t for t in texts if "starting on" in t or "Closed" in t], texts)
        # Logging elsewhere is untouched once the port is done.
        from twisted.internet import udp
        from twisted.python import log

        self.assertIs(udp.log, log)


class QuietPortWriteTests(SynchronousTestCase):
    """QuietUDPPort.write sends straight to the socket (the stream checked the address)."""

    def test_sends_and_reports_a_datagram_too_long(self):
        import socket

        from twisted.internet import error, reactor

        from anytls_twisted.server.udp import listen_udp

        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        port = listen_udp(reactor)(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.connectionLost)
        port.write(b"ping", receiver.getsockname())
        self.assertEqual(receiver.recvfrom(16)[0], b"ping")
        with self.assertRaises(error.MessageLengthError):
            port.write(b"x" * 70000, receiver.getsockname())
