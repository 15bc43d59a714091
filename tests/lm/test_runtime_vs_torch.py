"""LMRuntime against torch: onnxruntime alone reproduces the torch model's decoding, perplexity and seeded
sampling. (The torch-free runtime tests, on the committed bundles, are tests/serving/test_runtime.py.)"""

import math

import pytest
import torch

from lm.export import export_lm
from serving.runtime import LMRuntime
from serving.sampling import SamplingParams
from tests.tiny_bundles import TINY_TEXT, train_tiny_model

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module", params=["gru", "lstm", "mamba", "mingru"])
def trained(request, tmp_path_factory):
    """(torch model, tokenizer, runtime) for a tiny trained 2-layer model."""
    model, tokenizer = train_tiny_model(request.param, layers=2, hidden=32, steps=200)
    bundle = export_lm(model, tokenizer, tmp_path_factory.mktemp("rt") / request.param)
    return model, tokenizer, LMRuntime.load(bundle)


def torch_greedy(model, prompt_ids, steps):
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt_ids]))
        out = []
        for _ in range(steps):
            out.append(int(logits[0, -1].argmax()))
            logits, state = model(torch.tensor([[out[-1]]]), state)
    return out


def test_greedy_decoding_matches_torch_for_500_steps(trained):
    model, tokenizer, runtime = trained
    prompt = tokenizer.encode("The Time Traveller")
    got = list(runtime.generate_ids(prompt, 500, GREEDY))
    assert got == torch_greedy(model, prompt, 500)
    assert len(set(got)) >= 6  # a real continuation, not one symbol repeated


def test_perplexity_matches_torch(trained):
    model, tokenizer, runtime = trained
    text = TINY_TEXT * 2
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()
    got = runtime.perplexity(text, chunk=97)  # chunks carry the state across calls
    assert got["tokens"] == ids.shape[1] - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-3)
    # A char model predicts one character per token.
    assert got["bits_per_char"] == pytest.approx(nll / math.log(2), rel=1e-3)


def test_sampled_text_equals_the_torch_generator_for_the_same_seed(trained):
    from lm.generate import generate

    model, tokenizer, runtime = trained
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=11)
    want = list(generate(model, tokenizer, "His grey eyes", 150, params, stop=["xyz"]))
    assert list(runtime.generate("His grey eyes", 150, params, stop=["xyz"])) == want


def test_sentencepiece_bundle_stops_at_eos(tmp_path):
    from lm.model import RNNLM, ModelConfig
    from serving.tokenizers import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer.train(TINY_TEXT.splitlines(), vocab_size=60)
    eos = tokenizer.special_ids["<eos>"]
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, cell="gru", layers=1, embed=8, hidden=8))
    with torch.no_grad():
        model.head.bias[eos] = 50.0  # <eos> always wins the argmax
    runtime = LMRuntime.load(export_lm(model, tokenizer, tmp_path / "spm"))
    assert runtime.manifest.special_ids["<eos>"] == eos
    assert list(runtime.generate_ids(tokenizer.encode("The fire"), 20, GREEDY)) == [eos]
    assert list(runtime.generate("The fire", 20, GREEDY)) == []
