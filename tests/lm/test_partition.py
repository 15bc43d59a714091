"""Partitioning, proven on integer streams: the token at stream position p is p itself, so every
batch entry tells where in the stream it came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.partition import (
    num_random_batches,
    num_sequential_batches,
    random_batches,
    random_offset,
    sequential_batches,
)

shapes = st.tuples(st.integers(0, 400), st.integers(1, 6), st.integers(1, 12))  # N, B, T
FAST = settings(max_examples=60, deadline=None)


@FAST
@given(shapes, st.data())
def test_sequential_rows_continue_across_batches(shape: tuple[int, int, int], data: st.DataObject) -> None:
    n, b, t = shape
    offset = data.draw(st.integers(0, t - 1))
    batches = list(sequential_batches(np.arange(n), b, t, offset))
    assert len(batches) == num_sequential_batches(n, b, t, offset)
    row_length = max(0, (n - 1 - offset) // b)
    for k, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (b, t) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # Y is X shifted one ahead in the stream
        # row r of batch k is positions [kT, (k+1)T) of stream row r, which starts at offset + r * L
        expected = offset + torch.arange(b)[:, None] * row_length + k * t + torch.arange(t)
        assert torch.equal(x, expected)
        if k:
            assert torch.equal(x[:, 0], batches[k - 1][0][:, -1] + 1)  # row b continues row b


@FAST
@given(shapes, st.data())
def test_sequential_without_drop_last_covers_every_row_position_once(
    shape: tuple[int, int, int], data: st.DataObject
) -> None:
    n, b, t = shape
    offset = data.draw(st.integers(0, min(t - 1, max(0, n - 1))))
    batches = list(sequential_batches(np.arange(n), b, t, offset, drop_last=False))
    assert len(batches) == num_sequential_batches(n, b, t, offset, drop_last=False)
    used = np.concatenate([x.flatten().numpy() for x, _ in batches]) if batches else np.array([], int)
    assert len(np.unique(used)) == len(used)  # no position twice
    row_length = max(0, (n - 1 - offset) // b)
    assert sorted(used.tolist()) == list(range(offset, offset + b * row_length))
    assert n - 1 - (offset + b * row_length) < b  # what is left over is less than one token per row
    assert all(y.max() < n for _, y in batches)


def test_sequential_accepts_tensors_and_lists_and_resumes_mid_epoch() -> None:
    ids = np.arange(200)
    full = list(sequential_batches(ids, 3, 5, 2))
    assert all(
        torch.equal(a[0], b[0])
        for a, b in zip(full, sequential_batches(torch.arange(200), 3, 5, 2), strict=True)
    )
    assert all(
        torch.equal(a[1], b[1])
        for a, b in zip(full, sequential_batches(list(range(200)), 3, 5, 2), strict=True)
    )
    resumed = sequential_batches(ids, 3, 5, 2, start_batch=4)
    assert len(resumed) == len(full) - 4
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[4:], resumed, strict=True))
    with pytest.raises(ValueError, match="1-d"):
        sequential_batches(np.zeros((2, 3)), 1, 1)


@FAST
@given(shapes, st.integers(0, 2**31))
def test_random_batches_are_disjoint_windows_of_the_stream(shape: tuple[int, int, int], seed: int) -> None:
    n, b, t = shape
    batches = list(random_batches(np.arange(n), b, t, torch.Generator().manual_seed(seed)))
    assert len(batches) == num_random_batches(n, b, t)
    starts = []
    for x, y in batches:
        assert x.shape == y.shape == (b, t)
        assert torch.equal(y, x + 1) and int(y.max()) < n
        assert torch.equal(x, x[:, :1] + torch.arange(t))  # each row is one contiguous window
        starts += x[:, 0].tolist()
    assert len({s % t for s in starts}) <= 1  # one offset per epoch, windows on a grid of step T
    assert len(set(starts)) == len(starts)  # no window twice, so no position twice


def test_random_batch_order_is_shuffled_not_contiguous() -> None:
    n, b, t = 2000, 4, 10
    batches = list(random_batches(np.arange(n), b, t, torch.Generator().manual_seed(0)))
    starts = torch.stack([x[:, 0] for x, _ in batches])  # (batches, B)
    continues = starts[1:] == starts[:-1] + t  # would hold everywhere for sequential partitioning
    assert continues.float().mean() < 0.1
    assert not torch.equal(starts.flatten(), starts.flatten().sort().values)
    # the windows tile the stream after the offset: the epoch uses (n - t) // t windows of b * len of them
    assert len(set(starts.flatten().tolist())) == b * len(batches) == b * ((n - t) // t // b)


def test_random_batches_are_determined_by_the_generator_seed() -> None:
    def epoch(seed: int) -> list[torch.Tensor]:
        return [x for x, _ in random_batches(np.arange(500), 3, 7, torch.Generator().manual_seed(seed))]

    assert all(torch.equal(a, b) for a, b in zip(epoch(5), epoch(5), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch(5), epoch(6), strict=True))
    assert len(epoch(5)) == len(epoch(6)) == num_random_batches(500, 3, 7)


def test_random_resume_repeats_the_rest_of_the_epoch() -> None:
    generator = torch.Generator().manual_seed(11)
    saved = generator.get_state()  # what a checkpoint keeps from the epoch start
    full = [x for x, _ in random_batches(np.arange(300), 2, 6, generator)]
    after = generator.get_state()
    resumed = random_batches(np.arange(300), 2, 6, torch.Generator().set_state(saved), start_batch=5)
    assert len(resumed) == len(full) - 5
    assert all(torch.equal(a, b) for a, b in zip(full[5:], (x for x, _ in resumed), strict=True))
    list(random_batches(np.arange(300), 2, 6, torch.Generator().set_state(saved)))
    assert torch.equal(after, generator.get_state())  # draws happen at the call, not while iterating


def test_epoch_offsets_vary_within_bptt_and_follow_the_seed() -> None:
    generator = torch.Generator().manual_seed(1)
    offsets = [random_offset(8, generator) for _ in range(200)]
    assert set(offsets) == set(range(8))
    generator.manual_seed(1)
    assert [random_offset(8, generator) for _ in range(200)] == offsets
