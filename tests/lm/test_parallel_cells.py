"""The parallel (training) forms of the mamba and minGRU blocks equal their one-token reference steps:
outputs, final state and gradients, for several batch sizes, window lengths (1, and lengths that are not
a multiple of the chunk) and carried-in states; float64 within 1e-5, float32 within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from lm.cli import main
from lm.config import ConfigError, TrainConfig
from lm.mingru import MinGRUBlock, g, scan_blocked, scan_chunked, scan_log
from lm.model import RNNLM, ModelConfig
from lm.ssm import MambaBlock, RMSNorm, _RMSNormFunction
from tests.lm.conftest import TINY_FLAGS

SHAPES = [(1, 1), (3, 1), (2, 7), (3, 8), (4, 13), (2, 40)]  # (batch, time); the test chunk is 8
DTYPES = [(torch.float64, 1e-5), (torch.float32, 1e-4)]


def _block(cell: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    block = MambaBlock(8, 2, 4, 6, 4, chunk=8) if cell == "mamba" else MinGRUBlock(8, 2)
    return block.to(dtype)


def _random_state(block: torch.nn.Module, batch: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    return [torch.randn(batch, *shape, generator=gen, dtype=dtype) for shape in block.state_shapes()]


def _run(block: torch.nn.Module, u: torch.Tensor, state: list[torch.Tensor], parallel: bool):
    """-> (outputs (B, T, d), final state) with the window in one call, or one step at a time."""
    if parallel:
        out, *new_state = block(u, *state)
        return out, new_state
    steps = []
    for t in range(u.shape[1]):
        y, *state = block.step(u[:, t], *state)
        steps.append(y)
    return torch.stack(steps, dim=1), state


def _outputs_and_grads(block, u, state, parallel):
    block.zero_grad()
    u = u.clone().requires_grad_(True)
    state = [s.clone().requires_grad_(True) for s in state]
    out, new_state = _run(block, u, state, parallel)
    # Weights that differ per position and state element, so every gradient path is checked.
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    for s in new_state:
        loss = loss + (s * torch.cos(torch.arange(s.numel(), dtype=s.dtype)).view_as(s)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    return out.detach(), [s.detach() for s in new_state], u.grad, [s.grad for s in state], grads


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("batch,time", SHAPES)
@pytest.mark.parametrize("cell", ["mamba", "mingru"])
def test_parallel_form_equals_the_step_by_step_reference(
    cell: str, batch: int, time: int, dtype, tol: float
) -> None:
    block = _block(cell, dtype)
    u = torch.randn(batch, time, 8, generator=torch.Generator().manual_seed(time), dtype=dtype)
    state = _random_state(block, batch, dtype)
    par, ref = (_outputs_and_grads(block, u, state, parallel) for parallel in (True, False))
    close = dict(atol=tol, rtol=tol)
    torch.testing.assert_close(par[0], ref[0], **close)
    for got, want in zip(par[1] + [par[2]] + par[3], ref[1] + [ref[2]] + ref[3], strict=True):
        torch.testing.assert_close(got, want, **close)
    assert par[4].keys() == ref[4].keys()
    for name, grad in ref[4].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(par[4][name], grad, **close, msg=name)


@pytest.mark.parametrize("time", [1, 5, 16, 37])
def test_mingru_export_and_log_space_forms_equal_the_training_scan(time: int) -> None:
    gen = torch.Generator().manual_seed(time)
    gate, candidate = (4 * torch.randn(3, time, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    want = scan_blocked(torch.cat([gate, candidate], dim=-1), h0)
    torch.testing.assert_close(scan_chunked(gate, candidate, h0, 4), want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(scan_log(gate, candidate, h0), want, atol=1e-10, rtol=1e-10)


def test_training_scan_stays_exact_under_strong_forgetting_over_a_long_window() -> None:
    """Decays of e^-20 a step for 512 steps in float32: h_t is g(h̃_t) to float precision; the log-space
    form drifts by ε·|log A_t| (why training uses the doubling scan)."""
    gate = torch.full((1, 512, 3), 20.0)
    candidate = torch.randn(1, 512, 3, generator=torch.Generator().manual_seed(0))
    want = g(candidate)[0, 1:]
    got = scan_blocked(torch.cat([gate, candidate], dim=-1), torch.ones(1, 3))[0, 1:]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    drift = (scan_log(gate, candidate, torch.ones(1, 3))[0, 1:] - want).abs().max()
    assert 1e-5 < drift < 1e-2


@pytest.mark.parametrize("ff_mult", [0, 2])
@pytest.mark.parametrize("cell", ["mamba", "mingru"])
def test_model_window_in_pieces_equals_one_window_and_steps(cell: str, ff_mult: int) -> None:
    """The LM's state carried across calls (as truncated BPTT and generation carry it) changes nothing."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=13,
        cell=cell,
        layers=2,
        embed=12,
        hidden=12,
        dropout=0.0,
        heads=2,
        state_size=4,
        expand=2,
        conv_kernel=3,
        ff_mult=ff_mult,
    )
    model = RNNLM(config).double().eval()
    assert len(model.feed_forwards) == (2 if ff_mult else 0)
    tokens = torch.randint(0, 13, (3, 21))
    whole, whole_state = model(tokens)
    first, state = model(tokens[:, :9])
    second, state = model(tokens[:, 9:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-10, rtol=1e-10)
    steps, step_state = [], model.init_state(3, dtype=torch.float64)
    for t in range(21):
        logits, step_state = model.step(tokens[:, t : t + 1], step_state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-10, rtol=1e-10)
    assert [s.shape[1] for s in whole_state] == [3] * len(config.state_names)
    for got, want in zip((state, step_state), (whole_state, whole_state), strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_bad_settings_of_the_parallel_cells_are_refused_by_flag() -> None:
    with pytest.raises(ConfigError, match=r"--heads \(3\) must divide expand x hidden"):
        TrainConfig.of(cell="mamba", heads=3)
    with pytest.raises(ConfigError, match="--conv-kernel must be >= 2"):
        TrainConfig.of(cell="mamba", conv_kernel=1)
    with pytest.raises(ConfigError, match="--state-size must be >= 1"):
        TrainConfig.of(cell="mamba", state_size=0)
    with pytest.raises(ConfigError, match="--impl scratch is for rnn/gru/lstm"):
        TrainConfig.of(cell="mingru", impl="scratch")
    with pytest.raises(ConfigError, match="--ff-mult is for mamba and mingru"):
        TrainConfig.of(cell="gru", ff_mult=4)
    with pytest.raises(ConfigError, match="--ff-mult must be >= 0"):
        TrainConfig.of(cell="mingru", ff_mult=-1)


@pytest.mark.parametrize("cell,extra", [("mamba", []), ("mingru", []), ("mingru", ["--ff-mult", "2"])])
def test_cli_trains_resumes_evaluates_exports_and_generates(
    cell: str, extra: list[str], corpus_file, tmp_path, capsys
) -> None:
    """The whole command line with a parallel cell: the torch run and its bundle sample the same text."""
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    flags = [
        "--corpus",
        str(corpus_file),
        "--out",
        str(run),
        "--cell",
        cell,
        "--heads",
        "2",
        "--state-size",
        "4",
        *extra,
        *TINY_FLAGS,
    ]
    assert main(["train", *flags, "--epochs", "1"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert main(["eval", str(run), "--json"]) == 0
    assert main(["export", str(run), "--out", str(bundle)]) == 0
    architecture = json.loads((bundle / "manifest.json").read_text())["architecture"]
    assert architecture["cell"] == cell and architecture["ff_mult"] == (2 if extra else 0)
    capsys.readouterr()
    args = ["--prompt", "The Time", "--max-tokens", "40", "--temperature", "0.8", "--seed", "3"]
    assert main(["generate", str(bundle), *args]) == 0
    from_bundle = capsys.readouterr().out
    assert main(["generate", str(run), *args]) == 0
    assert capsys.readouterr().out == from_bundle and from_bundle


@pytest.mark.parametrize("time", [1, 2, 35, 64, 130])  # chunks of 1, 1, 8 (padded), 8 and 16 (padded)
def test_mingru_scan_gradients_equal_autograd_through_the_recurrence(time: int) -> None:
    gen = torch.Generator().manual_seed(time)
    gate, candidate = (3 * torch.randn(2, time, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, time, 5, generator=gen, dtype=torch.float64)

    def grads(parallel: bool) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (gate, candidate, h0)]
        if parallel:
            h = scan_blocked(torch.cat(leaves[:2], dim=-1), leaves[2])
        else:
            z, steps, state = torch.sigmoid(leaves[0]), [], leaves[2]
            for t in range(time):
                state = (1 - z[:, t]) * state + z[:, t] * g(leaves[1][:, t])
                steps.append(state)
            h = torch.stack(steps, dim=1)
        (h * weights).sum().backward()
        return [h.detach()] + [leaf.grad for leaf in leaves]

    for got, want in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", ["mamba", "mingru"])
def test_bf16_precision_trains_with_bf16_products_and_evaluates_in_float32(cell: str) -> None:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=13, cell=cell, layers=2, embed=16, hidden=16, dropout=0.0, heads=2, state_size=4)
    fp32, bf16 = RNNLM(ModelConfig(**kwargs)), RNNLM(ModelConfig(**kwargs, precision="bf16"))
    bf16.load_state_dict(fp32.state_dict())
    tokens = torch.randint(0, 13, (3, 20), generator=torch.Generator().manual_seed(1))
    trained, _ = bf16(tokens)
    reference, _ = fp32(tokens)
    difference = (trained - reference).abs().max()
    assert trained.dtype == torch.float32 and 0 < difference < 0.1  # bf16 products: close, not equal
    trained.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bf16.parameters())
    with torch.no_grad():
        torch.testing.assert_close(bf16.eval()(tokens)[0], fp32.eval()(tokens)[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="precision"):
        ModelConfig(vocab_size=13, cell="gru", precision="bf16")


def test_parallel_cells_drop_the_same_channels_at_every_step() -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=13, cell="mingru", layers=1, embed=16, hidden=16, dropout=0.5))
    dropped = model.drop(torch.ones(4, 9, 16))
    assert ((dropped == 0).any(dim=1) == (dropped == 0).all(dim=1)).all()  # a channel is off at all steps
    assert 0 < (dropped == 0).float().mean() < 1
    torch.testing.assert_close(dropped[dropped != 0], torch.full_like(dropped[dropped != 0], 2.0))
    assert torch.equal(model.eval().drop(torch.ones(4, 9, 16)), torch.ones(4, 9, 16))


@pytest.mark.parametrize("cell", ["mamba", "mingru"])
def test_blocks_drop_their_residual_branch_in_training_only(cell: str) -> None:
    """The branch is dropped, the skip path and the carried state are not; evaluation is the plain block."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=13, cell=cell, layers=2, embed=16, hidden=16, heads=2, dropout=0.5)
    block = RNNLM(config).blocks[0]
    u, state = torch.randn(3, 7, 16), _random_state(block, 3, torch.float32)
    plain, *plain_state = block.eval()(u, *state)
    dropped, *dropped_state = block.train()(u, *state)
    branch, kept = plain - u, dropped - u
    off = (kept == 0).all(dim=1)  # (B, d): a channel of the branch is off at every step or at none
    assert 0 < off.float().mean() < 1 and ((kept == 0).any(dim=1) == off).all()
    torch.testing.assert_close(kept[~off[:, None].expand_as(kept)], 2 * branch[~off[:, None].expand_as(kept)])
    for got, want in zip(dropped_state, plain_state, strict=True):
        torch.testing.assert_close(got, want)


def test_rms_norm_autograd_node_equals_the_exported_spelling() -> None:
    """RMSNorm's training form (one autograd node, hand-written backward) against the op-by-op form the
    ONNX export traces: values and gradients in float64, and torch's gradcheck."""
    norm = RMSNorm(7).double()
    torch.nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def run(spelled: bool) -> list[torch.Tensor]:
        norm.zero_grad()
        leaf = x.clone().requires_grad_(True)
        if spelled:
            y = leaf / torch.sqrt(leaf.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
        else:
            y = norm(leaf)
        (y * weights).sum().backward()
        return [y.detach(), leaf.grad, norm.weight.grad.clone()]

    for got, want in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    leaf = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-5), (leaf, norm.weight))
