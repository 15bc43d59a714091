"""The step loop on its own: batched, vectorised output equals each stream's solo output; hand-overs."""

from __future__ import annotations

import asyncio

import numpy as np

from serving.engine import EngineStopped, Finish, ModelEngine, Request, Stream
from serving.metrics import ServerMetrics
from serving.prompt_cache import PromptCache
from serving.sampling import SamplingParams

PROMPT = "The Time Traveller"


def engine_for(runtime, name: str = "tiny", **options) -> ModelEngine:
    """An engine without a prompt cache, so that every stream here reads its prompt while others decode
    (tests/serving/test_prompt_cache.py covers streams that start from the cache)."""
    options = {"prompt_cache": PromptCache(0), **options}
    return ModelEngine(name, runtime, ServerMetrics().for_model(name), **options)


async def read_all(stream: Stream) -> list[tuple[str, list[int], list[float]]]:
    """Every update the stream's writer would send, as (text, ids, logprobs), until the stream ends."""
    updates = []
    while not stream.done:
        await stream.wakeup.wait()
        stream.wakeup.clear()
        updates.append(stream.take())
    if (rest := stream.take()) != ("", [], []):  # buffered before this reader started
        updates.append(rest)
    return updates


def joined(updates: list[tuple[str, list[int], list[float]]]) -> tuple[str, list[int], list[float]]:
    return (
        "".join(text for text, _, _ in updates),
        [i for _, ids, _ in updates for i in ids],
        [p for _, _, lps in updates for p in lps],
    )


def solo(runtime, request: Request, stop: tuple[str, ...] = ()) -> tuple[str, list[int]]:
    """The single-stream reference: the runtime's own sampler and text streaming."""
    ids = list(runtime.generate_ids(request.ids, request.max_tokens, request.params))
    text = "".join(runtime.generate(PROMPT, request.max_tokens, request.params, stop))
    return text, ids


def mixed_requests(runtime) -> list[Request]:
    """Greedy, seeded unfiltered (long enough to refill its pre-drawn uniforms several times), top-k/top-p,
    logprobs and stop-string rows in one batch."""
    ids = runtime.encode(PROMPT)
    greedy = SamplingParams(temperature=0)
    requests = [Request(ids, 40, greedy), Request(ids, 40, greedy, logprobs=True)]
    requests += [Request(ids, 110 + i, SamplingParams(temperature=0.8 + 0.05 * i, seed=i)) for i in range(6)]
    requests += [
        Request(ids, 70, SamplingParams(temperature=0.9, top_k=5, seed=11)),
        Request(ids, 70, SamplingParams(temperature=1.1, top_p=0.8, seed=12), logprobs=True),
    ]
    return requests


def test_batched_streams_joining_at_different_steps_equal_their_solo_outputs(runtime):
    requests = mixed_requests(runtime)

    async def main() -> list[list]:
        engine = engine_for(runtime)
        engine.start(asyncio.get_running_loop())
        try:
            first = [engine.submit(r) for r in requests[::2]]
            while sum(len(s.token_ids) for s in first) < 20:  # the rest joins mid-way through a draw block
                await asyncio.sleep(0.001)
            second = [engine.submit(r) for r in requests[1::2]]
            results = await asyncio.gather(*(read_all(s) for s in first + second))
            order = [*range(0, len(requests), 2), *range(1, len(requests), 2)]
            return [results[order.index(i)] for i in range(len(requests))]
        finally:
            engine.stop()

    for request, updates in zip(requests, asyncio.run(main()), strict=True):
        text, ids, logprobs = joined(updates)
        assert (text, ids) == solo(runtime, request)
        assert len(logprobs) == (len(ids) if request.logprobs else 0)
        assert all(p <= 0 for p in logprobs)


def test_stop_strings_and_logprobs_in_a_batch_equal_the_solo_stream(runtime):
    params = SamplingParams(temperature=0)
    reference = "".join(runtime.generate(PROMPT, 60, params))
    stop = reference[10:13]
    ids = runtime.encode(PROMPT)
    stopped = Request(ids, 60, params, stop=(stop, "never seen"), logprobs=True)
    others = [Request(ids, 60, SamplingParams(temperature=1.0, seed=i)) for i in range(4)]

    async def main():
        engine = engine_for(runtime)
        engine.start(asyncio.get_running_loop())
        try:
            streams = [engine.submit(r) for r in [stopped, *others]]
            results = await asyncio.gather(*(read_all(s) for s in streams))
            return streams, results
        finally:
            engine.stop()

    streams, results = asyncio.run(main())
    text, token_ids, logprobs = joined(results[0])
    assert text == reference[: reference.index(stop)]
    assert streams[0].outcome.finish is Finish.STOP
    assert len(logprobs) == len(token_ids) == streams[0].outcome.generated_tokens
    assert streams[0].outcome.pending == token_ids[-1]
    for request, updates in zip(others, results[1:], strict=True):
        assert joined(updates)[:2] == solo(runtime, request)


