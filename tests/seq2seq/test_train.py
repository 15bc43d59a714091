import json
import os
import signal

import pytest
import torch

from lm.checkpoint import load_checkpoint
from lm.metrics import read_metrics
from seq2seq.cli import main
from seq2seq.train import TrainError, start_run, train


def test_run_directory_holds_everything(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {
        "config.json",
        "src_tokenizer.json",
        "tgt_tokenizer.json",
        "best.pt",
        "last.pt",
        "metrics.jsonl",
        "metrics.png",
    } <= names
    config = json.loads((trained_run / "config.json").read_text())
    assert config["special_ids"] == {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    assert config["model"]["attention"] == "additive"
    valid = [r for r in read_metrics(trained_run / "metrics.jsonl") if r["split"] == "valid"]
    assert valid and valid[-1]["loss"] < valid[0]["loss"] and valid[-1]["bleu"] > 0


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, tiny_config):
    # batch_tokens small: several epochs in 24 steps, so an epoch boundary (validation) is crossed too
    config = tiny_config(
        embed=16, enc_hidden=16, dec_hidden=16, attn_dim=8, batch_tokens=1500, max_steps=24, spm_vocab=150
    )
    train(config, tmp_path / "straight", show_progress=False)
    interrupted = tiny_config(
        embed=16, enc_hidden=16, dec_hidden=16, attn_dim=8, batch_tokens=1500, max_steps=9, spm_vocab=150
    )
    train(interrupted, tmp_path / "resumed", show_progress=False)
    middle = load_checkpoint(tmp_path / "resumed" / "last.pt", "mt")
    assert middle["step"] == 9 and middle["position"]["batch"] > 0  # stopped mid-epoch
    summary = train(config, tmp_path / "resumed", resume=True, show_progress=False)
    assert summary["steps"] == 24
    a = load_checkpoint(tmp_path / "straight" / "last.pt", "mt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt", "mt")
    assert a["position"] == b["position"] and a["epoch"] >= 1
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == sorted(set(steps))  # nothing logged twice


def test_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path, trained_run, tiny_config):
    with pytest.raises(TrainError, match="already holds a run"):
        train(tiny_config(), trained_run)
    with pytest.raises(TrainError, match=r"no last\.pt"):
        train(tiny_config(), tmp_path / "empty", resume=True)


def test_sigterm_mid_epoch_checkpoints_and_resumes_to_the_same_weights(tmp_path, tiny_config):
    """The translator stops on SIGTERM (and Ctrl-C) between steps like the language model: last.pt at the
    step, the earlier signal handlers back, and the resumed run ends where an uninterrupted one does."""
    config = tiny_config(
        embed=16,
        enc_hidden=16,
        dec_hidden=16,
        attn_dim=8,
        batch_tokens=1500,
        max_steps=20,
        spm_vocab=150,
        dropout=0.3,
    )
    train(config, tmp_path / "straight", show_progress=False)

    def terminate_at_step_7(trainer):
        if trainer.position.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = start_run(config, tmp_path / "resumed", on_step=terminate_at_step_7)
    assert trainer.fit().reason == "interrupted"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    middle = load_checkpoint(tmp_path / "resumed" / "last.pt", "mt")
    assert middle["step"] == 7 and middle["position"]["batch"] == 7
    assert main(["train", "--out", str(tmp_path / "resumed"), "--resume", "--no-progress"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "last.pt", "mt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt", "mt")
    assert b["step"] == 20
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_cli_exit_code_3_on_interrupt_and_resume_refuses_a_model_change(tmp_path, pairs_file, capsys):
    toml = tmp_path / "mt.toml"
    toml.write_text(
        f'[data]\ndataset = "{pairs_file}"\nvalid_fraction = 0.1\ntest_fraction = 0.1\n'
        "spm_vocab = 150\nbatch_tokens = 1500\nvalid_bleu_sentences = 5\n"
        "[model]\nembed = 16\nenc_hidden = 16\ndec_hidden = 16\nattn_dim = 8\n"
        '[optim]\nschedule = "constant"\n[run]\nmax_steps = 3\nprogress = false\n'
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(toml), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["stopped_by"] == "max_steps"
    assert main(["train", "--out", str(out), "--resume", "--embed", "32"]) == 2
    assert "--resume cannot change --embed" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "5", "--tensorboard"]) == 0
    assert load_checkpoint(out / "last.pt", "mt")["step"] == 5
    assert list((out / "tensorboard").iterdir())
