"""Perplexity and bits per character of a language model over a whole text, the state carried throughout.

The split is read as one stream: token t+1 is predicted from every token before it (through the
recurrent state, chunk after chunk), so the figure does not depend on how the stream is chunked.
perplexity = exp(total NLL / predicted tokens); bits per character = total NLL / ln 2 / characters,
where the characters are those of the predicted tokens (all but the first token, which only serves as
context); for a char model that is exactly NLL / ln 2 per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from lm.model import RNNLM
from lm.progress import perplexity
from serving.tokenizers import Tokenizer

EVAL_CHUNK = 512


@dataclass
class Evaluation:
    split: str
    perplexity: float
    bits_per_char: float
    nll: float
    tokens: int
    characters: int

    def to_dict(self) -> dict:
        return asdict(self)


def stream_nll(model: RNNLM, ids: Tensor, chunk: int = EVAL_CHUNK, streams: int = 1) -> tuple[float, int]:
    """Total NLL (nats) of ids[1:], each token predicted from the tokens before it, state carried.

    ids: (N,) int64 -> (sum of -log p(ids[t+1] | ids[:t+1]) for t < N-1, N-1). With ``streams`` S > 1
    the text is read as S consecutive pieces side by side (a batch of S, much faster on a CPU), each
    piece but the first starting from a zero state: a close upper bound, used for validation during
    training. S = 1 is the exact figure. Runs in eval mode and restores the model's previous mode.
    """
    count = max(len(ids) - 1, 0)
    rows = max(1, min(streams, count // chunk))
    length = count // rows
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with torch.inference_mode():
            inputs = ids[: rows * length].view(rows, length)
            targets = ids[1 : rows * length + 1].view(rows, length)
            state = None
            for start in range(0, length, chunk):
                logits, state = model(inputs[:, start : start + chunk], state)
                target = targets[:, start : start + chunk].flatten()
                total += F.cross_entropy(logits.flatten(0, 1).double(), target, reduction="sum")
            # The rest of the text continues the last piece.
            state = tuple(s[:, -1:] for s in state) if state is not None else None
            for start in range(rows * length, count, chunk):
                end = min(start + chunk, count)
                logits, state = model(ids[None, start:end], state)
                total += F.cross_entropy(logits[0].double(), ids[start + 1 : end + 1], reduction="sum")
    finally:
        model.train(was_training)
    return float(total), count


def predicted_characters(tokenizer: Tokenizer, text: str, ids: list[int]) -> int:
    """How many characters of ``text`` the predicted tokens (ids[1:]) cover."""
    if tokenizer.kind == "char":
        return len(ids) - 1
    return max(1, len(text) - len(tokenizer.decode(ids[:1]).strip()))


def evaluate_text(model: RNNLM, tokenizer: Tokenizer, text: str, split: str = "valid") -> Evaluation:
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError(f"the {split} split has {len(ids)} token(s); at least 2 are needed to evaluate")
    nll, tokens = stream_nll(model, torch.tensor(ids, dtype=torch.long))
    characters = predicted_characters(tokenizer, text, ids)
    return Evaluation(
        split=split,
        perplexity=perplexity(nll / tokens),
        bits_per_char=nll / math.log(2) / characters,
        nll=nll / tokens,
        tokens=tokens,
        characters=characters,
    )