def recording(engine: ModelEngine) -> list[list[tuple[Stream, int, bool]]]:
    """Records every hand-over to the event loop as [(stream, token count, ends)]."""
    handovers: list[list[tuple[Stream, int, bool]]] = []
    deliver = engine._deliver

    def record(updates) -> None:
        if updates:
            handovers.append([(stream, len(ids), end is not None) for stream, _, ids, _, end in updates])
        deliver(updates)

    engine._deliver = record
    return handovers


def test_a_slow_reader_gets_everything_produced_meanwhile_in_one_update(runtime):
    request = Request(runtime.encode(PROMPT), 2000, SamplingParams(temperature=1.0, seed=5))

    async def main():
        engine = engine_for(runtime, flush_interval=0.0)  # hand over after every step
        handovers = recording(engine)
        engine.start(asyncio.get_running_loop())
        try:
            stream = engine.submit(request)
            await stream.wakeup.wait()
            first = stream.take()
            while not stream.done:  # the reader stalls
                await asyncio.sleep(0.005)
            return first, stream.take(), handovers
        finally:
            engine.stop()

    first, rest, handovers = asyncio.run(main())
    assert len(handovers) > 2 and 0 < len(first[1]) < 2000
    text, ids = solo(runtime, request)
    assert (first[0] + rest[0], first[1] + rest[1]) == (text, ids)


def test_first_tokens_and_ends_are_handed_over_without_the_other_streams_tokens(runtime):
    ids = runtime.encode(PROMPT)
    long = Request(ids, 5000, SamplingParams(temperature=1.0, seed=1))
    short = Request(ids, 1000, SamplingParams(temperature=1.0, seed=2))

    async def main():
        engine = engine_for(runtime, flush_interval=60.0)  # no regular hand-over while streams run
        handovers = recording(engine)
        engine.start(asyncio.get_running_loop())
        try:
            a = engine.submit(long)
            await a.wakeup.wait()
            b = engine.submit(short)
            b_text, b_ids, _ = joined(await read_all(b))
            a_ids = joined(await read_all(a))[1]
            return a, handovers, (b_text, b_ids), a_ids
        finally:
            engine.stop()

    a, handovers, b_output, a_ids = asyncio.run(main())
    assert [[(s is a, n, end) for s, n, end in h] for h in handovers] == [
        [(True, 1, False)],  # a's first token
        [(False, 1, False)],  # b's first token, alone
        [(False, 999, True)],  # b's end with everything it made since, alone
        [(True, 4999, True)],
    ]  # a's end
    assert b_output == solo(runtime, short)
    assert a_ids == solo(runtime, long)[1]


class FailingRuntime:
    """The runtime, with its next ``failures`` decode calls raising (an ORT error mid-batch)."""

    def __init__(self, runtime, failures: int) -> None:
        self.runtime, self.failures = runtime, failures

    def __getattr__(self, name: str):
        return getattr(self.runtime, name)

    def step(self, tokens: np.ndarray, state: list[np.ndarray]):
        if tokens.shape[1] == 1 and self.failures:
            self.failures -= 1
            raise RuntimeError("ORT failed")
        return self.runtime.step(tokens, state)


def test_a_failed_step_fails_its_batch_and_the_engine_keeps_serving(runtime):
    request = Request(runtime.encode(PROMPT), 30, SamplingParams(temperature=0))

    async def main():
        engine = engine_for(FailingRuntime(runtime, failures=1))
        engine.start(asyncio.get_running_loop())
        try:
            first = engine.submit(request)
            results = [joined(await read_all(first))]
            later = [engine.submit(request) for _ in range(3)]
            results += [joined(r) for r in await asyncio.gather(*(read_all(s) for s in later))]
            return [first, *later], results
        finally:
            engine.stop()

    streams, results = asyncio.run(main())
    assert isinstance(streams[0].error, RuntimeError)
    for stream, (text, ids, _) in zip(streams[1:], results[1:], strict=True):
        assert stream.error is None and (text, ids) == solo(runtime, request)


def test_stopping_the_engine_ends_running_streams(runtime):
    async def main():
        engine = engine_for(runtime)
        engine.start(asyncio.get_running_loop())
        stream = engine.submit(Request(runtime.encode(PROMPT), 4000, SamplingParams(temperature=1.0, seed=0)))
        await stream.wakeup.wait()
        await asyncio.to_thread(engine.stop)
        await asyncio.sleep(0.01)  # the last hand-over is applied on the loop
        return stream

    assert isinstance(asyncio.run(main()).error, EngineStopped)
