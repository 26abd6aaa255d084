"""Reaching origins: name resolution, the destination policy, and TCP connects with a deadline.

The policy is applied to the *resolved* addresses, and we connect to exactly the address we
checked, so a name that resolves to a private address (or rebinds to one) cannot slip through.
Error texts follow Go's wording because sing-box clients log them as ``remote: <text>``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocolFactory, IResolutionReceiver
from zope.interface import implementer

from ..protocol.address import Destination, DestinationPolicy, IPAddress, parse_ip


class DialError(Exception):
    """A failed origin connect; ``str()`` is the text sent to the client in SYNACK.

    ``reason`` classifies it for metrics: refused, timeout, no_such_host, policy or other.
    """

    reason = "other"

    def __init__(self, text: str, reason: Optional[str] = None) -> None:
        super().__init__(text)
        if reason is not None:
            self.reason = reason


class DestinationRefused(DialError):
    """The destination resolved only to addresses the policy forbids."""

    reason = "policy"


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.deferred: defer.Deferred = defer.Deferred()
        self.addresses: List[IPAddress] = []

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        ip = parse_ip(address.host)
        if ip is not None and ip not in self.addresses:
            self.addresses.append(ip)

    def resolutionComplete(self) -> None:
        if not self.deferred.called:  # it may have been cancelled by a deadline
            self.deferred.callback(self.addresses)


class Resolver:
    """Resolves names through the reactor's pluggable name resolver (threaded getaddrinfo)."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def resolve(
        self, host: str, port: int = 0, udp: bool = False
    ) -> defer.Deferred[List[IPAddress]]:
        ip = parse_ip(host)
        if ip is not None:
            return defer.succeed([ip])
        collector = _Collector()
        self._reactor.nameResolver.resolveHostName(
            collector, host, port, transportSemantics="UDP" if udp else "TCP"
        )
        return collector.deferred


def allowed_addresses(
    dest: Destination, addresses: Sequence[IPAddress], policy: DestinationPolicy
) -> List[IPAddress]:
    """Filter resolved addresses through the policy, IPv4 first; raise if nothing is left."""
    if not addresses:
        raise DialError(f"lookup {dest.host}: no such host", "no_such_host")
    allowed = policy.permitted(addresses)
    if not allowed:
        raise DestinationRefused(f"dial {dest}: {policy.refusal(addresses[0])}")
    return allowed


def classify(failure_value: Optional[BaseException]) -> Tuple[str, str]:
    """A failed lookup or connect as ``(Go's wording, the metrics label)``: clients log the
    text as ``remote: <text>``; docs/metrics.md lists the labels."""
    if isinstance(failure_value, error.DNSLookupError):
        return "no such host", "no_such_host"
    if isinstance(failure_value, (error.TimeoutError, defer.CancelledError)):
        return "i/o timeout", "timeout"
    if isinstance(failure_value, error.ConnectionRefusedError):
        return "connect: connection refused", "refused"
    if isinstance(failure_value, error.NoRouteError):
        return "connect: no route to host", "other"
    if isinstance(failure_value, error.ConnectError) and failure_value.osError:
        return "connect: " + str(failure_value.osError), "other"
    if failure_value is None:
        return "connection failed", "other"
    text = str(failure_value) or failure_value.__class__.__name__
    return text.splitlines()[0][:200], "other"


class OriginDialer:
    """Connects streams to origins: resolve, filter by policy, then try each address in turn.

    The whole attempt (resolution included) is bounded by ``timeout`` seconds. The policy
    comes with each dial, from the live configuration, so a reload applies to the next stream.

    @ivar timeout: seconds allowed for one dial, resolution included.
    @ivar resolver: the name resolver (:class:`Resolver`, or a test double); UDP-over-TCP
        streams resolve through it too.
    """

    def __init__(self, reactor, timeout: float, resolver: Optional[Resolver] = None) -> None:
        self._reactor = reactor
        self.timeout = timeout
        self.resolver = resolver if resolver is not None else Resolver(reactor)

    def dial(
        self, dest: Destination, factory: IProtocolFactory, policy: DestinationPolicy
    ) -> defer.Deferred:
        """Fire with the connected protocol, or fail with :class:`DialError` (only).
        Cancellable."""
        deadline = self._reactor.seconds() + self.timeout
        attempt: List[Optional[defer.Deferred]] = [None]

        def cancel(d: defer.Deferred) -> None:
            if attempt[0] is not None:
                attempt[0].cancel()

        result: defer.Deferred = defer.Deferred(cancel)
        timer = self._reactor.callLater(self.timeout, result.cancel)

        def done(value):
            if timer.active():
                timer.cancel()
            return value

        def as_dial_error(failure):
            if failure.check(DialError):
                return failure
            if failure.check(defer.CancelledError):
                raise DialError(f"dial tcp {dest}: i/o timeout", "timeout")
            text, label = classify(failure.value)
            raise DialError(f"dial tcp {dest}: {text}", label)

        @defer.inlineCallbacks
        def run():
            attempt[0] = self.resolver.resolve(dest.host, dest.port)
            try:
                addresses = yield attempt[0]
            except defer.CancelledError:
                raise
            except Exception as e:
                text, label = classify(e)
                raise DialError(f"lookup {dest.host}: {text}", label) from None
            candidates = allowed_addresses(dest, addresses, policy)
            last = None
            for ip in candidates:
                remaining = max(deadline - self._reactor.seconds(), 0.001)
                endpoint_type = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
                endpoint = endpoint_type(self._reactor, str(ip), dest.port, timeout=remaining)
                attempt[0] = endpoint.connect(factory)
                try:
                    protocol = yield attempt[0]
                except (defer.CancelledError, error.ConnectingCancelledError):
                    # A cancelled endpoint connect fails with ConnectingCancelledError: it is
                    # our deadline (or the stream's teardown), not a connect error.
                    raise defer.CancelledError()
                except Exception as e:
                    last = e
                    continue
                return protocol
            text, label = classify(last)
            raise DialError(
                f"dial tcp {Destination(str(candidates[-1]), dest.port)}: {text}", label
            )

        run().chainDeferred(result)
        result.addBoth(done)
        result.addErrback(as_dial_error)
        return result
