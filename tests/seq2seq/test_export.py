"""Exporting a translator: two ONNX graphs that match torch, or a refused export with the numbers."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lm.export import ExportError
from seq2seq.cli import main
from seq2seq.export import check_parity, context_weight, export_graphs, export_seq2seq
from seq2seq.model import Seq2Seq, Seq2SeqConfig
from seq2seq.run import load_run
from serving.bundle import load_manifest
from serving.translator import Seq2SeqRuntime
from tests.tiny_translators import tiny_sources, tiny_translator


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_translator(tmp_path_factory)


def test_bundle_has_the_graphs_tokenizers_and_a_verified_manifest(tiny):
    _, bundle = tiny
    manifest = load_manifest(bundle)  # verifies every sha256
    assert manifest.kind == "seq2seq"
    assert manifest.graphs == {"encoder": "encoder.onnx", "decoder_step": "decoder_step.onnx"}
    assert set(manifest.files) == {*manifest.graphs.values(), "src_tokenizer.json", "tgt_tokenizer.json"}
    data = manifest.data
    assert data["architecture"]["attention"] == "additive"
    assert data["architecture"]["attention_keys_from_encoder"]
    assert [t["name"] for t in data["signatures"]["decoder_step"]["inputs"]] == [
        "prev", "k", "state", "projected_memory", "keys", "mask"]
    outputs = data["signatures"]["decoder_step"]["outputs"]
    assert [t["name"] for t in outputs] == ["log_probs", "ids", "state_out"]
    assert manifest.special_ids["<bos>"] == 2 and manifest.special_ids["<eos>"] == 3
    assert data["parity"]["max_abs_log_probs"] <= 1e-4 and data["parity"]["cases"] >= 4
    assert data["search_check"]["greedy_identical"] == data["search_check"]["sentences"] > 10
    assert data["training_config"]["max_steps"] == 300


def test_graphs_take_any_batch_and_length(tiny):
    """The encoder and decoder step at shapes the export never saw, against torch; the step's k best."""
    run_dir, bundle = tiny
    model = load_run(run_dir, "last").model
    runtime = Seq2SeqRuntime.load(bundle)
    c = model.config
    for batch, length in ((1, 1), (2, 40), (11, 3)):
        src = torch.randint(4, c.src_vocab, (batch, length))
        src_len = torch.full((batch,), length)
        src_len[-1] = 1
        with torch.no_grad():
            enc_out, mask, state = model.encode(src, src_len)
            logits, new_state = model.decode_step(torch.full((batch,), 2), state, enc_out, mask)
            memory, keys = model._split(enc_out)
            projected = memory @ context_weight(model).t()
        ort_memory, ort_state = runtime.encode(src.numpy(), src_len.numpy())
        assert ort_memory["projected_memory"].shape == (batch, length, 3 * c.dec_hidden + c.embed)
        np.testing.assert_allclose(ort_memory["projected_memory"], projected.numpy(), atol=1e-5)
        np.testing.assert_allclose(ort_memory["keys"], keys.numpy(), atol=1e-5)
        log_probs, ids, step_state = runtime.decoder.step(np.full(batch, 2), ort_state, ort_memory, 5)
        want, want_ids = torch.log_softmax(logits, dim=1).topk(5, dim=1)
        np.testing.assert_array_equal(ids, want_ids.numpy())
        np.testing.assert_allclose(log_probs, want.numpy(), atol=1e-4)
        np.testing.assert_allclose(step_state, new_state.numpy(), atol=1e-5)
        assert runtime.decoder.step(np.full(batch, 2), ort_state, ort_memory, 10 ** 6)[1].shape == (
            batch, c.tgt_vocab)  # k beyond the vocabulary: every token, still best first


