"""Corpus splits: train / valid / test parts of a text, cut by character position.

Cutting by position (not by shuffled lines) keeps each part a contiguous text, which is what a
recurrent model reads, and matches the published splits (nanoGPT's tinyshakespeare: the last 10%).
"""

from __future__ import annotations

from pathlib import Path

from lm.datasets import read_text

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT = (0.9, 0.05, 0.05)

CORPUS_SPLITS: dict[str, tuple[float, float, float]] = {
    "timemachine": (0.9, 0.05, 0.05),
    # nanoGPT shakespeare_char: valid = last 10%, no separate test part (test reads valid)
    "tinyshakespeare": (0.9, 0.1, 0.0),
}


def split_text(text: str, fractions: tuple[float, float, float] = DEFAULT_SPLIT) -> tuple[str, str, str]:
    """(train, valid, test): consecutive slices of ``text`` with the given shares of its characters.

    The parts concatenate back to ``text``; boundaries are ``int(len * cumulative fraction)``, as nanoGPT
    cuts tinyshakespeare (``data[:int(n * 0.9)]``).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
    n = len(text)
    first = int(n * fractions[0])
    # an empty share stays empty despite float rounding of the cumulative sum
    second = int(n * (fractions[0] + fractions[1]))
    if fractions[2] == 0:
        second = n
    elif fractions[1] == 0:
        second = first
    return text[:first], text[first:second], text[second:]


def corpus_fractions(name_or_path: str | Path) -> tuple[float, float, float]:
    """The documented split of a registered corpus, DEFAULT_SPLIT for other texts."""
    return CORPUS_SPLITS.get(str(name_or_path), DEFAULT_SPLIT)


def load_splits(
    name_or_path: str | Path, fractions: tuple[float, float, float] | None = None
) -> dict[str, str]:
    """{"train", "valid", "test"} texts of a corpus; an empty test part falls back to valid (nanoGPT)."""
    train, valid, test = split_text(read_text(name_or_path), fractions or corpus_fractions(name_or_path))
    return {"train": train, "valid": valid, "test": test or valid}


def load_split(
    name_or_path: str | Path, split: str, fractions: tuple[float, float, float] | None = None
) -> str:
    """One part ("train", "valid" or "test") of a corpus, as :func:`load_splits` cuts it."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return load_splits(name_or_path, fractions)[split]
