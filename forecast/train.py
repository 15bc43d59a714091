"""Training a forecaster on the shared loop (lm.loop): ``Forecasting`` is the forecasting lm.loop.Family.

Batches are windows of the standardised training part: (x: (B, W, D), y: (B, H, D)); an epoch's order is
a pure function of (seed, epoch), so the loop's exact resume holds. The loss is the Gaussian NLL of the
head (the mean is the point forecast, the scale gives the interval); the valid metrics are that NLL and
the MSE of the mean, in standardised units. best.pt holds the lowest valid loss.

Run directory: config.json (train config, model config, scaler, split, season), last.pt, best.pt,
metrics.jsonl, metrics.png.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from forecast.config import TrainConfig, TSDataConfig
from forecast.data import (
    PRESETS,
    Preset,
    Scaler,
    Series,
    Splits,
    chronological_splits,
    fit_transform,
    load_series,
    read_csv,
)
from forecast.model import ForecastConfig, Forecaster, calibrated_scale, gaussian_nll
from lm import loop
from lm.loop import StepLoss, Trainer
from lm.metrics import Figures
from serving.transforms import Transform

CHECKPOINT_KIND = "ts"
# What the loop logs and plots (metrics.jsonl, metrics.png, the bar, the valid lines), by --loss: the
# loss reported (Forecasting.loss) on the standardised scale, the valid MSE of the (ensemble) mean beside
# it, no perplexity; the bar counts windows.
_PANEL = ("mse", "valid MSE of the mean (standardised)")
FIGURES = {
    "nll": Figures(
        "Gaussian NLL", "nats/value, standardised", perplexity=False, panel=_PANEL, rate="windows/s"
    ),
    "mse": Figures("MSE", "standardised units²", perplexity=False, panel=_PANEL, rate="windows/s"),
}


def resolved_preset(data: TSDataConfig, length: int) -> Preset:
    """The preset's test/season/window/batch with the config's non-zero values over them."""
    base = (
        PRESETS[data.dataset]
        if not data.csv
        else Preset(test=max(length // 5, 1), season=1, window=8, batch_size=16)
    )
    return Preset(
        test=data.test or base.test,
        season=data.season or base.season,
        window=data.window or base.window,
        batch_size=data.batch_size or base.batch_size,
        ar=base.ar if data.ar < 0 else data.ar,
    )


def read_series(data: TSDataConfig, seed: int) -> Series:
    if data.csv:
        return read_csv(data.csv, data.time_column, data.columns())
    return load_series(data.dataset, seed)


@dataclass
class Prepared:
    """A series ready for a model: the split, the scaler fitted on train, the standardised values."""

    series: Series
    preset: Preset
    splits: Splits
    scaler: Scaler
    scaled: np.ndarray
    """(N, D) float32 standardised values (of the transformed series)."""
    transform: Transform = field(default_factory=Transform)

    def to_units(self, standardised: np.ndarray) -> np.ndarray:
        """(..., D) standardised (transformed) values -> the series' units (interval endpoints too: the
        inverse transform is monotone)."""
        return self.transform.inverse(self.scaler.inverse(standardised))

    def windows(self, start: int, stop: int, window: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Every (x, y) whose target lies in [start, stop): x (n, W, D), y (n, H, D)."""
        origins = np.arange(max(start, window), stop - horizon + 1)
        x = np.stack([self.scaled[o - window : o] for o in origins])
        y = np.stack([self.scaled[o : o + horizon] for o in origins])
        return x, y


def prepare(
    series: Series,
    preset: Preset,
    scaler: Scaler | None = None,
    transform: Transform | str = "none",
) -> Prepared:
    """The split, the transform (a name: fitted on the training part; a Transform: stored with a run) and
    the scaler (fitted on the transformed training part unless given)."""
    splits = chronological_splits(len(series.values), preset.test, preset.window)
    if isinstance(transform, str):
        transform = fit_transform(transform, series, splits.valid_start)
    else:
        fit_transform(transform.name, series, splits.valid_start)  # the domain check: names the bad row
    values = transform.forward(series.values)
    scaler = scaler or Scaler.fit(values[: splits.valid_start])
    return Prepared(series, preset, splits, scaler, scaler.transform(values).astype(np.float32), transform)


