"""The translators' shared front end: length-sorted batches, and per-line failures around any search."""

import pytest

from seq2seq.frontend import TextTranslator, sorted_batches
from seq2seq.run import load_run
from seq2seq.search import Hypothesis, SearchParams


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
