"""The torch-free translator over a bundle decides as the torch decoder does: greedy, beam, any batch.

(Its torch-free tests, on the committed bundle, are tests/serving/test_translator.py.)"""

import re
from pathlib import Path

import pytest

from seq2seq.run import load_run
from serving import search as torch_search_module
from serving.translator import SearchParams, Seq2SeqRuntime
from tests.tiny_translators import tiny_sources, tiny_translator

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run_dir, bundle = tiny_translator(tmp_path_factory)
    return load_run(run_dir, "last").translator(), Seq2SeqRuntime.load(bundle)


def _same(ours, theirs):
    assert [t.error for t in ours] == [t.error for t in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert [text for text, _ in a.n_best] == [text for text, _ in b.n_best]
        assert [s for _, s in a.n_best] == pytest.approx([s for _, s in b.n_best], abs=1e-4)


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("batch_size", [1, 64])
def test_same_translations_as_the_torch_decoder(tiny, beam, batch_size):
    torch_translator, runtime = tiny
    texts = tiny_sources(40, start=300)
    params = dict(beam=beam, n_best=beam)
    ours = runtime.translate(texts, SearchParams(**params), batch_size)
    theirs = torch_translator.translate(texts, torch_search_module.SearchParams(**params), batch_size)
    _same(ours, theirs)
    assert any(t.text for t in ours)


def test_length_limit_and_length_penalty_as_torch(tiny):
    """A tight limit leaves hypotheses unfinished; the length penalty and min_len change the outputs."""
    torch_translator, runtime = tiny
    texts = tiny_sources(16, start=600)
    for options in (dict(beam=3, n_best=3, max_len_ratio=0.0, max_len_extra=2),
                    dict(beam=5, n_best=2, length_penalty=0.0), dict(beam=2, length_penalty=2.0),
                    dict(beam=1, min_len=0), dict(beam=1, min_len=4), dict(beam=3, n_best=3, min_len=4)):
        ours = runtime.translate(texts, SearchParams(**options), batch_size=5)
        theirs = torch_translator.translate(texts, torch_search_module.SearchParams(**options), batch_size=5)
        _same(ours, theirs)
    limited = runtime.translate(texts, SearchParams(beam=3, max_len_ratio=0.0, max_len_extra=2))
    assert all(len(t.hypotheses[0].tokens) <= 2 for t in limited)
    assert not all(t.hypotheses[0].finished for t in limited)
    at_least = runtime.translate(texts, SearchParams(beam=3, min_len=4))
    assert all(len(t.hypotheses[0].tokens) >= 4 for t in at_least)


def test_results_do_not_depend_on_the_batch(tiny):
    _, runtime = tiny
    texts = tiny_sources(20, start=900)
    alone = [runtime.translate([t], SearchParams(beam=4))[0].text for t in texts]
    assert [t.text for t in runtime.translate(texts, SearchParams(beam=4))] == alone


@pytest.mark.parametrize("beam", [1, 4])
def test_workers_search_batches_at_once_with_the_same_results(tiny, beam):
    """Two threads over one pair of sessions and over one torch model: the batches, and so the n-best
    lists and scores, are those of one worker."""
    torch_translator, runtime = tiny
    texts = tiny_sources(48, start=1000)
    params = SearchParams(beam=beam, n_best=beam)
    calls_before = runtime.encoder_calls
    one = runtime.translate(texts, params, batch_size=6)
    calls_one = runtime.encoder_calls - calls_before
    two = runtime.translate(texts, params, batch_size=6, workers=2)
    assert runtime.encoder_calls - calls_before == 2 * calls_one == 16
    for a, b in zip(one, two, strict=True):
        assert a.hypotheses == b.hypotheses
    _same(two, torch_translator.translate(texts, torch_search_module.SearchParams(beam=beam, n_best=beam),
                                          batch_size=6, workers=2))
    with pytest.raises(ValueError, match="workers"):
        runtime.translate(texts, params, workers=0)


def test_bad_lines_fail_alone(tiny):
    _, runtime = tiny
    texts = ["Hello.", "", "   ", "word " * 200, "I am cold."]
    results = runtime.translate(texts, SearchParams(beam=2))
    errors = [r.error for r in results]
    assert errors[:3] == [None, "empty line", "empty line"] and errors[4] is None
    assert re.fullmatch(r"too long: \d+ tokens \(limit 128\)", errors[3])
    assert results[0].text and results[1].text == ""
    assert results[0].source_tokens == len(runtime.src_tokenizer.encode("Hello."))
