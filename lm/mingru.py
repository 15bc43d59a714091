"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?") as a residual block, trained with a parallel scan.

The gates read the input only, so the recurrence is linear in the state:

    z_t = σ(W_z u_t),  h̃_t = g(W_h u_t)       with g(x) = x + ½ for x ≥ 0, σ(x) below (g > 0)
    h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t
    x' = x + W_out h                           (u = RMSNorm(x); h has expand·d channels)

Unrolled, h_t = A_t h_0 + Σ_{s<=t} (A_t / A_s) z_s h̃_s with A_t = Π_{s<=t} (1 − z_s). Three exact
parallel forms of that sum live here:

- ``scan_blocked`` (training): the linear recurrence h_t = a_t h_{t−1} + b_t in chunks of Q ≈ √T steps,
  all chunks at once (``_blocked``), with the gates folded into the same autograd node (``MinGRUScan``).
  Every factor is a product of decays <= 1, so nothing overflows or cancels. It replaced a doubling
  (Hillis–Steele) scan of log2 T whole-window rounds; figures in docs/lm.md.
- ``scan_log``: the paper's log-space scan, log h = log A + logcumsumexp(log(z h̃) − log A) (g > 0 keeps
  the logarithms real). Slower than ``scan_blocked`` (bench.lm_cells, docs/lm.md), and in float32 it loses
  ε·|log A_t| of relative precision (5e-4 after 512 steps of decay e^-20), so it is kept for the
  benchmark only.
- ``scan_chunked`` (the ONNX export): onnxruntime has neither log-cumsum-exp nor a dynamic number of
  doubling rounds, so the graph sums within chunks of ``chunk`` steps with relative decays <= 1 and hands
  one state from chunk to chunk.

