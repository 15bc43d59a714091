"""Point and interval metrics of forecasts (numpy; NaN-free inputs, ``mask`` selects scored points)."""

from __future__ import annotations

import numpy as np


def seasonal_naive_scale(train: np.ndarray, season: int) -> float:
    """train: (N,) or (N, D) -> mean |y_t - y_{t-season}| over the training part (the MASE denominator)."""
    if len(train) <= season:
        raise ValueError(f"{len(train)} training points are too few for season {season}")
    scale = float(np.mean(np.abs(train[season:] - train[:-season])))
    return scale if scale > 0 else 1.0


def scores(
    pred: np.ndarray,
    truth: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    scale: float,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """All arrays of one shape -> mae, rmse, mase (mae / scale), coverage (share of truth in [lo, hi])."""
    keep = np.ones(truth.shape, dtype=bool) if mask is None else mask
    err = (pred - truth)[keep]
    inside = ((truth >= lo) & (truth <= hi))[keep]
    mae = float(np.mean(np.abs(err)))
    return {
        "mae": mae,
        "rmse": float(np.sqrt(np.mean(err * err))),
        "mase": mae / scale,
        "coverage": float(np.mean(inside)),
        "points": int(keep.sum()),
    }


def rolling_interval_scales(
    ratio: np.ndarray, mask: np.ndarray, prior: float, z: float, coverage: float = 0.9, min_points: int = 64
) -> np.ndarray:
    """Interval scales that use only what is known at each origin (online split-conformal calibration).

    ratio, mask: (n, H, ...) |truth - mean| / sigma (sigma uncalibrated) of consecutive origins and
    whether that truth was observed. Origin i may use the forecasts (j, h) whose target j + h < i was
    seen before it: once ``min_points`` of them exist, its scale is their ``coverage`` quantile (the next
    sample up) over ``z``; before that it is ``prior`` (the scale calibrated on the validation part).
    Returns (n,) scales.
    """
    n, horizon = ratio.shape[:2]
    flat_ratio, flat_mask = ratio.reshape(n, horizon, -1), mask.reshape(n, horizon, -1)
    target_time = np.arange(n)[:, None] + np.arange(horizon)[None, :]  # (n, H): j + h
    scales = np.full(n, prior, dtype=np.float64)
    for i in range(n):
        seen = flat_ratio[target_time < i][flat_mask[target_time < i]]
        if len(seen) >= min_points:
            scales[i] = float(np.quantile(seen, coverage, method="higher")) / z
    return scales
