"""Text generation with a PyTorch model, step for step as serving.runtime.LMRuntime does it in ORT.

The prompt warms up the state in one call; each next token is drawn by serving.sampling (the shared numpy
sampler) from a per-stream generator seeded by ``params.seed``, so the same seed gives the same text
here and in onnxruntime. Generation stops after max_tokens, at <eos> if the vocabulary has one, or
before the first stop string (which is never emitted).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lm.model import RNNLM
from serving.sampling import SamplingParams
from serving.streaming import sample_ids, stream_text
from serving.tokenizers import Tokenizer


def _last_logits(logits: torch.Tensor) -> np.ndarray:
    return logits[0, -1].float().numpy()


def generate_ids(
    model: RNNLM, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams, eos: int | None = None
) -> Iterator[int]:
    """Yields up to ``max_tokens`` sampled ids continuing ``prompt_ids`` (stops after ``eos``)."""
    if len(prompt_ids) == 0:
        raise ValueError("prompt: empty (no tokens to condition on)")
    model.eval()
    with torch.inference_mode():
        logits, state = model(torch.tensor([list(prompt_ids)], dtype=torch.long))

        def step(token_id: int) -> np.ndarray:
            nonlocal state
            step_logits, state = model(torch.tensor([[token_id]], dtype=torch.long), state)
            return _last_logits(step_logits)

        yield from sample_ids(_last_logits(logits), step, max_tokens, params, eos)


def generate(
    model: RNNLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_tokens: int,
    params: SamplingParams | None = None,
    stop: Sequence[str] = (),
) -> Iterator[str]:
    """Streams the text pieces of a continuation of ``prompt`` (the prompt itself is not repeated)."""
    eos = tokenizer.special_ids.get("<eos>")
    ids = generate_ids(model, tokenizer.encode(prompt), max_tokens, params or SamplingParams(), eos)
    return stream_text(ids, tokenizer, stop, eos)
