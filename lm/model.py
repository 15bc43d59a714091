"""The recurrent language model: Embedding → RNN/GRU/LSTM × L → dropout → Linear (optionally tied).

The parallel cells (``mamba``, ``mingru``: lm/ssm.py, lm/mingru.py) replace the RNN by L residual blocks
and a final RMSNorm: Embedding → (Linear embed → hidden) → (block → feed-forward if ``--ff-mult``) × L →
RMSNorm → dropout → Linear; their dropout is ``LockedDropout`` (one mask per sequence and channel), on the
embeddings, on every block's residual branch and before the output layer, and ``--precision bf16`` runs
their matrix products in bf16 while training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lm.cells import GATES, ScratchRNN
from lm.mingru import MinGRUBlock
from lm.ssm import FeedForward, LockedDropout, MambaBlock, RMSNorm

State = tuple[Tensor, ...]
"""The recurrent state, a tuple of tensors each with the layers on axis 0 and the batch on axis 1:
``(h,)`` for rnn_tanh, rnn_relu and gru, ``(h, c)`` for lstm, each (L, B, H); ``(conv, ssm)`` for mamba,
(L, B, k − 1, E + 2N) and (L, B, heads, E / heads, N) with E = expand · hidden; ``(h,)`` (L, B, E) for
mingru."""

PARALLEL_CELLS = ("mamba", "mingru")
CELLS = (*GATES, *PARALLEL_CELLS)
IMPLS = ("fused", "scratch")
PRECISIONS = ("fp32", "bf16")
STATE_NAMES = {"lstm": ("h", "c"), "mamba": ("conv", "ssm")}


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
    # mamba and mingru only (lm/ssm.py, lm/mingru.py)
    state_size: int = _model(16, "mamba: SSM state size N per head")
    expand: int = _model(2, "mamba, mingru: inner (recurrent) width = expand x hidden")
    conv_kernel: int = _model(4, "mamba: causal depthwise convolution width (>= 2)")
    heads: int = _model(4, "mamba: heads, each with its own decay (must divide expand x hidden)")
    ff_mult: int = _model(
        0,
        "mamba, mingru: a residual feed-forward layer of ff_mult x hidden after each block (0: none)",
    )
    precision: str = _model(
        "fp32", "mamba, mingru: training matmuls (bf16: autocast; scan, eval, export fp32)", PRECISIONS
    )

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, not {self.impl!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.precision != "fp32" and self.cell not in PARALLEL_CELLS:
            raise ValueError(f"--precision {self.precision} is for mamba and mingru")
        if self.tie and self.embed != self.hidden:
            raise ValueError(f"--tie needs embed == hidden (got embed {self.embed}, hidden {self.hidden})")
        if self.layers < 1 or self.hidden < 1 or self.embed < 1 or self.vocab_size < 1:
            raise ValueError("layers, embed, hidden and vocab_size must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.cell in PARALLEL_CELLS:
            self._check_parallel()
        elif self.ff_mult:
            raise ValueError("--ff-mult is for mamba and mingru")

    def _check_parallel(self) -> None:
        if self.impl != "fused":
            raise ValueError(f"--impl scratch is for rnn/gru/lstm; {self.cell} has one implementation")
        if self.ff_mult < 0:
            raise ValueError(f"--ff-mult must be >= 0, not {self.ff_mult}")
        for name in ("state_size", "expand", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(self, name)}")
        if self.conv_kernel < 2:
            raise ValueError(f"--conv-kernel must be >= 2, not {self.conv_kernel}")
        if self.cell == "mamba" and (self.expand * self.hidden) % self.heads:
            raise ValueError(
                f"--heads ({self.heads}) must divide expand x hidden "
                f"({self.expand} x {self.hidden} = {self.expand * self.hidden})"
            )

    @property
    def state_names(self) -> tuple[str, ...]:
        return STATE_NAMES.get(self.cell, ("h",))

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


def make_block(config: ModelConfig) -> nn.Module:
    c = config
    if c.cell == "mamba":
        return MambaBlock(c.hidden, c.expand, c.heads, c.state_size, c.conv_kernel, dropout=c.dropout)
    return MinGRUBlock(c.hidden, c.expand, dropout=c.dropout)


class RNNLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.parallel = config.cell in PARALLEL_CELLS
        self.embedding = nn.Embedding(config.vocab_size, config.embed)
        if self.parallel:
            self.proj_in = nn.Linear(config.embed, config.hidden) if config.embed != config.hidden else None
            self.blocks = nn.ModuleList(make_block(config) for _ in range(config.layers))
            self.feed_forwards = nn.ModuleList(
                FeedForward(config.hidden, config.ff_mult, config.dropout)
                for _ in range(config.layers if config.ff_mult else 0)
            )
            self.norm = RMSNorm(config.hidden)
        else:
            self.rnn = make_rnn(config)
        self.drop = LockedDropout(config.dropout) if self.parallel else nn.Dropout(config.dropout)
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
        if self.parallel:  # the blocks keep their own initialisation (lm/ssm.py, lm/mingru.py)
            return
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
                    bias[h : 2 * h] = c.forget_bias / 2

    def state_shapes(self) -> list[tuple[int, ...]]:
        """Each state tensor's shape for one stream, batch axis left out: (L, ...) -> (L, B, ...)."""
        c = self.config
        if self.parallel:
            return [(c.layers, *shape) for shape in self.blocks[0].state_shapes()]
        return [(c.layers, c.hidden) for _ in c.state_names]

    def init_state(
        self, batch_size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> State:
        return tuple(
            torch.zeros(shape[0], batch_size, *shape[1:], device=device, dtype=dtype)
            for shape in self.state_shapes()
        )

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens: (B, T) int64, state: see ``State`` -> (logits (B, T, V), state')."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        x = self.drop(self.embedding(tokens))
        if self.parallel:
            return self._run_blocks(x, state, step=False)
        rnn_state = state if self.config.cell == "lstm" else state[0]
        out, new_state = self.rnn(x, rnn_state)
        logits = self.head(self.drop(out))
        return logits, (tuple(new_state) if self.config.cell == "lstm" else (new_state,))

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """One token per stream with the blocks' recurrent (reference) form; the decode graph exports this.

        tokens: (B, 1) int64 -> (logits (B, 1, V), state'). The RNN cells' forward already is their step.
        """
        if not self.parallel:
            return self(tokens, state)
        return self._run_blocks(self.drop(self.embedding(tokens)), state, step=True)

    def _run_blocks(self, x: Tensor, state: State, step: bool) -> tuple[Tensor, State]:
        """x: embedded tokens (B, T, embed) (T = 1 when ``step``) -> (logits (B, T, V), state')."""
        if self.proj_in is not None:
            x = self.proj_in(x)
        if step:
            x = x[:, 0]
        layers = []
        # bf16 matrix products in training only: evaluation, generation and export run float32.
        bf16 = self.training and self.config.precision == "bf16" and not torch.jit.is_tracing()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            for k, block in enumerate(self.blocks):
                layer_state = [s[k] for s in state]
                x, *layer_state = block.step(x, *layer_state) if step else block(x, *layer_state)
                if self.feed_forwards:
                    x = self.feed_forwards[k](x)
                layers.append(layer_state)
        if step:
            x = x.reshape(-1, 1, self.config.hidden)
        logits = self.head(self.drop(self.norm(x)))
        return logits, tuple(torch.stack(parts) for parts in zip(*layers, strict=True))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State) -> State:
    """Cut the graph at a batch boundary: truncated BPTT."""
    return tuple(s.detach() for s in state)
