"""UDP over TCP (sing "udp-over-tcp", anytls-protocol.md section 10).

sing-box's anytls outbound carries all of its UDP this way: a stream to a magic domain name,
whose bytes are a request header (v2 only) followed by length-prefixed datagrams. Each such
stream gets its own unconnected UDP sockets, so replies are easy to attribute and vanish with
the stream. UDP has no backpressure: datagrams that arrive while the client side is backed up
are dropped and counted.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from twisted.internet import defer, error, udp
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from .. import logs
from ..logs import get_logger
from ..protocol.address import (
    CACHE_SIZE,
    AddressError,
    Destination,
    IPAddress,
    parse_ip,
)
from ..protocol.uot import UoTPacket, UoTReader, encode_connect_packet, encode_packet
from .stream import BaseStream

_log = get_logger("anytls_twisted.udp")

#: Names whose resolution a stream remembers, and for how long (getaddrinfo gives no TTL).
NAME_CACHE_SIZE = 64
NAME_CACHE_SECONDS = 60.0
#: Datagrams held per name while it resolves.
MAX_QUEUED_PER_NAME = 16
#: Receive size for the UDP sockets: the largest datagram, not Twisted's 8192 default.
MAX_DATAGRAM = 65535


@functools.lru_cache(maxsize=CACHE_SIZE)
def _unmap(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 as IPv4 (memoised, bounded: it runs for every datagram)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


#: The text of an address, memoised and bounded (``str`` of an ``ipaddress`` object builds it
#: anew each time, and every datagram needs it).
_text = functools.lru_cache(maxsize=CACHE_SIZE)(str)


class _QuietLog:
    """Stands in for ``twisted.python.log`` inside :class:`QuietUDPPort`: drops ``msg``."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def msg(self, *message: Any, **kw: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    real = udp.log
    setattr(udp, "log", _QuietLog(real))  # noqa: B010 (a module attribute, typed as a module)
    try:
        yield
    finally:
        udp.log = real


class QuietUDPPort(udp.Port):
    """A UDP port that does not log its start and close.

    Twisted's ``udp.Port`` logs "<protocol> starting on N" and "(UDP Port N Closed)" at info
    for every port, with no session or stream; each UDP-over-TCP stream opens one or two, so
    those lines drowned the server's own events. Ours say the same with the ids.
    """

    def startListening(self) -> None:
        with _quiet():
            super().startListening()

    def connectionLost(self, reason: Any = None) -> None:
        with _quiet():
            super().connectionLost(reason)

    def write(self, datagram: bytes, addr: Any = None) -> None:
        """Send to an address the stream has already parsed and checked: Twisted's ``write``
        parses the address text again, twice, for every datagram."""
        try:
            self.socket.sendto(datagram, addr)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                raise error.MessageLengthError("message too long") from None
            if e.errno != errno.ECONNREFUSED:  # an earlier datagram's ICMP; nothing to do
                raise


def listen_udp(reactor: Any) -> Callable[..., QuietUDPPort]:
    """``listen_udp(port, protocol, interface)`` for streams: quiet ports on ``reactor``."""

    def listen(port: int, protocol: DatagramProtocol, interface: str = "") -> QuietUDPPort:
        listening = QuietUDPPort(port, protocol, interface, MAX_DATAGRAM, reactor)
        listening.startListening()
        return listening

    return listen


class _Socket(DatagramProtocol):
    """One of a stream's UDP sockets: forwards what it receives to the stream."""

    noisy = False

    def __init__(self, stream: UoTStream) -> None:
        self.stream = stream

    def datagramReceived(self, data: bytes, addr) -> None:
        self.stream.datagram_received(data, addr)


class _Name:
    """A cached resolution: every address (for reply mapping) and the one we send to."""

    def __init__(
        self, addresses: List[IPAddress], target: Optional[IPAddress], error: str, expires: float
    ) -> None:
        self.addresses = addresses
        self.target = target  # None: nothing the policy permits, ``error`` says why
        self.error = error
        self.expires = expires


