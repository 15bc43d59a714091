"""Fixtures for the LM training, evaluation, generation and CLI tests: a tiny corpus and a tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm.cli import main
from tests.tiny_bundles import TINY_TEXT

# A model small enough that an epoch over the tiny corpus takes a few hundredths of a second.
TINY_FLAGS = [
    "--hidden",
    "16",
    "--embed",
    "8",
    "--layers",
    "1",
    "--batch-size",
    "4",
    "--bptt",
    "16",
    "--threads",
    "1",
    "--no-progress",
    "--checkpoint-every",
    "0",
    "--log-every",
    "5",
]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 5,000 characters of The Time Machine's opening, as a local UTF-8 corpus file."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(TINY_TEXT * 6, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A char GRU trained for 3 epochs on the tiny corpus (shared read-only by the tests)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(
        [
            "train",
            "--corpus",
            str(corpus_file),
            "--out",
            str(out),
            "--epochs",
            "3",
            "--hidden",
            "32",
            *TINY_FLAGS[2:],
        ]
    )
    assert code == 0
    return out
