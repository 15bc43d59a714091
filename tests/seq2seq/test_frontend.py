"""The translators' shared front end: length-sorted batches, and per-line failures around any search."""

import time

import pytest

from seq2seq.run import load_run
from serving.frontend import TextTranslator, sorted_batches
from serving.search import Hypothesis, SearchParams


def test_batches_are_length_sorted_and_cover_every_source_once():
    sources = [[1] * n for n in (5, 1, 3, 3, 9, 2, 7)]
    batches = list(sorted_batches(sources, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    order = [i for batch in batches for i in batch]
    assert sorted(order) == list(range(len(sources)))
    assert [len(sources[i]) for i in order] == sorted(len(s) for s in sources)
    assert order[2:4] == [2, 3]  # equal lengths keep input order


def test_token_budget_bounds_sentences_times_longest():
    sources = [[1] * n for n in (4, 4, 4, 6, 6, 30)]
    batches = list(sorted_batches(sources, batch_tokens=12))
    assert batches == [[0, 1, 2], [3, 4], [5]]  # 3 x 4, 2 x 6; a longer source alone
    assert all(len(b) * max(len(sources[i]) for i in b) <= 12 for b in batches[:-1])


class EchoTranslator(TextTranslator):
    """'Translates' a source into its own ids: records the batches it was given."""

    def __init__(self, src_tok, tgt_tok):
        super().__init__(src_tok, tgt_tok, max_src_tokens=6, normalize_fn=str.strip)
        self.batches = []

    def search_batch(self, sources, params):
        self.batches.append(sources)
        return [[Hypothesis(tuple(ids[:-1]), 0.0, -float(len(ids)), True)] for ids in sources]


@pytest.fixture(scope="module")
def echo(trained_run):
    run = load_run(trained_run)
    return EchoTranslator(run.src_tokenizer, run.tgt_tokenizer)


def test_bad_lines_fail_alone_and_results_keep_input_order(echo):
    texts = ["Go now.", "   ", "one two three four five six seven eight", "Hi."]
    results = echo.translate(texts, SearchParams(), batch_size=1)
    assert results[0].error is None and results[3].error is None and results[1].error == "empty line"
    assert results[2].error.startswith("too long: ") and results[2].text == ""
    assert results[0].source_tokens == len(echo.src_tokenizer.encode("Go now."))
    assert [len(b[0]) for b in echo.batches] == sorted(len(b[0]) for b in echo.batches)  # short first
    assert results[3].n_best == [(results[3].text, -float(results[3].source_tokens + 1))]


class SlowEchoTranslator(EchoTranslator):
    """EchoTranslator whose batches take 50 ms; the batch holding an empty source fails at once."""

    def search_batch(self, sources, params):
        if any(len(ids) == 1 for ids in sources):  # EOS alone
            raise RuntimeError("this batch failed")
        time.sleep(0.05)
        return super().search_batch(sources, params)


def test_workers_keep_input_order_and_a_failed_batch_stops_the_rest(echo):
    sources = [[7 + i] * (2 + i % 5) + [echo.src_eos] for i in range(20)]
    one = echo.search(sources, SearchParams(), batch_size=2)
    three = echo.search(sources, SearchParams(), batch_size=2, workers=3)
    assert three == one and [h[0].tokens for h in one] == [tuple(ids[:-1]) for ids in sources]
    slow = SlowEchoTranslator(echo.src_tokenizer, echo.tgt_tokenizer)
    short = [[slow.src_eos], *sources]  # the shortest: sorted into the first batch
    with pytest.raises(RuntimeError, match="this batch failed"):
        slow.search(short, SearchParams(), batch_size=2, workers=2)
    assert len(slow.batches) < 4  # of 10 left: those not started when the failure arrived never ran
