"""Forecasters: the notes' MLP on tau lags and RNN/GRU/LSTM regressors, each with a Gaussian head.

Every model maps a window of standardised values to ``horizon`` steps ahead (direct multi-horizon); the
head gives a mean and a log standard deviation per step and column, so every forecast has an interval.
Recursive k-step forecasts feed the one-step mean back (forecast.evaluate.recursive).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lm.config import setting

MODELS = ("mlp", "rnn", "gru", "lstm")
Z90 = 1.6448536269514722
"""Two-sided 90% interval of a Gaussian: mean +- Z90 sigma."""


@dataclass
class ForecastConfig:
    model: str = setting("gru", "network reading the window", choices=MODELS)
    hidden: int = setting(32, "hidden units (002's MLP: 10)", minimum=1)
    layers: int = setting(1, "recurrent layers (the MLP has one hidden layer)", minimum=1)
    inputs: int = setting(1, "values per time step (columns)", minimum=1)
    window: int = setting(4, "past values read per forecast", minimum=1)
    horizon: int = setting(1, "steps forecast at once (direct multi-horizon)", minimum=1)
    relative: bool = setting(
        True,
        "read the window relative to its last value and forecast the change "
        "(a trending series leaves the training range)",
    )

    def to_dict(self) -> dict:
        return asdict(self)


class Forecaster(nn.Module):
    """x: (B, W, D) float32 -> mean (B, H, D), log_sigma (B, H, D) in standardised units."""

    def __init__(self, config: ForecastConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        out = 2 * c.horizon * c.inputs
        if c.model == "mlp":  # 002: tau lags -> 10 hidden ReLU -> the output
            self.body: nn.Module = nn.Sequential(
                nn.Flatten(), nn.Linear(c.window * c.inputs, c.hidden), nn.ReLU()
            )
        else:
            cell = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[c.model]
            self.body = cell(c.inputs, c.hidden, num_layers=c.layers, batch_first=True)
        self.head = nn.Linear(c.hidden, out)

    def features(self, x: Tensor) -> Tensor:
        """x: (B, W, D) -> (B, hidden): the MLP's hidden layer or the recurrent net's last output."""
        if self.config.model == "mlp":
            return self.body(x)
        outputs, _ = self.body(x)
        return outputs[:, -1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        level = x[:, -1:] if c.relative else torch.zeros_like(x[:, -1:])
        out = self.head(self.features(x - level)).view(x.shape[0], 2, c.horizon, c.inputs)
        return out[:, 0] + level, out[:, 1].clamp(-7.0, 5.0)


def gaussian_nll(mean: Tensor, log_sigma: Tensor, target: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood per value (nats), all shapes (B, H, D)."""
    z = (target - mean) * torch.exp(-log_sigma)
    return (0.5 * z * z + log_sigma + 0.5 * math.log(2 * math.pi)).mean()
