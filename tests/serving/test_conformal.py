"""The adaptive interval rule (serving.conformal): its update by hand, that only resolved forecasts move
it, its coverage on a synthetic series whose noise changes, and its state round trip."""

from __future__ import annotations

import numpy as np
import pytest

from serving.conformal import ALPHA, AdaptiveIntervals, StateError, factor


def test_factor_serves_the_calibrated_interval_at_alpha():
    assert factor(ALPHA) == pytest.approx(1.0)
    assert factor(0.2) == pytest.approx(1.2816 / 1.6449, abs=1e-4)  # z(0.9) / z(0.95)
    assert factor(1.0) == 0.0 and factor(1.5) == 0.0  # ACI's empty set: the point forecast
    assert factor(-0.3) == factor(0.001) == pytest.approx(3.2905 / 1.6449, abs=1e-4)  # floored


def test_only_resolved_forecasts_move_the_level():
    rule = AdaptiveIntervals(gamma=0.1)
    # served at t=0 for t=1..3, the truth will fall outside at steps 2 and 3
    rule.serve(np.array([[0.0], [0.0], [0.0]]), np.array([[1.0], [1.0], [1.0]]))
    rule.observe(np.array([0.5]))  # t=1 inside: only step 1 has resolved
    assert rule.alpha_t == pytest.approx(0.1 + 0.1 * 0.1)
    rule.serve(np.array([[0.0], [0.0], [0.0]]), np.array([[9.0], [9.0], [9.0]]))
    rule.observe(np.array([5.0]))  # t=2: outside the first forecast's step 2, inside the second's step 1
    assert rule.alpha_t == pytest.approx(0.11 + 0.1 * (0.1 - 1) + 0.1 * 0.1)
    assert [len(lo) for lo, _ in rule.pending] == [1, 2]  # both still wait: for their step 3 / steps 2-3
    rule.observe(np.array([5.0]), observed=np.array([False]))  # a missing value resolves nothing
    assert rule.alpha_t == pytest.approx(0.11 - 0.09 + 0.01)
    assert [len(lo) for lo, _ in rule.pending] == [1]  # the first forecast's last step has passed


def stream_misses(scales: np.ndarray, gamma: float, horizon: int, seed: int = 0) -> np.ndarray:
    """A stream of N(0, scale_t^2) truths against a forecaster whose calibrated 90% half-width is
    z(0.95) for every step (calibrated for scale 1): the miss (0/1) of every step served, (T, H)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=len(scales) + horizon) * np.concatenate([scales, np.repeat(scales[-1:], horizon)])
    rule, misses = AdaptiveIntervals(gamma=gamma), []
    for t in range(len(scales)):
        if t:
            rule.observe(truth[t - 1 : t])
        half = 1.6449 * rule.factor * np.ones((horizon, 1))
        rule.serve(-half, half)
        misses.append(np.abs(truth[t : t + horizon]) > half[:, 0])
    return np.array(misses, dtype=float)


@pytest.mark.parametrize("shift", [0.6, 1.6])
def test_converges_to_the_target_coverage_after_a_shift(shift):
    scales = np.concatenate([np.ones(500), np.full(3000, shift)])
    fixed = stream_misses(scales, gamma=0.0, horizon=4)[500:].mean()
    adaptive = stream_misses(scales, gamma=0.05, horizon=4)[1000:].mean()
    assert abs(fixed - ALPHA) > 0.07  # the calibrated interval is far off after the shift ...
    assert abs(adaptive - ALPHA) < 0.015  # ... the adaptive one comes back to 90%


def test_state_arrays_round_trip_keeps_the_level_and_the_pending_intervals():
    rule = AdaptiveIntervals(gamma=0.05)
    for t in range(5):
        rule.observe(np.array([float(t % 3), 1.0], np.float32))
        rule.serve(np.zeros((3, 2), np.float32), np.ones((3, 2), np.float32))
    rule.observe(np.array([2.0, 0.5], np.float32))  # two observations between forecasts
    again = AdaptiveIntervals.from_arrays(rule.alpha_t, rule.arrays(2), width=2, max_steps=3, gamma=0.05)
    assert again.alpha_t == rule.alpha_t != ALPHA
    assert [len(lo) for lo, _ in again.pending] == [len(lo) for lo, _ in rule.pending] == [1, 2]
    for rules in (rule, again):
        rules.observe(np.array([2.0, 0.5], np.float32))
    assert again.alpha_t == rule.alpha_t and len(again.pending) == 1
    empty = AdaptiveIntervals.from_arrays(0.1, AdaptiveIntervals().arrays(2), 2, 3)
    assert empty.pending == [] and empty.arrays(2)[1].shape == (0, 2)
    steps, lo, hi = rule.arrays(2)
    for bad in (
        [steps + 0.5, lo, hi],
        [steps * 9, lo, hi],
        [steps, lo[:, :1], hi[:, :1]],
        [steps, hi + 1, hi],
    ):
        with pytest.raises(StateError):
            AdaptiveIntervals.from_arrays(0.1, bad, width=2, max_steps=3)
