"""mamba and mingru bundles (state tensors of other shapes than (L, B, H)) served by a real gRPC server:
streams, continuous batching, sessions, the prompt cache and signed state tokens, unchanged."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.client import Client, sampling_options
from serving.harness import ServerThread
from serving.runtime import LMRuntime
from serving.sampling import SamplingParams
from tests.serving.serve_helpers import Stubs, config
from tests.tiny_bundles import make_tiny_bundle

PROMPT = "The Time Traveller"
CELLS = ("mamba", "mingru")


@pytest.fixture(scope="module")
def cell_models(tmp_path_factory):
    """models/mamba (2 layers: conv and ssm state tensors) and models/mingru (h, 2 layers)."""
    root = tmp_path_factory.mktemp("cell-models")
    for cell in CELLS:
        make_tiny_bundle(root, cell, name=cell, layers=2, steps=120)
    return root


@pytest.fixture(scope="module")
def cell_server(cell_models):
    with ServerThread(config(cell_models, max_tokens=10_000)) as running:
        yield running


def _joined(messages) -> str:
    return "".join(m.text for m in messages)


@pytest.mark.parametrize("cell", CELLS)
def test_stream_equals_the_runtime_and_the_manifest_lists_the_state(cell, cell_server, cell_models):
    runtime = LMRuntime.load(cell_models / cell)
    names = ("conv", "ssm") if cell == "mamba" else ("h",)
    assert runtime.state_names == names
    assert all(spec.shape[:2] == (2, "batch") for spec in runtime.manifest.state)
    with Client(f"127.0.0.1:{cell_server.port}") as client:
        info = {m.name: m for m in client.models()}[cell]
    assert info.state_bytes == sum(a.nbytes for a in runtime.init_state(1))
    stubs = Stubs(cell_server.port)
    messages = list(stubs.generation.Generate(pb.GenerateRequest(model=cell, prompt=PROMPT, max_tokens=80)))
    stubs.channel.close()
    greedy = SamplingParams(temperature=0)
    assert _joined(messages) == "".join(runtime.generate(PROMPT, 80, greedy))
    assert messages[-1].end.generated_tokens == 80


@pytest.mark.parametrize("cell", CELLS)
def test_concurrent_seeded_streams_are_batched_and_equal_their_solo_outputs(cell, cell_server, cell_models):
    runtime = LMRuntime.load(cell_models / cell)
    prompts = [PROMPT[: 4 + i % 9] for i in range(24)]
    params = [SamplingParams(temperature=0.8, top_k=i % 5, seed=i) for i in range(24)]
    registry = cell_server.app.metrics.registry

    def batch_stats() -> tuple[float, float]:
        return (
            registry.get_sample_value("rnnlab_batch_size_count", {"model": cell}) or 0.0,
            registry.get_sample_value("rnnlab_batch_size_sum", {"model": cell}) or 0.0,
        )

    stubs = Stubs(cell_server.port)

    def run(i: int) -> str:
        p = params[i]
        request = pb.GenerateRequest(
            model=cell,
            prompt=prompts[i],
            max_tokens=60,
            sampling=sampling_options(p.temperature, p.top_k, p.top_p, p.seed),
        )
        return _joined(stubs.generation.Generate(request))

    steps_before, rows_before = batch_stats()
    with ThreadPoolExecutor(24) as pool:
        outputs = list(pool.map(run, range(24)))
    stubs.channel.close()
    for i, output in enumerate(outputs):
        assert output == "".join(runtime.generate(prompts[i], 60, params[i])), i
    steps, rows = batch_stats()
    assert rows - rows_before == 24 * 60
    assert (rows - rows_before) / (steps - steps_before) > 2  # streams share onnxruntime calls


@pytest.mark.parametrize("cell", CELLS)
def test_sessions_prompt_cache_and_state_tokens(cell, cell_server, cell_models):
    with Client(f"127.0.0.1:{cell_server.port}") as client:
        call = "".join(client.generate_text(cell, PROMPT, max_tokens=30, temperature=0))
        session = client.open_session(cell, prompt=PROMPT)  # the call above cached this prompt's state
        assert "".join(session.generate_text(30, temperature=0)) == call
        session.append(" abc")
        token = session.export()
        tail = "".join(session.generate_text(20, temperature=0.8, seed=4))
        resumed = client.resume(token)
        assert resumed.tokens == len(PROMPT) + 4 + 30
        assert "".join(resumed.generate_text(20, temperature=0.8, seed=4)) == tail
    registry = cell_server.app.metrics.registry
    assert registry.get_sample_value("rnnlab_prompt_cache_hits_total", {"model": cell}) >= 1
    # A server restarted with the same key continues the state token too.
    with ServerThread(config(cell_models)) as replica, Client(f"127.0.0.1:{replica.port}") as other:
        assert "".join(other.resume(token).generate_text(20, temperature=0.8, seed=4)) == tail
