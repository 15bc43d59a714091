"""Translating with the PyTorch model: the torch step decoder behind the shared search and front end.

The search lives in ``serving.search`` (numpy) and the text front end in ``serving.frontend``; here
``Seq2Seq.decode_step`` is wrapped as a ``StepDecoder`` (eager, ``torch.inference_mode``), so the torch
translator and the onnxruntime one (``serving.translator``) take the same decisions by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from seq2seq.model import Seq2Seq
from serving import frontend
from serving.frontend import BOS, EOS, TextTranslator, Translation
from serving.search import Hypothesis, SearchParams, beam_search, greedy_search
from serving.tokenizers import SentencePieceTokenizer

__all__ = [
    "BOS",
    "EOS",
    "TorchStepDecoder",
    "Translation",
    "Translator",
    "pad_batch",
    "search",
    "search_batch",
]

TorchMemory = tuple[Tensor, Tensor]
"""(enc_out (N,M,E'), mask (N,M) bool), as ``Seq2Seq.encode`` returns them."""


class TorchStepDecoder:
    """``StepDecoder`` over ``Seq2Seq.decode_step``: state (L,N,H) tensor, memory (enc_out, mask) with a
    row per sentence; ``decode_step`` wants a row per decoder row, so the memory is repeated R times
    (and the repetition kept until the search hands over another memory)."""

    def __init__(self, model: Seq2Seq) -> None:
        self.model = model
        self._source: TorchMemory | None = None
        self._repeated: TorchMemory = (torch.empty(0), torch.empty(0))

    def step(
        self,
        prev: np.ndarray,
        state: Tensor,
        memory: TorchMemory,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray, Tensor]:
        """prev (N,) int64 -> each row's min(k, V) best log-probabilities (N,k) float64 and ids (N,k)."""
        with torch.inference_mode():
            enc_out, mask = self._rows(memory, len(prev))
            logits, state = self.model.decode_step(torch.from_numpy(prev), state, enc_out, mask)
            # top-k of the logits, then only those k log-probabilities: no (N,V) log-softmax is written
            top, ids = logits.topk(min(k, logits.shape[1]), dim=1)
            log_probs = top - logits.logsumexp(dim=1, keepdim=True)
        return log_probs.numpy().astype(np.float64), ids.numpy(), state

    def _rows(self, memory: TorchMemory, rows: int) -> TorchMemory:
        """The memory (n sentences) repeated for ``rows`` = n * R decoder rows."""
        per_sentence = rows // len(memory[0])
        if per_sentence == 1:
            return memory
        if self._source is not memory or len(self._repeated[0]) != rows:
            enc_out, mask = memory
            self._source = memory
            self._repeated = (
                enc_out.repeat_interleave(per_sentence, dim=0),
                mask.repeat_interleave(per_sentence, dim=0),
            )
        return self._repeated

    def select_state(self, state: Tensor, rows: np.ndarray) -> Tensor:
        return state.index_select(1, torch.from_numpy(rows))

    def select_memory(self, memory: TorchMemory, sentences: np.ndarray) -> TorchMemory:
        index = torch.from_numpy(sentences)
        enc_out, mask = memory
        return enc_out.index_select(0, index), mask.index_select(0, index)


def pad_batch(sequences: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """-> ids (B, max len) int64 padded with ``pad``, lengths (B,) int64."""
    ids, lengths = frontend.pad_batch(sequences, pad)
    return torch.from_numpy(ids), torch.from_numpy(lengths)


@torch.inference_mode()
def search_batch(
    model: Seq2Seq,
    sources: list[list[int]],
    params: SearchParams,
    bos: int,
    eos: int,
) -> list[list[Hypothesis]]:
    """One batch of source id lists (EOS included, non-empty) -> n-best hypotheses per sentence."""
    src, src_len = pad_batch(sources, model.config.pad_id)
    enc_out, mask, state = model.encode(src, src_len)
    decoder, lens = TorchStepDecoder(model), src_len.numpy()
    if params.beam == 1:
        return [[hyp] for hyp in greedy_search(decoder, state, (enc_out, mask), lens, bos, eos, params)]
    return beam_search(decoder, state, (enc_out, mask), lens, bos, eos, params)


def search(
    model: Seq2Seq, sources: list[list[int]], params: SearchParams, bos: int, eos: int, batch_size: int = 64
) -> list[list[Hypothesis]]:
    """Any number of sources, decoded in length-sorted batches; results in input order."""
    was_training = model.training
    model.eval()
    results: list[list[Hypothesis]] = [[] for _ in sources]
    for batch in frontend.sorted_batches(sources, batch_size):
        for index, hyps in zip(
            batch, search_batch(model, [sources[i] for i in batch], params, bos, eos), strict=True
        ):
            results[index] = hyps
    model.train(was_training)
    return results


class Translator(TextTranslator):
    """Text in, text out over the torch model, which it puts in eval mode (a translator only infers)."""

    def __init__(
        self,
        model: Seq2Seq,
        src_tok: SentencePieceTokenizer,
        tgt_tok: SentencePieceTokenizer,
        max_src_tokens: int = 100,
        normalize_fn: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__(src_tok, tgt_tok, max_src_tokens, normalize_fn)
        self.model = model.eval()

    def search_batch(self, sources: list[list[int]], params: SearchParams) -> list[list[Hypothesis]]:
        # no train/eval toggling here: batches may run in several threads at once (``search``)
        return search_batch(self.model, sources, params, self.bos, self.eos)
