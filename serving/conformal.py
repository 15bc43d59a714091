"""Adaptive conformal inference (Gibbs & Candes 2021) for the intervals of a live forecast stream, numpy only.

One place for the online interval rule: ``rnnlab-ts eval`` (forecast/evaluate.py) replays it over the test
origins, a ``ForecastStream`` serves it.

Scores. A forecast's interval is its centre m plus or minus ``factor`` times its calibrated 90% half-width
h (the Gaussian head's z(0.95) sigma, sigma calibrated on the validation part so that 90% fell inside
there). When the truth y of a point arrives, its score is |y - m| / h: the factor at which it would just
have been covered.

The rule, as in the paper: ACI serves the (1 - alpha_t) conformal quantile of a calibration set of
recent scores, and moves the level by ``alpha_t <- alpha_t + gamma * (alpha - err)`` for every resolved
(step, column) point, err = 1 if the truth fell outside the interval served for it. ``alpha_t`` starts at
the target miss rate ``alpha`` (0.1 for 90% intervals). Each forecast is remembered until its target is
observed: a forecast h steps ahead resolves h observations after it was served. The update is additive,
so points resolving together give the same ``alpha_t`` in any order.

The calibration set is the stream's last ``WINDOW`` resolved scores per column. Until it holds that many,
the calibrated Gaussian fills it: ``WINDOW - n`` evenly spaced quantiles of |N(0, 1)| / z(0.95) stand in
for the missing scores, so a fresh stream serves the calibrated interval (factor 1.03: the conformal
quantile of 50 points at level 0.9 is the 46th) and every resolved score replaces one of them. The
quantile is the ceil((1 - alpha_t)(W + 1))-th smallest of the W scores; past the largest
(alpha_t < 1 / (W + 1)) it is the largest times the Gaussian ratio z(1 - alpha_t / 2) / z(1 - 1 / (2(W + 1)))
with alpha_t floored at ``ALPHA_FLOOR``; at alpha_t >= 1 ACI serves the empty set (here: the point
forecast, factor 0).

Why recent scores and not only the level. With the level alone over the calibrated Gaussian (the first
version of this rule), a test period calmer than the validation part is corrected only as fast as
gamma * alpha per covered point; the last 30 years of sunspots (184 points at horizon 8) ended at 0.957
coverage, co2 (776 points) at 0.896. Recent scores carry the calmer scale itself: ``rnnlab-ts eval`` of
bench.ts_baselines' final models gives sunspots GRU / LSTM / MLP 0.908 / 0.902 / 0.897 and co2 MLP / GRU
0.892 / 0.892 (with a window of 25 scores: 0.864-0.897 on the five; of 100: 0.885-0.940).

Constants: gamma fixed before any test coverage was looked at, WINDOW before its first replay over the
test origins (the recent scores themselves came after the first version missed on sunspots). gamma = 0.05:
the paper recommends 0.005-0.05 and bounds the long-run miss rate by |mean err - alpha| <=
(max(alpha, 1 - alpha) + gamma) / (gamma T) over T resolved points; the issue's test horizons are short
(co2 776 points, sunspots 184), and only the top of the range keeps that bound near the target band's
half-width (0.05). WINDOW = 50: the 90% quantile then rests on 5 scores above it, and sunspots' 184 points
renew the set three times. Measured since: one observation resolves up to H points (one per pending
forecast) and scores them alike (the same truth against forecasts of similar centre and width), so the set
spans about the last 50 / H observations, and on its own its quantile is biased (a synthetic stream at
horizon 4, gamma = 0: 0.139 misses against 0.1); the level's update corrects that (gamma = 0.05: 0.1006;
tests/serving/test_conformal.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

ALPHA = 0.1
GAMMA = 0.05
WINDOW = 50
ALPHA_FLOOR = 0.001
_Z90 = NormalDist().inv_cdf(1 - ALPHA / 2)
_Z_EDGE = NormalDist().inv_cdf(1 - 1 / (2 * (WINDOW + 1)))  # the Gaussian level of the largest score


def _gaussian_scores(n: int) -> np.ndarray:
    """n evenly spaced quantiles of |N(0, 1)| / z(0.95): the calibrated head's scores, (n,) float32."""
    return np.array([NormalDist().inv_cdf(0.5 + (k + 0.5) / (2 * n)) / _Z90 for k in range(n)], np.float32)


