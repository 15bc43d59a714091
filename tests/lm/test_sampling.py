"""The batched sampler: every row's token is the one that row gets on its own, whichever path draws it."""

from __future__ import annotations

import numpy as np

from serving.sampling import sample_next, sample_unfiltered, unfiltered


def batch(rows: int, vocab: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 logits (rows, vocab) with a spread like a model's, and uniforms (rows,)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, vocab)) * 3).astype(np.float32), rng.random(rows)


def one_by_one(logits, temperature, top_k, top_p, uniforms) -> list[int]:
    return [
        int(
            sample_next(
                logits[i : i + 1],
                temperature[i : i + 1],
                top_k[i : i + 1],
                top_p[i : i + 1],
                uniforms[i : i + 1],
            )[0]
        )
        for i in range(len(logits))
    ]


def test_unfiltered_rows_sample_at_a_temperature_without_top_k_or_top_p() -> None:
    temperature = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 0.7])
    top_k = np.array([0, 0, 5, 50, 0, 60])
    top_p = np.array([1.0, 1.0, 1.0, 1.0, 0.9, 1.0])
    assert unfiltered(temperature, top_k, top_p, vocab=50).tolist() == [False, True, False, True, False, True]


def test_a_batch_of_unfiltered_rows_samples_each_row_as_on_its_own() -> None:
    logits, uniforms = batch(64)
    temperature = np.linspace(0.3, 2.0, 64)
    top_k, top_p = np.zeros(64, np.int64), np.ones(64)
    expected = one_by_one(logits, temperature, top_k, top_p, uniforms)
    assert sample_next(logits, temperature, top_k, top_p, uniforms).tolist() == expected
    assert sample_unfiltered(logits, temperature, uniforms).tolist() == expected


def test_a_mixed_batch_samples_each_row_as_on_its_own() -> None:
    logits, uniforms = batch(40, seed=1)
    temperature = np.where(np.arange(40) % 5 == 0, 0.0, 0.9)
    top_k = np.where(np.arange(40) % 3 == 0, 7, 0)
    top_p = np.where(np.arange(40) % 4 == 0, 0.8, 1.0)
    expected = one_by_one(logits, temperature, top_k, top_p, uniforms)
    assert sample_next(logits, temperature, top_k, top_p, uniforms).tolist() == expected
    greedy = temperature == 0
    assert (np.array(expected)[greedy] == logits[greedy].argmax(axis=1)).all()


def test_the_vocabulary_major_cdf_draws_exactly_what_the_textbook_row_cdf_draws() -> None:
    """Seeded text must not change with the memory layout the sampler uses for speed."""
    rng = np.random.default_rng(3)
    for rows, vocab in [(1, 2), (3, 80), (64, 80), (257, 1000)]:
        logits, uniforms = batch(rows, vocab, seed=rows)
        temperature = rng.uniform(0.05, 3.0, rows)
        scaled = logits.astype(np.float64) / temperature[:, None]
        cdf = np.cumsum(np.exp(scaled - scaled.max(axis=1, keepdims=True)), axis=1)
        textbook = np.minimum((cdf <= (uniforms * cdf[:, -1])[:, None]).sum(axis=1), vocab - 1)
        assert sample_unfiltered(logits, temperature, uniforms).tolist() == textbook.tolist()
