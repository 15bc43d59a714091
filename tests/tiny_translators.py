"""A tiny trained translator (run directory + exported bundle) for the export, translator, batch-job and
translation-service tests. Built once per test process (~15 s on one thread), then copied per test.

    run_dir, bundle = tiny_translator(tmp_path_factory)     # read-only: copy before corrupting
    sources = tiny_sources(40)                               # English lines of the training file
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm.datasets import fetch

_PAIRS = 1200
_CACHE: dict[str, tuple[Path, Path]] = {}


def pairs_lines(count: int = _PAIRS) -> list[str]:
    return fetch("fra-eng").read_text(encoding="utf-8").splitlines()[:count]


def tiny_sources(count: int, start: int = 0) -> list[str]:
    """English sides of real Tatoeba pairs (from the training file: the model says something sensible)."""
    return [line.split("\t")[0] for line in pairs_lines()[start:start + count]]


def make_tiny_translator(base: Path, bundle: Path, attention: str = "additive", **config: Any) -> Path:
    """Trains a GRU translator for 300 steps on 1200 pairs in ``base`` (run dir ``base/run``) and exports
    it to ``bundle`` -> the run directory. Seeded (TrainConfig.seed); ``config`` overrides TrainConfig
    fields."""
    from seq2seq.export import export_seq2seq
    from seq2seq.run import load_run
    from seq2seq.train import TrainConfig, train

    base.mkdir(parents=True, exist_ok=True)
    pairs = base / "pairs.txt"
    pairs.write_text("\n".join(pairs_lines()) + "\n", encoding="utf-8")
    fields = {"valid_fraction": 0.1, "test_fraction": 0.1, "spm_vocab": 300, "embed": 32, "enc_hidden": 32,
              "dec_hidden": 32, "attn_dim": 16, "dropout": 0.1, "batch_tokens": 600, "warmup_steps": 20,
              "schedule": "constant", "lr": 5e-3, "max_steps": 300, "epochs": 1000, "max_minutes": None,
              "valid_bleu_sentences": 20, "checkpoint_every": 0, "label_smoothing": 0.1, "patience": 1000,
              "attention": attention, **config}
    train_config = TrainConfig.of(dataset=str(pairs), **fields)
    run_dir = base / "run"
    train(train_config, run_dir, show_progress=False)
    run = load_run(run_dir, "last")
    # the pairs file is a temporary copy: the bundle records where its pairs came from instead
    recorded = {**run.train_config, "dataset": f"fra-eng, first {_PAIRS} pairs"}
    export_seq2seq(run.model, run.src_tokenizer, run.tgt_tokenizer, bundle, sentences=tiny_sources(24),
                   train_config=recorded)
    return run_dir


def tiny_translator(tmp_path_factory, attention: str = "additive") -> tuple[Path, Path]:
    """-> (run directory, bundle directory) of a GRU translator trained for 300 steps on 1200 pairs."""
    if attention not in _CACHE:
        base = tmp_path_factory.mktemp(f"tiny-mt-{attention}")
        bundle = base / "bundles" / "tiny-mt"
        _CACHE[attention] = (make_tiny_translator(base, bundle, attention), bundle)
    return _CACHE[attention]
