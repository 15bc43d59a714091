"""In-memory session store: bounded by count and bytes, idle TTL, LRU eviction.

Policy (documented in docs/serving.md): sessions idle longer than the TTL are closed lazily (on every
store operation). When a new session or a grown state would exceed the count or byte budget, the least
recently used *idle* sessions are evicted first (with ``evict_idle=True``, the default), and the store
answers ``StoreFull`` (RESOURCE_EXHAUSTED) only when the sessions in use by a call alone fill it. With
``evict_idle=False`` a full store refuses new sessions instead of evicting. A session being used by a call
is "busy"; a second call on it gets ``SessionBusy`` (ABORTED).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serving.errors import quote

# Bookkeeping per session beyond its arrays (dict entry, object, id string); used for the byte budget.
SESSION_OVERHEAD_BYTES = 600


class SessionNotFound(Exception):
    pass


class SessionBusy(Exception):
    pass


class StoreFull(Exception):
    pass


@dataclass(slots=True)
class Session:
    """state: arrays (L, 1, ...) float32; logits (V,) float32 or None when ``pending`` holds a token id."""

    id: str
    model: str
    state: list[np.ndarray]
    logits: np.ndarray | None
    pending: int | None
    tokens: int = 0
    last_used: float = 0.0
    busy: bool = False
    nbytes: int = field(default=0)
    extra: dict[str, float] = field(default_factory=dict)  # exact numbers beside the state (state_token)

    def measure(self) -> int:
        arrays = sum(a.nbytes for a in self.state) + (0 if self.logits is None else self.logits.nbytes)
        return arrays + SESSION_OVERHEAD_BYTES


@dataclass(frozen=True)
class StoreLimits:
    max_sessions: int = 100_000
    max_bytes: int = 512 * 2**20
    idle_ttl_s: float = 3600.0
    evict_idle: bool = True


class SessionStore:
    """Not thread-safe: used from the server's event loop only."""

    def __init__(
        self, limits: StoreLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or StoreLimits()
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def create(
        self,
        model: str,
        state: list[np.ndarray],
        logits: np.ndarray | None,
        pending: int | None,
        tokens: int,
        busy: bool = False,
    ) -> Session:
        """Adds a session (busy if asked, so that its opening call can finish filling it)."""
        self.expire()
        session = Session(
            secrets.token_urlsafe(16), model, state, logits, pending, tokens, self._clock(), busy
        )
        session.nbytes = session.measure()
        self._make_room(session.nbytes, extra_count=1)
        self._sessions[session.id] = session
        self._bytes += session.nbytes
        return session

    def acquire(self, session_id: str) -> Session:
        """Marks a session busy for one call; SessionNotFound / SessionBusy."""
        self.expire()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {quote(session_id)} (unknown, closed or expired)")
        if session.busy:
            raise SessionBusy(f"session {quote(session_id)} is busy with another call")
        session.busy = True
        self._sessions.move_to_end(session_id)
        return session

    def release(self, session: Session) -> None:
        """Ends a call: the session becomes idle and its (possibly new) state is counted."""
        if self._sessions.get(session.id) is not session:
            return  # closed while busy
        session.busy = False
        session.last_used = self._clock()
        self._sessions.move_to_end(session.id)
        size = session.measure()
        self._bytes += size - session.nbytes
        session.nbytes = size
        self._make_room(0, extra_count=0, keep=session.id)

    def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"no session {quote(session_id)} (unknown, closed or expired)")
        self._bytes -= session.nbytes
        session.state, session.logits = [], None

    def expire(self) -> int:
        """Closes sessions idle longer than the TTL; returns how many."""
        deadline = self._clock() - self.limits.idle_ttl_s
        stale = []
        for session in self._sessions.values():  # idle sessions are in order of last use: stop early
            if session.busy:
                continue
            if session.last_used >= deadline:
                break
            stale.append(session.id)
        for session_id in stale:
            self.close(session_id)
        return len(stale)

    def _make_room(self, nbytes: int, extra_count: int, keep: str | None = None) -> None:
        def over() -> bool:
            return (
                len(self._sessions) + extra_count > self.limits.max_sessions
                or self._bytes + nbytes > self.limits.max_bytes
            )

        if not over():
            return
        if self.limits.evict_idle:
            for victim in [s.id for s in self._sessions.values() if not s.busy and s.id != keep]:
                self.close(victim)
                if not over():
                    return
        if extra_count:
            raise StoreFull(f"session store full ({len(self._sessions)} sessions, {self._bytes} bytes)")
