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
