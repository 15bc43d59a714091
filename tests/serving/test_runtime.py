"""LMRuntime on the committed bundles (no torch): prefill, batching, generation, sampling, refusals.

The comparisons with the torch model are in tests/lm/test_runtime_vs_torch.py."""

import json
import pickle

import numpy as np
import pytest

from serving.bundle import MANIFEST, BundleError, write_manifest
from serving.runtime import LMRuntime
from serving.sampling import SamplingParams
from tests.committed_bundles import committed

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module", params=["tiny", "tiny-lstm"])
def bundled(request):
    """(None, tokenizer, runtime) of a committed bundle: char GRU 1x32, char LSTM 2x32."""
    runtime = LMRuntime.load(committed(request.param))
    return None, runtime.tokenizer, runtime


def reseal(bundle, edit=None):
    """Rewrites manifest.json with fresh checksums (after ``edit(data)``): a consistent but bad bundle."""
    data = json.loads((bundle / MANIFEST).read_text())
    if edit is not None:
        edit(data)
    for key in ("format", "format_version", "files", "file_sizes"):
        del data[key]
    write_manifest(bundle, data)


def test_prefill_in_one_call_equals_stepping_token_by_token(bundled):
    _, tokenizer, runtime = bundled
    ids = tokenizer.encode("His grey eyes shone")
    last, state = runtime.prefill(ids)
    step_state = runtime.init_state(1)
    for i in ids:
        logits, step_state = runtime.step(np.array([[i]], dtype=np.int64), step_state)
    np.testing.assert_allclose(last, logits[0, -1], atol=1e-5)
    for a, b in zip(state, step_state, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_streams_batched_by_concatenating_states_match_single_streams(bundled):
    _, tokenizer, runtime = bundled
    prompts = ["The fire", "Our chairs, being", "precision"]
    singles = [runtime.prefill(tokenizer.encode(p)) for p in prompts]
    state = [np.concatenate([s[1][k] for s in singles], axis=1) for k in range(len(runtime.state_names))]
    tokens = np.array([[5], [9], [11]], dtype=np.int64)
    logits, new_state = runtime.step(tokens, state)
    for b, (_, single_state) in enumerate(singles):
        want, want_state = runtime.step(tokens[b:b + 1], single_state)
        np.testing.assert_allclose(logits[b], want[0], atol=1e-5)
        np.testing.assert_allclose(new_state[0][:, b:b + 1], want_state[0], atol=1e-5)


def test_generate_streams_pieces_and_honours_stop_strings(bundled):
    _, _, runtime = bundled
    full = "".join(runtime.generate("The Time", 60, GREEDY))
    assert len(full) == 60
    stop = full[20:23]
    cut = full.index(stop)
    pieces = list(runtime.generate("The Time", 60, GREEDY, stop=[stop, "never-there"]))
    assert "".join(pieces) == full[:cut]
    assert all(pieces)
    assert "".join(runtime.generate("The Time", 60, GREEDY, stop=["never-there"])) == full


def test_sampling_is_reproducible_per_seed(bundled):
    _, _, runtime = bundled
    params = SamplingParams(temperature=1.0, top_k=10, top_p=0.95, seed=7)
    first = "".join(runtime.generate("The", 80, params))
    assert first == "".join(runtime.generate("The", 80, params))
    assert first != "".join(runtime.generate("The", 80, SamplingParams(temperature=1.0, seed=8)))


def test_bad_inputs_are_refused_before_onnxruntime(bundled):
    _, _, runtime = bundled
    state = runtime.init_state(2)
    ok = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match=rf"tokens: id {runtime.vocab_size} out of range"):
        runtime.step(np.full((2, 3), runtime.vocab_size, dtype=np.int64), state)
    with pytest.raises(ValueError, match="tokens: id -1 out of range"):
        runtime.step(np.full((2, 3), -1, dtype=np.int64), state)
    pickled = pickle.loads(pickle.dumps(ok))  # equal dtypes, not the same dtype object: accepted
    assert runtime.step(pickled, state)[0].shape == (2, 3, runtime.vocab_size)
    long_prompt = np.zeros((2, 900), dtype=np.int64)  # a prompt-sized array takes the other path
    long_prompt[1, 700] = -5
    with pytest.raises(ValueError, match="tokens: id -5 out of range"):
        runtime.step(long_prompt, state)
    long_prompt[1, 700] = runtime.vocab_size + 3
    with pytest.raises(ValueError, match=rf"tokens: id {runtime.vocab_size + 3} out of range"):
        runtime.step(long_prompt, state)
    with pytest.raises(ValueError, match=r"tokens must be a \(batch, time\) int64 array, got int32"):
        runtime.step(ok.astype(np.int32), state)
    with pytest.raises(ValueError, match="tokens must have batch and time >= 1"):
        runtime.step(np.zeros((2, 0), dtype=np.int64), state)
    layers = runtime.layers
    wrong_batch = rf"state 'h': expected float32 \({layers}, 2, 32\), got float32 \({layers}, 3, 32\)"
    with pytest.raises(ValueError, match=wrong_batch):
        runtime.step(ok, runtime.init_state(3))
    with pytest.raises(ValueError, match=r"state 'h': expected float32 .* got float64"):
        runtime.step(ok, [s.astype(np.float64) for s in state])
    with pytest.raises(ValueError, match="state: expected"):
        runtime.step(ok, [*state, state[0]])
    with pytest.raises(ValueError, match="prompt: empty"):
        runtime.prefill([])


def test_manifest_state_shape_must_match_the_graph(tiny_bundle):
    bundle = tiny_bundle()
    reseal(bundle, lambda data: data["state"][0].update(shape=[3, "batch", 32]))
    message = r"state 'h' \[3, 'batch', 32\] float32 is not \[1, batch, \.\.\.\]"
    with pytest.raises(BundleError, match=message):
        LMRuntime.load(bundle)


def test_graph_that_is_not_onnx_is_refused_by_name(tiny_bundle):
    bundle = tiny_bundle()
    (bundle / "model.onnx").write_bytes(b"not a graph")
    reseal(bundle)
    with pytest.raises(BundleError, match=r"model\.onnx: onnxruntime cannot load this graph"):
        LMRuntime.load(bundle)


def test_seq2seq_bundle_is_not_a_language_model(tiny_bundle):
    bundle = tiny_bundle()
    data = json.loads((bundle / MANIFEST).read_text())
    data["kind"] = "seq2seq"
    (bundle / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="not a language model"):
        LMRuntime.load(bundle)


def test_unreadable_tokenizer_is_a_bundle_error(tiny_bundle):
    bundle = tiny_bundle()
    (bundle / "tokenizer.json").write_text('{"format": 99}')
    reseal(bundle)  # checksums match the bad file: the tokenizer itself is refused
    with pytest.raises(BundleError, match=r"tokenizer\.json: not a valid rnnlab tokenizer"):
        LMRuntime.load(bundle)
