"""The gRPC server against the runtime's own output: streaming, sessions, state tokens, batching."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.client import Client, sampling_options
from serving.config import ServerConfig
from serving.harness import ServerThread
from serving.sampling import SamplingParams
from tests.serving.serve_helpers import STATE_KEY, Stubs, config

PROMPT = "The Time Traveller"


def generate(stubs: Stubs, prompt: str = PROMPT, max_tokens: int = 40, **fields) -> list[pb.GenerateResponse]:
    return list(
        stubs.generation.Generate(
            pb.GenerateRequest(model="tiny", prompt=prompt, max_tokens=max_tokens, **fields)
        )
    )


def joined(messages: list[pb.GenerateResponse]) -> tuple[str, list[int]]:
    return "".join(m.text for m in messages), [i for m in messages for i in m.token_ids]


def test_stream_equals_the_runtime_greedy_output(stubs, runtime):
    messages = generate(stubs, max_tokens=60)
    text, ids = joined(messages)
    greedy = SamplingParams(temperature=0)
    assert ids == list(runtime.generate_ids(runtime.encode(PROMPT), 60, greedy))
    assert text == "".join(runtime.generate(PROMPT, 60, greedy))
    assert [m.HasField("end") for m in messages] == [False] * (len(messages) - 1) + [True]
    end = messages[-1].end
    assert (end.finish_reason, end.prompt_tokens, end.generated_tokens) == (
        pb.FINISH_REASON_LENGTH,
        len(PROMPT),
        60,
    )


def test_logprobs_are_the_model_log_softmax(stubs, runtime):
    messages = generate(stubs, max_tokens=5, logprobs=True)
    _, ids = joined(messages)
    logprobs = [p for m in messages for p in m.logprobs]
    logits, state = runtime.prefill(runtime.encode(PROMPT))
    for token, logprob in zip(ids, logprobs, strict=True):
        z = logits.astype(np.float64)
        expected = z[token] - z.max() - np.log(np.exp(z - z.max()).sum())
        assert logprob == pytest.approx(expected, abs=1e-4)
        step_logits, state = runtime.step(np.array([[token]], dtype=np.int64), state)
        logits = step_logits[0, -1]
    assert len(logprobs) == 5


def test_stop_string_ends_the_stream_before_it(stubs, runtime):
    reference = "".join(runtime.generate(PROMPT, 60, SamplingParams(temperature=0)))
    stop = reference[10:13]
    messages = generate(stubs, max_tokens=60, stop=[stop])
    text, _ = joined(messages)
    assert text == reference[: reference.index(stop)]
    assert messages[-1].end.finish_reason == pb.FINISH_REASON_STOP


def test_session_append_then_generate_equals_one_call_on_the_whole_text(stubs):
    whole, _ = joined(generate(stubs, prompt=PROMPT + " abc", max_tokens=30))
    info = stubs.sessions.Open(pb.OpenSessionRequest(model="tiny", prompt=PROMPT))
    appended = stubs.sessions.Append(pb.AppendRequest(session_id=info.session_id, text=" abc"))
    assert (appended.appended_tokens, appended.tokens) == (4, len(PROMPT) + 4)
    messages = list(
        stubs.sessions.Generate(pb.SessionGenerateRequest(session_id=info.session_id, max_tokens=30))
    )
    assert joined(messages)[0] == whole
    assert messages[-1].end.session_tokens == len(PROMPT) + 4 + 30
    stubs.sessions.Close(pb.CloseSessionRequest(session_id=info.session_id))


def test_two_session_generations_continue_one_another(stubs):
    """The last generated token is pending in the session, read at the start of the next call."""
    whole, _ = joined(generate(stubs, max_tokens=40))
    info = stubs.sessions.Open(pb.OpenSessionRequest(model="tiny", prompt=PROMPT))
    first = joined(
        list(stubs.sessions.Generate(pb.SessionGenerateRequest(session_id=info.session_id, max_tokens=25)))
    )[0]
    second = joined(
        list(stubs.sessions.Generate(pb.SessionGenerateRequest(session_id=info.session_id, max_tokens=15)))
    )[0]
    assert first + second == whole


def test_resumed_state_token_continues_exactly_where_it_stopped(server, models_dir):
    with Client(f"127.0.0.1:{server.port}") as client:
        session = client.open_session("tiny-lstm", prompt=PROMPT)
        head = "".join(session.generate_text(12, temperature=0.8, seed=3))
        token = session.export()
        tail = "".join(session.generate_text(20, temperature=0.8, seed=4))
        resumed = client.resume(token)
        assert resumed.tokens == len(PROMPT) + 12
        assert "".join(resumed.generate_text(20, temperature=0.8, seed=4)) == tail
        assert head
    # Another replica sharing the key continues it too.
    with ServerThread(config(models_dir)) as replica, Client(f"127.0.0.1:{replica.port}") as other:
        assert "".join(other.resume(token).generate_text(20, temperature=0.8, seed=4)) == tail


def test_64_concurrent_seeded_streams_equal_their_solo_outputs(server, stubs, runtime):
    prompts = [PROMPT[: 5 + i % 7] for i in range(64)]
    params = [
        SamplingParams(temperature=0.7 + 0.01 * i, top_k=i % 6, top_p=0.8 + 0.003 * i, seed=i)
        for i in range(64)
    ]
    registry = server.app.metrics.registry

    def batch_stats() -> tuple[float, float]:
        labels = {"model": "tiny"}
        return (
            registry.get_sample_value("rnnlab_batch_size_count", labels) or 0.0,
            registry.get_sample_value("rnnlab_batch_size_sum", labels) or 0.0,
        )

    steps_before, rows_before = batch_stats()

    def run(i: int) -> str:
        p = params[i]
        request = pb.GenerateRequest(
            model="tiny",
            prompt=prompts[i],
            max_tokens=120,
            sampling=sampling_options(p.temperature, p.top_k, p.top_p, p.seed),
        )
        return joined(list(stubs.generation.Generate(request)))[0]

    with ThreadPoolExecutor(64) as pool:
        outputs = list(pool.map(run, range(64)))
    for i, output in enumerate(outputs):
        assert output == "".join(runtime.generate(prompts[i], 120, params[i])), i
    steps, rows = batch_stats()
    assert rows - rows_before == 64 * 120  # one batch row per generated token,
    # Many rows per ORT call (unbatched would be 1; streams join over ~10 ms on a loaded 2-core runner).
    assert (rows - rows_before) / (steps - steps_before) > 4
    assert server.app.active_streams == 0


def test_interactive_stream_opens_generates_appends_and_exports(stubs):
    def requests():
        yield pb.InteractRequest(open=pb.OpenSessionRequest(model="tiny", prompt=PROMPT))
        yield pb.InteractRequest(append=" abc")
        yield pb.InteractRequest(generate=pb.SessionGenerateRequest(max_tokens=30))
        yield pb.InteractRequest(export=True)

    replies = list(stubs.sessions.Interact(requests()))
    kinds = [r.WhichOneof("event") for r in replies]
    assert kinds[:2] == ["session", "session"] and kinds[-1] == "state"
    text = "".join(r.generation.text for r in replies if r.WhichOneof("event") == "generation")
    assert text == joined(generate(stubs, prompt=PROMPT + " abc", max_tokens=30))[0]
    assert replies[-1].state.tokens == len(PROMPT) + 4 + 30
    # The stream opened its session without keep_open: it is closed now.
    with pytest.raises(Exception, match="NOT_FOUND"):
        stubs.sessions.Append(pb.AppendRequest(session_id=replies[0].session.session_id, text="x"))


def test_models_are_listed_with_their_manifest_figures(stubs, runtime):
    models = stubs.generation.ListModels(pb.ListModelsRequest()).models
    assert [m.name for m in models] == ["tiny", "tiny-lstm"]
    info = stubs.generation.GetModel(pb.GetModelRequest(model="tiny-lstm"))
    assert (info.cell, info.layers, info.hidden_size, info.vocab_size, info.tokenizer) == (
        "lstm",
        2,
        32,
        runtime.vocab_size,
        "char",
    )
    assert info.state_bytes == 2 * 2 * 32 * 4 and len(info.bundle_digest) == 64


def test_state_key_is_taken_from_the_environment(models_dir, monkeypatch):
    monkeypatch.setenv("RNNLAB_STATE_KEY", STATE_KEY)
    with ServerThread(ServerConfig(models=str(models_dir), port=0)) as running:
        assert running.app.state_key == STATE_KEY.encode()


def test_unbatched_server_with_chunked_prefill_gives_the_same_streams(models_dir, runtime):
    """max batch 1 (streams queue for the model) and prompts read 16 tokens per step."""
    text = "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite"
    prompts = [text[: 10 + 11 * i] for i in range(8)]
    params = [SamplingParams(temperature=0.9, seed=i) for i in range(8)]
    with (
        ServerThread(config(models_dir, batching=False, prefill_chunk=16)) as server,
        Client(f"127.0.0.1:{server.port}") as client,
    ):

        def run(i: int) -> str:
            return "".join(client.generate_text("tiny", prompts[i], 30, temperature=0.9, seed=i))

        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(run, range(8)))
        steps = server.app.metrics.registry.get_sample_value("rnnlab_batch_size_count", {"model": "tiny"})
    assert outputs == ["".join(runtime.generate(prompts[i], 30, params[i])) for i in range(8)]
    assert steps == 8 * 30  # one row per decode step


@pytest.mark.parametrize("cache_entries", [4096, 0])
def test_a_prompt_shared_by_a_call_and_a_new_session_is_read_once(models_dir, cache_entries):
    with ServerThread(config(models_dir, prompt_cache_entries=cache_entries)) as server:
        stubs = Stubs(server.port)
        call, _ = joined(generate(stubs, max_tokens=30))
        info = stubs.sessions.Open(pb.OpenSessionRequest(model="tiny", prompt=PROMPT))
        in_session, _ = joined(
            list(
                stubs.sessions.Generate(pb.SessionGenerateRequest(session_id=info.session_id, max_tokens=30))
            )
        )
        stubs.channel.close()
        registry = server.app.metrics.registry
        hits = registry.get_sample_value("rnnlab_prompt_cache_hits_total", {"model": "tiny"})
        read = registry.get_sample_value("rnnlab_prompt_tokens_total", {"model": "tiny"})
    assert in_session == call
    assert (hits, read) == ((1, len(PROMPT)) if cache_entries else (0, 2 * len(PROMPT)))
