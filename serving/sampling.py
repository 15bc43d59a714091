"""Next-token sampling over a batch of logits, in numpy.

One implementation for the PyTorch generator, the onnxruntime runtime and the server, so that a seed
gives the same text everywhere. Each row carries its own options and its own random generator, so a
stream's output does not depend on which other streams share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


DEFAULT_SAMPLING = SamplingParams()
"""What rnnlab-lm generate, rnnlab-client generate and the server use for options left unset."""


def sample_next(
    logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniforms: np.ndarray
) -> np.ndarray:
    """Draws one token per row by inverse-CDF sampling.

    logits: (B, V) float; temperature, top_p: (B,) float; top_k: (B,) int; uniforms: (B,) in [0, 1)
    -> (B,) int64. Rows with temperature 0 take the argmax and ignore their uniform. A row's token depends
    only on that row's inputs, never on the other rows of the batch.
    """
    logits = np.asarray(logits, dtype=np.float64)
    plain = unfiltered(temperature, top_k, top_p, logits.shape[1])
    if plain.all():  # the usual server batch: no row gathers are needed
        return sample_unfiltered(logits, temperature, uniforms)
    filtered = (temperature > 0) & ~plain
    out = logits.argmax(axis=1)
    if plain.any():
        out[plain] = sample_unfiltered(logits[plain], temperature[plain], uniforms[plain])
    if filtered.any():
        out[filtered] = _sample_filtered(
            logits[filtered] / temperature[filtered, None],
            top_k[filtered],
            top_p[filtered],
            uniforms[filtered],
        )
    return out


def unfiltered(temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, vocab: int) -> np.ndarray:
    """temperature, top_p: (B,) float; top_k: (B,) int -> (B,) bool: the row samples from the whole
    distribution (temperature > 0, top-k and top-p off)."""
    return (temperature > 0) & ~(((top_k > 0) & (top_k < vocab)) | (top_p < 1))


def sample_unfiltered(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """``sample_next`` for a batch whose rows are all ``unfiltered``, without checking that they are.

    logits: (B, V) float; temperature: (B,) float > 0; uniforms: (B,) in [0, 1) -> (B,) int64, the tokens
    ``sample_next`` gives these rows.
    """
    # Sampling from the whole distribution needs no sort: the CDF runs in vocabulary order. It is built
    # vocabulary-major, (V, B), because numpy's cumsum down axis 0 adds whole rows as vectors: at B = 256
    # that halves the cost, with the same sums in the same order (tests/lm/test_sampling.py).
    scaled = np.divide(np.asarray(logits).T, temperature, dtype=np.float64, order="C")
    scaled -= scaled.max(axis=0)
    cdf = np.cumsum(np.exp(scaled, out=scaled), axis=0, out=scaled)
    return np.minimum((cdf <= uniforms * cdf[-1]).sum(axis=0), cdf.shape[0] - 1)


def _inverse_cdf(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """probs: (N, V) unnormalised, uniforms: (N,) -> (N,) column index where the CDF passes u·total."""
    cdf = np.cumsum(probs, axis=1)
    targets = uniforms * cdf[:, -1]
    return np.minimum((cdf <= targets[:, None]).sum(axis=1), probs.shape[1] - 1)


def _sample_filtered(
    scaled: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniforms: np.ndarray,
) -> np.ndarray:
    vocab = scaled.shape[1]
    order = np.argsort(-scaled, axis=1, kind="stable")
    ranked = np.take_along_axis(scaled, order, axis=1)
    probs = np.exp(ranked - ranked[:, :1])
    k = np.where(top_k > 0, np.minimum(top_k, vocab), vocab)
    probs[np.arange(vocab)[None, :] >= k[:, None]] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    # Nucleus: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = np.cumsum(probs, axis=1) - probs
    probs[mass_before >= top_p[:, None]] = 0.0
    picks = _inverse_cdf(probs, uniforms)
    return order[np.arange(len(picks)), picks]


def sample_one(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits: (V,) -> one token id, drawing from ``rng`` only when sampling."""
    uniform = 0.0 if params.greedy else rng.random()
    return int(
        sample_next(
            logits[None, :],
            np.array([params.temperature]),
            np.array([params.top_k]),
            np.array([params.top_p]),
            np.array([uniform]),
        )[0]
    )


class StopMatcher:
    """Finds the first stop string in generated text; text after it is never emitted."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, start: int = 0) -> int | None:
        """Index where the earliest stop string begins in ``text``, searching from ``start``."""
        found = [i for s in self.stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
        return min(found) if found else None

    def safe_length(self, text: str) -> int:
        """How much of ``text`` can be emitted now: the tail that could begin a stop string is held back."""
        if not self.stops:
            return len(text)
        for hold in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-hold:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - hold
        return len(text)
