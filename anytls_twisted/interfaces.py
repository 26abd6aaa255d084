"""The seam between a session and its streams, shared by both sides.

One vocabulary for both directions of backpressure and for teardown:

* **peer**: the other end of the AnyTLS session (the client, seen from the server).
* **target**: the other end of a stream (an origin on the server; the local application on the
  client).
* **pause** always means *stop reading from*. The session pauses a stream (the stream is an
  ``IPushProducer`` of data for the peer) when the peer is backed up; a stream asks its context
  to pause the peer when its target is backed up.
* **end** is the one way a stream stops: :meth:`IStreamContext.end` when the stream's side ends
  it (the peer gets a FIN, and a SYNACK error if none was sent), and
  :meth:`IStream.connectionLost` when the peer or the session ended it. Either way
  ``connectionLost`` is called exactly once, and releases the target.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from zope.interface import Attribute, Interface


class IStream(IPushProducer):
    """A stream as its session drives it.

    ``pauseProducing``/``resumeProducing`` (from ``IPushProducer``): the peer is backed up;
    stop or restart reading the target. ``stopProducing``: the session is going away.
    """

    sid = Attribute("The stream id (int).")
    kind = Attribute("'tcp', 'udp' or 'pending' (the destination has not arrived yet).")
    destination = Attribute("The Destination, or None while it is not known.")
    bytes_in = Attribute("Bytes from the peer to the target so far.")
    bytes_out = Attribute("Bytes from the target to the peer so far.")
    opened_at = Attribute("When the stream opened (the clock's seconds).")

    def start(data: bytes) -> None:
        """The stream is in the session's table; ``data`` are the first bytes for it."""

    def dataReceived(data: bytes) -> None:
        """Bytes from the peer, for the target."""

    def connectionLost(reason: str) -> None:
        """The stream ended (by the peer, the session or the stream itself): release the
        target. Called once; nothing may be written to the peer for it afterwards."""


class IStreamContext(Interface):
    """What a stream may ask of its session: one object per session, so streams never reach
    into the session, its factory or its dialer."""

    config = Attribute("The live settings, read at the moment they are needed.")
    clock = Attribute("An IReactorTime for timers.")
    metrics = Attribute("The metrics sink (anytls_twisted.metrics.NullMetrics interface).")
    session_id = Attribute("The session's number, for log lines.")
    write_paused = Attribute("True while the peer is backed up (new streams start paused).")

    def acknowledge(stream: IStream, error: str = "") -> None:
        """Send the stream's SYNACK (``error`` empty for success), once; later calls do
        nothing."""

    def write(stream: IStream, data: bytes) -> None:
        """Relay target bytes to the peer."""

    def end(stream: IStream, reason: str, error: str | None = None) -> None:
        """The stream's side ends it: a SYNACK with ``error`` if none went out yet, then FIN;
        then ``stream.connectionLost(reason)``. Does nothing for a stream already ended."""

    def pausePeer(stream: IStream) -> None:
        """The stream's target is backed up: stop reading the peer until it resumes."""

    def resumePeer(stream: IStream) -> None:
        """The stream's target drained."""

    def replace(old: IStream, new: IStream) -> None:
        """``new`` takes over ``old``'s stream id (a pending stream whose destination
        arrived becomes a TCP or UDP stream). ``new`` starts paused if the peer is backed
        up."""


class IFallback(Interface):
    """A connection that is not an AnyTLS client, relayed to the fallback: what its session
    calls once it has handed the connection over (``server/fallback.py``)."""

    endpoint = Attribute("The fallback's endpoint string.")
    bytes_in = Attribute("Bytes from the client, those read before the hand-over included.")
    bytes_out = Attribute("Bytes from the fallback to the client.")

    def dataReceived(data: bytes) -> None:
        """Bytes from the client, for the fallback."""

    def closing() -> None:
        """The client's connection is being closed by its session: stop relaying into it."""

    def connectionLost(reason: str) -> None:
        """The client's connection is gone: close the fallback's (once)."""


class IFallbackDialer(Interface):
    """Connects to fallback endpoints."""

    def connect(endpoint: str, factory: object, timeout: float) -> object:
        """A Deferred firing with ``factory``'s protocol once the Twisted client endpoint
        string ``endpoint`` is connected, or failing (``defer.TimeoutError`` after
        ``timeout`` seconds)."""
