"""Numeric series: registry datasets, the notes' synthetic presets, user CSVs, chronological splits, scaling.

Missing-value rule (CSV and registry series): an empty field or one of ``NA``, ``NaN``, ``nan``, ``null``
is missing; missing values are filled by linear interpolation in time order between the nearest observed
neighbours (before the first / after the last observation: that observation) and marked in ``observed``
so that evaluation scores observed points only. A row that is not missing but cannot be read (wrong number
of fields, a value that is not a number, a time that does not increase) is refused with its line number.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.datasets import fetch
from serving.errors import UserError
from serving.transforms import Transform, boxcox_lambda

MISSING = {"", "na", "nan", "null"}


class SeriesError(UserError):
    """A series cannot be read or split; the message names the file and line."""


@dataclass
class Series:
    """A (multivariate) series in time order."""

    values: np.ndarray
    """(N, D) float64, missing values filled (see the module's rule)."""
    observed: np.ndarray
    """(N, D) bool, False where the value was missing."""
    times: list[str]
    columns: list[str]
    name: str


@dataclass(frozen=True)
class Preset:
    """Where a named series comes from and how it is split and scored."""

    test: int
    """Points at the end that form the test horizon."""
    season: int
    """Seasonal period of the MASE scale (1 = naive)."""
    window: int
    batch_size: int
    ar: int = 0
    """Lags of the linear autoregressive skip (forecast.model; 0 = none)."""
    source: tuple[str, str, str] | None = None
    """(registry name, time column, value column) for a real series."""


PRESETS: dict[str, Preset] = {
    # lags of the skip: a direct linear AR scored best at 60 lags on co2 (MASE 0.239; 52: 0.296, 104:
    # 0.251) and at 9 on sunspots (0.636; 22: 0.774), least squares on the points before the test
    "co2": Preset(test=104, season=52, window=64, batch_size=32, ar=60, source=("co2", "date", "co2")),
    "sunspots": Preset(
        test=30, season=11, window=22, batch_size=16, ar=9, source=("sunspots", "YEAR", "SUNACTIVITY")
    ),
    # 002: x_t = sin(0.01 t) + N(0, 0.2^2), T = 1000, tau = 4, the first 600 points train, batch 16
    "sine-d2l": Preset(test=400, season=1, window=4, batch_size=16),
    # 003: sin(t) + 0.1 N(0, 1) at t = 0, 0.1, ..., 19.9 (200 points), windows of 5; last 40 points test
    "sine-rnn": Preset(test=40, season=1, window=5, batch_size=16),
}


def sine_series(name: str, seed: int) -> Series:
    """The notes' noisy sine waves (002: sine-d2l, 003: sine-rnn); the noise is a function of ``seed``."""
    rng = np.random.default_rng(seed)
    if name == "sine-d2l":
        t = np.arange(1, 1001, dtype=np.float64)
        x = np.sin(0.01 * t) + rng.normal(0.0, 0.2, t.shape)
    else:
        t = np.arange(200, dtype=np.float64) * 0.1
        x = np.sin(t) + 0.1 * rng.normal(0.0, 1.0, t.shape)
    values = x[:, None]
    return Series(values, np.ones_like(values, dtype=bool), [f"{v:g}" for v in t], ["x"], name)


def _time_key(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _parse_rows(
    path: Path, time_column: str, value_columns: list[str]
) -> tuple[list[str], list[list[float]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise SeriesError(f"{path}: empty file")
        missing = [c for c in [time_column, *value_columns] if c not in header]
        if missing:
            raise SeriesError(f"{path}: no column {missing[0]!r}; columns: {', '.join(header)}")
        t_index, v_index = header.index(time_column), [header.index(c) for c in value_columns]
        times: list[str] = []
        rows: list[list[float]] = []
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise SeriesError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            rows.append([_parse_value(row[i], path, line, header[i]) for i in v_index])
            if times and _time_key(row[t_index]) <= _time_key(times[-1]):  # type: ignore[operator]
                raise SeriesError(f"{path}:{line}: time {row[t_index]!r} does not come after {times[-1]!r}")
            times.append(row[t_index])
    return times, rows


def _parse_value(text: str, path: Path, line: int, column: str) -> float:
    if text.strip().lower() in MISSING:
        return float("nan")
    try:
        value = float(text)
    except ValueError:
        raise SeriesError(f"{path}:{line}: column {column!r}: {text!r} is not a number") from None
    if not np.isfinite(value):
        raise SeriesError(f"{path}:{line}: column {column!r}: {text!r} is not finite")
    return value


def fill_missing(values: np.ndarray) -> np.ndarray:
    """values: (N, D) with NaN for missing -> linearly interpolated copy (ends: nearest observation)."""
    out = values.copy()
    index = np.arange(len(values))
    for d in range(values.shape[1]):
        seen = ~np.isnan(values[:, d])
        if not seen.any():
            raise SeriesError(f"column {d}: no observed value")
        out[:, d] = np.interp(index, index[seen], values[seen, d])
    return out


def read_csv(path: str | Path, time_column: str, value_columns: list[str], name: str | None = None) -> Series:
    """A CSV with a header: one time column (strictly increasing) and one or more value columns."""
    path = Path(path)
    times, rows = _parse_rows(path, time_column, value_columns)
    if len(rows) < 2:
        raise SeriesError(f"{path}: {len(rows)} data rows; a series needs at least 2")
    raw = np.array(rows, dtype=np.float64)
    return Series(fill_missing(raw), ~np.isnan(raw), times, list(value_columns), name or path.stem)


def load_series(dataset: str, seed: int = 0) -> Series:
    """A preset series by name: co2, sunspots (registry, mirror, sha256) or sine-d2l, sine-rnn (synthetic)."""
    if dataset not in PRESETS:
        raise SeriesError(f"unknown series {dataset!r}; known: {', '.join(PRESETS)} (or --csv FILE)")
    source = PRESETS[dataset].source
    if source is None:
        return sine_series(dataset, seed)
    name, time_column, value_column = source
    return read_csv(fetch(name), time_column, [value_column], name=dataset)


@dataclass
class Splits:
    """Chronological cut points: train = [0, valid_start), valid = [valid_start, test_start), test = rest."""

    valid_start: int
    test_start: int
    length: int


def chronological_splits(length: int, test: int, window: int) -> Splits:
    """The last ``test`` points are the test horizon; the last 10% of the rest (at least ``window`` + 1
    points) validate."""
    if test <= 0 or test >= length:
        raise SeriesError(f"a test horizon of {test} points does not fit a series of {length}")
    train_valid = length - test
    valid = max(train_valid // 10, window + 1)
    if train_valid - valid < 2 * window + 1:
        raise SeriesError(f"{train_valid} points before the test horizon are too few for windows of {window}")
    return Splits(train_valid - valid, train_valid, length)


@dataclass
class Scaler:
    """Per-column standardisation fitted on the training part only; stored with the model."""

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, train: np.ndarray) -> Scaler:
        """train: (N, D) -> the columns' mean and std (std 1 for a constant column)."""
        std = train.std(axis=0)
        return cls(train.mean(axis=0).tolist(), np.where(std > 0, std, 1.0).tolist())

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - np.array(self.mean)) / np.array(self.std)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return values * np.array(self.std) + np.array(self.mean)


def fit_transform(name: str, series: Series, train_end: int) -> Transform:
    """The transform ``name`` for ``series``; Box-Cox's lambda (per column) is fitted on the training part
    values[:train_end] only. Every value of the series must lie in the transform's domain: the first one
    outside is refused naming its column, row and time."""
    transform = Transform(name, (1.0,) * len(series.columns) if name == "boxcox" else ())
    transform.check(series.values, series.columns, series.times, series.name)
    if name != "boxcox":
        return transform
    train = series.values[:train_end]
    return Transform(name, tuple(boxcox_lambda(train[:, d]) for d in range(train.shape[1])))
