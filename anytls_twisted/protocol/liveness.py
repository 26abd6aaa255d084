"""Whether the peer of a session is still alive, as pure logic (no Twisted, no clock): one rule
for both sides.

NATs and middleboxes drop idle TCP connections without a FIN after about 30 s (honk PR #114),
and a peer that restarts, a laptop that sleeps or a phone that changes networks leaves sessions
that look open and are not (client-behaviour.md section 4). Nothing in AnyTLS notices: stock
clients and servers never send heartbeats, they only answer them (anytls-protocol.md section 8).
A session from which nothing arrived for :attr:`Liveness.check_after` seconds is asked with a
HeartRequest; if nothing arrives within :attr:`Liveness.answer_timeout`, its peer is presumed
dead. Any frame from the peer counts as an answer (a busy peer's data proves life as well as a
HeartResponse). Only peers of protocol version 2 answer heartbeats; the shells ask only them.

* **The client** asks an idle session before reusing it (the stream waits for the answer and
  goes to another session if none comes), and busy sessions that went silent
  (:mod:`anytls_twisted.client.sessions`).
* **The server** asks idle sessions (no open streams) that went silent, from its reaper
  (``--heartbeat-interval``, :mod:`anytls_twisted.server.service`), and closes those that do not
  answer. It leaves sessions with open streams alone: a stock client whose local application
  stops reading stops reading the whole session, so a live peer may not answer for a long time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Generic, Hashable, Iterable, List, Optional, Tuple, TypeVar

__all__ = ["ANSWER_TIMEOUT", "CHECK_AFTER", "Liveness"]

S = TypeVar("S", bound=Hashable)

#: The client's defaults (``--heartbeat-idle``, ``--heartbeat-timeout``).
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

    The shell calls :meth:`heard` when something arrives (the client for every read; the
    server at each check, with the time of the session's last frame, and for each
    HeartResponse), :meth:`asked` when it sends a HeartRequest, :meth:`forget` when a session
    closes, :meth:`should_ask` before reusing an idle session (the client), and :meth:`tick`
    every few seconds with the sessions it watches (the client's busy ones, the server's idle
    ones). The attributes may be changed between calls (the server's reload).
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
        """Something arrived on ``session`` at ``now``; True if it answered a question.

        ``now`` may lie in the past (the server passes the time of a session's last frame at
        each check): something heard before the question was asked does not answer it."""
        return self.answered(session, now) is not None

    def answered(self, session: S, now: float) -> Optional[float]:
        """As :meth:`heard`, returning the question's round trip (seconds) when this answered
        one, else None."""
        state = self._sessions.get(session)
        if state is None:
            self._sessions[session] = _State(now)
            return None
        if now > state.last_heard:
            state.last_heard = now
        asked = state.asked_at
        if asked is None or now < asked:
            return None
        state.asked_at = None
        return now - asked

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
        """For the watched sessions: (those to ask now, those presumed dead: close them)."""
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
