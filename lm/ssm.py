"""A selective state-space block in the Mamba-2 family, trained with the chunked "state space duality" form.

One block (per layer), width d, inner width E = expand·d split into H heads of P = E / H channels,
state size N:

    u = RMSNorm(x);  [z | x̃BC | δ] = W_in u                       (E, E + 2N, H channels)
    x̃BC ← SiLU(causal depthwise conv_k(x̃BC));  [x̃ | B | C] = x̃BC  (E, N, N)
    Δ = softplus(δ + b_Δ) (per head),  A = −exp(A_log) (a scalar per head)
    h_t = exp(Δ_t A) h_{t−1} + Δ_t x̃_t B_tᵀ         (per head: h is P × N)
    y_t = h_t C_t + D x̃_t
    x' = x + W_out RMSNorm(y ⊙ SiLU(z))

Because the decay exp(Δ_t A) is one scalar per head and step, the recurrence unrolls into
y = (L ∘ C Bᵀ) (Δ x̃) with L[t, s] = exp(Δ_{s+1}A + … + Δ_t A): within a chunk of Q steps that is
two batched matrix products, and chunks hand each other one (H, P, N) state, so the training form is a
few large matrix products over the whole window and never holds a (batch, time, E, N) tensor (Mamba-1's
selective scan does). ``MambaBlock.step`` is the same block one token at a time: the reference the
parallel form is tested against, and the decode graph the server runs.

The state per layer is the convolution's last k − 1 inputs, conv (B, k − 1, E + 2N), and the SSM state,
ssm (B, H, P, N): constant in the length of the text.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _RMSNormFunction(torch.autograd.Function):
    """y = x · r · w with r = 1 / sqrt(mean(x²) + eps) over the last axis, backward written out:

        ∂L/∂x = r (g − x̂ mean(g · x̂)),  g = ∂L/∂y · w,  x̂ = x r;   ∂L/∂w = Σ ∂L/∂y · x̂

    Why: left to autograd the six forward ops and their backward took 7.3 ms per (32, 128, 224) norm
    on one core (forward + backward, measured), three norms a step in a 2-layer model.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        r = torch.rsqrt(
            torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps)
        )
        normed = x * r
        ctx.save_for_backward(normed, r, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        normed, r, weight = ctx.saved_tensors
        grad_weight = (grad * normed).flatten(0, -2).sum(0)
        g = grad * weight
        mean = (g * normed).mean(-1, keepdim=True)
        return g.sub_(normed * mean).mul_(r), grad_weight, None


class RMSNorm(nn.Module):
    """x / rms(x) · w over the last axis. Traced for export it is spelt as onnxruntime's
    SimplifiedLayerNormalization fusion expects it (Pow, ReduceMean, Add, Sqrt, Div, Mul): one fused op
    per norm in the exported graphs; elsewhere one autograd node (``_RMSNormFunction``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence and channel, shared by every time step of the window (variational
    dropout, Gal & Ghahramani 2016; AWD-LSTM's locked dropout). x: (B, T, D) -> (B, T, D).

    Why for the parallel cells: ``nn.Dropout`` draws one random number per element, 20 ms per
    (32, 128, 448) tensor on one core (measured), where the mask over (32, 1, 448) takes 0.6 ms.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        mask_shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)  # (B, 1, D); (B, D) for a step
        keep = torch.empty(mask_shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)


class FeedForward(nn.Module):
    """x + dropout(W_2 GELU(W_1 RMSNorm(x))), W_1: d -> mult·d: the per-token channel mixing that the
    language models of the minGRU paper (nanoGPT with attention replaced) keep after each recurrent layer.
    Stateless, so the stream state is unchanged. x: (B, T, d) or (B, d) -> the same shape."""

    def __init__(self, d: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d)
        self.up = nn.Linear(d, mult * d)
        self.down = nn.Linear(mult * d, d)
        self.drop = LockedDropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


def segsum(a: Tensor) -> Tensor:
    """a: (..., Q) log decays -> (..., Q, Q): [t, s] = a[s+1] + ... + a[t] for s <= t, −inf above.

    Summed along the masked rows (not as a difference of two cumulative sums), so it stays exact when
    the cumulative sum is large.
    """
    q = a.shape[-1]
    below = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    rows = a[..., :, None].expand(*a.shape, q).masked_fill(~below, 0.0)
    on_and_below = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device))
    return rows.cumsum(-2).masked_fill(~on_and_below, -math.inf)


def pad_time(x: Tensor, pad: int) -> Tensor:
    """Zeros appended along axis 1 of x (B, T, ...)."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))


def ssd(
    x: Tensor,
    dt: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    h0: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """The scalar-decay SSM over a window, in chunks of ``chunk`` steps (without the D skip).

    x: (B, T, H, P), dt: (B, T, H) > 0, a: (H,) < 0, b, c: (B, T, N), h0: (B, H, P, N)
    -> y (B, T, H, P), h_T (B, H, P, N). The window is padded to a multiple of the chunk with steps of
    no input and no decay, which change neither the outputs kept nor the final state.
    """
    batch, time, heads, p = x.shape
    pad = (chunk - time % chunk) % chunk
    log_decay = pad_time(dt * a, pad).reshape(batch, -1, chunk, heads).permute(0, 3, 1, 2)  # (B, H, C, Q)
    xdt = pad_time(x * dt[..., None], pad).reshape(batch, -1, chunk, heads, p).permute(0, 3, 1, 2, 4)
    b = pad_time(b, pad).reshape(batch, -1, chunk, b.shape[-1])  # (B, C, Q, N)
    c = pad_time(c, pad).reshape(batch, -1, chunk, c.shape[-1])
    cum = log_decay.cumsum(-1)  # (B, H, C, Q)
    decay = torch.exp(segsum(log_decay))  # (B, H, C, Q, Q): [t, s] = exp(cum_t − cum_s), s <= t
    # Within each chunk: y[t] = Σ_{s<=t} (C_t · B_s) exp(cum_t − cum_s) Δ_s x_s.
    y = (decay * (c @ b.transpose(-1, -2))[:, None]) @ xdt  # (B, H, C, Q, P)
    # Each chunk's own contribution to the state at its end (the last row of ``decay``: summed, not a
    # difference of cumulative sums, which lost 1e-3 of a trained state in float32), then the chunks'
    # states in sequence.
    own = (xdt * decay[..., -1, :, None]).transpose(-1, -2) @ b[:, None]  # (B, H, C, P, N)
    own = torch.cat([h0[:, :, None], own], dim=2)  # (B, H, C + 1, P, N)
    across = torch.exp(segsum(F.pad(cum[..., -1], (1, 0))))  # (B, H, C + 1, C + 1)
    states = (across @ own.flatten(3)).unflatten(3, own.shape[3:])  # state at the end of chunk i − 1
    # Carried-in state's share of each output: C_t · (exp(cum_t) h_{chunk start}).
    y = y + (c[:, None] @ states[:, :, :-1].transpose(-1, -2)) * torch.exp(cum)[..., None]
    y = y.permute(0, 2, 3, 1, 4).reshape(batch, -1, heads, p)[:, :time]
    return y, states[:, :, -1]


def ssd_step(
    x: Tensor,
    dt: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    h: Tensor,
    dims: tuple[int, int, int],
) -> tuple[Tensor, Tensor]:
    """One step of the same recurrence. x: (B, H, P), dt: (B, H), b, c: (B, N), h: (B, H, P, N),
    dims: (H, P, N) -> y (B, H, P), h' (B, H, P, N).

    Broadcast axes come from reshapes to constant shapes with the batch as −1 (``dims`` are Python ints,
    not traced sizes): one ONNX op each, where ``[..., None]`` exports one Unsqueeze per axis; the decode
    graph is op-bound at batch 1.
    """
    heads, p, n = dims
    decay = torch.exp(dt * a).reshape(-1, heads, 1, 1)
    h = decay * h + (x * dt.reshape(-1, heads, 1)).reshape(-1, heads, p, 1) * b.reshape(-1, 1, 1, n)
    return (h @ c.reshape(-1, 1, n, 1)).reshape(-1, heads, p), h


def inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


class MambaBlock(nn.Module):
    """One residual Mamba-2 style layer; see the module docstring for the equations."""

    def __init__(
        self,
        d: int,
        expand: int,
        heads: int,
        state_size: int,
        conv_kernel: int,
        chunk: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = expand * d
        self.inner, self.heads, self.head_dim, self.n = inner, heads, inner // heads, state_size
        self.conv_dim, self.kernel, self.chunk = inner + 2 * state_size, conv_kernel, chunk
        self.norm = RMSNorm(d)
        self.in_proj = nn.Linear(d, 2 * inner + 2 * state_size + heads, bias=False)
        # The depthwise convolution as k shifted multiply-adds: torch's CPU depthwise Conv1d backward took
        # 42 % of a 3 M-parameter training step on 512-token windows; with the taps the step's CPU time
        # fell from 27.9 s to 16.4 s (torch profiler, one step each).
        bound = conv_kernel**-0.5  # nn.Conv1d's initialisation (fan-in k)
        self.conv_weight = nn.Parameter(torch.empty(conv_kernel, self.conv_dim).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim).uniform_(-bound, bound))
        # Mamba-2's initialisation: A uniform in [1, 16] per head, Δ log-uniform in [0.001, 0.1].
        self.a_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, heads)))
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(0.1), heads))
        self.dt_bias = nn.Parameter(inverse_softplus(dt))
        self.skip = nn.Parameter(torch.ones(heads))
        self.out_norm = RMSNorm(inner)
        self.out_proj = nn.Linear(inner, d, bias=False)
        self.drop = LockedDropout(dropout)  # on the residual branch, in training only

    def _project(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (B, T, d) -> z (B, T, E), x̃BC before the convolution (B, T, E + 2N), Δ before softplus."""
        # .to(u.dtype): under bf16 autocast the projection is bf16; the convolution and the SSM run float32.
        projected = self.in_proj(self.norm(u)).to(u.dtype)
        return projected.split([self.inner, self.conv_dim, self.heads], dim=-1)

    def _branch(self, y: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """y, x: (..., H, P), z: (..., E) -> the residual branch W_out RMSNorm((y + D x) ⊙ SiLU(z))."""
        y = (y + self.skip[:, None] * x).flatten(-2)
        return self.out_proj(self.out_norm(y * F.silu(z)))

    def forward(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (B, T, d), conv_state: (B, k − 1, E + 2N), ssm_state: (B, H, P, N) -> (u', conv', ssm')."""
        batch, time, _ = u.shape
        z, xbc, delta = self._project(u)
        window = torch.cat([conv_state, xbc], dim=1)  # (B, k − 1 + T, E + 2N)
        taps = [window[:, j : j + time] * self.conv_weight[j] for j in range(self.kernel)]
        xbc = F.silu(torch.stack(taps).sum(0) + self.conv_bias)
        x, b, c = xbc.split([self.inner, self.n, self.n], dim=-1)
        x = x.reshape(batch, time, self.heads, self.head_dim)
        # Short windows get one chunk of their own length; the traced export keeps the fixed chunk.
        chunk = self.chunk if torch.jit.is_tracing() else min(self.chunk, time)
        dt, a = F.softplus(delta + self.dt_bias), -torch.exp(self.a_log)
        with torch.autocast(u.device.type, enabled=False):  # the state hand-over in float32
            y, ssm_state = ssd(x, dt, a, b, c, ssm_state, chunk)
        return u + self.drop(self._branch(y, x, z)), window[:, 1 - self.kernel :], ssm_state

    def step(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token. u: (B, d), conv_state: (B, k − 1, E + 2N), ssm_state: (B, H, P, N)."""
        z, xbc, delta = self._project(u)
        window = torch.cat([conv_state, xbc.reshape(-1, 1, self.conv_dim)], dim=1)  # (B, k, E + 2N)
        xbc = F.silu((window * self.conv_weight).sum(1) + self.conv_bias)
        x, b, c = xbc.split([self.inner, self.n, self.n], dim=-1)
        x = x.reshape(-1, self.heads, self.head_dim)
        dt, a = F.softplus(delta + self.dt_bias), -torch.exp(self.a_log)
        y, ssm_state = ssd_step(x, dt, a, b, c, ssm_state, (self.heads, self.head_dim, self.n))
        return u + self._branch(y, x, z), window[:, 1:], ssm_state

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-stream shapes of (conv, ssm), without the batch axis."""
        return (self.kernel - 1, self.conv_dim), (self.heads, self.head_dim, self.n)
