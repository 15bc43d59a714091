"""Vocabulary: a bijection between tokens and integer ids, built by frequency."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

UNK = "<unk>"
PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"


class Vocab:
    """Tokens in id order: reserved tokens first, then by descending frequency (ties by token).

    Unknown tokens encode to ``<unk>``, which every vocabulary holds.
    """

    def __init__(self, tokens: Sequence[str], reserved: Sequence[str] = (UNK,)) -> None:
        if UNK not in reserved:
            raise ValueError(f"reserved tokens must include {UNK!r}")
        if list(tokens[: len(reserved)]) != list(reserved):
            raise ValueError("the reserved tokens must come first")
        if len(set(tokens)) != len(tokens):
            raise ValueError("duplicate tokens in vocabulary")
        self.itos: list[str] = list(tokens)
        self.reserved: tuple[str, ...] = tuple(reserved)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        self.unk_id = self.stoi[UNK]

    @classmethod
    def build(
        cls,
        tokens: Iterable[str],
        min_freq: int = 1,
        reserved: Sequence[str] = (UNK,),
        max_size: int | None = None,
    ) -> Vocab:
        counts = Counter(tokens)
        ranked = sorted(
            (t for t, n in counts.items() if n >= min_freq and t not in reserved),
            key=lambda t: (-counts[t], t),
        )
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(reserved))]
        return cls([*reserved, *ranked], reserved)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def id(self, token: str) -> int | None:
        """The id of a reserved or ordinary token, or None when absent."""
        return self.stoi.get(token)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        stoi, unk = self.stoi, self.unk_id
        return [stoi.get(t, unk) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def to_dict(self) -> dict:
        return {"tokens": self.itos, "reserved": list(self.reserved)}

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        return cls(data["tokens"], data["reserved"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
