"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?") as a residual block, trained with a parallel scan.

The gates read the input only, so the recurrence is linear in the state:

    z_t = σ(W_z u_t),  h̃_t = g(W_h u_t)       with g(x) = x + ½ for x ≥ 0, σ(x) below (g > 0)
    h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t
    x' = x + W_out h                           (u = RMSNorm(x); h has expand·d channels)

Unrolled, h_t = A_t h_0 + Σ_{s<=t} (A_t / A_s) z_s h̃_s with A_t = Π_{s<=t} (1 − z_s). Three exact
parallel forms of that sum live here:

- ``scan_doubling`` (training): the linear recurrence h_t = a_t h_{t−1} + b_t composed over spans that
  double each round (Hillis–Steele), log2 T rounds of whole-window elementwise ops. Every factor is a
  product of decays <= 1, so nothing overflows or cancels.
- ``scan_log``: the paper's log-space scan, log h = log A + logcumsumexp(log(z h̃) − log A) (g > 0 keeps
  the logarithms real). Measured at batch 32, 448 channels, forward + backward: 2.1x slower than
  ``scan_doubling`` on 128-token windows (148 vs 70 ms), and in float32 it loses ε·|log A_t| of relative
  precision (5e-4 after 512 steps of decay e^-20), so it is kept for the benchmark only.
- ``scan_chunked`` (the ONNX export): onnxruntime has neither log-cumsum-exp nor a dynamic number of
  doubling rounds, so the graph sums within chunks of ``chunk`` steps with relative decays <= 1 and hands
  one state from chunk to chunk.

``MinGRUBlock.step`` is the one-token reference. The state per layer is h: (B, expand·d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.ssm import RMSNorm, pad_time, segsum


def g(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def _doubling(a: Tensor, b: Tensor) -> Tensor:
    """h_t = a_t h_{t−1} + b_t along axis 1 from h_{−1} = 0, in log2 T rounds. a, b: (B, T, D), no autograd.

    After the round with span w, (a_t, b_t) maps h_{t−w} to h_t (or 0 to h_t when t < w).
    """
    a, b = a.clone(), b.clone()
    span, time = 1, a.shape[1]
    while span < time:
        b[:, span:] = torch.addcmul(b[:, span:], a[:, span:], b[:, :-span])
        if 2 * span < time:
            a[:, span:] = a[:, span:] * a[:, :-span]
        span *= 2
    return b


class LinearScan(torch.autograd.Function):
    """h_t = a_t h_{t−1} + b_t. a, b: (B, T, D), h0: (B, D) -> h (B, T, D).

    Forward and backward are each one ``_doubling`` scan (the backward one runs the adjoint recurrence
    λ_t = ∂L/∂h_t + a_{t+1} λ_{t+1} backwards in time). Left to autograd, the rounds' slices cost 6x
    more than the scan itself (measured: zero-filled slice gradients took 57 % of a training step).
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        first = torch.addcmul(b[:, :1], a[:, :1], h0[:, None])
        h = _doubling(a, torch.cat([first, b[:, 1:]], dim=1))
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, h, h0 = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        lam = _doubling(a_next.flip(1), grad_h.flip(1)).flip(1)  # λ_t = ∂L/∂b_t
        h_prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)
        return lam * h_prev, lam, lam[:, 0] * a[:, 0]


def scan_doubling(gate: Tensor, candidate: Tensor, h0: Tensor) -> Tensor:
    """gate, candidate: (B, T, D) pre-activations, h0: (B, D) -> h: (B, T, D)."""
    z = torch.sigmoid(gate)
    return LinearScan.apply(1 - z, z * g(candidate), h0)


def scan_log(gate: Tensor, candidate: Tensor, h0: Tensor) -> Tensor:
    """gate, candidate: (B, T, D) pre-activations, h0: (B, D) (any sign) -> h: (B, T, D)."""
    log_keep = -F.softplus(gate)  # log(1 − z)
    log_add = -F.softplus(-gate) + log_g(candidate)  # log(z h̃)
    cum = log_keep.cumsum(1)  # log A_t
    # The carried-in state enters linearly, so a zero (or negative) h0 needs no logarithm.
    return torch.exp(cum + torch.logcumsumexp(log_add - cum, dim=1)) + torch.exp(cum) * h0[:, None]


def scan_chunked(gate: Tensor, candidate: Tensor, h0: Tensor, chunk: int) -> Tensor:
    """The same h as ``scan_log``, from products of decays <= 1 within chunks of ``chunk`` steps and one
    hand-over per chunk. gate, candidate: (B, T, D), h0: (B, D) -> h: (B, T, D)."""
    batch, time, dim = gate.shape
    pad = (chunk - time % chunk) % chunk
    log_keep = pad_time(-F.softplus(gate), pad).reshape(batch, -1, chunk, dim).transpose(2, 3)  # (B, C, D, Q)
    add = pad_time(torch.sigmoid(gate) * g(candidate), pad).reshape(batch, -1, chunk, dim).transpose(2, 3)
    inside = (torch.exp(segsum(log_keep)) @ add[..., None])[..., 0]  # (B, C, D, Q): from a zero chunk start
    cum = log_keep.cumsum(-1)
    own = torch.cat([h0[:, None], inside[..., -1]], dim=1).transpose(1, 2)  # (B, D, C + 1)
    across = torch.exp(segsum(F.pad(cum[..., -1].transpose(1, 2), (1, 0))))  # (B, D, C + 1, C + 1)
    starts = (across @ own[..., None])[..., :-1, 0].transpose(1, 2)  # (B, C, D): h at each chunk's start
    h = inside + torch.exp(cum) * starts[..., None]
    return h.transpose(2, 3).reshape(batch, -1, dim)[:, :time]


class MinGRUBlock(nn.Module):
    """One residual minGRU layer of width d with expand·d recurrent channels."""

    def __init__(self, d: int, expand: int, chunk: int = 16) -> None:
        super().__init__()
        self.inner, self.chunk = expand * d, chunk
        self.norm = RMSNorm(d)
        self.in_proj = nn.Linear(d, 2 * self.inner)
        self.out_proj = nn.Linear(self.inner, d, bias=False)

    def forward(self, u: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        """u: (B, T, d), h0: (B, E) -> (u' (B, T, d), h_T (B, E))."""
        gate, candidate = self.in_proj(self.norm(u)).chunk(2, dim=-1)
        if torch.jit.is_tracing():  # the ONNX export: the number of doubling rounds depends on T
            h = scan_chunked(gate, candidate, h0, self.chunk)
        else:
            h = scan_doubling(gate, candidate, h0)
        return u + self.out_proj(h), h[:, -1]

    def state_shapes(self) -> tuple[tuple[int, ...]]:
        """Per-stream shape of h, without the batch axis."""
        return ((self.inner,),)

    def step(self, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One token. u: (B, d), h: (B, E) -> (u' (B, d), h' (B, E))."""
        gate, candidate = self.in_proj(self.norm(u)).chunk(2, dim=-1)
        z = torch.sigmoid(gate)
        h = (1 - z) * h + z * g(candidate)
        return u + self.out_proj(h), h
