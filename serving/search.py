"""Greedy and beam search over any step/top-k decoder, vectorised in numpy (torch-free).

The same code drives the PyTorch model (``seq2seq.decode``) and the exported ONNX graphs
(``serving.translator``): a ``StepDecoder`` runs one decoder step for a batch of rows and returns each
row's k best next tokens with their log-probabilities, and selects rows of its state and memory.
Every decision is taken per sentence (its own beam, its own finished list, its own length limit from
its own source length), so a sentence's output does not depend on the other sentences of its batch;
finished sentences leave the batch.

Beam search, per sentence, per step: the live hypotheses' scores (sum of log-probabilities) plus
each next token's log-probability give K*V candidates; the best 2K are visited in order of score
(ties: lower candidate index = row * V + token first). An end-of-sentence candidate among the first K
becomes a finished hypothesis; the first K others become the next beam. A sentence is done when it
has K finished hypotheses or reaches its length limit (its live hypotheses then count as unfinished
ones). Hypotheses are ranked by score / ((5 + length) / 6) ** length_penalty (GNMT; length counts
the end token). With K = 1 this is exactly greedy search.

Only each row's 2K best tokens are asked of the decoder: a sentence's 2K best candidates are always
among them, so no (rows, vocabulary) array reaches numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

State = TypeVar("State")
Memory = TypeVar("Memory")


class StepDecoder(Protocol[State, Memory]):
    """The decoder half of a model, over rows that each belong to one source sentence.

    ``state`` holds the recurrent state of N rows, ``memory`` what the encoder left for their n
    sentences, one row per sentence (both in the decoder's own types: torch tensors, numpy arrays).
    The N = n * R rows are R consecutive rows per sentence (R = K in a beam), so a beam's rows share
    their sentence's memory instead of each carrying a copy.
    """

    def step(
        self,
        prev: np.ndarray,
        state: State,
        memory: Memory,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray, State]:
        """prev (N,) int64 -> log_probs (N,k') float64, ids (N,k') int64, new state: each row's k' =
        min(k, V) best next tokens, best first (equal log-probabilities: lower id first)."""
        ...

    def select_state(self, state: State, rows: np.ndarray) -> State:
        """Rows ``rows`` (N',) int64 (may repeat) of the state."""
        ...

    def select_memory(self, memory: Memory, sentences: np.ndarray) -> Memory:
        """Rows ``sentences`` (n',) int64 of the memory."""
        ...


@dataclass(frozen=True)
class SearchParams:
    """Search options; the defaults (``DEFAULT_SEARCH``) are those of every entry point: rnnlab-mt
    translate/eval, the batch job, rnnlab-client and the server (beam 4, GNMT length penalty 0.6, at most
    2 x source + 10 tokens, capped at 200)."""

    beam: int = 4
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
            raise ValueError(
                f"need beam >= 1 and 1 <= n_best <= beam (got beam {self.beam}, n_best {self.n_best})"
            )
        if self.max_len_ratio < 0 or self.max_len_extra < 1 or self.max_len_cap < 1 or self.min_len < 0:
            raise ValueError("max_len_ratio and min_len must be >= 0, max_len_extra and max_len_cap >= 1")

    def max_len(self, src_len: int) -> int:
        """Most tokens (end token excluded) generated for a source of ``src_len`` tokens."""
        return min(self.max_len_cap, int(self.max_len_ratio * src_len) + self.max_len_extra)


DEFAULT_SEARCH = SearchParams()
GREEDY = SearchParams(beam=1)
BATCH_TOKENS = 600
"""Default batch budget (sentences x longest source, in tokens) of the batch job and the server: on a CPU
larger batches are slower per sentence."""


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]
    """Without BOS and EOS."""
    score: float
    """Sum of log-probabilities (of the end token too, when finished)."""
    normalized: float
    finished: bool


def length_normalize(score: float, length: int, alpha: float) -> float:
    return score / (((5.0 + length) / 6.0) ** alpha)


def _top(
    decoder: StepDecoder,
    prev: np.ndarray,
    state: State,
    memory: Memory,
    width: int,
    eos: int,
    eos_allowed: bool,
) -> tuple[np.ndarray, np.ndarray, State]:
    """One step: each row's ``width`` best (log-probability (N,width), id (N,width)), best first; when
    EOS is not allowed yet it counts as -inf (it is then last: one more candidate is asked for)."""
    if eos_allowed:
        return decoder.step(prev, state, memory, width)
    log_probs, ids, state = decoder.step(prev, state, memory, width + 1)
    log_probs = np.where(ids == eos, -np.inf, log_probs)
    order = np.argsort(-log_probs, axis=1, kind="stable")[:, :width]  # EOS last, the others keep order
    return np.take_along_axis(log_probs, order, axis=1), np.take_along_axis(ids, order, axis=1), state


def greedy_search(
    decoder: StepDecoder[State, Memory],
    state: State,
    memory: Memory,
    src_lens: np.ndarray,
    bos: int,
    eos: int,
    params: SearchParams | None = None,
) -> list[Hypothesis]:
    """The arg-max continuation of each of B sentences (row b of state/memory is sentence b).

    src_lens (B,): source lengths (EOS included), for the length limits. A sentence leaves the batch
    when it emits EOS or reaches its limit.
    """
    params = params or SearchParams()
    alpha = params.length_penalty
    count = len(src_lens)
    limits = np.array([params.max_len(int(n)) for n in src_lens], dtype=np.int64)
    outputs = np.zeros((count, int(limits.max()) if count else 0), dtype=np.int64)
    lengths = np.zeros(count, dtype=np.int64)
    scores = np.zeros(count, dtype=np.float64)
    results: list[Hypothesis | None] = [None] * count
    alive = np.arange(count)
    prev = np.full(count, bos, dtype=np.int64)
    step_no = 0
    while len(alive):
        step_no += 1
        log_probs, ids, state = _top(decoder, prev, state, memory, 1, eos, step_no > params.min_len)
        tokens = ids[:, 0]
        scores[alive] += log_probs[:, 0]
        ended = tokens == eos
        going = alive[~ended]
        outputs[going, lengths[going]] = tokens[~ended]
        lengths[going] += 1
        keep = ~ended & (lengths[alive] < limits[alive])
        for row in np.flatnonzero(~keep):
            sentence, done = int(alive[row]), bool(ended[row])
            score, length = float(scores[sentence]), int(lengths[sentence])
            results[sentence] = Hypothesis(
                tuple(outputs[sentence, :length].tolist()),
                score,
                length_normalize(score, length + done, alpha),
                done,
            )
        if not keep.all():
            rows = np.flatnonzero(keep)
            if len(rows):
                state, memory = decoder.select_state(state, rows), decoder.select_memory(memory, rows)
        alive, prev = alive[keep], tokens[keep].astype(np.int64)
    return results  # type: ignore[return-value]


@dataclass
class _Beams(Generic[State, Memory]):
    """The live part of a beam search: n sentences, R rows each (R = 1 at the first step, then K)."""

    alive: np.ndarray
    """(n,) the sentences' indices in the batch."""
    rows: int
    scores: np.ndarray
    """(n, R) float64 sum of log-probabilities of each row's hypothesis (-inf: a dead row)."""
    history: np.ndarray
    """(n, R, t) int64 each row's tokens so far."""
    state: State
    """n * R rows."""
    memory: Memory
    """One row per sentence."""


def beam_search(
    decoder: StepDecoder[State, Memory],
    state: State,
    memory: Memory,
    src_lens: np.ndarray,
    bos: int,
    eos: int,
    params: SearchParams,
) -> list[list[Hypothesis]]:
    """The ``params.n_best`` best hypotheses of each of B sentences, best first.

    On entry row b of state/memory is sentence b. The first step runs one row per sentence (the K-1
    other rows of a fresh beam would be K copies of <bos>), then K rows per sentence; the memory is
    re-gathered only when sentences leave the batch.
    """
    k, count = params.beam, len(src_lens)
    limits = np.array([params.max_len(int(n)) for n in src_lens], dtype=np.int64)
    finished: list[list[Hypothesis]] = [[] for _ in range(count)]
    beams = _Beams(
        np.arange(count), 1, np.zeros((count, 1)), np.zeros((count, 1, 0), dtype=np.int64), state, memory
    )
    prev = np.full(count, bos, dtype=np.int64)
    step_no = 0
    while len(beams.alive):
        step_no += 1
        log_probs, ids, state = _top(
            decoder, prev, beams.state, beams.memory, 2 * k, eos, step_no > params.min_len
        )
        beams.state = state
        prev = _advance(decoder, beams, log_probs, ids, finished, limits, step_no, eos, params)
    return [_n_best(hyps, params.n_best) for hyps in finished]


def _advance(
    decoder: StepDecoder[State, Memory],
    beams: _Beams[State, Memory],
    log_probs: np.ndarray,
    ids: np.ndarray,
    finished: list[list[Hypothesis]],
    limits: np.ndarray,
    step_no: int,
    eos: int,
    params: SearchParams,
) -> np.ndarray:
    """Extends every live beam by one step from its rows' best tokens (log_probs, ids (n*R, 2K)):
    records finished hypotheses, drops done sentences, returns the next step's tokens (n'*K,)."""
    k, alpha, rows = params.beam, params.length_penalty, beams.rows
    best_scores, origin, token = _ranked(beams, log_probs, ids, k)
    live = best_scores > -np.inf
    is_eos = token == eos
    ends = live & is_eos & (np.arange(best_scores.shape[1]) < k)[None, :]
    for slot, rank in zip(*np.nonzero(ends), strict=True):
        score = float(best_scores[slot, rank])
        finished[beams.alive[slot]].append(
            Hypothesis(
                tuple(beams.history[slot, origin[slot, rank]].tolist()),
                score,
                length_normalize(score, step_no, alpha),
                True,
            )
        )
    going = live & ~is_eos
    chosen = going & (np.cumsum(going, axis=1) <= k)
    n_chosen = chosen.sum(axis=1)
    picks = np.argsort(~chosen, axis=1, kind="stable")[:, :k]  # chosen ranks first, in rank order
    new_origin = np.take_along_axis(origin, picks, axis=1)
    new_token = np.take_along_axis(token, picks, axis=1)
    new_scores = np.take_along_axis(best_scores, picks, axis=1)
    new_history = np.concatenate(
        [np.take_along_axis(beams.history, new_origin[:, :, None], axis=1), new_token[:, :, None]], axis=2
    )
    n_finished = np.array([len(finished[s]) for s in beams.alive])
    done = (n_finished >= k) | (step_no >= limits[beams.alive]) | (n_chosen == 0)
    for slot in np.flatnonzero(done & (n_finished < k)):  # its live hypotheses count as unfinished ones
        finished[beams.alive[slot]].extend(
            Hypothesis(
                tuple(new_history[slot, j].tolist()),
                float(new_scores[slot, j]),
                length_normalize(float(new_scores[slot, j]), step_no, alpha),
                False,
            )
            for j in range(int(n_chosen[slot]))
        )
    slots = np.flatnonzero(~done)
    # A beam narrower than K keeps K rows: the missing ones repeat the first, with score -inf.
    pad = (np.arange(k)[None, :] >= n_chosen[:, None])[slots]
    new_origin, new_token = new_origin[slots], new_token[slots]
    new_origin = np.where(pad, new_origin[:, :1], new_origin)
    new_token = np.where(pad, new_token[:, :1], new_token)
    beams.scores = np.where(pad, -np.inf, new_scores[slots])
    beams.history = np.where(pad[:, :, None], new_history[slots, :1], new_history[slots])
    if len(slots):
        beams.state = decoder.select_state(beams.state, (slots[:, None] * rows + new_origin).reshape(-1))
        if len(slots) < len(beams.alive):
            beams.memory = decoder.select_memory(beams.memory, slots)
    beams.alive, beams.rows = beams.alive[slots], k
    return new_token.reshape(-1).astype(np.int64)


def _ranked(
    beams: _Beams,
    log_probs: np.ndarray,
    ids: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sentence's best 2K candidates from its R rows' best tokens (log_probs, ids (n*R, W)), in
    order of score (sum of log-probabilities), then lower row, then lower token:
    -> scores (n, 2K) float64, origin rows (n, 2K), tokens (n, 2K)."""
    n, rows, width = len(beams.alive), beams.rows, ids.shape[1]
    candidates = (beams.scores[:, :, None] + log_probs.reshape(n, rows, width)).reshape(n, rows * width)
    tokens = ids.reshape(n, rows * width)
    origins = np.broadcast_to(np.repeat(np.arange(rows), width), (n, rows * width))
    order = np.lexsort((tokens, origins, -candidates), axis=1)[:, : min(2 * k, rows * width)]
    return (
        np.take_along_axis(candidates, order, axis=1),
        np.take_along_axis(origins, order, axis=1),
        np.take_along_axis(tokens, order, axis=1),
    )


def _n_best(finished: list[Hypothesis], n_best: int) -> list[Hypothesis]:
    ranked = sorted(enumerate(finished), key=lambda item: (-item[1].normalized, item[0]))
    return [hyp for _, hyp in ranked[:n_best]]
