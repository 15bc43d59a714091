"""Translating text with the PyTorch model: batching, the torch step decoder, greedy and beam search.

The search itself lives in ``seq2seq.search`` (numpy); here the model is wrapped as a ``StepDecoder``.
Sentences are decoded in batches of similar length (less padding), and the results are put back in
input order; a sentence's result does not depend on its batch (see ``seq2seq.search``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lm.tokenizers import SentencePieceTokenizer
from seq2seq.model import Seq2Seq
from seq2seq.search import Hypothesis, SearchParams, beam_search, greedy_search

BOS, EOS = "<bos>", "<eos>"


class TorchStepDecoder:
    """``StepDecoder`` over ``Seq2Seq.decode_step``: state (L,N,H) tensor, memory (enc_out, mask)."""

    def __init__(self, model: Seq2Seq) -> None:
        self.model = model

    def step(self, prev: np.ndarray, state: Tensor, memory: tuple[Tensor, Tensor]
             ) -> tuple[np.ndarray, Tensor]:
        with torch.inference_mode():
            logits, state = self.model.decode_step(torch.from_numpy(prev), state, *memory)
        return logits.numpy(), state

    def select(self, state: Tensor, memory: tuple[Tensor, Tensor], rows: np.ndarray
               ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        index = torch.from_numpy(rows)
        enc_out, mask = memory
        return state.index_select(1, index), (enc_out.index_select(0, index), mask.index_select(0, index))


def pad_batch(sequences: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """-> ids (B, max len) int64 padded with ``pad``, lengths (B,) int64."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    ids = torch.full((len(sequences), int(lengths.max())), pad, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
    return ids, lengths


@torch.inference_mode()
def search_batch(model: Seq2Seq, sources: list[list[int]], params: SearchParams, bos: int, eos: int,
                 ) -> list[list[Hypothesis]]:
    """One batch of source id lists (EOS included, non-empty) -> n-best hypotheses per sentence."""
    src, src_len = pad_batch(sources, model.config.pad_id)
    enc_out, mask, state = model.encode(src, src_len)
    decoder, lens = TorchStepDecoder(model), src_len.numpy()
    if params.beam == 1:
        return [[hyp] for hyp in greedy_search(decoder, state, (enc_out, mask), lens, bos, eos, params)]
    return beam_search(decoder, state, (enc_out, mask), lens, bos, eos, params)


def search(model: Seq2Seq, sources: list[list[int]], params: SearchParams, bos: int, eos: int,
           batch_size: int = 64) -> list[list[Hypothesis]]:
    """Any number of sources, decoded in length-sorted batches; results in input order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: (len(sources[i]), i))
    results: list[list[Hypothesis]] = [[] for _ in sources]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        hyps = search_batch(model, [sources[i] for i in chunk], params, bos, eos)
        for index, sentence_hyps in zip(chunk, hyps, strict=True):
            results[index] = sentence_hyps
    model.train(was_training)
    return results


@dataclass
class Translation:
    text: str
    """The best hypothesis, detokenised ("" when the line failed)."""
    n_best: list[tuple[str, float]]
    """(text, normalised score) best first; empty when the line failed."""
    error: str | None = None
    warning: str | None = None
    """Set when the line was translated despite a problem (characters never seen in training)."""


class Translator:
    """Text in, text out: tokenisation, length checks, search, detokenisation."""

    def __init__(self, model: Seq2Seq, src_tok: SentencePieceTokenizer, tgt_tok: SentencePieceTokenizer,
                 max_src_tokens: int = 100, normalize_fn=None) -> None:
        self.model, self.src_tok, self.tgt_tok = model, src_tok, tgt_tok
        self.max_src_tokens = max_src_tokens
        self.normalize_fn = normalize_fn
        self.bos, self.eos = tgt_tok.special_ids[BOS], tgt_tok.special_ids[EOS]
        self.src_eos = src_tok.special_ids[EOS]
        self.unk = src_tok.special_ids["<unk>"]

    def encode_source(self, text: str) -> tuple[list[int], str | None]:
        """Text -> (normalised ids + EOS, warning or None); raises ValueError (one line) for a bad line."""
        if self.normalize_fn is not None:
            text = self.normalize_fn(text)
        if not text:
            raise ValueError("empty line")
        pieces = self.src_tok.sp.encode(text, out_type=str)
        ids = self.src_tok.encode(text)
        if len(ids) > self.max_src_tokens:
            raise ValueError(f"too long: {len(ids)} tokens (limit {self.max_src_tokens})")
        unknown = [piece for piece, i in zip(pieces, ids, strict=True) if i == self.unk]
        warning = f"unknown to the model, translated as <unk>: {' '.join(unknown)!r}" if unknown else None
        return [*ids, self.src_eos], warning

    def translate(self, texts: list[str], params: SearchParams | None = None, batch_size: int = 64,
                  ) -> list[Translation]:
        """One Translation per text, failures included (``error`` set, empty text); greedy by default."""
        params = params or SearchParams()
        results: list[Translation | None] = [None] * len(texts)
        good, sources, warnings = [], [], []
        for i, text in enumerate(texts):
            try:
                ids, warning = self.encode_source(text)
            except ValueError as exc:
                results[i] = Translation("", [], str(exc))
                continue
            good.append(i)
            sources.append(ids)
            warnings.append(warning)
        found = search(self.model, sources, params, self.bos, self.eos, batch_size)
        for i, hyps, warning in zip(good, found, warnings, strict=True):
            n_best = [(self.tgt_tok.decode(list(h.tokens)), h.normalized) for h in hyps]
            results[i] = Translation(n_best[0][0], n_best, warning=warning)
        return results  # type: ignore[return-value]