class UoTStream(BaseStream):
    """A UoT stream: parses the client's packets, sends them as datagrams, frames the replies.

    v2 starts with a request header (connect flag plus SOCKS address); connect-mode packets
    are ``u16 length, payload`` to the header's destination, non-connect packets carry a UoT
    address first. v1 has no header and is always non-connect.

    @ivar version: 2 or 1 (from the magic name).
    @ivar datagrams_in: datagrams from the client sent on.
    @ivar datagrams_out: datagrams relayed back to the client.
    @ivar dropped: datagrams dropped either way (refused, unresolvable, client backed up).
    @ivar connect: whether the v2 header asked for connect mode.
    @ivar header: the v2 header's destination, None until it arrives (and for v1).
    """

    kind = "udp"

    def __init__(
        self, context, sid: int, destination: Destination, opened_at: float, version: int
    ) -> None:
        super().__init__(context, sid, destination, opened_at)
        self.version = version
        self.datagrams_in = 0  # client -> origin
        self.datagrams_out = 0  # origin -> client
        self.dropped = 0
        self.connect = False
        self.header: Optional[Destination] = None  # the v2 request destination
        self._reader = UoTReader(version)
        self._ports: Dict[int, Any] = {}  # IP version -> listening port
        self._names: OrderedDict[str, _Name] = OrderedDict()
        self._resolving: Dict[str, List[Tuple[int, bytes]]] = {}
        self._paused = False
        self._timer = None
        # Replies leave at once, not on the reactor's next turn: a round trip waits on them.
        self._flush: Optional[Callable[[], None]] = getattr(context, "flush", None)

    def relay(self, data: bytes) -> None:
        super().relay(data)
        if self._flush is not None:
            self._flush()

    # IStream.
    def start(self, data: bytes = b"") -> None:
        """Report success at once (protocol 10.6): the header only comes with the first datagram."""
        self.context.acknowledge(self)
        self._timer = self.context.clock.callLater(self.context.config.udp_timeout, self._idle)
        if data:
            self.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.bytes_in += len(data)
        reader = self._reader
        reader.feed(data)
        try:
            while not self.closed:
                item = reader.next_item()
                if item is None:
                    break
                if isinstance(item, UoTPacket):
                    self.datagrams_in += 1
                    self._touch()
                    self._send_to(item.destination, item.payload)
                else:
                    self.connect, self.header = item.connect, item.destination
                    self._got_header()
        except AddressError as e:
            _log.info(
                "stream {session_id}/{stream_id}: bad UDP-over-TCP data: {error}",
                session_id=self.context.session_id,
                stream_id=self.sid,
                error=str(e),
            )
            self.end(f"bad udp-over-tcp data: {e}", str(e))

    def pauseProducing(self) -> None:
        """The client is backed up: UDP cannot be slowed, so replies are dropped meanwhile."""
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False

    def connectionLost(self, reason: str) -> None:
        super().connectionLost(reason)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for port in self._ports.values():
            port.stopListening()
        self._ports = {}
        self._reader = UoTReader(self.version)
        self._resolving = {}
        self._names.clear()

    @property
    def _request(self) -> Destination:
        """The v2 request header's destination; only read once the header has arrived."""
        assert self.header is not None
        return self.header

    # Client -> origin.
    def _got_header(self) -> None:
        if logs.DEBUG:  # skip building an event the filter drops
            _log.debug(
                "stream {session_id}/{stream_id}: udp {mode} to {destination}",
                session_id=self.context.session_id,
                stream_id=self.sid,
                mode="connect" if self.connect else "packets",
                destination=str(self.header),
            )
        # Resolve now: connect mode must vet its one destination, and non-connect mode maps
        # replies from the header's name back to it.
        if self._request.ip is None:
            self._lookup(self._request.host, self._request.port)
        elif self.connect:
            self._check_connect_target()

    def _send_to(self, dest: Destination, payload: bytes) -> None:
        literal = dest.ip
        if literal is not None:
            self._send_ip(_unmap(literal), dest, payload)
            return
        name = self._cached(dest.host)
        if name is not None:
            self._send_name(name, dest, payload)
        elif dest.host in self._resolving:
            queue = self._resolving[dest.host]
            if len(queue) < MAX_QUEUED_PER_NAME:
                queue.append((dest.port, payload))
            else:
                self._drop(dest, "too many datagrams waiting for the name to resolve")
        elif len(self._resolving) >= NAME_CACHE_SIZE:
            self._drop(dest, "too many names resolving")
        else:
            self._lookup(dest.host, dest.port, [(dest.port, payload)])

    def _send_ip(self, ip: IPAddress, dest: Destination, payload: bytes) -> None:
        policy = self.context.config.policy
        if not policy.permits(ip):
            self._refused(policy.refusal(ip))
            self._drop(dest, policy.refusal(ip))
            return
        port = self._port_for(ip.version)
        if port is None:
            return
        try:
            port.write(payload, (_text(ip), dest.port))
        except (OSError, error.MessageLengthError, error.InvalidAddressError) as e:
            self._drop(dest, str(e) or e.__class__.__name__)

    def _send_name(self, name: _Name, dest: Destination, payload: bytes) -> None:
        if name.target is None:
            if name.addresses:  # resolved, but only to addresses the policy refuses
                self._refused(name.error)
            self._drop(dest, name.error)
        else:
            self._send_ip(name.target, dest, payload)

    def _drop(self, dest: Destination, why: str) -> None:
        self.dropped += 1
        if logs.DEBUG:  # skip building an event the filter drops
            _log.debug(
                "stream {session_id}/{stream_id}: dropped datagram to {destination}: {why}",
                session_id=self.context.session_id,
                stream_id=self.sid,
                destination=str(dest),
                why=why,
            )

    def _port_for(self, version: int):
        port = self._ports.get(version)
        if port is None:
            interface = "0.0.0.0" if version == 4 else "::"
            try:
                port = self.context.listen_udp(0, _Socket(self), interface=interface)
            except error.CannotListenError as e:
                self.end(f"cannot open a UDP socket on {interface}: {e.socketError}", str(e))
                return None
            port.maxPacketSize = MAX_DATAGRAM
            self._ports[version] = port
        return port

    # Name resolution, cached per stream.
    def _cached(self, host: str) -> Optional[_Name]:
        """The known answer for ``host``; an expired one still serves while it is refreshed."""
        name = self._names.get(host)
        if name is not None:
            self._names.move_to_end(host)
            if name.expires <= self.context.clock.seconds():
                self._lookup(host, 0)
                name = self._names.get(host)
        return name

    def _lookup(
        self, host: str, port: int, queued: Optional[List[Tuple[int, bytes]]] = None
    ) -> None:
        if host in self._resolving:
            return
        self._resolving[host] = queued or []
        d = defer.maybeDeferred(self.context.dialer.resolver.resolve, host, port, udp=True)
        d.addCallbacks(
            self._resolved, self._resolve_failed, callbackArgs=(host,), errbackArgs=(host,)
        )

    def _resolved(self, addresses: List[IPAddress], host: str) -> None:
        """Remember every address (for replies); send to the first permitted one, IPv4 first."""
        addresses = [_unmap(ip) for ip in addresses]
        policy = self.context.config.policy
        permitted = policy.permitted(addresses)
        if permitted:
            why = ""
        elif addresses:
            why = f"{host} resolves to {addresses[0]}: {policy.refusal(addresses[0])}"
        else:
            why = f"lookup {host}: no such host"
        target = permitted[0] if permitted else None
        expires = self.context.clock.seconds() + NAME_CACHE_SECONDS
        self._store(host, _Name(addresses, target, why, expires))

    def _resolve_failed(self, failure: Failure, host: str) -> None:
        # Not cached: a failed lookup may be transient; the next datagram tries again. A failed
        # refresh keeps the previous answer for another period.
        text = f"lookup {host}: {failure.getErrorMessage()}"
        queued = self._resolving.pop(host, [])
        if self.closed:
            return
        stale = self._names.get(host)
        if stale is not None:
            stale.expires = self.context.clock.seconds() + NAME_CACHE_SECONDS
            return
        if self.connect and self.header is not None and host == self._request.host:
            self.end(f"udp destination failed: {text}")
            return
        for port, _ in queued:
            self._drop(Destination(host, port), text)

    def _store(self, host: str, name: _Name) -> None:
        queued = self._resolving.pop(host, [])
        if self.closed:
            return
        self._names[host] = name
        self._names.move_to_end(host)
        while len(self._names) > NAME_CACHE_SIZE:
            oldest = next(iter(self._names))
            if self.header is not None and oldest == self._request.host:
                self._names.move_to_end(oldest)  # keep the header's name for reply mapping
            else:
                del self._names[oldest]
        if self.connect and self.header is not None and host == self._request.host:
            self._check_connect_target()
        for port, payload in queued:
            if self.closed:
                break
            self._send_name(name, Destination(host, port), payload)

    def _connect_target(self) -> Optional[IPAddress]:
        """Connect mode: the address the header's destination resolved to, once known."""
        if self._request.ip is not None:
            return _unmap(self._request.ip)
        name = self._names.get(self._request.host)
        return name.target if name is not None else None

    def _check_connect_target(self) -> None:
        """Connect mode has one destination; if the policy refuses it the stream is useless."""
        literal = self._request.ip
        if literal is not None:
            policy = self.context.config.policy
            if not policy.permits(_unmap(literal)):
                self._refused(policy.refusal(_unmap(literal)))
                self.end(f"udp destination {self.header} refused by server policy")
            return
        name = self._names.get(self._request.host)
        if name is not None and name.target is None:
            if name.addresses:
                self._refused(name.error)
            self.end(f"udp destination refused: {name.error}")

    def _refused(self, why: str) -> None:
        self.context.metrics.destination_refused("udp")
        self.context.policy_refused("udp", why)

    # Origin -> client.
    def datagram_received(self, data: bytes, addr) -> None:
        if self.closed:
            return
        ip = parse_ip(addr[0])
        if ip is None or len(data) > 0xFFFF:
            return
        source = Destination(_text(_unmap(ip)), addr[1])
        if self.connect and (
            self._connect_target() != source.ip or source.port != self._request.port
        ):
            return
        self._touch()
        if self._paused:
            self.dropped += 1
            return
        self.datagrams_out += 1
        if self.connect:
            self.relay(encode_connect_packet(data))
        else:
            self.relay(encode_packet(self._reported_source(source), data))

    def _reported_source(self, source: Destination) -> Destination:
        """sing-box fidelity (protocol 10.5): replies from the header's name keep that name."""
        header = self.header
        if header is None or header.ip is not None or source.port != header.port:
            return source
        name = self._names.get(header.host)
        if name is not None and source.ip in name.addresses:
            return header
        return source

    # Idle timeout.
    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.context.config.udp_timeout)

    def _idle(self) -> None:
        self._timer = None
        self.end("udp idle timeout")
