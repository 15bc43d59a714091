"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from forecast.metrics import rolling_interval_scales, scores, seasonal_naive_scale


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


def test_rolling_interval_scales_use_only_resolved_forecasts():
    # 4 origins, horizon 2: origin i may use (j, h) with j + h < i
    ratio = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    mask = np.ones_like(ratio, dtype=bool)
    scales = rolling_interval_scales(ratio, mask, prior=9.0, z=2.0, coverage=0.5, min_points=1)
    # i=0: nothing resolved -> prior; i=1: {1}; i=2: {1, 2, 3}; i=3: {1, 2, 3, 4, 5}
    assert scales.tolist() == [9.0, 0.5, 1.0, 1.5]
    mask[0, 0] = False  # an unobserved truth is never used: i=1 has none, i=2 {2, 3}, i=3 {2, 3, 4, 5}
    assert rolling_interval_scales(ratio, mask, 9.0, 2.0, 0.5, min_points=2).tolist() == [9.0, 9.0, 1.5, 2.0]
