"""StatefulDecoder: a decode loop with the state kept in bound buffers equals LMRuntime.step."""

import numpy as np
import pytest

from serving.runtime import LMRuntime
from serving.stateful_decoder import StatefulDecoder
from tests.committed_bundles import committed


@pytest.fixture(params=["tiny", "tiny-lstm"])
def runtime(request):
    """The committed char GRU (1 layer) and char LSTM (2 layers)."""
    return LMRuntime.load(committed(request.param))


def random_state(runtime, batch, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s.shape).astype(np.float32) for s in runtime.init_state(batch)]


@pytest.mark.parametrize("batch", [1, 3])
def test_steps_equal_the_runtime_step_fed_its_own_state(runtime, batch):
    state = random_state(runtime, batch)
    decoder = StatefulDecoder(runtime, state)
    rng = np.random.default_rng(1)
    for _ in range(6):
        ids = rng.integers(0, runtime.vocab_size, batch)
        want, state = runtime.step(ids[:, None], state)
        got = decoder.step(ids.tolist() if batch == 1 else ids)
        np.testing.assert_array_equal(got, want[:, 0])
        for a, b in zip(decoder.state, state, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_bundle_without_a_decode_graph_steps_through_the_step_graph(runtime):
    step_graph_only = LMRuntime(runtime.manifest, runtime.session)
    state = random_state(runtime, 2)
    a, b = StatefulDecoder(runtime, state), StatefulDecoder(step_graph_only, state)
    for ids in ([3, 4], [5, 1]):
        np.testing.assert_allclose(a.step(ids), b.step(ids), atol=1e-6)
    np.testing.assert_allclose(a.state[0], b.state[0], atol=1e-6)


def test_starts_from_zeros_and_hands_out_copies_of_its_state(runtime):
    decoder = StatefulDecoder(runtime, batch=2)
    assert all(not s.any() and s.shape == (runtime.layers, 2, 32) for s in decoder.state)
    decoder.step([1, 2])
    copy = decoder.state
    copy[0][...] = 7.0
    assert not np.array_equal(decoder.state[0], copy[0])


def test_bad_ids_are_refused_and_leave_the_state_as_it_was(runtime):
    decoder = StatefulDecoder(runtime, random_state(runtime, 1))
    before = decoder.state
    v = runtime.vocab_size
    for bad, message in (([v], rf"id {v} out of range"), ([-1], "id -1 out of range"),
                         (np.array([v + 2]), rf"id {v + 2} out of range"), ([1, 2], "expected 1 integer ids"),
                         (np.array([1.5]), "expected 1 integer ids"), ([2.0], "expected 1 integer ids")):
        with pytest.raises(ValueError, match=message):
            decoder.step(bad)
    for a, b in zip(decoder.state, before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert decoder.step([2]).shape == (1, v)


def test_a_state_that_does_not_fit_the_graph_is_refused_by_name(runtime):
    name = runtime.state_names[0]
    wrong = rf"state '{name}': expected float32 \({runtime.layers}, 3, 32\), got float64"
    with pytest.raises(ValueError, match=wrong):
        StatefulDecoder(runtime, [s.astype(np.float64) for s in random_state(runtime, 3)])
    with pytest.raises(ValueError, match="state: expected"):
        StatefulDecoder(runtime, random_state(runtime, 3)[:1] * 3)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        StatefulDecoder(runtime, batch=0)
