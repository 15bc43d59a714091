"""Variance-stabilising transforms of a forecast series (none, log, sqrt, Box-Cox), numpy only.

A forecaster may model a transformed series: values are mapped forward before the standardisation (the
scaler is fitted on the transformed training part) and forecasts are mapped back. Every inverse is
monotone non-decreasing, so the endpoints of an interval on the transformed scale map to the endpoints of
the interval in the series' units, with the same coverage; a symmetric interval there becomes a skewed
one here, narrow at low levels and wide at high ones (sunspots: the spread grows with the level). The
point forecast mapped back is the median of the forecast distribution, not its mean.

Box-Cox: (y^lambda - 1) / lambda (log y at lambda 0), one lambda per column, fitted on the training part
(forecast.data.fit_transform). log and Box-Cox need positive values, sqrt non-negative ones.
One place for the training side (forecast/) and the torch-free runtime (serving/forecast_runtime.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.errors import UserError

TRANSFORMS = ("none", "log", "sqrt", "boxcox")
_EXP_LIMIT = 700.0  # exp(709) is the largest finite float64


class TransformError(UserError):
    """A value outside a transform's domain (a non-positive value with log or Box-Cox, say)."""


@dataclass(frozen=True)
class Transform:
    """One transform for every column; ``lam``: Box-Cox's lambda per column (empty otherwise)."""

    name: str = "none"
    lam: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in TRANSFORMS:
            raise TransformError(f"unknown transform {self.name!r}; known: {', '.join(TRANSFORMS)}")
        if self.name == "boxcox" and not (self.lam and all(np.isfinite(self.lam))):
            raise TransformError("the Box-Cox transform needs one finite lambda per column")

    @property
    def domain(self) -> str:
        return {"log": "positive", "boxcox": "positive", "sqrt": "non-negative"}.get(self.name, "")

    def first_outside(self, values: np.ndarray) -> tuple[int, int] | None:
        """values: (N, D) -> (row, column) of the first value outside the domain, or None."""
        values = np.asarray(values, dtype=np.float64)
        values = values[:, None] if values.ndim == 1 else values
        if self.domain == "positive":
            bad = ~(values > 0)
        elif self.domain == "non-negative":
            bad = ~(values >= 0)
        else:
            return None
        where = np.argwhere(bad)
        return (int(where[0][0]), int(where[0][1])) if len(where) else None

    def check(
        self,
        values: np.ndarray,
        columns: list[str],
        times: list[str] | None = None,
        source: str = "",
        first_row: int = 1,
    ) -> None:
        """Raises TransformError naming the column, row (``first_row`` for the first of ``values``) and
        time of the first value (N, D) outside the domain."""
        bad = self.first_outside(values)
        if bad is None:
            return
        row, col = bad
        value = np.asarray(values, dtype=np.float64).reshape(len(values), -1)[row, col]  # N >= 1 here
        at = f" (time {times[row]})" if times is not None else ""
        prefix = f"{source}: " if source else ""
        raise TransformError(
            f"{prefix}column {columns[col]!r}, row {row + first_row}{at}: {value:g} is not {self.domain}; "
            f"the {self.name} transform needs {self.domain} values"
        )

    def forward(self, values: np.ndarray) -> np.ndarray:
        """values: (N, D) in the series' units, inside the domain -> (N, D) float64 transformed."""
        y = np.asarray(values, dtype=np.float64)
        if self.name == "log":
            return np.log(y)
        if self.name == "sqrt":
            return np.sqrt(y)
        if self.name == "boxcox":
            lam = np.asarray(self.lam)
            safe = np.where(np.abs(lam) < 1e-8, 1.0, lam)
            return np.where(np.abs(lam) < 1e-8, np.log(y), (y**lam - 1.0) / safe)
        return y

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """values: (..., D) transformed -> the series' units; monotone non-decreasing, so interval endpoints
        map to interval endpoints. Points below the image of the domain map to its edge (0)."""
        z = np.asarray(values, dtype=np.float64)
        if self.name == "log":
            return np.exp(np.minimum(z, _EXP_LIMIT))
        if self.name == "sqrt":
            return np.maximum(z, 0.0) ** 2
        if self.name == "boxcox":
            lam = np.asarray(self.lam)
            safe = np.where(np.abs(lam) < 1e-8, 1.0, lam)
            # lambda > 0: the base clips at 0 (the value 0); lambda < 0: a base at 0 would be +inf, so it
            # clips at a tiny positive number (a huge but finite value)
            base = np.maximum(lam * z + 1.0, np.where(lam < 0, 1e-12, 0.0))
            with np.errstate(divide="ignore", over="ignore"):
                power = base ** (1.0 / safe)
            return np.where(np.abs(lam) < 1e-8, np.exp(np.minimum(z, _EXP_LIMIT)), power)
        return z

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lambda": list(self.lam)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Transform:
        """A stored transform (checkpoint payload, manifest); None (runs and bundles from before): none."""
        if data is None:
            return cls()
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise TransformError(f"a transform must be {{'name': ..., 'lambda': [...]}}, not {data!r}")
        lam = data.get("lambda") or []
        if not isinstance(lam, list) or not all(isinstance(v, int | float) for v in lam):
            raise TransformError(f"transform lambda must be a list of numbers, not {lam!r}")
        return cls(data["name"], tuple(float(v) for v in lam))


def boxcox_lambda(values: np.ndarray, low: float = -1.0, high: float = 2.0) -> float:
    """values: (N,) positive -> the lambda in [low, high] that maximises the Box-Cox profile
    log-likelihood -N/2 log var(transformed) + (lambda - 1) sum log y (a grid of 0.01, then refined)."""
    y = np.asarray(values, dtype=np.float64)
    logs = np.log(y)

    def loglik(lam: float) -> float:
        t = logs if abs(lam) < 1e-8 else (y**lam - 1.0) / lam
        return -0.5 * len(y) * np.log(max(float(np.var(t)), 1e-300)) + (lam - 1.0) * float(logs.sum())

    grid = np.arange(low, high + 1e-9, 0.01)
    best = float(grid[np.argmax([loglik(v) for v in grid])])
    fine = np.arange(max(low, best - 0.01), min(high, best + 0.01) + 1e-12, 0.0005)
    return round(float(fine[np.argmax([loglik(v) for v in fine])]), 4)
