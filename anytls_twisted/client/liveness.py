"""Whether a session to the server is still alive, as pure logic (no Twisted, no clock).

NATs and middleboxes drop idle TCP connections without a FIN after about 30 s (honk PR #114),
and a server that restarts or a laptop that sleeps leaves sessions that look open and are not
(client-behaviour.md section 4). The stock clients only find out when a stream on the dead
session times out. Here:

* **before reuse**: a session from which nothing arrived for :attr:`Liveness.check_after`
  seconds is asked with a HeartRequest before a stream is opened on it; the stream waits for
  the answer (one round trip), and goes to another session if none comes within
  :attr:`Liveness.answer_timeout`. Nothing is sent on it meanwhile, so nothing is lost.
* **while busy**: a session carrying streams from which nothing arrived for ``check_after``
  seconds gets a HeartRequest; if that is not answered within ``answer_timeout``, the session
  is presumed dead and closed, and its streams get an error instead of hanging.

Any frame from the server counts as an answer (a busy server's data proves life as well as a
HeartResponse). Only servers of protocol version 2 answer heartbeats; the shell asks only them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Generic, Hashable, Iterable, List, Optional, Tuple, TypeVar

__all__ = ["ANSWER_TIMEOUT", "CHECK_AFTER", "Liveness"]

S = TypeVar("S", bound=Hashable)

#: Seconds of silence from the server after which a session is asked before it is trusted.
CHECK_AFTER = 15.0
#: Seconds a HeartRequest may wait for an answer.
ANSWER_TIMEOUT = 5.0


@dataclass
class _State:
    last_heard: float
    asked_at: Optional[float] = None


class Liveness(Generic[S]):
    """Silence per session, and what to do about it.

    The shell calls :meth:`heard` for every read from the server, :meth:`asked` when it sends a
    HeartRequest, :meth:`forget` when a session closes, :meth:`should_ask` before reusing an
    idle session, and :meth:`tick` every few seconds with the busy sessions.
    """

    def __init__(self, check_after: float = CHECK_AFTER, answer_timeout: float = ANSWER_TIMEOUT):
        if check_after <= 0 or answer_timeout <= 0:
            raise ValueError("check_after and answer_timeout must be positive")
        self.check_after = check_after
        self.answer_timeout = answer_timeout
        self._sessions: Dict[S, _State] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def heard(self, session: S, now: float) -> bool:
        """Something arrived on ``session``; True if it answered a question (a heartbeat)."""
        state = self._sessions.get(session)
        if state is None:
            self._sessions[session] = _State(now)
            return False
        state.last_heard = now
        answered = state.asked_at is not None
        state.asked_at = None
        return answered

    def asked(self, session: S, now: float) -> None:
        """A HeartRequest went out on ``session``."""
        state = self._sessions.setdefault(session, _State(now))
        if state.asked_at is None:
            state.asked_at = now

    def forget(self, session: S) -> None:
        self._sessions.pop(session, None)

    def asked_at(self, session: S) -> Optional[float]:
        state = self._sessions.get(session)
        return None if state is None else state.asked_at

    def should_ask(self, session: S, now: float) -> bool:
        """Whether ``session`` has been silent long enough to be checked before reuse."""
        state = self._sessions.get(session)
        return state is None or now - state.last_heard >= self.check_after

    def overdue(self, session: S, now: float) -> bool:
        """Whether a question on ``session`` has gone unanswered for too long."""
        state = self._sessions.get(session)
        return (
            state is not None
            and state.asked_at is not None
            and now - state.asked_at >= self.answer_timeout
        )

    def tick(self, now: float, busy: Iterable[S]) -> Tuple[List[S], List[S]]:
        """For the busy sessions: (those to ask now, those presumed dead: close them)."""
        ask: List[S] = []
        dead: List[S] = []
        for session in busy:
            state = self._sessions.get(session)
            if state is None:
                self._sessions[session] = _State(now)
            elif state.asked_at is not None:
                if now - state.asked_at >= self.answer_timeout:
                    dead.append(session)
            elif now - state.last_heard >= self.check_after:
                ask.append(session)
        return ask, dead
