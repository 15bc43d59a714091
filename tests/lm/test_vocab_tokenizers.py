"""Vocabularies and the three tokenizers: ordering, reserved tokens, round trips, streaming pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)
from serving.vocab import BOS, EOS, PAD, UNK, Vocab

TEXT = (
    "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite\n"
    "matter to us. His grey eyes shone and twinkled, and his usually pale face was flushed and\n"
    "animated. The fire burned brightly, and the soft radiance of the incandescent lights in the\n"
    "lilies of silver caught the bubbles that flashed and passed in our glasses.\n"
) * 8


@pytest.fixture(scope="module")
def spm_tokenizer() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(TEXT.splitlines(), vocab_size=120, model_type="unigram")


def test_vocab_orders_reserved_first_then_by_frequency_then_alphabetically() -> None:
    vocab = Vocab.build("banana band", reserved=(UNK, PAD))
    assert vocab.itos[:2] == [UNK, PAD]
    assert vocab.itos[2:] == ["a", "n", "b", " ", "d"]  # a:4 n:3 b:2, then ties " " < "d"
    assert vocab.encode("bad") == [4, 2, 6]


def test_vocab_min_freq_and_max_size_send_rare_tokens_to_unk() -> None:
    vocab = Vocab.build(["x", "x", "x", "y", "y", "z"], min_freq=2)
    assert vocab.itos == [UNK, "x", "y"] and "z" not in vocab
    assert vocab.encode(["z", "x", "never"]) == [vocab.unk_id, 1, vocab.unk_id]
    assert Vocab.build(["x", "x", "y", "z"], max_size=2).itos == [UNK, "x"]


def test_vocab_rejects_inconsistent_token_lists() -> None:
    with pytest.raises(ValueError, match="<unk>"):
        Vocab(["a"], reserved=())
    with pytest.raises(ValueError, match="duplicate"):
        Vocab([UNK, "a", "a"])
    with pytest.raises(ValueError, match="first"):
        Vocab(["a", UNK])


def test_vocab_json_round_trip(tmp_path: Path) -> None:
    vocab = Vocab.build("hello world", reserved=(UNK, PAD, BOS, EOS))
    vocab.save(tmp_path / "v.json")
    loaded = Vocab.load(tmp_path / "v.json")
    assert loaded.itos == vocab.itos and loaded.reserved == vocab.reserved
    assert loaded.id(BOS) == 2 and loaded.id("never") is None


def _tokenizers(spm: SentencePieceTokenizer) -> list:
    return [CharTokenizer.train(TEXT), WordTokenizer.train(TEXT, lowercase=False), spm]


def test_in_vocabulary_text_round_trips_exactly(spm_tokenizer: SentencePieceTokenizer) -> None:
    char, word, spm = _tokenizers(spm_tokenizer)
    line = "The fire burned brightly, and the soft radiance of the lights"
    assert char.decode(char.encode(TEXT)) == TEXT
    assert spm.decode(spm.encode(line)) == line
    words = word.encode(line)
    assert word.vocab.unk_id not in words
    assert word.decode(words) == "The fire burned brightly , and the soft radiance of the lights"
    assert word.encode(word.decode(words)) == words  # ids survive; spacing is normalised


def test_unknown_symbols_map_to_unk(spm_tokenizer: SentencePieceTokenizer) -> None:
    char, word, spm = _tokenizers(spm_tokenizer)
    assert char.encode("Tq\u00e9") == [char.vocab.stoi["T"], char.vocab.unk_id, char.vocab.unk_id]
    assert word.encode("The zeppelin") == [word.vocab.stoi["The"], word.vocab.unk_id]
    assert spm.special_ids == {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    assert 1 in spm.encode("\u4e2d")  # a character the model never saw
    assert char.special_ids == {UNK: 0}


def test_pieces_join_to_the_decoded_text(spm_tokenizer: SentencePieceTokenizer) -> None:
    line = "His grey eyes shone,\nand twinkled."
    for tokenizer in _tokenizers(spm_tokenizer):
        ids = tokenizer.encode(line)
        streamed = "".join(tokenizer.piece(i, first=k == 0) for k, i in enumerate(ids))
        assert streamed == tokenizer.decode(ids), tokenizer.kind


def test_tokenizers_round_trip_through_one_json_file(
    tmp_path: Path, spm_tokenizer: SentencePieceTokenizer
) -> None:
    for tokenizer in _tokenizers(spm_tokenizer):
        path = tmp_path / f"{tokenizer.kind}.json"
        save_tokenizer(tokenizer, path)
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tokenizer)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.encode(TEXT[:300]) == tokenizer.encode(TEXT[:300])
        assert json.loads(path.read_text())["kind"] == tokenizer.kind
    lower = CharTokenizer.train(TEXT, lowercase=True)
    assert tokenizer_from_dict(lower.to_dict()).encode("THE") == lower.encode("the")


def test_broken_tokenizer_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"format": 99, "kind": "char"}')
    with pytest.raises(ValueError, match=r"t\.json: not a valid rnnlab tokenizer"):
        load_tokenizer(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"t\.json"):
        load_tokenizer(path)
