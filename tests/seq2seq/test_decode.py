"""Decoding a (tiny, briefly trained) translator: results do not depend on the batch."""

import numpy as np
import pytest
import torch

from seq2seq.data import load_splits
from seq2seq.decode import TorchStepDecoder, pad_batch, search
from seq2seq.run import load_run
from seq2seq.train import TrainConfig, build_corpus
from serving.search import SearchParams, beam_search, greedy_search


@pytest.fixture(scope="module")
def run_and_sources(trained_run):
    run = load_run(trained_run)
    config = TrainConfig.from_dict(run.train_config, strict=False)
    splits = load_splits(config.data_config())
    corpus = build_corpus(config.data, splits, run.src_tokenizer, run.tgt_tokenizer)
    sources = (corpus.valid_src + corpus.src)[:64]
    return run, sources


@pytest.mark.parametrize("beam", [1, 4])
def test_output_does_not_depend_on_the_batch(run_and_sources, beam):
    run, sources = run_and_sources
    bos, eos = run.tgt_tokenizer.special_ids["<bos>"], run.tgt_tokenizer.special_ids["<eos>"]
    params = SearchParams(beam=beam)
    alone = search(run.model, sources, params, bos, eos, batch_size=1)
    together = search(run.model, sources, params, bos, eos, batch_size=64)
    assert [h[0].tokens for h in alone] == [h[0].tokens for h in together]
    assert len({h[0].tokens for h in together}) > 10  # the model does translate: outputs differ


def test_beam_of_one_equals_greedy_on_a_trained_model(run_and_sources):
    run, sources = run_and_sources
    bos, eos = run.tgt_tokenizer.special_ids["<bos>"], run.tgt_tokenizer.special_ids["<eos>"]
    src, src_len = pad_batch(sources, 0)
    decoder = TorchStepDecoder(run.model)
    with torch.inference_mode():
        enc_out, mask, state = run.model.encode(src, src_len)
    greedy = greedy_search(decoder, state, (enc_out, mask), src_len.numpy(), bos, eos)
    beam = beam_search(decoder, state, (enc_out, mask), src_len.numpy(), bos, eos, SearchParams(beam=1))
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]
    assert [h.score for h in greedy] == pytest.approx([b[0].score for b in beam], abs=1e-6)


def test_translator_n_best_and_bad_lines(trained_run):
    translator = load_run(trained_run).translator(max_src_tokens=20)
    results = translator.translate(["Go.", "", "word " * 50, "I ran ☃."], SearchParams(beam=4, n_best=3))
    assert results[0].error is None and len(results[0].n_best) == 3
    scores = [score for _, score in results[0].n_best]
    assert scores == sorted(scores, reverse=True) and results[0].text == results[0].n_best[0][0]
    assert results[1].error == "empty line" and results[1].text == ""
    assert results[2].error.startswith("too long")
    assert results[3].error is None and "☃" in results[3].warning


def test_torch_decoder_rows_share_their_sentence_memory(run_and_sources):
    """R rows per sentence over a memory with a row per sentence = the memory repeated R times."""
    run, sources = run_and_sources
    src, src_len = pad_batch(sources[:5], 0)
    with torch.inference_mode():
        enc_out, mask, state = run.model.encode(src, src_len)
    state = state.repeat_interleave(3, dim=1)
    prev = np.arange(4, 4 + 15, dtype=np.int64)
    decoder = TorchStepDecoder(run.model)
    shared = decoder.step(prev, state, (enc_out, mask), 4)
    repeated = decoder.step(prev, state, (enc_out.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)), 4)
    np.testing.assert_array_equal(shared[1], repeated[1])
    np.testing.assert_allclose(shared[0], repeated[0])
    fewer = decoder.select_memory((enc_out, mask), np.array([0, 2]))  # a new memory: no stale repetition
    assert decoder.step(prev[:6], state[:, :6], fewer, 4)[0].shape == (6, 4)
    log_probs, ids, _ = decoder.step(prev[:5], state[:, ::3], (enc_out, mask), 10**6)
    assert ids.shape == (5, run.model.config.tgt_vocab)  # k beyond the vocabulary: every token
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0, atol=1e-5)
    assert (np.diff(log_probs, axis=1) <= 0).all()  # best first
