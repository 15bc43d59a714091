"""A tiny trained forecaster (run directory + exported bundle) for the forecast export and serving tests.

``make_tiny_forecaster(run_dir, bundle)`` trains a GRU on the notes' sine-rnn series (003: sin(t) + noise,
windows of 5) for 60 steps through ``rnnlab-ts train`` (~2 s on one thread, seeded) and exports it with
``forecast.export``. tests/bundles/tiny-ts is this bundle (scripts/make_test_bundles.py).
"""

from __future__ import annotations

from pathlib import Path

TINY_TS_TRAIN = (
    "--dataset sine-rnn --model gru --hidden 8 --horizon 3 --max-steps 60 --seed 0 --threads 1 --no-progress"
)


def train_tiny_forecaster(run_dir: Path, flags: str = TINY_TS_TRAIN) -> Path:
    """Trains with ``flags`` (``rnnlab-ts train`` options) into ``run_dir`` -> ``run_dir``."""
    from forecast.cli import main

    if main(["train", *flags.split(), "--out", str(run_dir)]) != 0:
        raise RuntimeError(f"rnnlab-ts train {flags} failed")
    return run_dir


def make_tiny_forecaster(run_dir: Path, bundle: Path, flags: str = TINY_TS_TRAIN) -> Path:
    """Trains (``train_tiny_forecaster``) and exports the best checkpoint to ``bundle`` -> the bundle."""
    from forecast.export import export_run

    return export_run(train_tiny_forecaster(run_dir, flags), bundle)