``MinGRUBlock.step`` is the one-token reference. The state per layer is h: (B, expand·d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.ssm import LockedDropout, RMSNorm, pad_time, segsum


def g(x: Tensor) -> Tensor:
    """x + ½ for x >= 0, σ(x) below, as σ(min(x, 0)) + max(x, 0): on a (32, 128, 448) tensor on one core the
    torch.where form took 18.1 ms, this one 4.1 ms (one microbenchmark, machine under load)."""
    return torch.sigmoid(x.clamp(max=0)) + x.clamp(min=0)


def log_g(x: Tensor) -> Tensor:
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def _blocked(a: Tensor, b: Tensor, h0: Tensor, reverse: bool = False) -> Tensor:
    """h_t = a_t h_{t−1} + b_t along axis 1 from h0 (``reverse``: h_t = a_t h_{t+1} + b_t from the end),
    no autograd. a, b: (B, T, D), h0: (B, D) -> h (B, T, D). a and b are overwritten (callers pass fresh
    tensors).

    The window is cut into C chunks of Q ≈ √T steps. Q − 1 whole-window updates run the recurrence inside
    every chunk at once from a zero start (b) and the decay since the chunk start (a); C − 1 updates of
    one (B, D) state hand each chunk's end to the next; one more whole-window update adds each chunk's
    carried-in share. About 2√T small loops and 4 passes over the tensors, where the doubling scan this
    replaces made 4 log2 T passes plus copies (measured below in docs/lm.md). Padding steps (a = 1, b = 0)
    pass the state through unchanged.
    """
    batch, time, dim = a.shape
    q = 2 ** round(math.log2(math.sqrt(time)))
    pad = (q - time % q) % q
    if pad:
        a, b = F.pad(a, (0, 0, 0, pad), value=1.0), pad_time(b, pad)
    a, b = a.view(batch, -1, q, dim), b.view(batch, -1, q, dim)
    step, last = (1, 0) if reverse else (-1, q - 1)  # the neighbour a step feeds from; the chunk's last step
    for k in range(q - 2, -1, -1) if reverse else range(1, q):
        b[:, :, k].addcmul_(a[:, :, k], b[:, :, k + step])
        a[:, :, k].mul_(a[:, :, k + step])
    chunks = a.shape[1]
    starts = [h0]  # the state each chunk starts from, in scan order
    for c in range(chunks - 1, 0, -1) if reverse else range(chunks - 1):
        starts.append(torch.addcmul(b[:, c, last], a[:, c, last], starts[-1]))
    h = b.addcmul_(a, torch.stack(starts[::-1] if reverse else starts, dim=1)[:, :, None])
    return h.view(batch, -1, dim)[:, :time]


def _adjoint(a: Tensor, grad_h: Tensor) -> Tensor:
    """λ_t = ∂L/∂h_t + a_{t+1} λ_{t+1}, backwards in time: the gradient of the loss with respect to b_t
    of ``_blocked``. a, grad_h: (B, T, D) -> λ (B, T, D)."""
    a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
    return _blocked(a_next, grad_h.clone(), torch.zeros_like(a[:, 0]), reverse=True)


class LinearScan(torch.autograd.Function):
    """h_t = a_t h_{t−1} + b_t. a, b: (B, T, D), h0: (B, D) -> h (B, T, D).

    Forward and backward are each one ``_blocked`` scan (the backward one runs the adjoint recurrence
    backwards in time); bench.lm_cells runs its Mamba-1 style selective scan with it.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        h = _blocked(a.clone(), b.clone(), h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, h, h0 = ctx.saved_tensors
        lam = _adjoint(a, grad_h)
        h_prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)
        return lam * h_prev, lam, lam[:, 0] * a[:, 0]


class MinGRUScan(torch.autograd.Function):
    """The gates and the scan as one autograd node: projected (B, T, 2D) = [gate | candidate]
    pre-activations (float32, or bf16 from an autocast projection), h0: (B, D) -> h (B, T, D) in h0's dtype,
    with the backward written out (λ from ``_adjoint``, s = σ(min(candidate, 0))):

        ∂L/∂gate = λ z (1 − z) (g(candidate) − h_{t−1}),   ∂L/∂h0 = λ_0 (1 − z_0),
        ∂L/∂candidate = λ z g'(candidate),   g' = s (1 − s) + ¾ [candidate > 0]  (1 above zero)

    Why: left to autograd, every op of the gates and ``g`` and of their backward is a pass over a
    (B, T, D) tensor with its own allocation; taking the projection whole also spares the concatenation of
    the halves' gradients.
    """

    @staticmethod
    def forward(ctx, projected: Tensor, h0: Tensor) -> Tensor:
        gate, candidate = (half.to(h0.dtype) for half in projected.chunk(2, dim=-1))
        z = torch.sigmoid(gate)
        s = torch.sigmoid(candidate.clamp(max=0))
        gc = s + candidate.clamp(min=0)
        h = _blocked(1 - z, z * gc, h0)
        ctx.save_for_backward(z, s, gc, candidate, h, h0)
        ctx.projected_dtype = projected.dtype
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor]:
        z, s, gc, candidate, h, h0 = ctx.saved_tensors
        keep = 1 - z
        lam_z = _adjoint(keep, grad_h)
        grad_h0 = lam_z[:, 0] * keep[:, 0]
        lam_z.mul_(z)
        grad = torch.empty(*z.shape[:2], 2 * z.shape[2], dtype=z.dtype, device=z.device)
        grad_gate, grad_candidate = grad.chunk(2, dim=-1)
        torch.sub(gc[:, 1:], h[:, :-1], out=grad_gate[:, 1:])  # g(candidate) − h_{t−1}
        torch.sub(gc[:, 0], h0, out=grad_gate[:, 0])
        grad_gate.mul_(keep).mul_(lam_z)
        above = torch.ops.aten.threshold_backward(lam_z, candidate, 0)  # λz where candidate > 0, else 0
        torch.mul(s, 1 - s, out=grad_candidate).mul_(lam_z).add_(above, alpha=0.75)
        return grad.to(ctx.projected_dtype), grad_h0


def scan_blocked(projected: Tensor, h0: Tensor) -> Tensor:
    """projected: (B, T, 2D) = [gate | candidate] pre-activations, h0: (B, D) -> h: (B, T, D)."""
    return MinGRUScan.apply(projected, h0)


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

    def __init__(self, d: int, expand: int, chunk: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.inner, self.chunk = expand * d, chunk
        self.norm = RMSNorm(d)
        self.in_proj = nn.Linear(d, 2 * self.inner)
        self.out_proj = nn.Linear(self.inner, d, bias=False)
        self.drop = LockedDropout(dropout)  # on the residual branch, in training only

    def forward(self, u: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        """u: (B, T, d), h0: (B, E) -> (u' (B, T, d), h_T (B, E))."""
        # Under bf16 autocast (``--precision bf16``) the projection is bf16; the gates and the scan run in
        # u's dtype (a decay 1 − z near 1 has 3 significant digits in bf16).
        projected = self.in_proj(self.norm(u))
        if torch.jit.is_tracing():  # the ONNX export: onnxruntime runs the fixed-chunk form
            h = scan_chunked(*projected.chunk(2, dim=-1), h0, self.chunk)
        else:
            h = scan_blocked(projected, h0.to(u.dtype))
        return u + self.drop(self.out_proj(h)), h[:, -1]

    def state_shapes(self) -> tuple[tuple[int, ...]]:
        """Per-stream shape of h, without the batch axis."""
        return ((self.inner,),)

    def step(self, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One token. u: (B, d), h: (B, E) -> (u' (B, d), h' (B, E))."""
        gate, candidate = self.in_proj(self.norm(u)).chunk(2, dim=-1)
        z = torch.sigmoid(gate)
        h = (1 - z) * h + z * g(candidate)
        return u + self.out_proj(h), h
