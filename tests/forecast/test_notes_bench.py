"""bench/ts_notes.py's k-step matrix (the note's construction) against rnnlab's recursive forecasts."""

from __future__ import annotations

import torch
from torch import nn

from bench.ts_notes import k_step_matrix, lagged
from forecast.data import sine_series
from forecast.evaluate import recursive
from forecast.model import ForecastConfig, Forecaster


class FlatMean(nn.Module):
    """(n, tau) -> (n, 1): a Forecaster's one-step mean on flat lag rows, as the note's net is called."""

    def __init__(self, model: Forecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model(rows[:, :, None])[0][:, 0]


def test_the_notes_k_step_matrix_is_rnnlabs_recursive_forecast():
    torch.manual_seed(0)
    model = Forecaster(ForecastConfig(model="mlp", hidden=10, window=4, horizon=1, relative=False)).eval()
    x = torch.from_numpy(sine_series("sine-d2l", 0).values[:, 0]).float()
    features, labels = lagged(x, 4)
    assert features.shape == (996, 4) and torch.equal(features[0], x[:4]) and labels[0, 0] == x[4]
    matrix = k_step_matrix(FlatMean(model), x, 4, 16)
    assert matrix.shape == (1000 - 4 - 16 + 1, 20)
    rec = recursive(model, matrix[:, :4, None].numpy(), 16)
    for k in (1, 4, 16):
        torch.testing.assert_close(matrix[:, 4 + k - 1], torch.from_numpy(rec[:, k - 1, 0]).float())
