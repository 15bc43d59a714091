"""Loading a run and scoring it with a rolling origin over the test horizon; plots beside the run.

Rolling origin: every test point o with o + H <= N is an origin; the model reads the W values before o
(true values: the series is observed up to o) and forecasts o .. o+H-1. MAE, RMSE and MASE (MAE over the
in-sample seasonal-naive MAE of the training part) and 90% interval coverage are taken over all (origin,
step) pairs whose truth was observed, in the series' own units. With a transform (``--transform``), the
model's mean and interval ends on the transformed scale are mapped back (the point forecast is then the
median).

``coverage`` is that of the intervals a live stream serves (``ForecastStream``): adaptive conformal
inference (serving.conformal, at its fixed gamma) replayed over the consecutive test origins, each
origin's interval using only the forecasts whose targets were observed before it. ``coverage_by_gamma``
reports it for each gamma of ``GAMMAS`` (the sensitivity; the served gamma was fixed before any of them
was measured). ``coverage_fixed`` is that of the model's calibrated intervals (sigma times the interval
scale calibrated on the validation part: what ``forecast`` and the one-shot ``Forecast`` call serve). A
test period calmer than the validation part (co2: the 90% quantile of |error| / sigma was 0.79 of the
validation part's) leaves fixed intervals too wide."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forecast.data import Preset, Scaler, Series
from forecast.metrics import scores, seasonal_naive_scale
from forecast.model import Z90, ForecastConfig, Forecaster
from forecast.train import CHECKPOINT_KIND, Prepared, TrainConfig, prepare, read_series
from lm.checkpoint import load_checkpoint
from serving.conformal import GAMMA, AdaptiveIntervals
from serving.transforms import Transform

GAMMAS = (0.005, 0.01, 0.02, 0.05)


@dataclass
class LoadedRun:
    model: Forecaster
    config: TrainConfig
    prepared: Prepared


def load_run(run_dir: str | Path, which: str = "best") -> LoadedRun:
    """The run's model (eval mode), its config and its series prepared with the stored scaler."""
    payload = load_checkpoint(Path(run_dir) / f"{which}.pt", CHECKPOINT_KIND)
    model = Forecaster(ForecastConfig(**payload["model_config"]))
    model.load_state_dict(payload["model"])
    config = TrainConfig.from_dict(payload["train_config"])
    mc = model.config
    preset = Preset(test=payload["test"], season=payload["season"], window=mc.window, batch_size=1)
    series = read_series(config.data, config.optim.seed)
    transform = Transform.from_dict(payload.get("transform"))  # runs from before the transform: none
    return LoadedRun(model.eval(), config, prepare(series, preset, Scaler(**payload["scaler"]), transform))


@torch.no_grad()
def predict(model: Forecaster, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """windows: (n, W, D) standardised -> mean, sigma (n, H, D) standardised."""
    mean, log_sigma = model(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)))
    return mean.numpy().astype(np.float64), np.exp(log_sigma.numpy()).astype(np.float64)


@torch.no_grad()
def recursive(model: Forecaster, windows: np.ndarray, steps: int) -> np.ndarray:
    """windows: (n, W, D) -> (n, steps, D) means, each step's one-step mean fed back as an input."""
    current, out = np.array(windows, dtype=np.float32), []
    for _ in range(steps):
        mean, _ = predict(model, current)
        out.append(mean[:, 0])
        current = np.concatenate([current[:, 1:], mean[:, :1].astype(np.float32)], axis=1)
    return np.stack(out, axis=1)


def rolling_origin(run: LoadedRun) -> dict[str, Any]:
    """Scores of the direct forecasts over every test origin (see the module doc), plus per-step MAE.
    Intervals are built on the model's (transformed, standardised) scale and their endpoints mapped to
    the series' units."""
    p, mc = run.prepared, run.model.config
    x, _ = p.windows(p.splits.test_start, p.splits.length, mc.window, mc.horizon)
    origins = np.arange(p.splits.test_start, p.splits.length - mc.horizon + 1)
    mean, sigma = predict(run.model, x)
    pred = p.to_units(mean)
    truth = np.stack([p.series.values[o : o + mc.horizon] for o in origins])
    mask = np.stack([p.series.observed[o : o + mc.horizon] for o in origins])
    scale = seasonal_naive_scale(p.series.values[: p.splits.valid_start], p.preset.season)

    half = Z90 * sigma
    result = scores(pred, truth, p.to_units(mean - half), p.to_units(mean + half), scale, mask)
    err = np.abs(pred - truth)
    result["per_step_mae"] = [float(np.mean(err[:, h][mask[:, h]])) for h in range(mc.horizon)]
    adaptive = {g: adaptive_intervals(p, origins, mean, half, g) for g in GAMMAS}
    adaptive = {g: scores(pred, truth, lo, hi, scale, mask) for g, (lo, hi) in adaptive.items()}
    result["coverage_fixed"], result["coverage"] = result["coverage"], adaptive[GAMMA]["coverage"]
    result["coverage_by_gamma"] = {str(g): a["coverage"] for g, a in adaptive.items()}
    result.update(origins=len(origins), horizon=mc.horizon, season=p.preset.season)
    return result


def adaptive_intervals(
    p: Prepared, origins: np.ndarray, mean: np.ndarray, half: np.ndarray, gamma: float = GAMMA
) -> tuple[np.ndarray, np.ndarray]:
    """The intervals a live stream serves at consecutive origins under the adaptive rule: mean, half
    (n, H, D) standardised (the calibrated 90% half-width) -> lo, hi (n, H, D) in the series' units.
    Before origin o the stream observes the value at o - 1, which resolves the forecasts that targeted it;
    the rule compares on the model's scale (the standardised transformed values), as the service does.
    """
    rule = AdaptiveIntervals(gamma=gamma, width=mean.shape[-1])
    lo, hi = np.empty_like(mean), np.empty_like(mean)
    for i, o in enumerate(origins):
        if i:
            rule.observe(p.scaled[o - 1], p.series.observed[o - 1])
        served = rule.factor
        lo[i], hi[i] = mean[i] - served * half[i], mean[i] + served * half[i]
        rule.serve(mean[i], half[i], served)  # kept as float32, as the service keeps them
    return p.to_units(lo), p.to_units(hi)


