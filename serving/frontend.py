"""Text in, text out, around any batch search (torch-free): the translators' shared front end.

``TextTranslator`` holds what the torch translator (``seq2seq.decode.Translator``) and the onnxruntime
one (``serving.translator.Seq2SeqRuntime``) have in common: source normalisation and sentencepiece,
per-line failures (an empty or over-long line fails alone), length-sorted batches (a fixed number of
sentences, or a token budget), results back in input order, detokenised n-best lists. Subclasses only
implement ``search_batch``: one padded batch of source ids -> hypotheses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving.search import Hypothesis, SearchParams
from serving.tokenizers import SentencePieceTokenizer

BOS, EOS, UNK = "<bos>", "<eos>", "<unk>"


@dataclass
class Translation:
    text: str
    """The best hypothesis, detokenised ("" when the line failed)."""
    n_best: list[tuple[str, float]]
    """(text, normalised score) best first; empty when the line failed."""
    error: str | None = None
    warning: str | None = None
    """Set when the line was translated despite a problem (characters never seen in training)."""
    hypotheses: tuple[Hypothesis, ...] = ()
    source_tokens: int = 0
    """Source length in sentencepiece tokens, EOS not counted (0 when the line failed)."""


def pad_batch(sources: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """-> ids (B, max len) int64 padded with ``pad``, lengths (B,) int64."""
    lengths = np.array([len(s) for s in sources], dtype=np.int64)
    ids = np.full((len(sources), int(lengths.max())), pad, dtype=np.int64)
    for row, seq in enumerate(sources):
        ids[row, : len(seq)] = seq
    return ids, lengths


def token_batches(order: list[int], lengths: list[int], batch_tokens: int) -> Iterator[list[int]]:
    """Cuts length-sorted items into batches whose size x longest length stays within the budget
    (a single longer item still gets a batch of its own)."""
    batch: list[int] = []
    for index, length in zip(order, lengths, strict=True):
        if batch and (len(batch) + 1) * length > batch_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def sorted_batches(
    sources: list[list[int]],
    batch_size: int = 64,
    batch_tokens: int | None = None,
) -> Iterator[list[int]]:
    """Indices of ``sources`` sorted by length (less padding), cut into batches of ``batch_size``
    sentences or, with ``batch_tokens``, of at most that many sentences x longest source."""
    order = sorted(range(len(sources)), key=lambda i: (len(sources[i]), i))
    if batch_tokens is not None:
        yield from token_batches(order, [len(sources[i]) for i in order], batch_tokens)
        return
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class TextTranslator(ABC):
    """Tokenisation, length checks, batching and detokenisation around ``search_batch``."""

    def __init__(
        self,
        src_tokenizer: SentencePieceTokenizer,
        tgt_tokenizer: SentencePieceTokenizer,
        max_src_tokens: int,
        normalize_fn: Callable[[str], str] | None = None,
    ) -> None:
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.max_src_tokens = max_src_tokens
        self.normalize_fn = normalize_fn
        self.bos, self.eos = tgt_tokenizer.special_ids[BOS], tgt_tokenizer.special_ids[EOS]
        self.src_eos, self.unk = src_tokenizer.special_ids[EOS], src_tokenizer.special_ids[UNK]

    @abstractmethod
    def search_batch(self, sources: list[list[int]], params: SearchParams) -> list[list[Hypothesis]]:
        """One batch of source id lists (EOS included, non-empty) -> ``params.n_best`` hypotheses each."""

    def search(
        self,
        sources: list[list[int]],
        params: SearchParams,
        batch_size: int = 64,
        batch_tokens: int | None = None,
        workers: int = 1,
    ) -> list[list[Hypothesis]]:
        """Any number of sources in length-sorted batches (``sorted_batches``); input order out.

        ``workers`` > 1 searches that many batches at once, in threads: both runtimes release the GIL
        in their matrix work, so on a multi-core machine this scales where a runtime's own intra-op
        threads hardly do (steps of a few hundred rows are too small to split). The batches are the
        same whatever the number of workers, and so are the results.
        """
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        batches = list(sorted_batches(sources, batch_size, batch_tokens))

        def run(batch: list[int]) -> list[list[Hypothesis]]:
            return self.search_batch([sources[i] for i in batch], params)

        results: list[list[Hypothesis]] = [[] for _ in sources]
        if workers > 1 and len(batches) > 1:
            with ThreadPoolExecutor(min(workers, len(batches)), thread_name_prefix="search") as pool:
                # map cancels the batches not started yet when one fails or on Ctrl-C
                found = list(pool.map(run, batches))
        else:
            found = [run(batch) for batch in batches]
        for batch, hyps_of_batch in zip(batches, found, strict=True):
            for index, hyps in zip(batch, hyps_of_batch, strict=True):
                results[index] = hyps
        return results

    def encode_source(self, text: str) -> tuple[list[int], str | None]:
        """Text -> (ids + EOS, warning or None); raises ValueError (one line) for an untranslatable line."""
        if self.normalize_fn is not None:
            text = self.normalize_fn(text)
        if not text:
            raise ValueError("empty line")
        ids = self.src_tokenizer.encode(text)
        if len(ids) > self.max_src_tokens:
            raise ValueError(f"too long: {len(ids)} tokens (limit {self.max_src_tokens})")
        warning = None
        if self.unk in ids:
            pieces = self.src_tokenizer.sp.encode(text, out_type=str)
            unknown = [p for p, i in zip(pieces, ids, strict=True) if i == self.unk]
            warning = f"unknown to the model, translated as <unk>: {' '.join(unknown)!r}"
        return [*ids, self.src_eos], warning

    def finish(self, hyps: list[Hypothesis], source_tokens: int, warning: str | None = None) -> Translation:
        """Hypotheses of one sentence -> its Translation (detokenised n-best)."""
        n_best = [(self.tgt_tokenizer.decode(list(h.tokens)), h.normalized) for h in hyps]
        return Translation(
            n_best[0][0], n_best, warning=warning, hypotheses=tuple(hyps), source_tokens=source_tokens
        )

    def translate(
        self,
        texts: list[str],
        params: SearchParams | None = None,
        batch_size: int = 64,
        batch_tokens: int | None = None,
        workers: int = 1,
    ) -> list[Translation]:
        """One Translation per text, failures included (``error`` set, empty text); greedy by default.
        ``workers``: batches searched at once (``search``)."""
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
        found = self.search(sources, params or SearchParams(), batch_size, batch_tokens, workers)
        for i, ids, hyps, warning in zip(good, sources, found, warnings, strict=True):
            results[i] = self.finish(hyps, len(ids) - 1, warning)
        return results  # type: ignore[return-value]
