"""Figures and the numbers behind them: principal components by hand, k-step errors against direct
predictions of a real run, PNGs written."""

from __future__ import annotations

import numpy as np
import pytest

from forecast import plots
from forecast.cli import main
from forecast.evaluate import k_step_errors, load_run, predict

PNG = b"\x89PNG\r\n\x1a\n"


def test_principal_components_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    t = rng.normal(size=200)
    # variance along (1, 1, 0) / sqrt 2 is 8x that along (0, 0, 1); nothing along (1, -1, 0)
    states = np.stack([2 * t, 2 * t, rng.normal(size=200)], axis=1)
    coords, share = plots.principal_components(states)
    axis1 = coords[:, 0] / np.linalg.norm(coords[:, 0])
    centred = (states - states.mean(0)) @ np.array([1, 1, 0]) / np.sqrt(2)
    assert abs(axis1 @ (centred / np.linalg.norm(centred))) == pytest.approx(1.0, abs=1e-3)
    assert share[0] > 0.85 and share.sum() == pytest.approx(1.0)
    path = plots.hidden_pca_figure(tmp_path / "pca.png", "t", states, t, "t")
    assert path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ts") / "mlp"
    args = ["train", "--dataset", "sunspots", "--model", "mlp", "--hidden", "8", "--horizon", "2"]
    assert main([*args, "--max-steps", "20", "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    return out


def test_k_step_errors_start_at_the_one_step_error(mlp_run):
    run = load_run(mlp_run)
    p, window = run.prepared, run.model.config.window
    x, y = p.windows(p.splits.test_start, p.splits.length, window, 1)
    one_step = np.abs(p.scaler.inverse(predict(run.model, x)[0][:, 0]) - p.scaler.inverse(y[:, 0])).mean()
    errors = k_step_errors(run)
    assert sorted(errors) == [1, 2, 4, 8, 16]  # the k below the 30 test years
    assert errors[1] == pytest.approx(one_step, rel=1e-5)
    assert errors[16] > errors[1]


def test_eval_of_an_mlp_draws_no_pca(mlp_run, capsys):
    assert main(["eval", str(mlp_run)]) == 0
    assert "coverage=" in capsys.readouterr().out
    assert (mlp_run / "error_growth.png").read_bytes()[:8] == PNG
    assert not (mlp_run / "hidden_pca.png").exists()  # the MLP carries no state between steps
