"""Parallel data: read Tatoeba pairs, normalise, filter, split by a hash of the English sentence.

The split key is always the English sentence, whichever the translation direction, so an English
sentence and all its translations sit in exactly one split. For fr→en the source side is French:
training pairs whose French sentence also occurs in valid or test are dropped, so that no *source*
sentence is in two splits in either direction. Test and valid sources are grouped, with every
translation of a source as its references (multi-reference BLEU). Torch-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from serving.text import normalize

LANGS = ("en", "fr")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Pair:
    en: str
    fr: str

    def side(self, lang: str) -> str:
        return self.en if lang == "en" else self.fr


def _data(default: object, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DataConfig:
    """Which pairs, which direction, and how they are split."""

    dataset: str = _data("fra-eng", "a registered data set name, or a file of english<TAB>french lines")
    src: str = _data("en", "source language", LANGS)
    tgt: str = _data("fr", "target language", LANGS)
    lowercase: bool = _data(False, "lowercase both sides")
    max_words: int = _data(25, "pairs with more words than this on either side are dropped (all splits)")
    valid_fraction: float = _data(0.02, "share of English sentences (by hash) held out for validation")
    test_fraction: float = _data(0.03, "share of English sentences (by hash) held out for the test split")

    def __post_init__(self) -> None:
        if {self.src, self.tgt} != set(LANGS):
            raise ValueError(f"--src/--tgt must be en and fr in either order, not {self.src}->{self.tgt}")
        if self.max_words < 1:
            raise ValueError(f"max_words must be positive, not {self.max_words}")
        if min(self.valid_fraction, self.test_fraction) < 0 or self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid_fraction and test_fraction must be >= 0 and sum to less than 1")


def parse_pairs(lines: Iterable[str], lowercase: bool = False) -> list[Pair]:
    """``english<TAB>french[<TAB>attribution]`` lines -> normalised, de-duplicated pairs in file order.

    Lines without a tab or with an empty side are skipped.
    """
    seen: set[Pair] = set()
    pairs = []
    for line in lines:
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 2:
            continue
        pair = Pair(normalize(fields[0], lowercase), normalize(fields[1], lowercase))
        if pair.en and pair.fr and pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def split_of(english: str, valid_fraction: float = 0.02, test_fraction: float = 0.03) -> str:
    """The split of an English sentence: sha1 of its UTF-8 bytes -> a bucket in [0, 1)."""
    bucket = int.from_bytes(hashlib.sha1(english.encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + valid_fraction:
        return "valid"
    return "train"


@dataclass
class TestGroup:
    """One source sentence with every target sentence it is paired with in its split."""

    source: str
    references: list[str] = field(default_factory=list)


def group_references(pairs: Iterable[Pair], src: str, tgt: str) -> list[TestGroup]:
    """Groups by source sentence, in order of first appearance; references keep file order."""
    groups: dict[str, TestGroup] = {}
    for pair in pairs:
        source = pair.side(src)
        groups.setdefault(source, TestGroup(source)).references.append(pair.side(tgt))
    return list(groups.values())


def too_long(pair: Pair, max_words: int) -> bool:
    return len(pair.en.split(" ")) > max_words or len(pair.fr.split(" ")) > max_words


def split_pairs(pairs: list[Pair], config: DataConfig) -> dict[str, list[Pair]]:
    """Length filter, then the hash split; fr→en also drops training pairs whose French is held out."""
    splits: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    for pair in pairs:
        if not too_long(pair, config.max_words):
            splits[split_of(pair.en, config.valid_fraction, config.test_fraction)].append(pair)
    if config.src == "fr":
        held_out = {p.fr for name in ("valid", "test") for p in splits[name]}
        splits["train"] = [p for p in splits["train"] if p.fr not in held_out]
    return splits


def load_splits(config: DataConfig) -> dict[str, list[Pair]]:
    """Reads the registered data set (cache, mirror, sha256) or a local file of pairs, and splits it.

    Raises lm.datasets.DatasetError (one-line message) when it cannot be read.
    """
    from lm.datasets import read_text

    return split_pairs(parse_pairs(read_text(config.dataset).splitlines(), config.lowercase), config)
