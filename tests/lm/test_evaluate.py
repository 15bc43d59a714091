"""Evaluation: perplexity over a whole split with the state carried, bits per character, eval.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lm.cli import main
from lm.corpus import load_split
from lm.evaluate import evaluate_text, stream_nll
from lm.model import RNNLM, ModelConfig
from lm.run import load_run
from serving.tokenizers import CharTokenizer
from tests.lm.conftest import TINY_FLAGS


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary_size() -> None:
    tokenizer = CharTokenizer.train("abcdefghij klmnop")
    model = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, layers=1, embed=4, hidden=8))
    nn.init.zeros_(model.head.weight)  # logits are all zero: p = 1/V for every token
    result = evaluate_text(model, tokenizer, "abc def ghij klm nop " * 5)
    assert math.isclose(result.perplexity, tokenizer.vocab_size, rel_tol=1e-9)
    assert math.isclose(result.bits_per_char, math.log2(tokenizer.vocab_size), rel_tol=1e-9)
    assert result.tokens == 5 * 21 - 1 == result.characters


def test_the_state_is_carried_across_chunks_as_in_one_long_forward() -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=13, cell="lstm", layers=2, embed=6, hidden=12)).eval()
    ids = torch.randint(0, 13, (100,))
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
        manual = F.cross_entropy(logits[0].double(), ids[1:], reduction="sum").item()
        chunks_without_state = sum(
            F.cross_entropy(
                model(ids[None, s : min(s + 7, 99)])[0][0].double(), ids[s + 1 : s + 8], reduction="sum"
            ).item()
            for s in range(0, 99, 7)
        )
    nll, count = stream_nll(model, ids, chunk=7)
    assert count == 99
    assert math.isclose(nll, manual, rel_tol=1e-6)
    assert not math.isclose(nll, chunks_without_state, rel_tol=1e-4)  # a reset state would show
    assert math.isclose(stream_nll(model, ids, chunk=1)[0], manual, rel_tol=1e-6)


def test_eval_command_prints_json_and_writes_eval_json(tiny_run: Path, capsys) -> None:
    assert main(["eval", str(tiny_run), "--split", "test", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tiny_run / "eval.json").read_text())
    assert printed["split"] == "test" and printed["checkpoint"] == "best.pt"
    assert math.isclose(printed["perplexity"], math.exp(printed["nll"]), rel_tol=1e-12)
    assert math.isclose(printed["bits_per_char"], printed["nll"] / math.log(2), rel_tol=1e-12)  # char model
    run = load_run(tiny_run)
    text = load_split(run.train_config["corpus"], "test")
    assert printed["tokens"] == len(text) - 1
    assert 1 < printed["perplexity"] < run.model_config.vocab_size
    assert run.model.training is False
    assert load_run(tiny_run).evaluation == printed


def test_validation_streams_read_consecutive_pieces_side_by_side() -> None:
    """streams=3 over 100 predictions: pieces of 33 from a zero state each; the last one continues
    into the remaining token."""
    torch.manual_seed(1)
    model = RNNLM(ModelConfig(vocab_size=13, cell="gru", layers=1, embed=6, hidden=12)).eval()
    ids = torch.randint(0, 13, (101,))

    def piece_nll(piece: torch.Tensor) -> float:
        with torch.no_grad():
            logits, _ = model(piece[None, :-1])
        return F.cross_entropy(logits[0].double(), piece[1:], reduction="sum").item()

    manual = piece_nll(ids[0:34]) + piece_nll(ids[33:67]) + piece_nll(ids[66:101])
    nll, count = stream_nll(model, ids, chunk=8, streams=3)
    assert count == 100
    assert math.isclose(nll, manual, rel_tol=1e-6)
    assert not math.isclose(nll, stream_nll(model, ids, chunk=8)[0], rel_tol=1e-4)


@pytest.mark.parametrize(("tokenizer", "flags"), [("word", []), ("spm", ["--vocab-size", "80"])])
def test_word_and_sentencepiece_runs_report_bits_per_character(
    tokenizer: str, flags: list[str], corpus_file: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / tokenizer
    assert (
        main(
            [
                "train",
                "--corpus",
                str(corpus_file),
                "--out",
                str(run),
                "--tokenizer",
                tokenizer,
                *flags,
                *TINY_FLAGS,
                "--bptt",
                "4",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    assert main(["eval", str(run), "--split", "valid", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["characters"] > result["tokens"] > 10  # several characters per token
    assert math.isclose(
        result["bits_per_char"],
        result["nll"] * result["tokens"] / math.log(2) / result["characters"],
        rel_tol=1e-12,
    )