# PRIOR[m]: the m stand-in scores of a set that holds WINDOW - m real ones (computed once: ~1,300 values)
PRIOR = [_gaussian_scores(m) for m in range(WINDOW + 1)]


def factors(alpha_t: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The multipliers of the calibrated half-width that serve levels alpha_t (K,): scores (K, n <= WINDOW,
    D) the streams' recent scores -> (K, D) float32, the conformal quantile of each column's calibration
    set."""
    k, n, width = scores.shape
    stand_ins = WINDOW - n
    calibration = (
        np.concatenate([scores, np.broadcast_to(PRIOR[stand_ins][None, :, None], (k, stand_ins, width))], 1)
        if stand_ins
        else scores
    )
    alpha_t = np.asarray(alpha_t, np.float64)
    rank = np.ceil((1 - alpha_t) * (WINDOW + 1)).astype(np.int64)  # 1-based, of the WINDOW scores
    inside = np.minimum(np.maximum(rank, 1), WINDOW) - 1
    # a sort of 50: 1.5 µs for one stream, against 17 µs for a partition at each stream's own rank
    out = np.sort(calibration, axis=1)[np.arange(k), inside]  # (K, D)
    for i in np.flatnonzero(rank > WINDOW):  # past the largest score: its Gaussian tail (rare)
        tail = NormalDist().inv_cdf(1 - max(float(alpha_t[i]), ALPHA_FLOOR) / 2)
        out[i] = calibration[i].max(axis=0) * (tail / _Z_EDGE)
    out[alpha_t >= 1.0] = 0.0  # ACI's empty set: the point forecast
    return out.astype(np.float32, copy=False)


def factor(alpha_t: float, scores: np.ndarray) -> np.ndarray:
    """One stream's ``factors``: scores (n, D) -> (D,)."""
    return factors(np.array([alpha_t]), scores[None])[0]


def max_state_bytes(horizon: int, width: int) -> int:
    """The most a stream's rule takes as float32 arrays: a forecast is remembered only after an
    observation, so at most H are pending, with distinct step counts 1..H; plus WINDOW scores."""
    return 4 * (horizon + horizon * width + horizon * (horizon + 1) * width + WINDOW * width)


class StateError(ValueError):
    """Arrays that do not hold an adaptive interval state (a state token's, say)."""


def _empty(width: int) -> np.ndarray:
    return np.zeros((0, width), np.float32)


@dataclass
class StreamRules:
    """The rules of K streams that share one layout of pending forecasts, stacked (a model's streams in one
    batch of the server; K = 1: one stream, ``AdaptiveIntervals``). Arrays as ``AdaptiveIntervals`` keeps
    them, with the streams first: ``alpha_t`` (K,) float64; ``steps`` (P,) float32, shared; ``factors``
    (K, P, D); ``mean``, ``half`` (K, S, D); ``scores`` (K, n, D), all float32. The batch runs the rule as
    one set of numpy calls instead of ~25 a message and stream."""

    alpha_t: np.ndarray
    steps: np.ndarray
    factors: np.ndarray
    mean: np.ndarray
    half: np.ndarray
    scores: np.ndarray
    gamma: float = GAMMA
    alpha: float = ALPHA

    @classmethod
    def stack(cls, levels: list[float], arrays: list[list[np.ndarray]], gamma: float = GAMMA) -> StreamRules:
        """Streams' levels and ``AdaptiveIntervals.arrays`` lists, all of one layout (equal steps)."""
        if len(arrays) == 1:  # one stream (a lone message, eval): views, 1 µs against 10 for stacking
            stacked = [a[None] for a in arrays[0][1:]]
        else:
            stacked = [np.stack([a[i] for a in arrays]) for i in range(1, 5)]
        return cls(np.array(levels, np.float64), arrays[0][0], *stacked, gamma=gamma)

    def stream(self, k: int) -> tuple[float, list[np.ndarray]]:
        """Stream k's level and arrays (views into the stack)."""
        arrays = [self.steps, self.factors[k], self.mean[k], self.half[k], self.scores[k]]
        return float(self.alpha_t[k]), arrays

    def factor(self) -> np.ndarray:
        """(K, D) the factors the next forecasts are served with."""
        return factors(self.alpha_t, self.scores)

    def observe(self, value: np.ndarray, observed: np.ndarray | None = None) -> None:
        """value: (K, D) each stream's next observation; observed: (D,) bool, False for a missing value
        (that column resolves nothing; a row with any missing value adds no scores). Scores every pending
        forecast's first row against it, updates the levels and the recent scores."""
        if not len(self.steps):
            return
        counts = self.steps.astype(np.int64)
        firsts = np.cumsum(counts) - counts  # (P,) the row each pending forecast targets now
        value = np.asarray(value, np.float32)
        scores = np.abs(value[:, None] - self.mean[:, firsts]) / self.half[:, firsts]  # (K, P, D) float32
        miss = scores > self.factors
        if observed is not None and not np.all(observed):
            miss = miss[:, :, np.asarray(observed, bool).reshape(-1)]
        else:  # every column seen (always on a server): the scores join the recent ones
            self.scores = np.concatenate([self.scores, scores], axis=1)[:, -WINDOW:]
        self.alpha_t = self.alpha_t + self.gamma * (self.alpha * miss[0].size - miss.sum(axis=(1, 2)))
        rest = np.ones(self.mean.shape[1], bool)
        rest[firsts] = False
        self.mean, self.half = self.mean[:, rest], self.half[:, rest]
        waiting = counts > 1
        self.factors, self.steps = self.factors[:, waiting], self.steps[waiting] - np.float32(1)

    def serve(self, mean: np.ndarray, half: np.ndarray, served: np.ndarray) -> None:
        """Remembers the forecasts just served: mean, half (K, steps, D) their centres and calibrated
        half-widths, row 0 targeting the next observation; served (K, D) the factors they were served with."""
        if not mean.shape[1]:
            return
        self.steps = np.concatenate([self.steps, np.array([mean.shape[1]], np.float32)])
        self.factors = np.concatenate([self.factors, np.asarray(served, np.float32)[:, None]], axis=1)
        self.mean = np.concatenate([self.mean, mean], axis=1, dtype=np.float32)
        self.half = np.concatenate([self.half, half], axis=1, dtype=np.float32)


@dataclass
class AdaptiveIntervals:
    """One stream's ACI state (see the module doc), kept flat as a state token holds it, all float32:

    - ``steps`` (P,): oldest first, the observations each pending forecast still waits for;
    - ``factors`` (P, D): the factor each was served with;
    - ``mean``, ``half`` (sum of steps, D): each pending forecast's centres and calibrated half-widths in
      order, its first row targeting the next observation (``pending`` lists them per forecast);
    - ``scores`` (n <= WINDOW, D): the last resolved scores, oldest first.

    Flat, because a server keeps them in its session and hands them to the batch (``StreamRules``) at
    every message: kept as a list of per-interval arrays, the rule took ~34 µs a message with 7 pending
    and ForecastStream served 0.66× the observations per second of the server without the rule
    (bench.ts_serve, side by side); arrays are never changed in place, so a rule built on a session's
    arrays leaves them as they were. Centres, half-widths and observations are on whatever scale the caller
    serves on (the service and eval: the model's standardised scale). The rule itself is ``StreamRules``'s,
    run with K = 1.
    """

    gamma: float = GAMMA
    alpha: float = ALPHA
    alpha_t: float = ALPHA
    width: int = 1
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    factors: np.ndarray | None = None  # None: empty, of ``width`` columns
    mean: np.ndarray | None = None
    half: np.ndarray | None = None
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("factors", "mean", "half", "scores"):
            if getattr(self, name) is None:
                setattr(self, name, _empty(self.width))

    @property
    def factor(self) -> np.ndarray:
        """(D,) the factor the next forecast is served with."""
        return factor(self.alpha_t, self.scores)

    @property
    def pending(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(lo, hi) per pending forecast, each (steps left, D), oldest first: the intervals as served."""
        out, start = [], 0
        for n, f in zip(self.steps.astype(np.int64).tolist(), self.factors, strict=True):
            m, h = self.mean[start : start + n], self.half[start : start + n]
            out.append((m - f * h, m + f * h))
            start += n
        return out

    def _run(self, step: Callable[[StreamRules], None]) -> None:
        rules = StreamRules.stack([self.alpha_t], [self.arrays()], self.gamma)
        step(rules)
        self.alpha_t, (self.steps, self.factors, self.mean, self.half, self.scores) = rules.stream(0)

    def observe(self, value: np.ndarray, observed: np.ndarray | None = None) -> None:
        """value: (D,) the next observation; observed: (D,) bool (see ``StreamRules.observe``)."""
        self._run(lambda rules: rules.observe(np.asarray(value).reshape(1, -1), observed))

    def serve(self, mean: np.ndarray, half: np.ndarray, served: np.ndarray) -> None:
        """Remembers the forecast just served: mean, half (steps, D) its centres and calibrated
        half-widths, row 0 targeting the next observation; served (D,) the factor it was served with."""
        self._run(lambda rules: rules.serve(np.asarray(mean)[None], np.asarray(half)[None], served[None]))

    def arrays(self) -> list[np.ndarray]:
        """[steps (P,), factors (P, D), mean, half (sum, D), scores (n, D)] float32 (a state token's)."""
        return [self.steps, self.factors, self.mean, self.half, self.scores]

    @classmethod
    def from_arrays(
        cls,
        alpha_t: float,
        arrays: list[np.ndarray],
        width: int,
        max_steps: int,
        gamma: float = GAMMA,
    ) -> AdaptiveIntervals:
        """The inverse of ``arrays``; StateError unless they are consistent with (max_steps, width)."""
        _check_arrays(alpha_t, arrays, width, max_steps)
        return cls(gamma, ALPHA, alpha_t, width, *arrays)


def _check_arrays(alpha_t: float, arrays: list[np.ndarray], width: int, max_steps: int) -> None:
    shapes = [a.shape for a in arrays]
    if len(arrays) != 5 or any(a.dtype != np.float32 for a in arrays):
        raise StateError(f"adaptive interval arrays {shapes}: five float32 arrays expected")
    steps, factors, mean, half, scores = arrays
    counts = steps.astype(np.int64) if steps.ndim == 1 else np.zeros(0, np.int64)
    total = int(counts.sum())
    if not (
        steps.ndim == 1
        and np.array_equal(counts, steps)
        and np.all((counts >= 1) & (counts <= max_steps))
        and factors.shape == (len(steps), width)
        and mean.shape == half.shape == (total, width)
        and scores.ndim == 2
        and scores.shape[0] <= WINDOW
        and scores.shape[1] == width
        and np.isfinite(mean).all()
        and np.all(half > 0)
        and np.all(np.isfinite(half))
        and np.all((factors >= 0) & np.isfinite(factors))
        and np.all((scores >= 0) & np.isfinite(scores))
        and math.isfinite(alpha_t)
    ):
        raise StateError(f"adaptive interval arrays {shapes} do not fit {max_steps} steps of {width} columns")
