"""The session store's bounds: count, bytes, idle TTL, LRU eviction of idle sessions, busy sessions."""

from __future__ import annotations

import numpy as np
import pytest

from serving.sessions import (
    SESSION_OVERHEAD_BYTES,
    SessionBusy,
    SessionNotFound,
    SessionStore,
    StoreFull,
    StoreLimits,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def state(hidden: int = 8) -> list[np.ndarray]:
    return [np.zeros((1, 1, hidden), np.float32)]


def test_full_store_evicts_the_least_recently_used_idle_session():
    clock = Clock()
    store = SessionStore(StoreLimits(max_sessions=2), clock)
    a = store.create("m", state(), None, None, 0)
    b = store.create("m", state(), None, None, 0)
    clock.now = 1
    store.release(store.acquire(a.id))  # a is now more recently used than b
    c = store.create("m", state(), None, None, 0)
    with pytest.raises(SessionNotFound):
        store.acquire(b.id)
    assert {store.acquire(a.id).id, store.acquire(c.id).id} == {a.id, c.id}


def test_busy_sessions_are_never_evicted_and_refuse_a_second_call():
    store = SessionStore(StoreLimits(max_sessions=1))
    a = store.create("m", state(), None, None, 0)
    store.acquire(a.id)
    with pytest.raises(SessionBusy):
        store.acquire(a.id)
    with pytest.raises(StoreFull):
        store.create("m", state(), None, None, 0)
    store.release(a)
    store.create("m", state(), None, None, 0)  # now a is idle and evicted
    assert len(store) == 1


def test_without_eviction_a_full_store_refuses():
    store = SessionStore(StoreLimits(max_sessions=1, evict_idle=False))
    store.create("m", state(), None, None, 0)
    with pytest.raises(StoreFull):
        store.create("m", state(), None, None, 0)


def test_byte_budget_counts_state_and_logits_and_is_freed_on_close():
    per_session = 4 * 64 + 4 * 10 + SESSION_OVERHEAD_BYTES
    store = SessionStore(StoreLimits(max_bytes=2 * per_session, evict_idle=False))
    a = store.create("m", state(64), np.zeros(10, np.float32), None, 0)
    store.create("m", state(64), np.zeros(10, np.float32), None, 0)
    assert store.nbytes == 2 * per_session
    with pytest.raises(StoreFull):
        store.create("m", state(64), np.zeros(10, np.float32), None, 0)
    store.close(a.id)
    assert store.nbytes == per_session


def test_idle_sessions_expire_after_the_ttl_but_busy_ones_do_not():
    clock = Clock()
    store = SessionStore(StoreLimits(idle_ttl_s=10), clock)
    idle = store.create("m", state(), None, None, 0)
    busy = store.acquire(store.create("m", state(), None, None, 0).id)
    clock.now = 11
    assert store.expire() == 1
    with pytest.raises(SessionNotFound):
        store.acquire(idle.id)
    store.release(busy)
    clock.now = 20
    store.release(store.acquire(busy.id))  # used at 20: alive until 30
    clock.now = 29
    assert store.expire() == 0 and len(store) == 1
