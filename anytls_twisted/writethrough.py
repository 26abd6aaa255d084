"""Send to a TCP socket at once when nothing waits to go before: no reactor turn, no epoll_ctl.

Twisted's TCP transport never sends inside ``write``: it queues the bytes, asks the reactor to
watch for writability (an ``epoll_ctl``), sends on the next turn, and stops watching (another
``epoll_ctl``). On a relay that is two system calls and a turn of latency per frame.
:func:`write_through` sends straight away when the transport's buffers are empty, and hands
whatever the kernel did not take to the transport's own ``writeSequence``, which queues it
behind nothing, pauses producers and reports errors as before. Measurements in
docs/performance.md ("Why the code is shaped this way").

Anything that is not Twisted's TCP transport (a PROXY-protocol wrapper, a test's fake) gets
its ordinary ``write`` or ``writeSequence``. This reads five attributes of Twisted's ``FileDescriptor``
(:data:`TWISTED_INTERNALS`); tests/test_writethrough.py checks that they still exist.
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence

from twisted.internet import tcp

#: The attributes of ``twisted.internet.abstract.FileDescriptor`` read here.
TWISTED_INTERNALS = ("_tempDataBuffer", "_writeDisconnecting", "_writeDisconnected", "offset")


def _sendable(transport: Any) -> bool:
    """Twisted's TCP transport, open, with nothing queued: bytes may go to the socket now."""
    return bool(
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    )


def _send_now(send: Callable[[Any], int], data: Any) -> int:
    """What the socket takes at once: 0 when it would block, or when the connection is dead (the
    transport's own write attempt then finds the error and closes as usual)."""
    try:
        return send(data)
    except OSError:
        return 0


def write_through(transport: Any, chunks: Sequence[bytes]) -> None:
    """Write ``chunks`` to ``transport`` in order, sending now if nothing is queued before."""
    if not _sendable(transport):
        if len(chunks) == 1:
            transport.write(chunks[0])  # some local ends (a UDP association) have only write
        else:
            transport.writeSequence(chunks)
        return
    sent = _send_now(transport.socket.sendmsg, chunks)
    if sent != sum(map(len, chunks)):
        transport.writeSequence(_after(chunks, sent))


def write_through_copy(transport: Any, scratch: Any) -> None:
    """:func:`write_through` for bytes in a buffer the caller reuses (``scratch``, any object
    with the buffer protocol): what the socket does not take now is copied for the transport."""
    sent = _send_now(transport.socket.send, scratch) if _sendable(transport) else 0
    if sent != len(scratch):
        transport.write(bytes(memoryview(scratch)[sent:]))


def _after(chunks: Sequence[bytes], sent: int) -> List[bytes]:
    """What of ``chunks`` is left once ``sent`` bytes went."""
    rest: List[bytes] = []
    for chunk in chunks:
        if sent >= len(chunk):
            sent -= len(chunk)
            continue
        rest.append(chunk[sent:] if sent else chunk)
        sent = 0
    return rest
