import json

import pytest
import torch

from lm.checkpoint import load_checkpoint
from lm.metrics import read_metrics
from seq2seq.train import TrainError, train


def test_run_directory_holds_everything(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "src_tokenizer.json", "tgt_tokenizer.json", "best.pt", "last.pt", "metrics.jsonl",
            "metrics.png"} <= names
    config = json.loads((trained_run / "config.json").read_text())
    assert config["special_ids"] == {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    assert config["model"]["attention"] == "additive"
    valid = [r for r in read_metrics(trained_run / "metrics.jsonl") if r["split"] == "valid"]
    assert valid and valid[-1]["loss"] < valid[0]["loss"] and valid[-1]["bleu"] > 0


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, tiny_config):
    # batch_tokens small: several epochs in 24 steps, so an epoch boundary (validation) is crossed too
    config = tiny_config(embed=16, enc_hidden=16, dec_hidden=16, attn_dim=8, batch_tokens=1500,
                         max_steps=24, spm_vocab=150)
    train(config, tmp_path / "straight", show_progress=False)
    interrupted = tiny_config(embed=16, enc_hidden=16, dec_hidden=16, attn_dim=8,
                              batch_tokens=1500, max_steps=9, spm_vocab=150)
    train(interrupted, tmp_path / "resumed", show_progress=False)
    middle = load_checkpoint(tmp_path / "resumed" / "last.pt", "mt")
    assert middle["step"] == 9 and middle["batch"] > 0  # stopped mid-epoch
    summary = train(config, tmp_path / "resumed", resume=True, show_progress=False)
    assert summary["steps"] == 24
    a = load_checkpoint(tmp_path / "straight" / "last.pt", "mt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt", "mt")
    assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"]) and a["epoch"] >= 1
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == sorted(set(steps))  # nothing logged twice


def test_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path, trained_run, tiny_config):
    with pytest.raises(TrainError, match="already holds a run"):
        train(tiny_config(), trained_run)
    with pytest.raises(TrainError, match="no checkpoint"):
        train(tiny_config(), tmp_path / "empty", resume=True)
