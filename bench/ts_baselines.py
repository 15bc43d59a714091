"""co2 and sunspots at horizon 8 with a rolling origin: rnnlab forecasters against seasonal-naive,
exponential smoothing and (S)ARIMA from statsmodels, on the same origins in the same run.

Every origin o of the test horizon (the last 104 weeks of co2, the last 30 years of sunspots) with
o + 8 <= N forecasts o .. o+7 from the true values before o. MASE divides by the in-sample seasonal-naive
MAE of the training part (forecast.metrics), the same scale for every model.

statsmodels models are fitted ONCE on all points before the test horizon; at each origin the fitted
parameters are applied to the history up to the origin (``results.apply``: the Kalman filter runs with
the parameters fixed, no refit) and forecast 8 steps. Holt-Winters (statsmodels.tsa.holtwinters, which
has no ``apply``) is re-run at each origin with the fitted smoothing parameters and initial states fixed
(``optimized=False``), which is the same filter. co2's missing weeks are NaN for the state-space models
(the Kalman filter skips them) and interpolated for Holt-Winters.

rnnlab models are trained twice, as the statsmodels models see all points before the test horizon too:
a selection run (train part only, early stopping on the validation part, whose best epoch and 90%
interval calibration are kept) and a final run on train + validation for that many epochs with that
interval scale (``--fit-valid``); the final run is scored. Both runs' scores are in the JSON. Sunspots
models are also trained on the square root of the series (``--transform sqrt``: the spread of sunspot
numbers grows with their level; log and Box-Cox are undefined on the years without sunspots).

Each series is one run (its baselines and models measured together); ``--series NAME`` re-runs only those
series and keeps the other series' entries of the existing JSON as they were measured.

    python -m bench.ts_baselines [--minutes 2] [--series co2 sunspots]  # -> bench/results/ts_baselines.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import ROOT
from forecast.data import Series
from forecast.evaluate import evaluate_run
from forecast.metrics import scores, seasonal_naive_scale
from forecast.train import TrainConfig, prepare, read_series, resolved_preset, start_run

HORIZON = 8
# rnnlab recipes per series: lr 1e-3 (1e-2 moved the least-squares skip away from its optimum within an
# epoch on sunspots), three members per model (forecast.model: a seed ensemble in one module)
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "co2": {
        "mlp": {"model": "mlp", "hidden": 32},
        "gru": {"model": "gru", "hidden": 16},
        "mamba": {"model": "mamba", "hidden": 16},
        "mingru": {"model": "mingru", "hidden": 16},
    },
    "sunspots": {
        "mlp": {"model": "mlp", "hidden": 16},
        "gru": {"model": "gru", "hidden": 16},
        "lstm": {"model": "lstm", "hidden": 16},
        "mamba": {"model": "mamba", "hidden": 16},
        "mingru": {"model": "mingru", "hidden": 16},
        "mlp-sqrt": {"model": "mlp", "hidden": 16, "transform": "sqrt"},
        "gru-sqrt": {"model": "gru", "hidden": 16, "transform": "sqrt"},
        "lstm-sqrt": {"model": "lstm", "hidden": 16, "transform": "sqrt"},
    },
}
COVERAGE_TARGET = (0.85, 0.95)
COMMON = {"lr": 1e-3, "members": 3, "epochs": 200, "patience": 10, "horizon": HORIZON}
FOURIER_TERMS = 4
"""Harmonics of the year in the ARIMA's exogenous regressors (co2)."""
AIRLINE_HISTORY = 312
"""Weeks the airline SARIMA is fitted on and filters at each origin: over all 2,180 weeks the
52-week seasonal state space did not finish fitting in 4 minutes; 312 weeks took 110 s."""


def origins_of(length: int, test_start: int) -> np.ndarray:
    return np.arange(test_start, length - HORIZON + 1)


def seasonal_naive(y: np.ndarray, origins: np.ndarray, season: int) -> np.ndarray:
    """The value one season before each target (the last observed season, repeated past the origin)."""
    return np.stack([[y[o - season + (h % season)] for h in range(HORIZON)] for o in origins])


def year_fourier(times: list[str]) -> np.ndarray:
    """times 'YYYYMMDD' -> (N, 2K) sin/cos of the first K harmonics of the calendar year."""
    days = np.array([datetime.date(int(t[:4]), int(t[4:6]), int(t[6:])).toordinal() for t in times], float)
    angle = 2 * np.pi * days / 365.25
    return np.column_stack([f(k * angle) for k in range(1, FOURIER_TERMS + 1) for f in (np.sin, np.cos)])


