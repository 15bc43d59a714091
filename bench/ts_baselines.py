"""co2 and sunspots at horizon 8 with a rolling origin: rnnlab forecasters against seasonal-naive,
exponential smoothing and (S)ARIMA from statsmodels, on the same origins in the same run.

Every origin o of the test horizon (the last 104 weeks of co2, the last 30 years of sunspots) with
o + 8 <= N forecasts o .. o+7 from the values before o. The statsmodels models are fitted once on the
points before the test horizon and then filtered forward to each origin with their parameters fixed (the
rnnlab models, too, are trained once and read the true values before each origin). MASE divides by the
in-sample seasonal-naive MAE of the training part (forecast.metrics). Coverage: rnnlab's 90% intervals.

    python -m bench.ts_baselines [--minutes 1.0]     # -> bench/results/ts_baselines.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench import ROOT
from forecast.evaluate import evaluate_run
from forecast.metrics import scores, seasonal_naive_scale
from forecast.train import TrainConfig, prepare, read_series, resolved_preset, start_run

HORIZON = 8
MODELS = ("mlp", "gru", "lstm")
BASELINES = {
    # weekly co2: a trend and a 52-week season
    "co2": {"sarima": ((1, 1, 1), (0, 1, 1, 52)), "ets": {"trend": True, "seasonal": 52}, "history": 312},
    # yearly sunspots: an 11-year cycle that is not a fixed season; AR(9) is the classic model
    "sunspots": {
        "sarima": ((9, 0, 0), (0, 0, 0, 0)),
        "ets": {"trend": True, "damped_trend": True},
        "history": 279,
    },
}


def origins_of(length: int, test_start: int) -> np.ndarray:
    return np.arange(test_start, length - HORIZON + 1)


def statsmodels_forecasts(name: str, y: np.ndarray, test_start: int) -> dict[str, np.ndarray]:
    """y: (N,) -> {baseline: (origins, HORIZON) forecasts}; fitted on y[:test_start], filtered forward."""
    from statsmodels.tsa.statespace.exponential_smoothing import ExponentialSmoothing
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    order, seasonal = BASELINES[name]["sarima"]
    # the last HISTORY points only: a 52-week seasonal state space over all 2,180 weeks took > 5 minutes
    history = BASELINES[name]["history"]
    train = y[max(test_start - history, 0) : test_start]
    fits = {
        "sarima": SARIMAX(train, order=order, seasonal_order=seasonal).fit(disp=False, maxiter=50),
        "ets": ExponentialSmoothing(train, **BASELINES[name]["ets"]).fit(disp=False, maxiter=50),
    }
    out = {}
    for key, fit in fits.items():
        out[key] = np.stack(
            [fit.apply(y[max(o - history, 0) : o]).forecast(HORIZON) for o in origins_of(len(y), test_start)]
        )
    return out


def seasonal_naive(y: np.ndarray, test_start: int, season: int) -> np.ndarray:
    """The value one season before each target (the last observed season, repeated past the origin)."""
    return np.stack(
        [[y[o - season + (h % season)] for h in range(HORIZON)] for o in origins_of(len(y), test_start)]
    )


def rnnlab_runs(name: str, minutes: float, work: Path) -> dict[str, dict]:
    results = {}
    for model in MODELS:
        config = TrainConfig.of(
            dataset=name,
            model=model,
            horizon=HORIZON,
            max_minutes=minutes,
            epochs=40,
            progress=False,
            threads=1,
            seed=0,
        )
        start = time.perf_counter()
        start_run(config, work / model).fit()
        results[model] = {**evaluate_run(work / model), "train_s": round(time.perf_counter() - start, 1)}
    return results


def bench_series(name: str, minutes: float, work: Path) -> dict:
    config = TrainConfig.of(dataset=name)
    series = read_series(config.data, 0)
    prepared = prepare(series, resolved_preset(config.data, len(series.values)))
    y, s = series.values[:, 0], prepared.splits
    origins = origins_of(len(y), s.test_start)
    truth = np.stack([y[o : o + HORIZON] for o in origins])
    mask = np.stack([series.observed[o : o + HORIZON, 0] for o in origins])
    scale = seasonal_naive_scale(y[: s.valid_start], prepared.preset.season)
    start = time.perf_counter()
    forecasts = {
        "seasonal_naive": seasonal_naive(y, s.test_start, prepared.preset.season),
        **statsmodels_forecasts(name, y, s.test_start),
    }
    baselines = {k: scores(f, truth, f, f, scale, mask) for k, f in forecasts.items()}
    for v in baselines.values():
        v.pop("coverage")  # point forecasts only
    stats_s = round(time.perf_counter() - start, 1)
    rnnlab = rnnlab_runs(name, minutes, work / name)
    best = min(rnnlab, key=lambda m: rnnlab[m]["mase"])
    return {
        "origins": len(origins),
        "season": prepared.preset.season,
        "baselines": baselines,
        "baselines_s": stats_s,
        "rnnlab": rnnlab,
        "best_rnnlab": best,
        "best_mase_minus_baseline": {k: rnnlab[best]["mase"] - v["mase"] for k, v in baselines.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="training budget per rnnlab model")
    parser.add_argument("--series", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # statsmodels convergence chatter
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "horizon": HORIZON,
            "minutes_per_model": args.minutes,
            "series": {name: bench_series(name, args.minutes, Path(tmp)) for name in args.series},
        }
    out = ROOT / "bench" / "results" / "ts_baselines.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {
                n: {"best": r["best_rnnlab"], "margin": r["best_mase_minus_baseline"]}
                for n, r in result["series"].items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
