"""The generation loop shared by the PyTorch generator and the onnxruntime runtime (torch-free).

Both feed it their own step function, so a seed gives the same ids, and the same text, in either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from serving.sampling import SamplingParams, StopMatcher, sample_one
from serving.tokenizers import Tokenizer


def sample_ids(
    logits: np.ndarray,
    step: Callable[[int], np.ndarray],
    max_tokens: int,
    params: SamplingParams,
    eos: int | None = None,
) -> Iterator[int]:
    """Yields up to ``max_tokens`` ids, stopping after ``eos``.

    logits: (V,) after the prompt; step(token_id) feeds one token and returns the next (V,) logits.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, not {max_tokens}")
    rng = params.generator()
    for k in range(max_tokens):
        next_id = sample_one(logits, params, rng)
        yield next_id
        if next_id == eos or k == max_tokens - 1:
            return
        logits = step(next_id)


def stream_text(
    ids: Iterable[int], tokenizer: Tokenizer, stop: Sequence[str] = (), eos: int | None = None
) -> Iterator[str]:
    """Turns generated ids into text pieces as they come.

    Text that could begin a stop string is held back until it cannot; the stop string and anything
    after it are never yielded, and neither is ``eos``.
    """
    matcher = StopMatcher(tuple(stop))
    text, emitted = "", 0
    for token_id in ids:
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
