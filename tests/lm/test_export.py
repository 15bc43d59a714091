"""Exporting language models to ONNX bundles: parity with torch, dynamic axes, refusal, quantisation."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lm.export import ExportError, export_lm
from lm.model import RNNLM, ModelConfig
from serving.bundle import BundleError, load_manifest
from serving.files import sha256_file
from serving.runtime import LMRuntime
from serving.tokenizers import CharTokenizer
from tests.tiny_bundles import TINY_TEXT, train_tiny_model

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")


def random_model(cell: str, vocab: int, layers: int = 2, hidden: int = 16, impl: str = "fused") -> RNNLM:
    torch.manual_seed(1)
    return RNNLM(
        ModelConfig(
            vocab_size=vocab, cell=cell, layers=layers, embed=12, hidden=hidden, dropout=0.2, impl=impl
        )
    )


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.train(TINY_TEXT)


@pytest.mark.parametrize("cell", CELLS)
def test_step_graph_matches_torch_at_any_batch_and_length(cell, tokenizer, tmp_path):
    model = random_model(cell, tokenizer.vocab_size)  # left in training mode: export must use eval
    bundle = export_lm(model, tokenizer, tmp_path / "b")
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    model.eval()
    names = model.config.state_names
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3, 8):
        for time in (1, 7, 33):
            tokens = torch.randint(0, tokenizer.vocab_size, (batch, time), generator=gen)
            state = tuple(torch.randn(2, batch, 16, generator=gen) for _ in names)
            with torch.no_grad():
                logits, new_state = model(tokens, state)
            feed = {"tokens": tokens.numpy(), **{n: s.numpy() for n, s in zip(names, state, strict=True)}}
            got = session.run(None, feed)
            assert got[0].shape == (batch, time, tokenizer.vocab_size)
            np.testing.assert_allclose(got[0], logits.numpy(), atol=1e-4, rtol=0)
            for g, s in zip(got[1:], new_state, strict=True):
                np.testing.assert_allclose(g, s.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_manifest_describes_the_bundle(cell, tokenizer, tmp_path):
    model = random_model(cell, tokenizer.vocab_size, layers=2, hidden=16)
    bundle = export_lm(
        model, tokenizer, tmp_path / "m", evaluation={"perplexity": 9.5}, training_config={"lr": 0.01}
    )
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["format"] == "rnnlab-bundle" and data["format_version"] == 1 and data["kind"] == "lm"
    assert data["architecture"] == {
        "type": "rnnlm",
        "cell": cell,
        "layers": 2,
        "embed": 12,
        "hidden": 16,
        "vocab_size": tokenizer.vocab_size,
        "tie": False,
        "trained_impl": "fused",
        "exported_impl": "fused",
    }
    names = ["h", "c"] if cell == "lstm" else ["h"]
    assert [s["name"] for s in data["state"]] == names
    assert [s["output"] for s in data["state"]] == [f"{n}_out" for n in names]
    assert all(s["shape"] == [2, "batch", 16] and s["dtype"] == "float32" for s in data["state"])
    assert data["special_ids"] == {"<unk>": 0}
    assert data["evaluation"] == {"perplexity": 9.5} and data["training_config"] == {"lr": 0.01}
    assert data["parity"]["max_abs_logits"] <= 1e-4 and data["parity"]["cases"] >= 12
    assert set(data["files"]) == {"model.onnx", "decode.onnx", "tokenizer.json"}
    # The one-token graph passed the same check as the step graph.
    assert data["decode_parity"]["max_abs_logits"] <= 1e-4
    assert data["decode_parity"]["max_abs_state"] <= 1e-4
    assert all(sha256_file(bundle / f) == h for f, h in data["files"].items())
    assert load_manifest(bundle).state_names == tuple(names)


def test_scratch_model_is_exported_through_the_fused_rnn(tokenizer, tmp_path):
    torch.manual_seed(2)
    model = RNNLM(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            cell="lstm",
            layers=3,
            embed=16,
            hidden=16,
            tie=True,
            impl="scratch",
        )
    ).eval()
    runtime = LMRuntime.load(export_lm(model, tokenizer, tmp_path / "s"))
    assert runtime.manifest.architecture["trained_impl"] == "scratch"
    tokens = np.array([tokenizer.encode("The Time Traveller")], dtype=np.int64)
    logits, (_, c) = runtime.step(tokens, runtime.init_state(1))
    with torch.no_grad():
        want, (_, want_c) = model(torch.from_numpy(tokens))
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4)
    np.testing.assert_allclose(c, want_c.numpy(), atol=1e-4)


class LengthDependentLM(RNNLM):
    """Branches on the input length in Python: the tracer freezes the branch, so ONNX and torch differ."""

    def forward(self, tokens, state=None):
        logits, state = super().forward(tokens, state)
        return (logits * 2 if tokens.shape[1] > 5 else logits), state


def test_disagreeing_graph_is_refused_with_numbers_and_nothing_written(tokenizer, tmp_path):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, cell="gru", layers=1, embed=8, hidden=8)
    out = tmp_path / "bad"
    with pytest.raises(ExportError, match=r"max abs difference [0-9.e+-]+ on logits") as info:
        export_lm(LengthDependentLM(config), tokenizer, out)
    assert any(f"T={t}" in str(info.value) for t in (7, 33, 130))
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging directory


def test_export_replaces_a_bundle_but_never_other_content(tokenizer, tmp_path):
    model = random_model("gru", tokenizer.vocab_size, layers=1)
    out = tmp_path / "b"
    export_lm(model, tokenizer, out, evaluation={"perplexity": 1.0})
    export_lm(model, tokenizer, out, evaluation={"perplexity": 2.0})
    assert load_manifest(out).evaluation == {"perplexity": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a bundle"):
        export_lm(model, tokenizer, other)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "notes"]


def test_mismatched_tokenizer_is_refused(tokenizer, tmp_path):
    model = random_model("gru", tokenizer.vocab_size + 1)
    with pytest.raises(ExportError, match="tokenizer has"):
        export_lm(model, tokenizer, tmp_path / "x")


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_int8_bundle_is_smaller_and_close_in_perplexity(cell, tmp_path):
    model, tokenizer = train_tiny_model(cell, hidden=48, embed=24, steps=80)
    fp32 = LMRuntime.load(export_lm(model, tokenizer, tmp_path / "fp32"))
    int8 = LMRuntime.load(export_lm(model, tokenizer, tmp_path / "int8", quantize="int8"))
    quant = int8.manifest.data["quantization"]["step"]
    assert quant["int8_bytes"] < quant["fp32_bytes"]
    size = {name: (tmp_path / name / "model.onnx").stat().st_size for name in ("fp32", "int8")}
    assert size["int8"] < size["fp32"]
    ppl32, ppl8 = fp32.perplexity(TINY_TEXT)["perplexity"], int8.perplexity(TINY_TEXT)["perplexity"]
    assert abs(ppl8 / ppl32 - 1) < 0.05
    assert quant["vs_torch_max_abs_logits"] > 0


@pytest.mark.parametrize(("cell", "layers"), [("gru", 2), ("lstm", 2), ("rnn_relu", 1)])
def test_int8_bundles_decode_with_int8_matmuls(cell, layers, tmp_path):
    model, tokenizer = train_tiny_model(cell, layers=layers, hidden=48, embed=24, steps=80)
    runtime = LMRuntime.load(export_lm(model, tokenizer, tmp_path / "int8", quantize="int8"))
    assert runtime.manifest.graphs == {"step": "model.onnx", "decode": "decode.onnx"}
    quant = runtime.manifest.data["quantization"]
    assert runtime.manifest.data["decode_parity"]["max_abs_logits"] <= 1e-4  # checked before quantising
    assert quant["decode"]["int8_bytes"] < quant["decode"]["fp32_bytes"] / 2
    ops = [node.op_type for node in onnx.load(str(tmp_path / "int8" / "decode.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 2 * layers and "MatMul" not in ops  # every weight matrix is int8
    # T = 1 runs the decode graph, T > 1 the step graph: both approximate the torch model.
    tokens = np.array([tokenizer.encode("The fire burned")], dtype=np.int64)
    _, prefilled = runtime.step(tokens[:, :-1], runtime.init_state(1))
    decoded, _ = runtime.step(tokens[:, -1:], prefilled)
    with torch.no_grad():
        want, _ = model(torch.from_numpy(tokens))
    np.testing.assert_allclose(decoded[0, 0], want[0, -1].numpy(), atol=0.3)
    stepwise = runtime.perplexity(TINY_TEXT, chunk=1)["perplexity"]  # every token through the decode graph
    assert abs(stepwise / runtime.perplexity(TINY_TEXT)["perplexity"] - 1) < 0.05


def test_unknown_quantization_is_refused(tokenizer, tmp_path):
    with pytest.raises(ExportError, match="quantize"):
        export_lm(random_model("gru", tokenizer.vocab_size), tokenizer, tmp_path / "q", quantize="int4")
    assert not (tmp_path / "q").exists()


def test_cli_exports_a_run_and_generates_from_the_bundle(tiny_run, tmp_path, capsys):
    from lm.cli import main
    from lm.run import load_run

    out = tmp_path / "bundle"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    run = load_run(tiny_run)
    manifest = load_manifest(out)
    assert manifest.training_config == run.train_config
    assert manifest.evaluation == run.evaluation
    capsys.readouterr()
    args = [
        "--prompt",
        "The Time",
        "--max-tokens",
        "60",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--stop",
        "q",
    ]
    assert main(["generate", str(out), *args]) == 0
    from_bundle = capsys.readouterr().out
    assert main(["generate", str(tiny_run), *args]) == 0
    assert from_bundle == capsys.readouterr().out  # same seed, same sampler: same text from ORT and torch
    assert "q" not in from_bundle


def test_cli_export_of_a_missing_run_fails_cleanly(tmp_path, capsys):
    from lm.cli import main

    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cell,layers,embed", [("mamba", 2, 12), ("mamba", 1, 16), ("mingru", 2, 12)])
def test_parallel_cells_export_step_and_decode_graphs_that_match_torch(
    cell, layers, embed, tokenizer, tmp_path
):
    """(mamba: with and without the input projection, one layer and two.)"""
    torch.manual_seed(2)
    model = RNNLM(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            cell=cell,
            layers=layers,
            embed=embed,
            hidden=16,
            heads=2,
            state_size=4,
            conv_kernel=3,
        )
    ).eval()
    bundle = export_lm(model, tokenizer, tmp_path / cell)
    data = json.loads((bundle / "manifest.json").read_text())
    shapes = (
        [[layers, "batch", 2, 40], [layers, "batch", 2, 16, 4]] if cell == "mamba" else [[2, "batch", 32]]
    )
    assert [s["shape"] for s in data["state"]] == shapes
    assert data["parity"]["worst_case"] and data["parity"]["max_abs_logits"] <= 1e-4
    assert data["decode_parity"]["max_abs_state"] <= 1e-4
    runtime = LMRuntime.load(bundle)
    gen = torch.Generator().manual_seed(0)
    for batch, time in ((1, 1), (3, 5), (2, 150)):  # 150: several chunks in the exported graph
        tokens = torch.randint(0, tokenizer.vocab_size, (batch, time), generator=gen)
        state = tuple(torch.randn(s[0], batch, *s[2:], generator=gen) for s in shapes)
        with torch.no_grad():
            logits, new_state = model(tokens, state)
        got, got_state = runtime.step(tokens.numpy(), [s.numpy() for s in state])
        np.testing.assert_allclose(got, logits.numpy(), atol=1e-4, rtol=0)
        for g, s in zip(got_state, new_state, strict=True):
            np.testing.assert_allclose(g, s.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cell", ["mamba", "mingru"])
def test_parallel_cells_int8_bundle_is_smaller_and_close_in_perplexity(cell, tmp_path):
    model, tokenizer = train_tiny_model(cell, layers=2, hidden=48, embed=24, steps=80)
    fp32 = LMRuntime.load(export_lm(model, tokenizer, tmp_path / "fp32"))
    int8 = LMRuntime.load(export_lm(model, tokenizer, tmp_path / "int8", quantize="int8"))
    for graph in ("step", "decode"):
        quant = int8.manifest.data["quantization"][graph]
        assert quant["int8_bytes"] < 0.6 * quant["fp32_bytes"]  # the embedding and conv stay fp32
    ppl32, ppl8 = fp32.perplexity(TINY_TEXT)["perplexity"], int8.perplexity(TINY_TEXT)["perplexity"]
    assert abs(ppl8 / ppl32 - 1) < 0.05
    stepwise = int8.perplexity(TINY_TEXT, chunk=1)["perplexity"]  # every token through the decode graph
    assert abs(stepwise / ppl8 - 1) < 0.05
