"""Text generation with a PyTorch model, step for step as serving.runtime.LMRuntime does it in ORT.

The prompt warms up the state in one call; each next token is drawn by lm.sampling (the shared numpy
sampler) from a per-stream generator seeded by ``params.seed``, so the same seed gives the same text
here and in onnxruntime. Generation stops after max_tokens, at <eos> if the vocabulary has one, or
before the first stop string (which is never emitted).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lm.model import RNNLM
from lm.sampling import SamplingParams, StopMatcher, sample_one
from lm.tokenizers import Tokenizer


def _last_logits(logits: torch.Tensor) -> np.ndarray:
    return logits[0, -1].float().numpy()


def generate_ids(model: RNNLM, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams,
                 eos: int | None = None) -> Iterator[int]:
    """Yields up to ``max_tokens`` sampled ids continuing ``prompt_ids`` (stops after ``eos``)."""
    if len(prompt_ids) == 0:
        raise ValueError("prompt: empty (no tokens to condition on)")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, not {max_tokens}")
    if max_tokens == 0:
        return
    model.eval()
    rng = params.generator()
    with torch.inference_mode():
        logits, state = model(torch.tensor([list(prompt_ids)], dtype=torch.long))
        last = _last_logits(logits)
        for k in range(max_tokens):
            next_id = sample_one(last, params, rng)
            yield next_id
            if next_id == eos or k == max_tokens - 1:
                return
            logits, state = model(torch.tensor([[next_id]], dtype=torch.long), state)
            last = _last_logits(logits)


def generate(model: RNNLM, tokenizer: Tokenizer, prompt: str, max_tokens: int,
             params: SamplingParams | None = None, stop: Sequence[str] = ()) -> Iterator[str]:
    """Streams the text pieces of a continuation of ``prompt`` (the prompt itself is not repeated).

    Text that could begin a stop string is held back until it cannot; the stop string and anything
    after it are never yielded.
    """
    params = params or SamplingParams()
    eos = tokenizer.special_ids.get("<eos>")
    matcher = StopMatcher(tuple(stop))
    text, emitted = "", 0
    for token_id in generate_ids(model, tokenizer.encode(prompt), max_tokens, params, eos):
        if token_id == eos:
            break
        text += tokenizer.piece(token_id, False)
        cut = matcher.find(text, emitted)
        if cut is not None:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = matcher.safe_length(text)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if len(text) > emitted:
        yield text[emitted:]
