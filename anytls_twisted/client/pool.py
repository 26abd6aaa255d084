"""The client's session pool and its SYNACK watchdog, as pure logic: no Twisted, no clock.

Time comes in as ``now`` arguments (seconds, from one monotonic clock), sessions and streams
are opaque handles (whatever the shell uses; hashable), and every decision comes back as a
value for the shell to carry out. So the rules are testable without a reactor, and the shell
around them stays thin.

:class:`Pool` is the stock pool of sing-anytls (sing-box's ``anytls`` outbound) and anytls-go,
rule for rule (client-behaviour.md section 1, anytls-protocol.md section 11.1). :class:`Watchdog`
replaces their 3 s SYNACK timer (anytls-protocol.md section 7.4, client-behaviour.md section 2)
with one that closes a session only when the session, not just one stream, went silent.

Both are bounded by what is alive: the pool holds one entry per live session it was told about
(:meth:`Pool.created` until :meth:`Pool.remove` or a reap), the watchdog one per unanswered
watched stream plus one per session that has such a stream.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, Generic, Hashable, List, Optional, Tuple, TypeVar, Union

S = TypeVar("S", bound=Hashable)
T = TypeVar("T", bound=Hashable)

#: sing-box's defaults (seconds): an unset interval or timeout is 0, which becomes 30 s.
DEFAULT_IDLE_SESSION_CHECK_INTERVAL = 30.0
DEFAULT_IDLE_SESSION_TIMEOUT = 30.0
DEFAULT_MIN_IDLE_SESSION = 0
#: sing-anytls replaces an interval or a timeout of this many seconds or less by 30 s.
CLAMP_AT_OR_BELOW = 5.0
#: The stock clients' SYNACK deadline on a reused session (anytls-protocol.md section 7.4).
SYNACK_TIMEOUT = 3.0


def clamp_duration(seconds: float) -> float:
    """What sing-anytls makes of an interval or timeout: 5 s or less (unset is 0) means 30 s.

    Kept so that a configuration copied from sing-box behaves here as it does there.
    """
    return 30.0 if seconds <= CLAMP_AT_OR_BELOW else float(seconds)


class _Entry(Generic[S]):
    """One live session the pool knows: its creation number and, while idle, since when."""

    __slots__ = ("session", "seq", "idle_since")

    def __init__(self, session: S, seq: int) -> None:
        self.session = session
        self.seq = seq
        self.idle_since: Optional[float] = None  # None: a stream is using it


class Pool(Generic[S]):
    """Idle sessions waiting for their next stream, the way the stock clients keep them.

    A session carries one stream at a time: :meth:`take` removes it from the idle set, and
    :meth:`give_back` returns it once that stream has ended (and its FIN was written). So
    concurrency means more sessions, as with sing-box and anytls-go.

    The shell's part: call :meth:`created` for each session it dials (this fixes the session's
    place in the newest-first order), :meth:`take` before dialling, :meth:`give_back` when a
    stream ends on a session that is still open, :meth:`remove` when a session closes or breaks,
    and :meth:`reap` every :attr:`idle_session_check_interval` seconds, closing what it returns.

    @ivar idle_session_check_interval: seconds between two :meth:`reap` calls (clamped as
        sing-box does: see :func:`clamp_duration`).
    @ivar idle_session_timeout: seconds an idle session may wait before a reap closes it
        (clamped the same way).
    @ivar min_idle_session: how many idle sessions a reap leaves open at least, newest first.
        It only spares sessions from reaping; it never opens one. See :meth:`reap`.
    @ivar reuse: False gives every stream its own session (anytls-go's ``-dr``, asked for in
        mihomo #2921): :meth:`give_back` then keeps nothing and says so.
    """

    def __init__(
        self,
        idle_session_check_interval: float = DEFAULT_IDLE_SESSION_CHECK_INTERVAL,
        idle_session_timeout: float = DEFAULT_IDLE_SESSION_TIMEOUT,
        min_idle_session: int = DEFAULT_MIN_IDLE_SESSION,
        reuse: bool = True,
    ) -> None:
        if min_idle_session < 0:
            raise ValueError(f"min_idle_session must be 0 or more, not {min_idle_session}")
        self.idle_session_check_interval = clamp_duration(idle_session_check_interval)
        self.idle_session_timeout = clamp_duration(idle_session_timeout)
        self.min_idle_session = min_idle_session
        self.reuse = reuse
        self._next_seq = 0
        self._live: Dict[S, _Entry[S]] = {}
        # The idle sessions' creation numbers, ascending (newest last), and their entries.
        self._idle_seqs: List[int] = []
        self._idle: Dict[int, _Entry[S]] = {}

    def configure(
        self, idle_session_check_interval: float, idle_session_timeout: float, min_idle_session: int
    ) -> None:
        """New settings (a reload): they apply from the next :meth:`reap` on, to every session
        the pool knows, with the same clamping as at creation."""
        if min_idle_session < 0:
            raise ValueError(f"min_idle_session must be 0 or more, not {min_idle_session}")
        self.idle_session_check_interval = clamp_duration(idle_session_check_interval)
        self.idle_session_timeout = clamp_duration(idle_session_timeout)
        self.min_idle_session = min_idle_session

    def drain(self) -> List[S]:
        """Forget every idle session and return them, for the shell to close (a reload that
        changed the server). Busy sessions stay known until they come back or close."""
        sessions = self.idle_sessions()
        for session in sessions:
            self.remove(session)
        return sessions

    def __len__(self) -> int:
        """How many sessions are idle now."""
        return len(self._idle_seqs)

    @property
    def live(self) -> int:
        """How many sessions the pool knows (idle or carrying a stream)."""
        return len(self._live)

    def idle_sessions(self) -> List[S]:
        """The idle sessions, newest first: the order :meth:`take` and :meth:`reap` use."""
        return [self._idle[seq].session for seq in reversed(self._idle_seqs)]

    def created(self, session: S) -> None:
        """Record a session just dialled for a stream: it is busy, and newer than all before.

        sing-anytls numbers sessions when it creates them, so the order is creation order,
        not the order in which sessions come back.
        """
        if session in self._live:
            raise ValueError(f"session already in the pool: {session!r}")
        self._next_seq += 1
        self._live[session] = _Entry(session, self._next_seq)

    def take(self, now: float) -> Optional[S]:
        """The idle session a new stream gets, now busy; None: dial a new one.

        The stock choice: the idle session created last (highest creation number), not the one
        returned last. ``now`` is not needed by that rule; it is taken so that every call
        carries the clock and a later policy needs no new signature.
        """
        if not self._idle_seqs:
            return None
        entry = self._idle.pop(self._idle_seqs.pop())
        entry.idle_since = None
        return entry.session

    def give_back(self, session: S, now: float) -> bool:
        """A stream on ``session`` ended and its FIN was written: the session is idle from now.

        Returns False when the pool does not keep it: it was removed (it closed meanwhile) or
        never recorded, or reuse is off. The shell then closes it if it is still open.
        """
        entry = self._live.get(session)
        if entry is None:
            return False
        if not self.reuse:
            del self._live[session]
            return False
        if entry.idle_since is None:
            bisect.insort(self._idle_seqs, entry.seq)
            self._idle[entry.seq] = entry
        entry.idle_since = now
        return True

    def remove(self, session: S) -> None:
        """Forget a session that closed or broke; it is never handed out again. Idempotent."""
        entry = self._live.pop(session, None)
        if entry is not None and entry.idle_since is not None:
            self._drop_idle(entry)

    def _drop_idle(self, entry: _Entry[S]) -> None:
        index = bisect.bisect_left(self._idle_seqs, entry.seq)
        del self._idle_seqs[index]
        del self._idle[entry.seq]

    def reap(self, now: float) -> List[S]:
        """The idle sessions to close now, already forgotten by the pool; call it every
        :attr:`idle_session_check_interval` seconds.

        sing-anytls's rule exactly. The idle sessions are walked newest first (by creation),
        counting those kept:

          - one idle for :attr:`idle_session_timeout` or less is kept and counted;
          - one idle for longer is kept while fewer than :attr:`min_idle_session` have been
            counted, and its idle time restarts now (so it is not reaped at the next check
            either, unless newer sessions fill the quota);
          - every other one is returned, to be closed.

        So ``min_idle_session = n`` keeps the *newest* n idle sessions open however long they
        wait, and sessions still within the timeout use up that quota first. It counts only
        idle sessions: busy ones neither count nor are reaped. It does **not** open sessions:
        a pool that has fewer than n idle sessions stays that way until streams end; n warm
        sessions ready in advance would be a different feature (a pre-warm). With the defaults
        (30 s checks, 30 s timeout) an idle session is closed 30 to 60 s after its last stream.
        """
        expired_before = now - self.idle_session_timeout
        kept = 0
        to_close: List[_Entry[S]] = []
        for seq in reversed(self._idle_seqs):
            entry = self._idle[seq]
            assert entry.idle_since is not None
            if not entry.idle_since < expired_before:  # sing-anytls: !idleSince.Before(exp)
                kept += 1
            elif kept < self.min_idle_session:
                entry.idle_since = now
                kept += 1
            else:
                to_close.append(entry)
        for entry in to_close:
            self._drop_idle(entry)
            del self._live[entry.session]
        return [entry.session for entry in to_close]


@dataclass(frozen=True)
class ResetStream(Generic[T]):
    """Give up this stream only (FIN it, fail its application connection): its session is
    alive, since frames arrived after the open, but no SYNACK came for this stream."""

    stream: T


@dataclass(frozen=True)
class CloseSession(Generic[S, T]):
    """Close this session: a stream opened on it got no SYNACK and nothing at all arrived
    since. ``streams`` are all the streams the watchdog still watched on it, each reported
    here once and then forgotten; the shell fails them with the session."""

    session: S
    streams: Tuple[T, ...]


Action = Union[ResetStream[T], CloseSession[S, T]]


class _Watched(Generic[S]):
    __slots__ = ("session", "deadline", "frames_at_open")

    def __init__(self, session: S, deadline: float, frames_at_open: int) -> None:
        self.session = session
        self.deadline = deadline
        self.frames_at_open = frames_at_open


class _Listening:
    """A session with watched streams: frames received on it, and how many streams wait."""

    __slots__ = ("frames", "waiting")

    def __init__(self) -> None:
        self.frames = 0
        self.waiting = 0


class Watchdog(Generic[S, T]):
    """The SYNACK deadline for streams opened on reused sessions, closing less than stock.

    The stock clients arm one 3 s timer per session when they open a stream on a reused session
    of a v2 server, cancel it on *any* SYNACK on that session, and close the *whole* session
    when it fires (anytls-protocol.md section 7.4). That kills sessions carrying many healthy
    streams because one open went unanswered (honk PR #116), and sessions of a slow-dialling
    server on high-RTT links (shoes PR #144).

    Here each open has its own deadline, cancelled only by that stream's SYNACK. When it
    passes: if any frame arrived on the session since the open, the server is evidently alive
    and only this stream is given up (:class:`ResetStream`); if the session stayed silent, it
    is presumed dead and closed (:class:`CloseSession`), as stock does. The trade-off: a
    session that is alive but ignores one stream keeps serving the others, at the cost of one
    failed stream; a session that receives frames but never acknowledges anything is closed
    only when an open finds it silent, whereas stock would close it at the first miss.

    Which opens to watch is the shell's call; stock watches every open but a session's first
    (stream id 2 and up) when the server announced version 2 or more, and so should the shell.
    The watchdog assumes ``now`` never goes backwards.

    @ivar timeout: seconds an open may wait for its SYNACK (stock: 3).
    """

    def __init__(self, timeout: float = SYNACK_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.timeout = timeout
        # Insertion order is deadline order, since now never goes backwards.
        self._watched: Dict[T, _Watched[S]] = {}
        self._sessions: Dict[S, _Listening] = {}

    def __len__(self) -> int:
        """How many streams wait for their SYNACK."""
        return len(self._watched)

    def opened(self, stream: T, session: S, now: float) -> None:
        """``stream`` was just opened on ``session`` (its SYN is being written): watch it."""
        if stream in self._watched:
            raise ValueError(f"stream already watched: {stream!r}")
        listening = self._sessions.get(session)
        if listening is None:
            listening = self._sessions[session] = _Listening()
        listening.waiting += 1
        self._watched[stream] = _Watched(session, now + self.timeout, listening.frames)

    def acknowledged(self, stream: T) -> None:
        """The stream's SYNACK came, or it ended some other way: stop watching it. Idempotent."""
        watched = self._watched.pop(stream, None)
        if watched is not None:
            self._release(watched.session)

    def _release(self, session: S) -> None:
        listening = self._sessions[session]
        listening.waiting -= 1
        if not listening.waiting:
            del self._sessions[session]

    def activity(self, session: S, now: float) -> None:
        """A frame (any frame) arrived on ``session``: proof that it is alive.

        Constant time, and nothing is stored for sessions without watched streams, so the
        shell may call it for every frame. ``now`` is accepted for symmetry; proof of life is
        counted in frames, not timed, so a frame in the same clock tick as the open counts.
        """
        listening = self._sessions.get(session)
        if listening is not None:
            listening.frames += 1

    def session_closed(self, session: S) -> None:
        """The session closed for another reason: stop watching its streams."""
        if self._sessions.pop(session, None) is None:
            return
        for stream in [s for s, w in self._watched.items() if w.session == session]:
            del self._watched[stream]

    def next_deadline(self) -> Optional[float]:
        """When :meth:`expired` next has something to say; None: nothing is watched."""
        for watched in self._watched.values():
            return watched.deadline
        return None

    def expired(self, now: float) -> List[Action[T, S]]:
        """What to do about the opens whose deadline has passed (``now - opened >= timeout``),
        in the order they were opened. Each watched stream is reported once, then forgotten."""
        due: List[Tuple[T, _Watched[S]]] = []
        for stream, watched in self._watched.items():
            if watched.deadline > now:
                break
            due.append((stream, watched))
        actions: List[Action[T, S]] = []
        for stream, watched in due:
            if stream not in self._watched:
                continue  # reported already, with its silent session
            listening = self._sessions[watched.session]
            if listening.frames > watched.frames_at_open:
                del self._watched[stream]
                self._release(watched.session)
                actions.append(ResetStream(stream))
            else:
                session = watched.session
                streams = tuple(s for s, w in self._watched.items() if w.session == session)
                for each in streams:
                    del self._watched[each]
                del self._sessions[session]
                actions.append(CloseSession(session, streams))
        return actions
