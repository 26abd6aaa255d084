"""How much a relay reads from a plain TCP connection at once, and how much it queues for one
before pausing the other side.

Reading four frames' worth (4 x 65535 bytes) at a time makes one reactor event and one pass
through the relay and the TLS layer carry up to four frames; measured effect in
docs/performance.md ("Why the code is shaped this way"). Twisted uses one figure,
``bufferSize``, both for its reads and as the write high-water mark that pauses a producer;
:func:`read_frames_at_once` keeps the latter at Twisted's 64 KiB by giving the transport its own
``_isSendBufferFull`` (the attributes it reads are in :data:`TWISTED_INTERNALS`).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from .protocol.codec import MAX_DATA

#: Bytes per read: four whole frames.
READ_SIZE = 4 * MAX_DATA

#: Bytes queued for a connection before whoever feeds it is paused (Twisted's default).
WRITE_HIGH_WATER = 64 * 1024

#: The attributes of Twisted's ``FileDescriptor`` used here.
TWISTED_INTERNALS = ("bufferSize", "dataBuffer", "_tempDataLen", "_isSendBufferFull")


def _send_buffer_full(ref: weakref.ref[Any]) -> bool:
    transport = ref()  # weak: the transport holding this must not be kept alive by it
    if transport is None:
        return False
    return bool(len(transport.dataBuffer) + transport._tempDataLen > WRITE_HIGH_WATER)


def read_frames_at_once(transport: Any) -> None:
    """Read :data:`READ_SIZE` bytes at a time from ``transport`` (a Twisted TCP transport;
    anything else is left alone), still pausing its producer past :data:`WRITE_HIGH_WATER`."""
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = READ_SIZE
        if hasattr(transport, "_isSendBufferFull"):
            transport._isSendBufferFull = functools.partial(
                _send_buffer_full, weakref.ref(transport)
            )
