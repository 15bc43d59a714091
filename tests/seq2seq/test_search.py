"""Greedy and beam search on a scripted decoder whose probabilities are known exactly."""

import math

import numpy as np
import pytest

from serving.search import SearchParams, beam_search, greedy_search

BOS, EOS, A, B = 2, 3, 4, 5
VOCAB = 6
# Next-token probabilities after each prefix; any other prefix ends for sure.
TABLE = {
    (): {A: 0.5, B: 0.4, EOS: 0.1},
    (A,): {A: 0.34, B: 0.33, EOS: 0.33},
    (B,): {EOS: 0.9, A: 0.1},
    (A, A): {EOS: 1.0},
}


class ScriptedDecoder:
    """State: the prefix (a tuple) of every row; memory: unused. Log-probabilities from TABLE."""

    def __init__(self):
        self.batch_sizes = []

    def step(self, prev, state, memory, k):
        self.batch_sizes.append(len(prev))
        new_state = np.empty(len(prev), dtype=object)
        log_probs = np.full((len(prev), VOCAB), -1e9)
        for row, (token, prefix) in enumerate(zip(prev, state, strict=True)):
            prefix = prefix if token == BOS else (*prefix, int(token))
            new_state[row] = prefix
            for next_token, p in TABLE.get(prefix, {EOS: 1.0}).items():
                log_probs[row, next_token] = math.log(p)
        ids = np.argsort(-log_probs, axis=1, kind="stable")[:, :k]  # best first, lower id on ties
        return np.take_along_axis(log_probs, ids, axis=1), ids, new_state

    def select_state(self, state, rows):
        return state[rows]

    def select_memory(self, memory, rows):
        return memory


def start(count):
    state = np.empty(count, dtype=object)
    for i in range(count):
        state[i] = ()
    return state, None, np.full(count, 5)


def test_greedy_takes_the_locally_best_token():
    [hyp] = greedy_search(ScriptedDecoder(), *start(1), BOS, EOS)
    assert hyp.tokens == (A, A) and hyp.finished
    assert hyp.score == pytest.approx(math.log(0.5 * 0.34 * 1.0))


def test_beam_finds_the_more_probable_sequence_greedy_misses():
    params = SearchParams(beam=2, length_penalty=0.0, n_best=2)
    [hyps] = beam_search(ScriptedDecoder(), *start(1), BOS, EOS, params)
    assert [h.tokens for h in hyps] == [(B,), (A, A)]
    assert hyps[0].score == pytest.approx(math.log(0.4 * 0.9))
    assert hyps[0].normalized >= hyps[1].normalized


def test_beam_of_one_is_greedy():
    greedy = greedy_search(ScriptedDecoder(), *start(3), BOS, EOS)
    beam = beam_search(ScriptedDecoder(), *start(3), BOS, EOS, SearchParams(beam=1))
    assert [[h.tokens for h in hyps] for hyps in beam] == [[h.tokens] for h in greedy]


def test_length_limit_gives_an_unfinished_hypothesis():
    params = SearchParams(beam=2, max_len_ratio=0.0, max_len_extra=1, length_penalty=0.0)
    [hyp] = greedy_search(ScriptedDecoder(), *start(1), BOS, EOS, params)
    assert hyp.tokens == (A,) and not hyp.finished
    [[best]] = beam_search(ScriptedDecoder(), *start(1), BOS, EOS, params)
    assert best.tokens == (A,) and best.finished is False  # A (0.5) beats B (0.4) when cut after one token


def test_finished_sentences_leave_the_batch():
    params = SearchParams(beam=2, max_len_ratio=1.0, max_len_extra=1)
    state, memory, _ = start(2)
    lens = np.array([0, 5])  # limits: 1 token for the first sentence, 6 for the second
    decoder = ScriptedDecoder()
    first, second = greedy_search(decoder, state, memory, lens, BOS, EOS, params)
    assert (first.tokens, second.tokens) == ((A,), (A, A))
    assert decoder.batch_sizes == [2, 1, 1]
    decoder = ScriptedDecoder()
    beam_search(decoder, state, memory, lens, BOS, EOS, params)
    assert decoder.batch_sizes[:2] == [2, 2]  # first step: a row per sentence; then K rows of the one left


def test_search_params_are_checked():
    with pytest.raises(ValueError):
        SearchParams(beam=2, n_best=3)
    with pytest.raises(ValueError):
        SearchParams(beam=0)
