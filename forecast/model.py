"""Forecasters: the notes' MLP on tau lags and RNN, GRU, LSTM, mamba and minGRU regressors, each with
a Gaussian head.

Every model maps a window of standardised values to ``horizon`` steps ahead (direct multi-horizon); the
head gives a mean and a log standard deviation per step and column, so every forecast has an interval.
Recursive k-step forecasts feed the one-step mean back (forecast.evaluate.recursive).

Beside the network, ``ar`` > 0 adds a linear autoregressive skip over the last ``ar`` values (LSTNet's
"highway"): the network only has to learn what a linear AR model misses. On sunspots a direct linear AR
on 9 lags alone scores MASE 0.64 at horizon 8, below statsmodels' AR(9) (0.67) and far below the MLP
trained alone (1.36, bench/results/ts_baselines.json before the skip).

``members`` > 1 trains that many networks side by side on the same batches (each its own initial
weights, each its own loss) and averages them: a seed ensemble in one module, so that export and
serving see one model. The combined interval is the mixture's: var = mean(sigma^2) + var(means).

``interval_scale`` (a buffer, 1 until calibrated) multiplies sigma: the family sets it at each validation
so that 90% of the validation targets fall inside mean +- Z90 sigma (split-conformal calibration; the
NLL-trained sigma of a small net is too narrow on unseen data).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from forecast.config import ForecastConfig
from lm.config import PARALLEL_CELLS
from lm.mingru import MinGRUBlock
from lm.ssm import MambaBlock, RMSNorm

Z90 = 1.6448536269514722
"""Two-sided 90% interval of a Gaussian: mean +- Z90 sigma."""


class ParallelStack(nn.Module):
    """The parallel cells as a regressor (the language models' blocks, lm/ssm.py, lm/mingru.py): x (B, W, D)
    -> (B, W, hidden), an input projection, ``layers`` residual blocks from a zero state, RMSNorm. The
    window is read in the cells' parallel form, in training and in the exported graph alike."""

    def __init__(self, c: ForecastConfig) -> None:
        super().__init__()
        self.proj_in = nn.Linear(c.inputs, c.hidden)
        if c.model == "mamba":
            blocks = (
                MambaBlock(c.hidden, c.expand, c.heads, c.state_size, c.conv_kernel) for _ in range(c.layers)
            )
        else:
            blocks = (MinGRUBlock(c.hidden, c.expand) for _ in range(c.layers))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(c.hidden)

    def forward(self, x: Tensor) -> Tensor:
        u = self.proj_in(x)
        for block in self.blocks:
            state = [u.new_zeros((x.shape[0], *shape)) for shape in block.state_shapes()]
            u = block(u, *state)[0]
        return self.norm(u)


class Member(nn.Module):
    """One network of the ensemble: x (B, W, D) -> mean (B, H, D), log_sigma (B, H, D), uncalibrated."""

    def __init__(self, c: ForecastConfig) -> None:
        super().__init__()
        self.config = c
        if c.model == "mlp":  # 002: tau lags -> 10 hidden ReLU -> the output
            self.body: nn.Module = nn.Sequential(
                nn.Flatten(), nn.Linear(c.window * c.inputs, c.hidden), nn.ReLU()
            )
        elif c.model in PARALLEL_CELLS:
            self.body = ParallelStack(c)
        else:
            cell = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[c.model]
            self.body = cell(c.inputs, c.hidden, num_layers=c.layers, batch_first=True)
        self.head = nn.Linear(c.hidden, 2 * c.horizon * c.inputs)
        self.highway = nn.Linear(c.ar * c.inputs, c.horizon * c.inputs) if c.ar else None

    def features(self, x: Tensor) -> Tensor:
        """x: (B, W, D) -> (B, hidden): the MLP's hidden layer or the recurrent net's last output."""
        if self.config.model == "mlp":
            return self.body(x)
        if isinstance(self.body, ParallelStack):
            return self.body(x)[:, -1]
        outputs, _ = self.body(x)
        return outputs[:, -1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        level = x[:, -1:] if c.relative else torch.zeros_like(x[:, -1:])
        out = self.head(self.features(x - level)).view(x.shape[0], 2, c.horizon, c.inputs)
        mean = out[:, 0] + level
        if self.highway is not None:  # on the absolute values: a full linear AR (with the level's weight)
            mean = mean + self.highway(x[:, -c.ar :].reshape(x.shape[0], -1)).view_as(mean)
        return mean, out[:, 1].clamp(-7.0, 5.0)


class Forecaster(nn.Module):
    """x: (B, W, D) float32 -> mean (B, H, D), log_sigma (B, H, D) in standardised units (calibrated)."""

    def __init__(self, config: ForecastConfig) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(Member(config) for _ in range(config.members))
        self.register_buffer("interval_scale", torch.ones(()))

    def features(self, x: Tensor) -> Tensor:
        """x: (B, W, D) -> (B, hidden) of the first member (the hidden state a plot projects)."""
        return self.members[0].features(x)

    def member_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, W, D) -> mean, log_sigma (K, B, H, D) of the K members, uncalibrated (training's view)."""
        means, log_sigmas = zip(*(m(x) for m in self.members), strict=True)
        return torch.stack(means), torch.stack(log_sigmas)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        means, log_sigmas = self.member_outputs(x)
        mean = means.mean(0)
        variance = torch.exp(2 * log_sigmas).mean(0) + ((means - mean) ** 2).mean(0)
        return mean, 0.5 * torch.log(variance) + torch.log(self.interval_scale)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # checkpoints from before the ensemble and the calibration: one network, uncalibrated
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "members.")]:
            if key != prefix + "interval_scale":
                state_dict[prefix + "members.0." + key[len(prefix) :]] = state_dict.pop(key)
        state_dict.setdefault(prefix + "interval_scale", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args)


def gaussian_nll(mean: Tensor, log_sigma: Tensor, target: Tensor) -> Tensor:
    """Mean Gaussian NLL per value (nats); mean, log_sigma: (..., B, H, D), target: (B, H, D)."""
    z = (target - mean) * torch.exp(-log_sigma)
    return (0.5 * z * z + log_sigma + 0.5 * math.log(2 * math.pi)).mean()


def calibrated_scale(mean: Tensor, log_sigma: Tensor, target: Tensor, coverage: float = 0.9) -> float:
    """The smallest factor on sigma that puts at least ``coverage`` of the targets inside mean +- Z90
    sigma: the ``coverage`` quantile (the next sample up) of |target - mean| / sigma over Z90; all shapes
    (B, H, D), sigma uncalibrated."""
    ratio = ((target - mean).abs() * torch.exp(-log_sigma)).flatten()
    return float(torch.quantile(ratio, coverage, interpolation="higher")) / Z90