class Forecasting:
    """The forecasters' lm.loop.Family: shuffled training windows, Gaussian NLL, valid NLL and MSE."""

    kind = CHECKPOINT_KIND
    monitor, maximize = "loss", False

    def __init__(self, config: TrainConfig, prepared: Prepared) -> None:
        self.config, self.prepared = config, prepared
        p, s = prepared.preset, prepared.splits
        self.model_config = ForecastConfig(
            **config.section("model"),  # every setting of the model section; the data decides the rest
            inputs=prepared.scaled.shape[1],
            window=p.window,
            horizon=config.data.horizon,
            ar=min(p.ar, p.window),
        )
        h = config.data.horizon
        w = p.window
        train_end = s.test_start if config.data.fit_valid else s.valid_start
        self.x, self.y = (torch.from_numpy(a) for a in prepared.windows(0, train_end, w, h))
        self.vx, self.vy = (torch.from_numpy(a) for a in prepared.windows(s.valid_start, s.test_start, w, h))
        self.title = f"{prepared.series.name} {config.model.model} h={config.data.horizon}"
        self.figures = FIGURES[config.optim.loss]
        self.model: Forecaster | None = None

    def build_model(self) -> Forecaster:
        self.model = Forecaster(self.model_config)
        start_at_linear_ar(self.model, self.x, self.y)
        return self.model

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.optim.seed, epoch]).permutation(len(self.x))

    def epoch_length(self, epoch: int) -> int:
        return -(-len(self.x) // self.prepared.preset.batch_size)

    def start_epoch(self, epoch: int) -> None:
        pass

    def batches(self, epoch: int, start: int) -> list[np.ndarray]:
        order, size = self._order(epoch), self.prepared.preset.batch_size
        return [order[i : i + size] for i in range(start * size, len(order), size)]

    def loss(self, means: Tensor, log_sigmas: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """means, log_sigmas: (K, B, H, D) of the K members, target (B, H, D) -> (objective, reported):
        each member on its own (the mean over members of each one's loss). nll: both are the Gaussian NLL;
        mse: the objective adds the NLL of the detached means (sigma's only teacher), the loss reported
        and monitored is the MSE alone, the notes' loss."""
        nll = gaussian_nll(means.detach() if self.config.optim.loss == "mse" else means, log_sigmas, target)
        if self.config.optim.loss == "mse":
            mse = ((means - target) ** 2).mean()
            return mse + nll, mse.detach()
        return nll, nll.detach()

    def step_loss(self, batch: np.ndarray) -> StepLoss:
        """batch: (B,) int64 window indices -> the loss of their targets."""
        assert self.model is not None
        index = torch.from_numpy(batch)
        objective, reported = self.loss(*self.model.member_outputs(self.x[index]), self.y[index])
        return StepLoss(objective, reported, len(batch))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The valid loss, the MSE of the ensemble mean, and the interval calibration: the model's
        interval_scale is set here, before the loop saves best.pt, from these validation windows."""
        model = self.model
        assert model is not None
        model.eval()
        mean, log_sigma = model(self.vx)
        log_sigma = log_sigma - torch.log(model.interval_scale)
        fixed = self.config.data.interval_scale
        model.interval_scale.fill_(fixed or calibrated_scale(mean, log_sigma, self.vy))
        result = {
            "loss": float(self.loss(*model.member_outputs(self.vx), self.vy)[1]),
            "mse": float(torch.mean((mean - self.vy) ** 2)),
            "interval_scale": float(model.interval_scale),
        }
        model.train()
        return result

    def payload(self) -> dict[str, Any]:
        p = self.prepared
        return {
            "model_config": self.model_config.to_dict(),
            "scaler": vars(p.scaler),
            "transform": p.transform.to_dict(),
            "columns": p.series.columns,
            "season": p.preset.season,
            "test": p.preset.test,
        }

    def restore(self, payload: dict[str, Any]) -> None:
        pass  # nothing is carried from one batch to the next

    def run_files(self) -> dict[str, Any]:
        return {"config.json": {"train": self.config.to_dict(), **self.payload()}}


@torch.no_grad()
def start_at_linear_ar(model: Forecaster, x: Tensor, y: Tensor, ridge: float = 1.0) -> None:
    """x: (n, W, D), y: (n, H, D) training windows. With a skip (``ar`` > 0), every member starts as the
    least-squares linear AR on the training windows: the skip holds the ridge solution and stays fixed
    (the network learns what the linear AR misses), the mean outputs of the network's head start at zero
    and its log sigma at the log std of the AR's residuals. Measured on sunspots (horizon 8, MASE): a
    skip trained by Adam from a random start was still far from least squares when early stopping ended
    the run (MLP 0.82 against 0.72); started at least squares but trained on, Adam moved it away again
    (final runs, 3 members: MLP 0.645, GRU 0.658; kept fixed: 0.639, 0.637)."""
    c = model.config
    if not c.ar:
        return
    n = len(x)
    level = x[:, -1:] if c.relative else torch.zeros_like(x[:, -1:])
    inputs = torch.cat([x[:, -c.ar :].reshape(n, -1), torch.ones(n, 1)], dim=1).double()
    targets = (y - level).reshape(n, -1).double()
    gram = inputs.T @ inputs + ridge * torch.eye(inputs.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, inputs.T @ targets)
    residual_std = (targets - inputs @ solution).std(dim=0).clamp_min(1e-3)
    half = c.horizon * c.inputs
    for member in model.members:
        member.highway.weight.copy_(solution[:-1].T)
        member.highway.bias.copy_(solution[-1])
        member.highway.requires_grad_(False)
        member.head.weight[:half].zero_()
        member.head.bias[:half].zero_()
        member.head.bias[half:].copy_(residual_std.log())


def _prepared(config: TrainConfig) -> Prepared:
    series = read_series(config.data, config.optim.seed)
    return prepare(series, resolved_preset(config.data, len(series.values)), transform=config.data.transform)


def start_run(config: TrainConfig, out: str | Path, **trainer_options: Any) -> Trainer:
    """A trainer for a new run in ``out``; the series is read and split before the directory is made."""
    loop.check_new_run_dir(Path(out))
    return loop.start_run(Forecasting(config, _prepared(config)), config, out, **trainer_options)


def _family_for(config: TrainConfig, payload: dict[str, Any]) -> Forecasting:
    return Forecasting(config, _prepared(config))


def resume_run(out: str | Path, overrides: dict[str, Any], **trainer_options: Any) -> Trainer:
    """Continues the run in ``out`` exactly where it stopped; only [run] settings may change."""
    return loop.resume_run(_family_for, TrainConfig, CHECKPOINT_KIND, out, overrides, **trainer_options)
