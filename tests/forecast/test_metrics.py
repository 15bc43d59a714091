"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from forecast.data import Preset, Series
from forecast.evaluate import adaptive_intervals
from forecast.metrics import scores, seasonal_naive_scale
from forecast.train import prepare


def test_scores_by_hand():
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 3.0, 1.0, 4.0])  # errors 0, 1, -2, 0
    lo, hi = pred - 1.0, pred + 1.0  # covers 1, 2 (|err| <= 1), 4 -> 3 of 4
    s = scores(pred, truth, lo, hi, scale=0.5)
    assert s["mae"] == pytest.approx(0.75)
    assert s["rmse"] == pytest.approx(np.sqrt(5 / 4))
    assert s["mase"] == pytest.approx(1.5)
    assert s["coverage"] == pytest.approx(0.75)
    masked = scores(pred, truth, lo, hi, 1.0, mask=np.array([True, True, False, True]))
    assert masked["mae"] == pytest.approx(1 / 3) and masked["points"] == 3


def test_seasonal_naive_scale_by_hand():
    train = np.array([1.0, 5.0, 2.0, 7.0, 2.0])
    assert seasonal_naive_scale(train, 1) == pytest.approx((4 + 3 + 5 + 5) / 4)
    assert seasonal_naive_scale(train, 2) == pytest.approx((1 + 2 + 0) / 3)


def test_adaptive_intervals_use_only_observations_before_each_origin():
    n = 200
    values = np.sin(np.arange(n) / 3.0)[:, None] + np.random.default_rng(0).normal(0, 0.3, (n, 1))
    series = Series(values, np.ones((n, 1), bool), [str(t) for t in range(n)], ["y"], "s")
    p = prepare(series, Preset(test=40, season=1, window=4, batch_size=1))
    origins = np.arange(p.splits.test_start, n - 3 + 1)
    mean = np.stack([p.scaled[o : o + 3] for o in origins]).astype(np.float64)  # exact: all covered
    half = np.full(mean.shape, 0.5)
    lo, hi = adaptive_intervals(p, origins, mean, half, gamma=0.05)
    t = origins[6]
    p.scaled[t:] += 100.0  # from time t on, every truth falls outside (the rule reads the model scale)
    lo2, hi2 = adaptive_intervals(p, origins, mean, half, gamma=0.05)
    assert np.array_equal(lo[:7], lo2[:7]) and np.array_equal(hi[:7], hi2[:7])  # origins <= t: the same
    assert np.all(hi2[7] - lo2[7] > hi[7] - lo[7])  # origin t + 1 has seen the misses at t: wider