def evaluate_run(run_dir: str | Path, which: str = "best") -> dict[str, Any]:
    return rolling_origin(load_run(run_dir, which))


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def forecast_next(run: LoadedRun, horizon: int, series: Series | None = None) -> list[dict[str, Any]]:
    """The next ``horizon`` values after the series' end (default: the run's own series) with 90% intervals;
    beyond the model's horizon the direct forecasts are extended recursively."""
    p, mc = run.prepared, run.model.config
    history = p.series if series is None else series
    values = history.values
    if len(values) < mc.window:
        raise ValueError(f"the history has {len(values)} points; the model reads {mc.window}")
    start = len(values) - mc.window  # only the last W values are read
    p.transform.check(values[start:], history.columns, history.times[start:], history.name, start + 1)
    window = p.scaler.transform(p.transform.forward(values[-mc.window :]))[None]
    mean, sigma = predict(run.model, window)
    if horizon > mc.horizon:
        extra = recursive(run.model, window, horizon)[:, mc.horizon :]
        mean = np.concatenate([mean, extra], axis=1)
        sigma = np.concatenate([sigma, np.repeat(sigma[:, -1:], horizon - mc.horizon, axis=1)], axis=1)
    mean, half = mean[0, :horizon], Z90 * sigma[0, :horizon]
    pred, lower, upper = p.to_units(mean), p.to_units(mean - half), p.to_units(mean + half)
    return [
        {"step": h + 1, "mean": pred[h].tolist(), "lo90": lower[h].tolist(), "hi90": upper[h].tolist()}
        for h in range(horizon)
    ]


def k_step_errors(run: LoadedRun, ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> dict[int, float]:
    """MAE of recursive k-step forecasts (one-step means fed back, note 002) over the test origins o with
    o + k <= N, for every k that fits the test horizon: {k: MAE in the series' units}."""
    p, mc = run.prepared, run.model.config
    ks = tuple(k for k in ks if k < p.splits.length - p.splits.test_start)
    x, _ = p.windows(p.splits.test_start, p.splits.length, mc.window, 1)
    rec = p.to_units(recursive(run.model, x, max(ks)))
    out = {}
    for k in ks:
        n = len(x) - k + 1  # origins whose k-th target exists
        truth = p.series.values[p.splits.test_start + k - 1 :][:n]
        seen = p.series.observed[p.splits.test_start + k - 1 :][:n]
        out[k] = float(np.mean(np.abs(rec[:n, k - 1] - truth)[seen]))
    return out


@torch.no_grad()
def hidden_states(run: LoadedRun) -> tuple[np.ndarray, np.ndarray]:
    """The first member's features (the recurrent state after each window, or the MLP's hidden layer)
    at every origin of the whole series: states (n, hidden), the time index of each (n,)."""
    p, mc = run.prepared, run.model.config
    x, _ = p.windows(0, p.splits.length, mc.window, 1)
    level = x[:, -1:] if mc.relative else np.zeros_like(x[:, -1:])
    states = run.model.features(torch.from_numpy(np.ascontiguousarray(x - level, dtype=np.float32)))
    return states.numpy(), np.arange(mc.window, p.splits.length)


def plot_run(run: LoadedRun, out_dir: str | Path) -> list[Path]:
    """PNGs beside the run: forecast.png (the test horizon's one-step forecasts against the truth with
    the 90% interval; MAE by step ahead, direct vs recursive), error_growth.png (recursive k-step MAE,
    note 002) and, for recurrent models, hidden_pca.png (the hidden state's first two principal
    components over the whole series, coloured by the position in the season, note 003)."""
    from forecast import plots

    p, mc, out = run.prepared, run.model.config, Path(out_dir)
    x, _ = p.windows(p.splits.test_start, p.splits.length, mc.window, mc.horizon)
    mean, sigma = predict(run.model, x)
    pred = p.to_units(mean)[:, 0, 0]
    lower, upper = p.to_units(mean - Z90 * sigma)[:, 0, 0], p.to_units(mean + Z90 * sigma)[:, 0, 0]
    origins = np.arange(p.splits.test_start, p.splits.test_start + len(pred))
    truth = np.stack([p.series.values[o : o + mc.horizon] for o in origins])
    rec = p.to_units(recursive(run.model, x, mc.horizon))
    steps = {
        "direct": np.abs(p.to_units(mean) - truth).mean(axis=(0, 2)),
        "recursive": np.abs(rec - truth).mean(axis=(0, 2)),
    }
    title = f"{p.series.name} {mc.model}"
    values = p.series.values[:, 0]
    paths = [
        plots.forecast_figure(
            out / "forecast.png",
            title,
            values,
            p.splits.test_start,
            pred,
            lower,
            upper,
            steps,
            context=3 * mc.window,
        ),
        plots.error_growth_figure(
            out / "error_growth.png", f"{title}: recursive k-step MAE", {"test origins": k_step_errors(run)}
        ),
    ]
    if mc.model != "mlp":
        states, times = hidden_states(run)
        season = p.preset.season
        colour, label = (
            (times % season, f"time mod {season} (season)") if season > 1 else (times, "time index")
        )
        paths.append(
            plots.hidden_pca_figure(out / "hidden_pca.png", f"{title}: hidden state", states, colour, label)
        )
    return paths
