"""The prompt cache: bounded LRU of prompt states, and streams that start from it decode as if they had read
their prompt themselves."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.engine import Finish, ModelEngine, Request
from serving.metrics import ServerMetrics
from serving.prompt_cache import PromptCache
from serving.sampling import SamplingParams
from tests.serving.test_engine import PROMPT, joined, read_all, solo


def state(value: float) -> tuple[list[np.ndarray], np.ndarray]:
    """A 2-layer, hidden-4 state and 5 logits, all equal to ``value``."""
    return [np.full((2, 1, 4), value, np.float32)], np.full(5, value, np.float32)


def test_a_cached_prompt_comes_back_read_only_and_unchanged_by_its_source() -> None:
    cache = PromptCache()
    source_state, source_logits = state(1.0)
    cache.put([5, 6, 7], source_state, source_logits)
    source_state[0][:] = 9.0  # the caller's arrays stay its own
    cached_state, cached_logits = cache.get([5, 6, 7])
    assert (cached_state[0] == 1.0).all() and (cached_logits == 1.0).all()
    with pytest.raises(ValueError, match="read-only"):
        cached_state[0][0, 0, 0] = 2.0
    assert cache.get([5, 6]) is None and cache.get([5, 6, 7, 8]) is None


def test_the_least_recently_used_prompt_goes_first_when_count_or_bytes_overflow() -> None:
    cache = PromptCache(max_entries=2)
    for ids in ([1], [2]):
        cache.put(ids, *state(float(ids[0])))
    cache.get([1])  # [2] is now the least recently used
    cache.put([3], *state(3.0))
    assert len(cache) == 2 and cache.get([2]) is None and cache.get([1]) is not None

    entry_bytes = 8 + 2 * 4 * 4 + 5 * 4
    by_bytes = PromptCache(max_bytes=2 * entry_bytes)
    for ids in ([1], [2], [3]):
        by_bytes.put(ids, *state(float(ids[0])))
    assert len(by_bytes) == 2 and by_bytes.bytes == 2 * entry_bytes and by_bytes.get([1]) is None
    by_bytes.put(list(range(1000)), *state(4.0))  # larger than the whole budget: not cached
    assert len(by_bytes) == 2


def test_a_cache_of_zero_entries_is_off() -> None:
    cache = PromptCache(max_entries=0)
    cache.put([1], *state(1.0))
    assert cache.get([1]) is None and len(cache) == 0


def test_streams_sharing_a_prompt_read_it_once_and_decode_exactly_as_if_each_had_read_it(runtime):
    metrics = ServerMetrics()
    ids = runtime.encode(PROMPT)
    greedy = Request(ids, 30, SamplingParams(temperature=0))
    sampled = Request(ids, 30, SamplingParams(seed=4))

    async def main() -> list:
        engine = ModelEngine("tiny", runtime, metrics.for_model("tiny"))
        engine.start(asyncio.get_running_loop())
        try:
            first = await read_all(engine.submit(greedy))  # reads the prompt, fills the cache
            later = await asyncio.gather(*(read_all(engine.submit(r)) for r in (greedy, sampled)))
            opened = engine.submit(Request(ids, 0, SamplingParams()))  # as a new session reads its prompt
            await read_all(opened)
            return [first, *later, opened.outcome]
        finally:
            engine.stop()

    first, again, seeded, opened = asyncio.run(main())
    hits = metrics.registry.get_sample_value("rnnlab_prompt_cache_hits_total", {"model": "tiny"})
    read = metrics.registry.get_sample_value("rnnlab_prompt_tokens_total", {"model": "tiny"})
    assert hits == 3 and read == len(ids)
    assert joined(first)[:2] == joined(again)[:2] == solo(runtime, greedy)
    assert joined(seeded)[:2] == solo(runtime, sampled)
    logits, prefilled = runtime.prefill(ids)
    assert opened.finish == Finish.APPENDED
    np.testing.assert_allclose(opened.logits, logits, atol=1e-5)
    for cached, fresh in zip(opened.state, prefilled, strict=True):
        np.testing.assert_allclose(cached, fresh, atol=1e-5)
