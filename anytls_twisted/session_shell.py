"""What the server's and the client's session protocols share: closing a TLS session politely
(or not), the session as the producer registered on its TLS transport, and the producer that
stands for the peer on a stream's target transport.

Both ``SessionProtocol`` (server) and ``ClientSessionProtocol`` (client) mix in
:class:`SessionShell`; they provide ``machine`` (a
:class:`~anytls_twisted.protocol.session.SessionMachine`), ``transport``, ``clock`` and the
:meth:`SessionShell._closing` hook.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from .protocol.session import State

#: Seconds a closing session waits for the peer's close_notify before aborting.
CLOSE_GRACE = 5.0


class SessionShell:
    """The closing and producing half of a session protocol (a mixin).

    @ivar _close_reason: why the session is closing, once :meth:`close` was called.
    """

    machine: Any
    transport: Any
    clock: Any
    _close_reason: Optional[str] = None
    _close_timer: Any = None

    def _closing(self) -> bool:
        """Called once by :meth:`close`, after the machine is closed: stop the side's own
        timers; return False when there is no transport to close yet."""
        return True

    def close(self, reason: str, abort: bool = False) -> None:
        """End the session (once): the TLS connection closes, then its streams, without FIN.

        A polite close sends close_notify and waits for the peer's; a peer that never answers
        is aborted after ``CLOSE_GRACE`` seconds.
        """
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self.machine.state = State.CLOSED
        if not self._closing():
            return
        # TLS only shuts down once no producer is registered; and it must read to see the
        # peer's close_notify.
        self.transport.unregisterProducer()
        if self.machine.read_paused:
            self.machine.read_paused = False
            self.transport.resumeProducing()
        if abort:
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        self._close_timer = self.clock.callLater(CLOSE_GRACE, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        self.transport.abortConnection()

    def _cancel_close_timer(self) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None

    # IPushProducer: our TLS transport's write buffer is full / drained.
    def pauseProducing(self) -> None:
        for stream in self.machine.pause_writing():
            stream.pauseProducing()

    def resumeProducing(self) -> None:
        for stream in self.machine.resume_writing():
            stream.resumeProducing()

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` follows and cleans up."""

    def set_reading(self, paused: Optional[bool]) -> None:
        """Apply the machine's decision to stop (True) or restart (False) reading the peer."""
        if paused is True:
            self.transport.pauseProducing()
        elif paused is False:
            self.transport.resumeProducing()


class ContextShell:
    """What the server's and the client's stream contexts share: streams pause and resume the
    peer through it (``_session`` is the session protocol, a :class:`SessionShell`)."""

    _session: Any

    @property
    def write_paused(self) -> bool:
        return bool(self._session.machine.write_paused)

    def pausePeer(self, stream: Any) -> None:
        self._session.set_reading(self._session.machine.set_blocked(stream.sid, True))

    def resumePeer(self, stream: Any) -> None:
        self._session.set_reading(self._session.machine.set_blocked(stream.sid, False))


def describe(reason: Optional[Failure]) -> str:
    """A connection's end, for a log line."""
    if reason is None:
        return "connection lost"
    return reason.getErrorMessage() or getattr(reason.type, "__name__", "error")


@implementer(IPushProducer)
class PeerProducer:
    """The producer registered on a stream's target transport: the peer's side of the stream.

    When the target's write buffer fills, the stream pauses the peer (its session stops reading
    TLS); kept apart from the stream, whose own ``pauseProducing`` means the other direction.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def pauseProducing(self) -> None:
        self.stream.pause_peer(True)

    def resumeProducing(self) -> None:
        self.stream.pause_peer(False)

    def stopProducing(self) -> None:
        self.stream.pause_peer(False)
