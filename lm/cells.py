"""Recurrent layers written from the gate equations, parameter-compatible with torch's fused modules.

``ScratchRNN`` holds the same parameters under the same names as ``nn.RNN``/``nn.GRU``/``nn.LSTM``
(``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``; gates stacked in torch's
order: GRU r|z|n, LSTM i|f|g|o), so one state dict loads into either implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lm.config import GATES


def rnn_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, nonlinearity: str
) -> Tensor:
    """h' = act(W_ih x + b_ih + W_hh h + b_hh).  x: (B, I), h: (B, H) -> (B, H)."""
    pre = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """The GRU of Cho et al. as torch computes it (the reset gate applies after W_hn h).

    r = σ(W_ir x + b_ir + W_hr h + b_hr)
    z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 − z) ⊙ n + z ⊙ h
    """
    x_r, x_z, x_n = (x @ w_ih.T + b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def lstm_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
) -> tuple[Tensor, Tensor]:
    """i, f, o = σ(·), g = tanh(·) over W_i x + b_i + W_h h + b_h;  c' = f ⊙ c + i ⊙ g;  h' = o ⊙ tanh(c')."""
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_next), c_next


class ScratchRNN(nn.Module):
    """A multi-layer, batch-first recurrent layer stepping through time in Python.

    forward(x: (B, T, I), state) -> (outputs (B, T, H), state'), where state is ``h`` (L, B, H)
    or, for the LSTM, ``(h, c)`` as in torch.
    """

    def __init__(
        self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"unknown cell {cell!r}")
        self.cell, self.hidden_size, self.num_layers, self.dropout = cell, hidden_size, num_layers, dropout
        gates = GATES[cell] * hidden_size
        for k in range(num_layers):
            in_size = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(gates, in_size)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(gates, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(gates)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(gates)))
        bound = hidden_size**-0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _layer_params(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            getattr(self, f"weight_ih_l{k}"),
            getattr(self, f"weight_hh_l{k}"),
            getattr(self, f"bias_ih_l{k}"),
            getattr(self, f"bias_hh_l{k}"),
        )

    def forward(self, x: Tensor, state: Tensor | tuple[Tensor, Tensor]):
        is_lstm = self.cell == "lstm"
        h_all, c_all = state if is_lstm else (state, None)
        h_out, c_out = [], []
        for k in range(self.num_layers):
            params = self._layer_params(k)
            h = h_all[k]
            c = c_all[k] if is_lstm else None
            steps = []
            for t in range(x.shape[1]):
                if is_lstm:
                    h, c = lstm_cell(x[:, t], h, c, *params)
                elif self.cell == "gru":
                    h = gru_cell(x[:, t], h, *params)
                else:
                    h = rnn_cell(x[:, t], h, *params, nonlinearity=self.cell.removeprefix("rnn_"))
                steps.append(h)
            h_out.append(h)
            c_out.append(c)
            x = torch.stack(steps, dim=1)
            if self.dropout and self.training and k < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        h_n = torch.stack(h_out)
        return x, ((h_n, torch.stack(c_out)) if is_lstm else h_n)