def applied(
    model: Any, y: np.ndarray, test_start: int, start: int = 0, exog: Any = None, maxiter: int = 200
) -> np.ndarray:
    """Fits ``model`` (a statsmodels state-space model on y[start:test_start]) once, then at every origin
    applies the fitted parameters to y[o - (test_start - start):o] (``apply``, no refit) and forecasts."""
    fit = model.fit(disp=False, maxiter=maxiter)
    history = test_start - start
    out = []
    for o in origins_of(len(y), test_start):
        lo = max(o - history, 0)
        past, future = (None, None) if exog is None else (exog[lo:o], exog[o : o + HORIZON])
        out.append(fit.apply(y[lo:o], exog=past).forecast(HORIZON, exog=future))
    return np.stack(out)


def holt_winters(y: np.ndarray, test_start: int, season: int) -> np.ndarray:
    """Additive trend and season, fitted once on y[:test_start]; re-run per origin with everything fixed."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    spec = {"trend": "add", "seasonal": "add", "seasonal_periods": season}
    p = ExponentialSmoothing(y[:test_start], **spec).fit().params
    known = {"initial_level": p["initial_level"], "initial_trend": p["initial_trend"]}
    smoothing = {k: p[k] for k in ("smoothing_level", "smoothing_trend", "smoothing_seasonal")}
    out = []
    for o in origins_of(len(y), test_start):
        model = ExponentialSmoothing(
            y[:o], **spec, initialization_method="known", initial_seasonal=p["initial_seasons"], **known
        )
        out.append(model.fit(**smoothing, optimized=False).forecast(HORIZON))
    return np.stack(out)


def statsmodels_forecasts(series: Series, test_start: int) -> dict[str, tuple[str, np.ndarray, float]]:
    """{baseline: (description, (origins, HORIZON) forecasts, seconds)} for co2 or sunspots."""
    from statsmodels.tsa.statespace.exponential_smoothing import ExponentialSmoothing
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    y = series.values[:, 0]
    gappy = np.where(series.observed[:, 0], y, np.nan)
    if series.name == "co2":
        fourier = year_fourier(series.times)
        first = test_start - AIRLINE_HISTORY
        jobs = {
            "ets": (
                "Holt-Winters, additive trend and 52-week season",
                lambda: holt_winters(y, test_start, 52),
            ),
            "arima_fourier": (
                f"ARIMA(1,1,1) + drift with {FOURIER_TERMS} yearly Fourier pairs as regressors",
                lambda: applied(
                    SARIMAX(gappy[:test_start], exog=fourier[:test_start], order=(1, 1, 1), trend="t"),
                    gappy,
                    test_start,
                    exog=fourier,
                ),
            ),
            "sarima": (
                f"airline SARIMA(0,1,1)(0,1,1,52) on the last {AIRLINE_HISTORY} weeks",
                lambda: applied(
                    SARIMAX(gappy[first:test_start], order=(0, 1, 1), seasonal_order=(0, 1, 1, 52)),
                    gappy,
                    test_start,
                    start=first,
                    maxiter=50,  # 110 s on the shared machine; 200 iterations took 742 s
                ),
            ),
        }
    else:
        jobs = {
            "ets": (
                "damped-trend exponential smoothing",
                lambda: applied(
                    ExponentialSmoothing(y[:test_start], trend=True, damped_trend=True), y, test_start
                ),
            ),
            "ar9": (
                "AR(9) with a constant (the classic sunspot model)",
                lambda: applied(SARIMAX(y[:test_start], order=(9, 0, 0), trend="c"), y, test_start),
            ),
        }
    out = {}
    for name, (text, job) in jobs.items():
        start = time.perf_counter()
        out[name] = (text, job(), round(time.perf_counter() - start, 1))
        print(f"{series.name} {name}: {out[name][2]} s", flush=True)
    return out


def best_epoch(history: list[dict[str, Any]]) -> tuple[int, float]:
    """The selection run's epoch with the lowest valid loss and the interval scale calibrated there."""
    valid = [r for r in history if r["split"] == "valid"]
    best = min(valid, key=lambda r: r["loss"])
    return max(round(best["epoch"]), 1), float(best["interval_scale"])


