"""Learning-rate schedules, early stopping and the time budget."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lm.schedule import EarlyStopping, TimeBudget, make_lr_scheduler


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(kind: str, steps: int, **kwargs: object) -> list[float]:
    schedule = make_lr_scheduler(_optimizer(), kind, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(schedule.last_lr[0])
        schedule.step()
    return lrs


def test_linear_warmup_then_constant() -> None:
    assert _lrs("constant", 6, warmup_steps=4) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _lrs("constant", 2) == [1.0, 1.0]


def test_cosine_decays_from_the_peak_to_the_floor() -> None:
    lrs = _lrs("cosine", 12, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert lrs[10] == lrs[11] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps"):
        make_lr_scheduler(_optimizer(), "cosine", warmup_steps=5, total_steps=5)


def test_noam_warms_up_linearly_then_decays_as_inverse_square_root() -> None:
    lrs = _lrs("noam", 16, warmup_steps=4)
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[15] == pytest.approx(math.sqrt(4 / 16))
    with pytest.raises(ValueError, match="warmup"):
        make_lr_scheduler(_optimizer(), "noam")


def test_plateau_halves_the_rate_when_validation_stops_improving() -> None:
    schedule = make_lr_scheduler(_optimizer(0.8), "plateau", plateau_patience=2)
    for loss in (3.0, 2.0, 2.5):
        schedule.on_validation(loss)
    assert schedule.last_lr == [0.8]  # one bad validation is within patience
    schedule.on_validation(2.1)
    assert schedule.last_lr == [pytest.approx(0.4)]
    schedule.step()
    assert schedule.last_lr == [pytest.approx(0.4)]  # steps keep the reduced rate
    constant = make_lr_scheduler(_optimizer(0.8), "constant")
    for loss in (1.0, 2.0, 3.0):
        constant.on_validation(loss)
    assert constant.last_lr == [0.8]


def test_schedule_resumes_from_its_state() -> None:
    first = make_lr_scheduler(_optimizer(), "cosine", warmup_steps=2, total_steps=20)
    for _ in range(7):
        first.step()
    second = make_lr_scheduler(_optimizer(), "cosine", warmup_steps=2, total_steps=20)
    second.load_state_dict(first.state_dict())
    first.step()
    second.step()
    assert second.last_lr == first.last_lr
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        make_lr_scheduler(_optimizer(), "linear")


def test_early_stopping_counts_validations_without_improvement() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert [stopper.update(m) for m in (5.0, 4.0, 3.995, 3.5, 3.6, 3.7)] == [
        False,
        False,
        False,
        False,
        False,
        True,
    ]
    assert stopper.best == 3.5
    resumed = EarlyStopping(patience=2, min_delta=0.01)
    resumed.load_state_dict(EarlyStopping(patience=2).state_dict() | {"best": 3.5, "bad_updates": 1})
    assert resumed.update(3.6) is True


def test_time_budget() -> None:
    assert not TimeBudget(None).exceeded() and TimeBudget(None).remaining_s == math.inf
    assert TimeBudget(1.0, already_spent_s=61.0).exceeded()
    fresh = TimeBudget(1.0)
    assert not fresh.exceeded() and 59.0 < fresh.remaining_s <= 60.0
