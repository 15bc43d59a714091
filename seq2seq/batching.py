"""Training batches: pairs bucketed by length under a token budget, in a seeded order per epoch.

An epoch's batches are a pure function of (seed, epoch, lengths), so a resumed run rebuilds the
epoch's batch list and skips the batches it already trained on. Torch-free.
"""

from __future__ import annotations

import numpy as np

POOL_BATCHES = 50
"""Pairs are sorted by length inside pools of about this many batches: similar lengths share a batch
(little padding) while each epoch still mixes the pools differently."""


def make_batches(
    lengths: np.ndarray, seed: int, epoch: int, max_tokens: int = 4000, max_sentences: int = 0
) -> list[np.ndarray]:
    """lengths: (N,) padded length of each pair (max of its source and target lengths) -> batches of indices.

    A batch holds sentences while ``count * longest <= max_tokens`` (and ``count <= max_sentences``
    when that is > 0); a pair longer than the budget gets a batch of its own.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    mean_batch = max(1, max_tokens // max(1, int(lengths.mean()) if len(lengths) else 1))
    if max_sentences:
        mean_batch = min(mean_batch, max_sentences)
    pool = POOL_BATCHES * mean_batch
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(_cut(chunk, lengths, max_tokens, max_sentences))
    return [batches[i] for i in rng.permutation(len(batches))]


def _cut(
    sorted_indices: np.ndarray, lengths: np.ndarray, max_tokens: int, max_sentences: int
) -> list[np.ndarray]:
    batches, current, longest = [], [], 0
    for index in sorted_indices:
        longest_with = max(longest, int(lengths[index]))
        full = max_sentences and len(current) >= max_sentences
        if current and (full or (len(current) + 1) * longest_with > max_tokens):
            batches.append(np.array(current))
            current, longest_with = [], int(lengths[index])
        current.append(int(index))
        longest = longest_with
    if current:
        batches.append(np.array(current))
    return batches
