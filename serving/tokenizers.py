"""Tokenizers: text <-> ids at the level of characters, words or sentencepiece pieces.

Every tokenizer serialises to one JSON document (``to_dict``/``tokenizer_from_dict``), so a
checkpoint or a bundle carries its tokenizer in a single file. Torch-free: the server uses it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from serving.vocab import UNK, Vocab

TOKENIZER_FORMAT = 1


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_ids(self) -> dict[str, int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def piece(self, token_id: int, first: bool) -> str:
        """The text one token adds when it follows ``first=False`` or opens ``first=True`` a text.

        ``"".join(piece(i, k == 0) for k, i in enumerate(ids)) == decode(ids)``: what streaming relies on.
        """
        ...

    def to_dict(self) -> dict: ...


class _VocabTokenizer:
    """What the char and word tokenizers share: a :class:`Vocab` whose reserved tokens are the specials."""

    vocab: Vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_ids(self) -> dict[str, int]:
        return {t: self.vocab.stoi[t] for t in self.vocab.reserved}


class CharTokenizer(_VocabTokenizer):
    """One token per Unicode code point."""

    kind = "char"

    def __init__(self, vocab: Vocab, lowercase: bool = False) -> None:
        self.vocab = vocab
        self.lowercase = lowercase

    @classmethod
    def train(cls, text: str, lowercase: bool = False, min_freq: int = 1) -> CharTokenizer:
        return cls(Vocab.build(text.lower() if lowercase else text, min_freq=min_freq), lowercase)

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(text.lower() if self.lowercase else text)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab.decode(ids))

    def piece(self, token_id: int, first: bool) -> str:
        return self.vocab.itos[token_id]

    def to_dict(self) -> dict:
        return {
            "format": TOKENIZER_FORMAT,
            "kind": self.kind,
            "lowercase": self.lowercase,
            "vocab": self.vocab.to_dict(),
        }


_WORDS_AND_PUNCT = re.compile(r"\n|\w+(?:'\w+)?|[^\w\s]")
_WORDS_ONLY = re.compile(r"\n|\w+(?:'\w+)?")


class WordTokenizer(_VocabTokenizer):
    """Words (optionally with punctuation marks as tokens of their own) and line breaks.

    Decoding joins tokens with single spaces, so ``encode(decode(ids)) == ids`` for in-vocabulary ids,
    while the original spacing is not kept.
    """

    kind = "word"

    def __init__(self, vocab: Vocab, lowercase: bool = True, keep_punct: bool = True) -> None:
        self.vocab = vocab
        self.lowercase = lowercase
        self.keep_punct = keep_punct
        self._pattern = _WORDS_AND_PUNCT if keep_punct else _WORDS_ONLY

    def split(self, text: str) -> list[str]:
        return self._pattern.findall(text.lower() if self.lowercase else text)

    @classmethod
    def train(
        cls,
        text: str,
        lowercase: bool = True,
        keep_punct: bool = True,
        min_freq: int = 1,
        max_size: int | None = None,
    ) -> WordTokenizer:
        splitter = cls(Vocab([UNK]), lowercase, keep_punct)
        vocab = Vocab.build(splitter.split(text), min_freq=min_freq, max_size=max_size)
        return cls(vocab, lowercase, keep_punct)

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(self.split(text))

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.piece(i, k == 0) for k, i in enumerate(ids))

    def piece(self, token_id: int, first: bool) -> str:
        token = self.vocab.itos[token_id]
        return token if first or token == "\n" else " " + token

    def to_dict(self) -> dict:
        return {
            "format": TOKENIZER_FORMAT,
            "kind": self.kind,
            "lowercase": self.lowercase,
            "keep_punct": self.keep_punct,
            "vocab": self.vocab.to_dict(),
        }


class SentencePieceTokenizer:
    """A sentencepiece model (unigram or BPE), carried inside the JSON document as base64."""

    kind = "spm"

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._pieces = [
            self.sp.id_to_piece(i).replace("\u2581", " ") for i in range(self.sp.get_piece_size())
        ]

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        vocab_size: int = 4000,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        seed_sentencepiece_size: int = 1_000_000,
    ) -> SentencePieceTokenizer:
        """Trains with fixed special ids: pad 0, unk 1, bos 2, eos 3."""
        import io

        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            hard_vocab_limit=False,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=1,
            minloglevel=2,
        )
        return cls(buffer.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def special_ids(self) -> dict[str, int]:
        ids = {
            "<pad>": self.sp.pad_id(),
            "<unk>": self.sp.unk_id(),
            "<bos>": self.sp.bos_id(),
            "<eos>": self.sp.eos_id(),
        }
        return {k: v for k, v in ids.items() if v >= 0}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def piece(self, token_id: int, first: bool) -> str:
        text = self._pieces[token_id]
        if self.sp.is_control(token_id):
            return ""
        return text.lstrip(" ") if first else text

    def to_dict(self) -> dict:
        return {
            "format": TOKENIZER_FORMAT,
            "kind": self.kind,
            "model": base64.b64encode(self.model_proto).decode("ascii"),
        }


def tokenizer_from_dict(data: dict) -> CharTokenizer | WordTokenizer | SentencePieceTokenizer:
    if data.get("format") != TOKENIZER_FORMAT:
        raise ValueError(f"unsupported tokenizer format {data.get('format')!r}")
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(Vocab.from_dict(data["vocab"]), data["lowercase"])
    if kind == "word":
        return WordTokenizer(Vocab.from_dict(data["vocab"]), data["lowercase"], data["keep_punct"])
    if kind == "spm":
        return SentencePieceTokenizer(base64.b64decode(data["model"]))
    raise ValueError(f"unknown tokenizer kind {kind!r}")


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_dict(), ensure_ascii=False), encoding="utf-8")


def load_tokenizer(path: str | Path) -> CharTokenizer | WordTokenizer | SentencePieceTokenizer:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return tokenizer_from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid rnnlab tokenizer ({exc})") from exc
