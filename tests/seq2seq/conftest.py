"""Shared fixtures: a few hundred real Tatoeba pairs, and one tiny translator trained on them once."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm.datasets import fetch
from seq2seq.train import TrainConfig, train


def _tiny_config(pairs_file: Path, **overrides) -> TrainConfig:
    """A model small enough to train in seconds on one thread."""
    values = dict(
        dataset=str(pairs_file),
        valid_fraction=0.1,
        test_fraction=0.1,
        spm_vocab=300,
        embed=32,
        enc_hidden=32,
        dec_hidden=32,
        attn_dim=16,
        dropout=0.1,
        batch_tokens=600,
        warmup_steps=20,
        schedule="constant",
        lr=3e-3,
        max_steps=150,
        epochs=1000,
        max_minutes=None,
        valid_bleu_sentences=20,
        checkpoint_every=0,
        label_smoothing=0.1,
        patience=1000,
    )
    values.update(overrides)
    return TrainConfig.of(**values)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """The first 1200 lines of fra.txt: short sentences, many with several translations."""
    lines = fetch("fra-eng").read_text(encoding="utf-8").splitlines()[:1200]
    path = tmp_path_factory.mktemp("mt-data") / "pairs.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_config(pairs_file):
    """tiny_config(**overrides) -> a TrainConfig over the pairs file."""
    return lambda **overrides: _tiny_config(pairs_file, **overrides)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, pairs_file) -> Path:
    run_dir = tmp_path_factory.mktemp("mt-run") / "run"
    train(_tiny_config(pairs_file, max_steps=400), run_dir, show_progress=False)
    return run_dir
