"""The recurrent language model: Embedding → RNN/GRU/LSTM × L → dropout → Linear (optionally tied).

The parallel cells (``mamba``, ``mingru``: lm/ssm.py, lm/mingru.py) replace the RNN by L residual blocks
and a final RMSNorm: Embedding → (Linear embed → hidden) → (block → feed-forward if ``--ff-mult``) × L →
RMSNorm → dropout → Linear; their dropout is ``LockedDropout`` (one mask per sequence and channel), on the
embeddings, on every block's residual branch and before the output layer, and ``--precision bf16`` runs
their matrix products in bf16 while training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lm.cells import ScratchRNN
from lm.config import GATES, PARALLEL_CELLS, ModelConfig
from lm.mingru import MinGRUBlock
from lm.ssm import FeedForward, LockedDropout, MambaBlock, RMSNorm

State = tuple[Tensor, ...]
"""The recurrent state, a tuple of tensors each with the layers on axis 0 and the batch on axis 1:
``(h,)`` for rnn_tanh, rnn_relu and gru, ``(h, c)`` for lstm, each (L, B, H); ``(conv, ssm)`` for mamba,
(L, B, k − 1, E + 2N) and (L, B, heads, E / heads, N) with E = expand · hidden; ``(h,)`` (L, B, E) for
mingru."""


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
