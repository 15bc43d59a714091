"""Greedy and beam search over any step function, in numpy (torch-free).

The same code drives the PyTorch model (``seq2seq.decode``) and can drive the exported ONNX decoder:
a ``StepDecoder`` only has to run one decoder step for a batch of rows and to select rows of its
state and memory. Every decision is taken per sentence (its own beam, its own finished list, its
own length limit from its own source length), so a sentence's output does not depend on the other
sentences of its batch; finished sentences leave the batch.

Beam search, per sentence, per step: the live hypotheses' scores (sum of log-probabilities) plus
each next token's log-probability give K*V candidates; the best 2K are visited in order of score
(ties: lower candidate index first). An end-of-sentence candidate among the first K becomes a
finished hypothesis; the first K others become the next beam. A sentence is done when it has K
finished hypotheses or reaches its length limit (its live hypotheses then count as unfinished
ones). Hypotheses are ranked by score / ((5 + length) / 6) ** length_penalty (GNMT; length counts
the end token). With K = 1 this is exactly greedy search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class StepDecoder(Protocol):
    """The decoder half of a model, over rows that each belong to one source sentence."""

    def step(self, prev: np.ndarray, state: Any, memory: Any) -> tuple[np.ndarray, Any]:
        """prev (N,) int64 -> logits (N,V) float, new state (for the same N rows)."""
        ...

    def select(self, state: Any, memory: Any, rows: np.ndarray) -> tuple[Any, Any]:
        """Keeps rows ``rows`` (int64 (N',), may repeat) of the state and the memory."""
        ...


@dataclass(frozen=True)
class SearchParams:
    beam: int = 1
    length_penalty: float = 0.6
    max_len_ratio: float = 2.0
    max_len_extra: int = 10
    max_len_cap: int = 200
    n_best: int = 1
    min_len: int = 1
    """The end token is not allowed before this many tokens: an empty translation is never right, and
    beam search otherwise tends to prefer one for uncertain sentences."""

    def __post_init__(self) -> None:
        if self.beam < 1 or not 1 <= self.n_best <= self.beam:
            raise ValueError(f"need beam >= 1 and 1 <= n_best <= beam (got beam {self.beam}, "
                             f"n_best {self.n_best})")
        if self.max_len_ratio < 0 or self.max_len_extra < 1 or self.max_len_cap < 1 or self.min_len < 0:
            raise ValueError("max_len_ratio and min_len must be >= 0, max_len_extra and max_len_cap >= 1")

    def max_len(self, src_len: int) -> int:
        """Most tokens (end token excluded) generated for a source of ``src_len`` tokens."""
        return min(self.max_len_cap, int(self.max_len_ratio * src_len) + self.max_len_extra)


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]
    """Without BOS and EOS."""
    score: float
    """Sum of log-probabilities (of the end token too, when finished)."""
    normalized: float
    finished: bool


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(N,V) -> (N,V) float64, row by row."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def length_normalize(score: float, length: int, alpha: float) -> float:
    return score / (((5.0 + length) / 6.0) ** alpha)


def greedy_search(decoder: StepDecoder, state: Any, memory: Any, src_lens: np.ndarray, bos: int, eos: int,
                  params: SearchParams | None = None) -> list[Hypothesis]:
    """The arg-max continuation of each sentence (row b of state/memory is sentence b)."""
    params = params or SearchParams()
    count = len(src_lens)
    limits = [params.max_len(int(n)) for n in src_lens]
    outputs: list[list[int]] = [[] for _ in range(count)]
    scores = [0.0] * count
    results: list[Hypothesis | None] = [None] * count
    alive = np.arange(count)
    prev = np.full(count, bos, dtype=np.int64)
    step = 0
    while len(alive):
        step += 1
        logits, state = decoder.step(prev, state, memory)
        logp_all = log_softmax(logits)
        if step <= params.min_len:
            logp_all[:, eos] = -np.inf
        tokens = logp_all.argmax(axis=1)
        logp = logp_all[np.arange(len(alive)), tokens]
        keep = []
        for row, sentence in enumerate(alive):
            token = int(tokens[row])
            scores[sentence] += float(logp[row])
            if token != eos:
                outputs[sentence].append(token)
                if len(outputs[sentence]) < limits[sentence]:
                    keep.append(row)
                    continue
            length = len(outputs[sentence]) + (token == eos)
            results[sentence] = Hypothesis(tuple(outputs[sentence]), scores[sentence],
                                           length_normalize(scores[sentence], length, params.length_penalty),
                                           token == eos)
        keep_rows = np.array(keep, dtype=np.int64)
        if 0 < len(keep_rows) < len(alive):
            state, memory = decoder.select(state, memory, keep_rows)
        alive, prev = alive[keep_rows], tokens[keep_rows].astype(np.int64)
    return results  # type: ignore[return-value]


@dataclass
class _Beam:
    """The search state of one sentence."""

    limit: int
    tokens: list[tuple[int, ...]]
    scores: np.ndarray
    finished: list[Hypothesis]
    done: bool = False


def beam_search(decoder: StepDecoder, state: Any, memory: Any, src_lens: np.ndarray, bos: int, eos: int,
                params: SearchParams) -> list[list[Hypothesis]]:
    """The ``params.n_best`` best hypotheses of each sentence, best first.

    On entry row b of state/memory is sentence b; rows are expanded to K per sentence here.
    """
    k, count = params.beam, len(src_lens)
    beams = []
    for n in src_lens:
        # Only the first row of a fresh beam is live: K copies of <bos> must not become K equal hypotheses.
        scores = np.full(k, -np.inf)
        scores[0] = 0.0
        beams.append(_Beam(params.max_len(int(n)), [()] * k, scores, []))
    alive = list(range(count))
    state, memory = decoder.select(state, memory, np.repeat(np.arange(count), k))
    prev = np.full(count * k, bos, dtype=np.int64)
    step = 0
    while alive:
        step += 1
        logits, state = decoder.step(prev, state, memory)
        logp = log_softmax(logits)
        if step <= params.min_len:
            logp[:, eos] = -np.inf
        vocab = logp.shape[1]
        rows, next_tokens, still = [], [], []
        for slot, sentence in enumerate(alive):
            beam = beams[sentence]
            candidates = (beam.scores[:, None] + logp[slot * k:(slot + 1) * k]).reshape(-1)
            origins, tokens, scores = _advance(beam, candidates, vocab, eos, k, step, params)
            if beam.done:
                continue
            still.append(sentence)
            rows.extend(slot * k + origin for origin in origins)
            next_tokens.extend(tokens)
            beam.scores = scores
        alive = still
        if alive:
            state, memory = decoder.select(state, memory, np.array(rows, dtype=np.int64))
            prev = np.array(next_tokens, dtype=np.int64)
    return [_n_best(beam, params) for beam in beams]


def _advance(beam: _Beam, candidates: np.ndarray, vocab: int, eos: int, k: int, step: int,
             params: SearchParams) -> tuple[list[int], list[int], np.ndarray]:
    """Extends one sentence's beam by a step; returns (origin rows, tokens, scores) of the new beam."""
    top = min(2 * k, len(candidates))
    best = np.argpartition(-candidates, top - 1)[:top]
    best = best[np.lexsort((best, -candidates[best]))]
    origins, tokens, scores, old_tokens = [], [], [], beam.tokens
    new_tokens = []
    for rank, index in enumerate(best):
        score = float(candidates[index])
        if score == -math.inf:
            break
        origin, token = divmod(int(index), vocab)
        if token == eos:
            if rank < k:
                beam.finished.append(Hypothesis(old_tokens[origin], score,
                                                length_normalize(score, step, params.length_penalty), True))
            continue
        origins.append(origin)
        tokens.append(token)
        scores.append(score)
        new_tokens.append((*old_tokens[origin], token))
        if len(origins) == k:
            break
    if len(beam.finished) >= k or step >= beam.limit or not origins:
        beam.done = True
        if len(beam.finished) < k:
            beam.finished.extend(Hypothesis(t, s, length_normalize(s, step, params.length_penalty), False)
                                 for t, s in zip(new_tokens, scores, strict=True))
        return [], [], np.empty(0)
    # A beam narrower than K (few live candidates) is padded with dead rows, so every sentence keeps K rows.
    while len(origins) < k:
        origins.append(origins[0])
        tokens.append(tokens[0])
        scores.append(-math.inf)
        new_tokens.append(new_tokens[0])
    beam.tokens = new_tokens
    return origins, tokens, np.array(scores)


def _n_best(beam: _Beam, params: SearchParams) -> list[Hypothesis]:
    ranked = sorted(enumerate(beam.finished), key=lambda item: (-item[1].normalized, item[0]))
    return [hyp for _, hyp in ranked[: params.n_best]]