def rnnlab_model(name: str, recipe: dict[str, Any], minutes: float, work: Path) -> dict[str, Any]:
    """The selection run, then the final run on train + valid; both scored on the test origins."""
    base = {"dataset": name, **COMMON, **recipe, "progress": False, "threads": 1, "seed": 0}
    start = time.perf_counter()
    trainer = start_run(TrainConfig.of(**base, max_minutes=minutes), work / "select")
    fit = trainer.fit()
    epochs, scale = best_epoch(fit.history)
    final = {**base, "epochs": epochs, "patience": 0, "fit_valid": True, "interval_scale": scale}
    start_run(TrainConfig.of(**final), work / "final").fit()
    return {
        **evaluate_run(work / "final", "last"),
        "selection": {k: v for k, v in evaluate_run(work / "select").items() if k != "per_step_mae"},
        "epochs": epochs,
        "selection_stopped_by": fit.reason,
        "interval_scale": scale,
        "recipe": {**COMMON, **recipe},
        "train_s": round(time.perf_counter() - start, 1),
    }


def bench_series(name: str, minutes: float, work: Path) -> dict[str, Any]:
    config = TrainConfig.of(dataset=name)
    series = read_series(config.data, 0)
    prepared = prepare(series, resolved_preset(config.data, len(series.values)))
    y, s, season = series.values[:, 0], prepared.splits, prepared.preset.season
    origins = origins_of(len(y), s.test_start)
    truth = np.stack([y[o : o + HORIZON] for o in origins])
    mask = np.stack([series.observed[o : o + HORIZON, 0] for o in origins])
    scale = seasonal_naive_scale(y[: s.valid_start], season)
    baselines = {"seasonal_naive": ("the value one season before", seasonal_naive(y, origins, season), 0.0)}
    baselines.update(statsmodels_forecasts(series, s.test_start))
    scored = {}
    for key, (text, forecast, seconds) in baselines.items():
        point = scores(forecast, truth, forecast, forecast, scale, mask)
        point.pop("coverage")  # point forecasts only
        scored[key] = {**point, "model": text, "seconds": seconds}
    rnnlab = {m: rnnlab_model(name, r, minutes, work / name / m) for m, r in RECIPES[name].items()}
    best = min(rnnlab, key=lambda m: rnnlab[m]["mase"])
    covered = [m for m, r in rnnlab.items() if in_target(r["coverage"])]
    best_covered = min(covered, key=lambda m: rnnlab[m]["mase"]) if covered else None
    return {
        "origins": len(origins),
        "season": season,
        "mase_scale": scale,
        "baselines": scored,
        "rnnlab": rnnlab,
        "best_rnnlab": best,
        "best_mase_vs_baselines": margins(rnnlab[best]["mase"], scored),
        "target_mase_met": all(m["difference"] < 0 for m in margins(rnnlab[best]["mase"], scored).values()),
        "target_coverage_met": {
            "served_stream": in_target(rnnlab[best]["coverage"]),
            "fixed_intervals": in_target(rnnlab[best]["coverage_fixed"]),
        },
        "best_covered_rnnlab": best_covered,
        "best_covered_mase_vs_baselines": (
            margins(rnnlab[best_covered]["mase"], scored) if best_covered else None
        ),
    }


def in_target(coverage: float) -> bool:
    return COVERAGE_TARGET[0] <= coverage <= COVERAGE_TARGET[1]


def margins(mase: float, baselines: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """An rnnlab MASE against each baseline's: the difference (negative: rnnlab is better) and the ratio."""
    return {k: {"difference": mase - v["mase"], "ratio": mase / v["mase"]} for k, v in baselines.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="budget of each rnnlab selection run")
    parser.add_argument("--series", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # statsmodels convergence chatter
    torch.set_num_threads(1)
    out = ROOT / "bench" / "results" / "ts_baselines.json"
    kept = json.loads(out.read_text(encoding="utf-8"))["series"] if out.exists() else {}
    result = {"horizon": HORIZON, "threads": 1, "minutes_per_selection_run": args.minutes, "series": kept}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.series:
            start = time.perf_counter()
            result["series"][name] = bench_series(name, args.minutes, Path(tmp))
            result["series"][name]["seconds"] = round(time.perf_counter() - start, 1)
            result["series"][name]["measured"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    summary = {
        n: {
            "best": r["best_rnnlab"],
            "coverage": r["rnnlab"][r["best_rnnlab"]]["coverage"],
            "coverage_fixed": r["rnnlab"][r["best_rnnlab"]]["coverage_fixed"],
            "vs": r["best_mase_vs_baselines"],
            "models": {
                m: {k: v[k] for k in ("mase", "coverage", "coverage_fixed", "coverage_by_gamma")}
                for m, v in r["rnnlab"].items()
            },
            "best_covered": r.get("best_covered_rnnlab"),
        }
        for n, r in result["series"].items()
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
