"""Training: the loop's semantics, exact resume after any interruption, run directory, stop rules."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from lm.checkpoint import load_checkpoint
from lm.cli import main
from lm.config import TrainConfig, build_config
from lm.loop import make_optimizer
from lm.metrics import read_metrics
from lm.model import RNNLM
from lm.rng import seed_everything
from lm.train import Trainer, epoch_batches, prepare_corpus, resume_run, start_run
from tests.lm.conftest import TINY_FLAGS


def train(corpus: Path, out: Path, *extra: str) -> int:
    return main(["train", "--corpus", str(corpus), "--out", str(out), *TINY_FLAGS, *extra])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt", "lm")["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.parametrize("partition", ["sequential", "random"])
def test_trainer_equals_a_hand_written_truncated_bptt_loop(
    corpus_file: Path, tmp_path: Path, partition: str
) -> None:
    """Sequential: state carried across batches and detached, reset at epoch start; random: fresh state
    per batch; gradient clipping by global norm; AdamW. Two epochs, no dropout, constant lr."""
    flags = dict(
        corpus=str(corpus_file),
        hidden=16,
        embed=8,
        layers=1,
        batch_size=4,
        bptt=16,
        epochs=2,
        dropout=0.0,
        lr_schedule="constant",
        partition=partition,
        clip=0.05,
        progress=False,
        patience=0,
        checkpoint_every=0,
    )
    config = build_config(TrainConfig, flags)
    trainer = start_run(config, tmp_path / "run")
    assert trainer.fit().reason == "completed"

    corpus = prepare_corpus(config)
    seed_everything(config.optim.seed)
    model = RNNLM(config.model_config(corpus.tokenizer.vocab_size))
    optim = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    steps = 0
    for epoch in range(2):
        state = model.init_state(4)
        for x, y in epoch_batches(corpus.train, config, epoch):
            logits, new_state = model(x, state if partition == "sequential" else None)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            optimizer.step()
            state = tuple(s.detach() for s in new_state)
            steps += 1
    assert trainer.position.step == steps
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("decayed", ["all", "matrices"])
def test_weight_decay_on_matrices_spares_vectors(decayed: str) -> None:
    """With zero gradients an AdamW step is the decay alone: every matrix shrinks by lr x wd; with
    ``matrices`` the vectors (biases, norm gains, mamba's A_log, Δ bias, D) keep their values."""
    config = TrainConfig.of(
        cell="mamba", hidden=8, embed=8, heads=2, lr=0.1, weight_decay=0.5, weight_decay_on=decayed
    )
    model = RNNLM(config.model_config(vocab_size=5))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = make_optimizer(model, config.optim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    vectors = [name for name, p in model.named_parameters() if p.dim() < 2]
    assert any(name.endswith("a_log") for name in vectors) and any("norm" in name for name in vectors)
    for name, p in model.named_parameters():
        spared = decayed == "matrices" and name in vectors
        torch.testing.assert_close(p.detach(), before[name] * (1.0 if spared else 0.95), msg=name)


def test_resume_after_a_mid_epoch_stop_is_exact(corpus_file: Path, tmp_path: Path) -> None:
    assert train(corpus_file, tmp_path / "whole", "--epochs", "2") == 0
    assert train(corpus_file, tmp_path / "split", "--epochs", "2", "--max-steps", "23") == 0
    stopped = load_checkpoint(tmp_path / "split" / "last.pt", "lm")
    assert stopped["step"] == 23 and stopped["position"]["batch"] > 0 and stopped["carried_state"]
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--max-steps", "0"]) == 0
    assert_same_weights(tmp_path / "whole", tmp_path / "split")
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == sorted(set(steps))  # records after the checkpoint were not logged twice


def test_resume_after_an_epoch_then_more_epochs_is_exact(corpus_file: Path, tmp_path: Path) -> None:
    """Dropout on (the global RNG state is checkpointed) and the plateau lr schedule (its state too)."""
    assert train(corpus_file, tmp_path / "whole", "--epochs", "3", "--dropout", "0.3") == 0
    assert train(corpus_file, tmp_path / "split", "--epochs", "1", "--dropout", "0.3") == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--epochs", "3"]) == 0
    assert_same_weights(tmp_path / "whole", tmp_path / "split")


def test_ctrl_c_mid_epoch_saves_a_checkpoint_that_resumes_exactly(corpus_file: Path, tmp_path: Path) -> None:
    """SIGINT is honoured between steps: last.pt holds the batch position and the carried state."""
    common = [*TINY_FLAGS, "--partition", "random", "--dropout", "0.2", "--epochs", "2"]
    assert main(["train", "--corpus", str(corpus_file), "--out", str(tmp_path / "whole"), *common]) == 0

    def interrupt_at_step_31(trainer: Trainer) -> None:
        if trainer.position.step == 31:
            os.kill(os.getpid(), signal.SIGINT)

    parser_flags = dict(
        corpus=str(corpus_file),
        hidden=16,
        embed=8,
        layers=1,
        batch_size=4,
        bptt=16,
        threads=1,
        progress=False,
        checkpoint_every=0,
        log_every=5,
        partition="random",
        dropout=0.2,
        epochs=2,
    )
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = start_run(TrainConfig.of(**parser_flags), tmp_path / "split", on_step=interrupt_at_step_31)
    assert trainer.fit().reason == "interrupted"
    # the handlers installed before are back, whatever they were (SIG_IGN when the suite runs detached)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert load_checkpoint(tmp_path / "split" / "last.pt", "lm")["step"] == 31
    assert resume_run(tmp_path / "split", {}).fit().reason == "completed"
    assert_same_weights(tmp_path / "whole", tmp_path / "split")


def test_run_directory_layout_and_metrics(tiny_run: Path) -> None:
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "tokenizer.json", "best.pt", "last.pt", "metrics.jsonl", "metrics.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["train"]["hidden"] == 32 and config["model"]["vocab_size"] > 20
    records = read_metrics(tiny_run / "metrics.jsonl")
    valid = [r for r in records if r["split"] == "valid"]
    assert len(valid) == 3 and all(r["ppl"] > 1 for r in valid)
    assert all(r["tokens_per_s"] > 0 for r in records if r["split"] == "train")
    assert valid[-1]["loss"] < valid[0]["loss"]  # it learns
    payload = load_checkpoint(tiny_run / "best.pt", "lm")
    for key in (
        "model_config",
        "train_config",
        "tokenizer",
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "epoch",
        "step",
        "position",
        "best",
    ):
        assert key in payload
    assert payload["best"]["valid_loss"] == min(r["loss"] for r in valid)
    with Image.open(tiny_run / "metrics.png") as png:  # the y labels lm.metrics.plot_metrics wrote
        assert png.text["Description"] == "loss (nats/token) | perplexity"


def test_early_stopping_and_time_budget(corpus_file: Path, tmp_path: Path, capsys) -> None:
    early = ["--epochs", "9", "--patience", "2", "--min-delta", "100"]
    assert train(corpus_file, tmp_path / "early", *early) == 0
    assert "early_stopping: epoch 3," in capsys.readouterr().err  # the first validation sets the bar
    assert train(corpus_file, tmp_path / "budget", "--epochs", "9", "--max-minutes", "0.00001") == 0
    assert "time_budget: epoch 0, step 1," in capsys.readouterr().err
    assert (tmp_path / "budget" / "best.pt").exists()  # validated on the way out


def test_toml_config_and_flags_override_it(corpus_file: Path, tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'[train]\ncorpus = "{corpus_file}"\ncell = "lstm"\nhidden = 24\nlr = 1\n'
        'optimizer = "sgd"\nepochs = 1\n'
    )
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "run"), *TINY_FLAGS]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (config["cell"], config["hidden"], config["lr"], config["optimizer"]) == ("lstm", 16, 1.0, "sgd")


