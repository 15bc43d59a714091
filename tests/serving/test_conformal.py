"""The adaptive interval rule (serving.conformal): the factor from the recent scores, its update by hand,
that only resolved forecasts move it, its coverage on a synthetic series whose noise changes, and its
state round trip."""

from __future__ import annotations

import numpy as np
import pytest

from serving.conformal import ALPHA, WINDOW, AdaptiveIntervals, StateError, StreamRules, factor

Z90 = 1.6449


def test_a_fresh_stream_serves_the_calibrated_interval():
    empty = np.zeros((0, 2), np.float32)
    # the conformal quantile of 50 calibrated scores at level 0.9 is the 46th: z(0.955) / z(0.95)
    assert factor(ALPHA, empty) == pytest.approx([1.6954 / Z90] * 2, abs=1e-4)
    assert factor(0.2, empty)[0] == pytest.approx(1.2816 / Z90, abs=0.02)  # about z(0.9) / z(0.95)
    assert list(factor(1.0, empty)) == list(factor(1.5, empty)) == [0.0, 0.0]  # ACI's empty set


def test_recent_scores_replace_the_calibrated_ones():
    half = np.full((WINDOW // 2, 1), 0.4, np.float32)
    mixed = factor(ALPHA, half)  # half the set at 0.4: the 46th of 50 is a calibrated score
    assert 0.4 < mixed[0] < factor(ALPHA, np.zeros((0, 1), np.float32))[0]
    scores = np.linspace(0.01, 0.5, WINDOW, dtype=np.float32)[:, None]
    assert factor(ALPHA, scores)[0] == pytest.approx(scores[45, 0])  # all real: their own 46th
    past = factor(0.005, scores)[0]  # beyond the largest score: its Gaussian tail, floored at 0.001
    assert past > 0.5 and factor(-3.0, scores)[0] == pytest.approx(factor(0.001, scores)[0])


def test_only_resolved_forecasts_move_the_level():
    rule = AdaptiveIntervals(gamma=0.1)
    # served at t=0 for t=1..3 as 0 .. 1; the truth will fall outside at steps 2 and 3
    rule.serve(np.full((3, 1), 0.5), np.full((3, 1), 0.5), np.ones(1))
    rule.observe(np.array([0.5]))  # t=1 inside: only step 1 has resolved, with score 0
    assert rule.alpha_t == pytest.approx(0.1 + 0.1 * 0.1)
    assert rule.scores.tolist() == [[0.0]]
    rule.serve(np.full((3, 1), 4.5), np.full((3, 1), 2.25), np.full(1, 2.0))  # 0 .. 9
    rule.observe(np.array([5.0]))  # t=2: outside the first forecast's step 2, inside the second's step 1
    assert rule.alpha_t == pytest.approx(0.11 + 0.1 * (0.1 - 1) + 0.1 * 0.1)
    assert rule.scores[1:, 0] == pytest.approx([9.0, 0.5 / 2.25])
    assert [len(lo) for lo, _ in rule.pending] == [1, 2]  # both still wait: for their step 3 / steps 2-3
    assert rule.pending[1][1][:, 0].tolist() == [9.0, 9.0]
    rule.observe(np.array([5.0]), observed=np.array([False]))  # a missing value resolves nothing
    assert rule.alpha_t == pytest.approx(0.11 - 0.09 + 0.01) and len(rule.scores) == 3
    assert [len(lo) for lo, _ in rule.pending] == [1]  # the first forecast's last step has passed


def stream_misses(scales: np.ndarray, gamma: float, horizon: int, seed: int = 0) -> np.ndarray:
    """A stream of N(0, scale_t^2) truths against a forecaster whose calibrated 90% half-width is
    z(0.95) for every step (calibrated for scale 1): the miss (0/1) of every step served, (T, H)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=len(scales) + horizon) * np.concatenate([scales, np.repeat(scales[-1:], horizon)])
    rule, misses, half = AdaptiveIntervals(gamma=gamma), [], np.full((horizon, 1), Z90)
    for t in range(len(scales)):
        if t:
            rule.observe(truth[t - 1 : t])
        served = rule.factor
        rule.serve(np.zeros((horizon, 1)), half, served)
        misses.append(np.abs(truth[t : t + horizon]) > served * half[:, 0])
    return np.array(misses, dtype=float)


@pytest.mark.parametrize("shift", [0.6, 1.6])
def test_converges_to_the_target_coverage_after_a_shift(shift):
    scales = np.concatenate([np.ones(500), np.full(3000, shift)])
    fixed = np.mean(np.abs(np.random.default_rng(0).normal(size=3000) * shift) > Z90)
    adaptive = stream_misses(scales, gamma=0.05, horizon=4)[1000:].mean()
    assert abs(fixed - ALPHA) > 0.07  # the calibrated interval is far off after the shift ...
    assert abs(adaptive - ALPHA) < 0.015  # ... the adaptive one comes back to 90%
    # the recent scores alone (no level update) carry the new scale within a window's worth of points;
    # their quantile is biased (one truth scores the H forecasts that target it alike: 0.139 misses
    # measured), which the level's update corrects
    window_only = stream_misses(scales, gamma=0.0, horizon=4)[520:].mean()
    assert abs(window_only - ALPHA) < 0.05


def test_state_arrays_round_trip_keeps_the_level_the_pending_forecasts_and_the_scores():
    rule = AdaptiveIntervals(gamma=0.05, width=2)
    for t in range(5):
        rule.observe(np.array([float(t % 3), 1.0], np.float32))
        rule.serve(np.full((3, 2), 0.5, np.float32), np.full((3, 2), 0.5, np.float32), rule.factor)
    rule.observe(np.array([2.0, 0.5], np.float32))  # two observations between forecasts
    again = AdaptiveIntervals.from_arrays(rule.alpha_t, rule.arrays(), width=2, max_steps=3, gamma=0.05)
    assert again.alpha_t == rule.alpha_t != ALPHA
    assert [len(lo) for lo, _ in again.pending] == [len(lo) for lo, _ in rule.pending] == [1, 2]
    assert np.array_equal(again.factor, rule.factor) and len(again.scores) == 12
    for rules in (rule, again):
        rules.observe(np.array([2.0, 0.5], np.float32))
    assert again.alpha_t == rule.alpha_t and len(again.pending) == 1
    assert np.array_equal(again.scores, rule.scores)
    empty = AdaptiveIntervals.from_arrays(0.1, AdaptiveIntervals(width=2).arrays(), 2, 3)
    assert empty.pending == [] and empty.arrays()[2].shape == (0, 2)
    steps, factors, mean, half, scores = rule.arrays()
    for bad in (
        [steps + 0.5, factors, mean, half, scores],
        [steps * 9, factors, mean, half, scores],
        [steps, factors[:, :1], mean, half, scores],
        [steps, factors, mean, -half, scores],
        [steps, factors, mean, half, np.repeat(scores, 9, axis=0)],  # more than the window
        [steps, factors, mean, half, -scores - 1],
        [steps, factors, mean.astype(np.float64), half, scores],
        [steps, factors, mean, half],
    ):
        with pytest.raises(StateError):
            AdaptiveIntervals.from_arrays(0.1, bad, width=2, max_steps=3)


def test_stacked_rules_equal_each_stream_alone():
    """StreamRules over K streams of one layout (the server's batch) against each stream's rule alone."""
    rng = np.random.default_rng(7)
    alone = [AdaptiveIntervals(gamma=0.05, width=2) for _ in range(5)]
    for t in range(12):  # the same layout for every stream: one observation, one forecast of 3 steps
        values = rng.normal(size=(5, 2)).astype(np.float32) * (1 + t % 4)
        mean = rng.normal(size=(5, 3, 2)).astype(np.float32)
        half = rng.uniform(0.5, 2.0, size=(5, 3, 2)).astype(np.float32)
        stack = StreamRules.stack([r.alpha_t for r in alone], [r.arrays() for r in alone], gamma=0.05)
        stack.observe(values)
        served = stack.factor()
        stack.serve(mean, half, served)
        for k, rule in enumerate(alone):
            rule.observe(values[k])
            assert np.array_equal(rule.factor, served[k])
            rule.serve(mean[k], half[k], rule.factor)
            alpha_t, arrays = stack.stream(k)
            assert alpha_t == rule.alpha_t
            assert all(np.array_equal(a, b) for a, b in zip(arrays, rule.arrays(), strict=True))
    assert len({r.alpha_t for r in alone}) >= 3 and len(alone[0].scores) == 30  # they did diverge
