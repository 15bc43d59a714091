"""Cutting a token stream into (X, Y) minibatches for truncated BPTT, sequentially or at random.

sequential: the stream (after ``offset`` tokens) is cut into ``B`` rows of equal length
``L = (N - 1 - offset) // B`` (row b starts at ``offset + b * L``); batch k holds positions
``[k*T, (k+1)*T)`` of every row, so row b of batch k+1 continues row b of batch k and the recurrent
state can be carried across batches. The caller draws a new ``offset`` in ``[0, T)`` at each epoch
start (:func:`random_offset`) so that the cut points vary between epochs.

random: after a random offset in ``[0, T)`` the stream is cut into windows of length T that do not
overlap; the windows are shuffled and grouped B at a time, so batches are independent and the state
is reset for each one.

In both, ``Y`` is ``X`` shifted one position ahead in the stream. Batches are CPU int64 tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class Batches:
    """An iterator of (X (B, T), Y (B, T)) int64 batches that also knows how many it yields."""

    def __init__(self, batches: Iterator[Batch], count: int) -> None:
        self._batches = batches
        self._count = count

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def __len__(self) -> int:
        return self._count


def _as_stream(ids: np.ndarray | torch.Tensor | list[int]) -> torch.Tensor:
    stream = torch.as_tensor(np.asarray(ids) if isinstance(ids, list) else ids)
    if stream.dim() != 1:
        raise ValueError(f"ids must be a 1-d token stream, got shape {tuple(stream.shape)}")
    return stream.to(torch.int64)


def _check(batch_size: int, bptt: int) -> None:
    if batch_size < 1 or bptt < 1:
        raise ValueError(f"batch_size and bptt must be positive, got {batch_size} and {bptt}")


def random_offset(bptt: int, generator: torch.Generator | None = None) -> int:
    """A start offset in ``[0, bptt)`` for one epoch, drawn from ``generator``."""
    return int(torch.randint(bptt, (1,), generator=generator).item())


def sequential_row_length(num_tokens: int, batch_size: int, offset: int = 0) -> int:
    """L, the number of input positions in each of the B rows."""
    return max(0, (num_tokens - 1 - offset) // batch_size)


def num_sequential_batches(
    num_tokens: int, batch_size: int, bptt: int, offset: int = 0, drop_last: bool = True
) -> int:
    """How many batches :func:`sequential_batches` yields (with ``start_batch=0``)."""
    _check(batch_size, bptt)
    length = sequential_row_length(num_tokens, batch_size, offset)
    return length // bptt if drop_last else -(-length // bptt)


def sequential_batches(
    ids: np.ndarray | torch.Tensor | list[int],
    batch_size: int,
    bptt: int,
    offset: int = 0,
    *,
    drop_last: bool = True,
    start_batch: int = 0,
) -> Batches:
    """Batches whose rows continue each other (see the module docstring).

    ids: (N,) int. Yields X, Y: (B, T) int64. With ``drop_last=False`` a final batch shorter than T
    covers the rest of the rows (evaluation uses every token then). ``start_batch`` skips the first
    batches, to resume an epoch in the middle.
    """
    stream = _as_stream(ids)
    if offset < 0:
        raise ValueError(f"offset must be non-negative, got {offset}")
    count = num_sequential_batches(len(stream), batch_size, bptt, offset, drop_last)
    length = sequential_row_length(len(stream), batch_size, offset)
    inputs = stream[offset : offset + batch_size * length].view(batch_size, length)
    targets = stream[offset + 1 : offset + 1 + batch_size * length].view(batch_size, length)

    def generate() -> Iterator[Batch]:
        for k in range(start_batch, count):
            cols = slice(k * bptt, (k + 1) * bptt)
            yield inputs[:, cols].contiguous(), targets[:, cols].contiguous()

    return Batches(generate(), max(0, count - start_batch))


def num_random_windows(num_tokens: int, bptt: int) -> int:
    """Windows per epoch; the same for every offset in [0, T), so an epoch's length does not vary."""
    return max(0, (num_tokens - bptt) // bptt)


def num_random_batches(num_tokens: int, batch_size: int, bptt: int) -> int:
    """How many batches :func:`random_batches` yields (with ``start_batch=0``)."""
    _check(batch_size, bptt)
    return num_random_windows(num_tokens, bptt) // batch_size


def random_batches(
    ids: np.ndarray | torch.Tensor | list[int],
    batch_size: int,
    bptt: int,
    generator: torch.Generator | None = None,
    *,
    start_batch: int = 0,
) -> Batches:
    """Independent batches of non-overlapping windows taken in random order (see the module docstring).

    ids: (N,) int. Yields X, Y: (B, T) int64. The offset and the order are drawn from ``generator``
    when this is called, not while iterating, so the generator's state afterwards does not depend on
    how many batches were consumed; call again with the same generator state and ``start_batch=k`` to
    resume after k batches.
    """
    stream = _as_stream(ids)
    count = num_random_batches(len(stream), batch_size, bptt)
    windows = num_random_windows(len(stream), bptt)
    offset = random_offset(bptt, generator)
    order = torch.randperm(windows, generator=generator)[: count * batch_size]
    starts = offset + order * bptt
    steps = torch.arange(bptt)

    def generate() -> Iterator[Batch]:
        for k in range(start_batch, count):
            positions = starts[k * batch_size : (k + 1) * batch_size, None] + steps  # (B, T)
            yield stream[positions], stream[positions + 1]

    return Batches(generate(), max(0, count - start_batch))