def test_toml_sections_per_concept(corpus_file: Path, tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'[data]\ncorpus = "{corpus_file}"\nbptt = 16\nbatch_size = 4\n[model]\nhidden = 24\n'
        'embed = 8\nlayers = 1\n[optim]\nlr_schedule = "constant"\n[run]\nepochs = 1\n'
        "progress = false\nthreads = 1\n"
    )
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "run"), "--hidden", "16"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    given = (config["hidden"], config["bptt"], config["lr_schedule"], config["epochs"])
    assert given == (16, 16, "constant", 1)


def test_resume_refuses_a_change_that_shapes_the_run_and_names_it(
    tiny_run: Path, tmp_path: Path, capsys
) -> None:
    assert main(["train", "--out", str(tiny_run), "--resume", "--hidden", "64"]) == 2
    assert "--resume cannot change --hidden (the run has 32" in capsys.readouterr().err
    assert main(["train", "--out", str(tiny_run), "--resume", "--lr", "0.5"]) == 2
    assert "--resume cannot change --lr" in capsys.readouterr().err


def test_grad_norm_and_lr_are_logged_with_the_loss_and_tensorboard_events(
    corpus_file: Path, tmp_path: Path
) -> None:
    assert train(corpus_file, tmp_path / "run", "--epochs", "1", "--tensorboard", "--clip", "0.5") == 0
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert records and all(r["grad_norm"] > 0 and r["lr"] > 0 for r in records)
    # the norm before clipping: clipping to 0.5 does not cap the logged figure
    assert max(r["grad_norm"] for r in records) > 0.5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/grad_norm", "train/lr", "valid/loss"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in records]