def test_decoder_rows_share_their_sentence_memory(tiny):
    """R decoder rows per sentence read one memory row: as torch with the memory repeated R times."""
    run_dir, bundle = tiny
    model = load_run(run_dir, "last").model
    runtime = Seq2SeqRuntime.load(bundle)
    src = torch.randint(4, model.config.src_vocab, (3, 7))
    src_len = torch.tensor([7, 4, 1])
    prev = torch.randint(4, model.config.tgt_vocab, (3 * 4,))
    with torch.no_grad():
        enc_out, mask, state = model.encode(src, src_len)
        state = state.repeat_interleave(4, dim=1) + 0.1 * torch.randn(1, 12, model.config.dec_hidden)
        logits, new_state = model.decode_step(prev, state, enc_out.repeat_interleave(4, dim=0),
                                              mask.repeat_interleave(4, dim=0))
    memory, _ = runtime.encode(src.numpy(), src_len.numpy())
    log_probs, ids, ort_state = runtime.decoder.step(prev.numpy(), state.numpy(), memory, 3)
    want, want_ids = torch.log_softmax(logits, dim=1).topk(3, dim=1)
    np.testing.assert_array_equal(ids, want_ids.numpy())
    np.testing.assert_allclose(log_probs, want.numpy(), atol=1e-4)
    np.testing.assert_allclose(ort_state, new_state.numpy(), atol=1e-5)


def test_refuses_to_publish_when_parity_is_not_met(tiny, tmp_path):
    """A zero tolerance cannot be met by float arithmetic in two runtimes: the export must say by how much."""
    run = load_run(tiny[0], "last")
    out = tmp_path / "bundle"
    numbers = r"max abs difference [0-9.e-]+ on the encoder outputs, [0-9.e-]+ on log-probabilities"
    with pytest.raises(ExportError, match=numbers + ".*tolerance 0"):
        export_seq2seq(run.model, run.src_tokenizer, run.tgt_tokenizer, out, tolerance=0.0)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_parity_check_catches_a_wrong_weight(tiny, tmp_path):
    run = load_run(tiny[0], "last")
    encoder, decoder = tmp_path / "encoder.onnx", tmp_path / "decoder_step.onnx"
    export_graphs(run.model, encoder, decoder)
    assert check_parity(run.model, encoder, decoder).worst <= 1e-4
    graph = onnx.load(str(decoder))
    largest = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    tensor = numpy_helper.to_array(largest).copy()
    tensor.reshape(len(tensor), -1)[:, 0] += 0.5  # the first entry of every row: every step sees it
    largest.CopyFrom(numpy_helper.from_array(tensor, largest.name))
    onnx.save(graph, str(decoder))
    report = check_parity(run.model, encoder, decoder)
    assert report.max_abs["log_probs"] > 1e-3 and report.max_abs["encoder"] <= 1e-4


def test_other_architectures_export_and_search_identically(tiny, tmp_path):
    """No attention, a one-way two-layer encoder: untrained, so outputs run to the length limit."""
    run = load_run(tiny[0], "last")
    torch.manual_seed(0)
    config = Seq2SeqConfig(run.model_config.src_vocab, run.model_config.tgt_vocab, embed=16, enc_hidden=24,
                           dec_hidden=16, layers=2, bidirectional=False, attention="none", dropout=0.0)
    model = Seq2Seq(config).eval()
    bundle = export_seq2seq(model, run.src_tokenizer, run.tgt_tokenizer, tmp_path / "plain",
                            sentences=tiny_sources(12))
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["architecture"]["attention"] == "none" and data["search_check"]["beam_identical"] == 12


def test_cli_export_and_its_errors(tiny, tmp_path, capsys):
    out = tmp_path / "cli-bundle"
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(tiny_sources(6)) + "\n", encoding="utf-8")
    assert main(["export", str(tiny[0]), "--out", str(out), "--which", "last", "--sentences",
                 str(sentences), "--name", "en-fr"]) == 0
    assert "identical on 6 sentences" in capsys.readouterr().out
    assert load_manifest(out).name == "en-fr"
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "x").exists()
    shutil.rmtree(out)
