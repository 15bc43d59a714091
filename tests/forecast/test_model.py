"""The forecaster's parts: the least-squares AR skip, the seed ensemble, the interval calibration, loading
checkpoints of the single-network layout, the parallel cells against their step-by-step recurrence, and
ONNX parity of the window -> (mean, log sigma) graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forecast.model import Z90, ForecastConfig, Forecaster, Member
from forecast.train import Forecasting, TrainConfig, _prepared
from lm.config import ConfigError
from lm.exporter import Signature, export_graph, require_parity, step_parity
from serving.bundle import TensorSpec

SMALL = {"dataset": "sunspots", "horizon": 4, "hidden": 8, "threads": 1, "progress": False}


def family(**settings) -> Forecasting:
    config = TrainConfig.of(**{**SMALL, **settings})
    torch.manual_seed(0)
    fam = Forecasting(config, _prepared(config))
    fam.build_model()
    return fam


def test_the_skip_starts_at_least_squares_and_stays_fixed():
    fam = family(model="mlp", members=2)
    model, c = fam.model, fam.model_config
    assert c.ar == 9 and c.window == 22  # the sunspots preset
    x, y = fam.x.numpy().astype(np.float64), fam.y.numpy().astype(np.float64)
    level = x[:, -1:]
    inputs = np.c_[x[:, -c.ar :, 0], np.ones(len(x))]
    targets = (y - level)[:, :, 0]
    solution = np.linalg.solve(inputs.T @ inputs + np.eye(c.ar + 1), inputs.T @ targets)
    with torch.no_grad():
        mean, _ = model(fam.x)
    np.testing.assert_allclose(mean[:, :, 0].numpy(), x[:, -1, :] + inputs @ solution, atol=1e-4)
    before = [m.highway.weight.clone() for m in model.members]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        fam.step_loss(np.arange(32)).loss.backward()
        optimizer.step()
    assert all(torch.equal(b, m.highway.weight) for b, m in zip(before, model.members, strict=True))
    assert not torch.equal(model(fam.x)[0], mean)  # the network around it did learn


def test_the_ensemble_averages_members_and_mixes_their_variance():
    torch.manual_seed(1)
    model = Forecaster(ForecastConfig(model="gru", hidden=6, window=5, horizon=3, members=3)).eval()
    x = torch.randn(4, 5, 1)
    means, log_sigmas = model.member_outputs(x)
    assert means.shape == (3, 4, 3, 1) and not torch.allclose(means[0], means[1])
    mean, log_sigma = model(x)
    torch.testing.assert_close(mean, means.mean(0))
    variance = torch.exp(2 * log_sigmas).mean(0) + means.var(0, unbiased=False)
    torch.testing.assert_close(torch.exp(2 * log_sigma), variance)


def test_validation_calibrates_the_interval_to_90_percent():
    fam = family(model="gru")
    fam.validate()
    model = fam.model
    assert model.interval_scale != 1.0
    with torch.no_grad():
        mean, log_sigma = model(fam.vx)
    inside = ((fam.vy - mean).abs() <= Z90 * torch.exp(log_sigma) + 1e-6).float().mean()
    assert 0.9 <= float(inside) <= 0.9 + 2 / fam.vy.numel()
    fixed = family(model="gru", interval_scale=1.7)
    fixed.validate()
    assert float(fixed.model.interval_scale) == pytest.approx(1.7)


def test_fit_valid_trains_on_the_validation_part_too():
    plain, refit = family(model="mlp"), family(model="mlp", fit_valid=True)
    splits = plain.prepared.splits
    # one more window per validation target (also those whose horizon starts in train and ends in valid)
    assert len(refit.x) == len(plain.x) + splits.test_start - splits.valid_start
    torch.testing.assert_close(refit.x[-len(plain.vx) :], plain.vx)


def test_a_single_network_checkpoint_still_loads():
    config = ForecastConfig(model="lstm", hidden=5, window=4, horizon=2)
    torch.manual_seed(2)
    old = Member(config).eval()  # the layout before the ensemble: body.*, head.* at the top
    model = Forecaster(config)
    model.load_state_dict(old.state_dict())
    x = torch.randn(3, 4, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), old(x))
    with pytest.raises(ConfigError, match="--ar 5 reads more values than the window of 4"):
        ForecastConfig(window=4, ar=5)


@pytest.mark.parametrize("model", ["mamba", "mingru"])
def test_a_parallel_cell_reads_the_window_as_its_step_by_step_recurrence(model):
    """The stack's parallel form (what training and the exported graph run) against the blocks' own
    one-step form fed the window value by value from a zero state, in float64."""
    torch.manual_seed(4)
    config = ForecastConfig(model=model, hidden=8, layers=2, window=21, horizon=3, heads=2, state_size=4)
    member = Member(config).double().eval()
    x = torch.randn(3, 21, 1, dtype=torch.float64)
    stack = member.body
    u = stack.proj_in(x)
    for block in stack.blocks:
        state = [u.new_zeros((3, *shape)) for shape in block.state_shapes()]
        steps = []
        for t in range(21):
            out, *state = block.step(u[:, t], *state)
            steps.append(out)
        u = torch.stack(steps, dim=1)
    with torch.no_grad():
        torch.testing.assert_close(member.features(x), stack.norm(u)[:, -1], atol=1e-10, rtol=0)


def test_the_parallel_cells_settings_reach_the_network_and_are_checked_as_the_language_models():
    fam = family(model="mamba", layers=2, heads=2, state_size=4, expand=1, conv_kernel=3)
    block = fam.model.members[0].body.blocks[1]
    assert (block.heads, block.n, block.inner, block.kernel) == (2, 4, 8, 3)
    with pytest.raises(ConfigError, match="--heads"):
        ForecastConfig(model="mamba", hidden=6, expand=1, heads=4)
    assert ForecastConfig(model="gru", hidden=6, expand=1, heads=4).heads == 4  # unused by the others


@pytest.mark.parametrize("name", ["mlp", "gru", "mamba", "mingru"])
def test_the_window_graph_exports_with_parity(tmp_path, name):
    torch.manual_seed(3)
    config = ForecastConfig(model=name, hidden=6, window=8, horizon=3, ar=4, members=2, heads=2)
    model = Forecaster(config).eval()
    model.interval_scale.fill_(1.3)
    signature = Signature(
        inputs=(TensorSpec("window", ("batch", 8, 1), "float32"),),
        outputs=(
            TensorSpec("mean", ("batch", 3, 1), "float32"),
            TensorSpec("log_sigma", ("batch", 3, 1), "float32"),
        ),
        state=(),
    )
    path = tmp_path / "window.onnx"
    export_graph(model, (torch.zeros(2, 8, 1),), path, signature.input_specs, signature.output_specs)
    gen = torch.Generator().manual_seed(0)
    cases = [(f"B={b}", {"window": torch.randn(b, 8, 1, generator=gen)}) for b in (1, 5)]
    parity = require_parity(step_parity(model, path, signature, cases), "the window graph")
    assert parity["cases"] == 2
