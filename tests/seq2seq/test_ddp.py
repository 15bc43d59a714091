"""Distributed translator training on torchrun (2 gloo processes on loopback, 1 thread each): each
length-bucketed global batch is split by rank, the loss weighted by tokens, so the weights equal one
process's on the same global batches; the run resumes with another process count."""

from __future__ import annotations

import shutil
from pathlib import Path

from seq2seq.train import resume_run, start_run
from tests import torchrun

TOLERANCE = 1e-5


def test_two_processes_train_the_weights_of_one_and_resume_with_one(tmp_path: Path, tiny_config) -> None:
    # dropout 0: the ranks draw their own masks; a budget of 24 tokens mixes batches of one pair (the
    # second rank then runs with weight 0) with batches of several pairs split between the ranks
    settings = dict(dropout=0.0, batch_tokens=24, eval_every=10, progress=False)
    config = tiny_config(max_steps=20, **settings)
    one, two = tmp_path / "one", tmp_path / "two"
    trainer = start_run(config, one)
    sizes = [len(b) for b in trainer.family.batches(0, 0)[:20]]
    assert min(sizes) == 1 and max(sizes) >= 3, sizes
    trainer.fit()

    toml = torchrun.write_toml(config.to_sections(), tmp_path / "config.toml")
    proc = torchrun.run(torchrun.command("seq2seq.cli", "train", "--config", str(toml), "--out", str(two)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torchrun.max_weight_difference(one, two, "mt") < TOLERANCE
    assert torchrun.checkpoint(two, "mt")["world_size"] == 2
    # rank 0's validation is the single process's
    assert (two / "tgt_tokenizer.json").read_text() == (one / "tgt_tokenizer.json").read_text()

    # 2 processes -> 1, against one process trained 30 steps without a stop
    resumed = tmp_path / "two-then-one"
    shutil.copytree(two, resumed)
    resume_run(resumed, {"max_steps": 30}).fit()
    longer = tmp_path / "one30"
    start_run(
        tiny_config(dropout=0.0, batch_tokens=24, max_steps=30, eval_every=10, progress=False), longer
    ).fit()
    assert torchrun.max_weight_difference(longer, resumed, "mt") < TOLERANCE
