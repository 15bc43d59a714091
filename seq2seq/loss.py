"""Masked cross-entropy: padded target positions contribute nothing, neither loss nor gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_cross_entropy(
    logits: Tensor, targets: Tensor, pad_id: int, label_smoothing: float = 0.0, per: int | None = None
) -> tuple[Tensor, int]:
    """logits (B,T,V), targets (B,T) int64 -> (loss summed over non-pad tokens / ``per`` (default: their
    number, i.e. the mean), number of non-pad tokens). A rank of a distributed run divides its part of a
    global batch by the global batch's tokens: its share of the global mean."""
    tokens = int((targets != pad_id).sum())
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total / max(tokens if per is None else per, 1), tokens


def token_nll(logits: Tensor, targets: Tensor, pad_id: int) -> tuple[float, int]:
    """Summed negative log-likelihood over non-pad tokens (no smoothing), and their count."""
    with torch.no_grad():
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id, reduction="sum"
        )
    return float(total), int((targets != pad_id).sum())
