"""The recurrent language model: Embedding → RNN/GRU/LSTM × L → dropout → Linear (optionally tied)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lm.cells import GATES, ScratchRNN

State = tuple[Tensor, ...]
"""The recurrent state: ``(h,)`` for rnn_tanh, rnn_relu and gru, ``(h, c)`` for lstm; each (L, B, H)."""

CELLS = tuple(GATES)
IMPLS = ("fused", "scratch")


def _model(default: object, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    """The network. Its defaults are the ``rnnlab-lm train`` recipe (the model section of lm.config)."""

    vocab_size: int
    cell: str = _model("gru", "recurrent cell", CELLS)
    layers: int = _model(2, "stacked recurrent layers")
    embed: int = _model(64, "embedding size")
    hidden: int = _model(256, "hidden state size")
    dropout: float = _model(0.2, "dropout on embeddings, between layers and before the output layer")
    tie: bool = _model(False, "tie output to embedding weights (needs embed == hidden)")
    impl: str = _model("fused", "fused torch modules or the from-scratch cells", IMPLS)
    forget_bias: float = _model(1.0, "LSTM forget-gate bias at init (0 = off)")
    orthogonal: bool = _model(True, "orthogonal recurrent weights at init (--no-orthogonal: torch's uniform)")

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, not {self.impl!r}")
        if self.tie and self.embed != self.hidden:
            raise ValueError(f"--tie needs embed == hidden (got embed {self.embed}, hidden {self.hidden})")
        if self.layers < 1 or self.hidden < 1 or self.embed < 1 or self.vocab_size < 1:
            raise ValueError("layers, embed, hidden and vocab_size must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell == "lstm" else ("h",)

    def to_dict(self) -> dict:
        return asdict(self)


def make_rnn(config: ModelConfig) -> nn.Module:
    dropout = config.dropout if config.layers > 1 else 0.0
    if config.impl == "scratch":
        return ScratchRNN(config.cell, config.embed, config.hidden, config.layers, dropout)
    kwargs = dict(num_layers=config.layers, dropout=dropout, batch_first=True)
    if config.cell == "gru":
        return nn.GRU(config.embed, config.hidden, **kwargs)
    if config.cell == "lstm":
        return nn.LSTM(config.embed, config.hidden, **kwargs)
    return nn.RNN(config.embed, config.hidden, nonlinearity=config.cell.removeprefix("rnn_"), **kwargs)


class RNNLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed)
        self.rnn = make_rnn(config)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.vocab_size)
        if config.tie:
            self.head.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)
        if not c.tie:
            nn.init.uniform_(self.head.weight, -0.1, 0.1)
        for k in range(c.layers):
            w_hh = getattr(self.rnn, f"weight_hh_l{k}")
            if c.orthogonal:
                # Orthogonal blocks keep the recurrent Jacobian's spectrum near 1 at initialisation.
                for block in w_hh.data.chunk(GATES[c.cell], dim=0):
                    nn.init.orthogonal_(block)
            if c.cell == "lstm" and c.forget_bias:
                # Forget gate open at the start, so gradients flow through c across long spans.
                h = c.hidden
                for name in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
                    bias = getattr(self.rnn, name).data
                    bias[h:2 * h] = c.forget_bias / 2

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        c = self.config
        zeros = torch.zeros(c.layers, batch_size, c.hidden, device=device)
        return (zeros, zeros.clone()) if c.cell == "lstm" else (zeros,)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens: (B, T) int64, state: see ``State`` -> (logits (B, T, V), state')."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        x = self.drop(self.embedding(tokens))
        rnn_state = state if self.config.cell == "lstm" else state[0]
        out, new_state = self.rnn(x, rnn_state)
        logits = self.head(self.drop(out))
        return logits, (tuple(new_state) if self.config.cell == "lstm" else (new_state,))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State) -> State:
    """Cut the graph at a batch boundary: truncated BPTT."""
    return tuple(s.detach() for s in state)
