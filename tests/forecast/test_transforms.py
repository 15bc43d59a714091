"""Variance-stabilising transforms (serving.transforms): round trips, interval endpoints mapped back,
Box-Cox's lambda fitted on the training part only, and values outside a transform's domain refused by
column, row and time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forecast.cli import main
from forecast.data import Preset, Series, fit_transform, load_series
from forecast.evaluate import load_run, predict
from forecast.model import Z90
from forecast.train import prepare
from serving.transforms import Transform, TransformError, boxcox_lambda

RNG = np.random.default_rng(0)
POSITIVE = np.exp(RNG.normal(0.0, 1.0, (200, 2)))


@pytest.mark.parametrize(
    "transform", [Transform(), Transform("log"), Transform("sqrt"), Transform("boxcox", (0.3, -0.4))]
)
def test_round_trip(transform):
    back = transform.inverse(transform.forward(POSITIVE))
    np.testing.assert_allclose(back, POSITIVE, rtol=1e-10)
    assert Transform.from_dict(transform.to_dict()) == transform


@pytest.mark.parametrize("transform", [Transform("log"), Transform("sqrt"), Transform("boxcox", (0.5, -0.5))])
def test_interval_endpoints_map_to_endpoints_with_the_same_coverage(transform):
    """The inverse is monotone, so a point inside [mean - h, mean + h] on the transformed scale is inside
    the mapped interval; the mapped interval is skewed (wider above the median) for these concave maps."""
    z = transform.forward(POSITIVE)
    mean, half = z + RNG.normal(0.0, 0.3, z.shape), 0.5
    lower, upper = transform.inverse(mean - half), transform.inverse(mean + half)
    inside_there = (z >= mean - half) & (z <= mean + half)
    inside_here = (lower <= POSITIVE) & (upper >= POSITIVE)
    assert inside_there.any() and not inside_there.all()
    np.testing.assert_array_equal(inside_here, inside_there)
    centre, fits = transform.inverse(mean), upper < 1e20  # Box-Cox, lambda < 0: beyond the image, a cap
    assert fits.mean() > 0.9 and np.all((upper - centre > centre - lower)[fits])
    grid = np.linspace(-50.0, 50.0, 2001)[:, None].repeat(2, axis=1)
    assert (
        np.all(np.diff(transform.inverse(grid), axis=0) >= 0) and np.isfinite(transform.inverse(grid)).all()
    )


def test_boxcox_lambda_is_fitted_on_the_training_part_only():
    """The validation and test parts are replaced by wild values: lambda and the scaler do not move."""
    values = POSITIVE[:, :1] ** 2
    times = [str(t) for t in range(len(values))]
    base = Series(values, np.ones_like(values, dtype=bool), times, ["y"], "squares")
    preset = Preset(test=40, season=1, window=5, batch_size=8)
    prepared = prepare(base, preset, transform="boxcox")
    train = values[: prepared.splits.valid_start, 0]
    assert prepared.transform.lam == (boxcox_lambda(train),)
    wild = values.copy()
    wild[prepared.splits.valid_start :] = 1000.0
    assert abs(prepared.transform.lam[0] - boxcox_lambda(wild[:, 0])) > 0.05  # fitted on all: moves
    again = prepare(Series(wild, base.observed, times, ["y"], "squares"), preset, transform="boxcox")
    assert again.transform == prepared.transform and again.scaler == prepared.scaler
    assert (
        again.scaled[: prepared.splits.valid_start].tolist()
        == prepared.scaled[: prepared.splits.valid_start].tolist()
    )


def test_boxcox_lambda_recovers_a_known_power():
    """y = x^2 with x normal around 4: the Box-Cox lambda that makes y normal is near 0.5 (scipy's
    boxcox_normmax gave 0.5499 on this sample, ours 0.55)."""
    x = np.random.default_rng(0).normal(4.0, 1.0, 5000)
    assert boxcox_lambda(x**2) == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize("name", ["log", "boxcox"])
def test_non_positive_values_are_refused_naming_column_row_and_time(name):
    series = load_series("sunspots")  # 1711, 1712 and 1810 had no sunspots
    with pytest.raises(
        TransformError, match=r"sunspots: column 'SUNACTIVITY', row 12 \(time 1711\): 0 is not"
    ):
        fit_transform(name, series, 200)
    assert fit_transform("sqrt", series, 200) == Transform("sqrt")


def test_train_with_log_on_zeros_is_a_user_error(tmp_path, capsys):
    flags = "--dataset sunspots --model mlp --transform log --max-steps 2 --no-progress"
    assert main(["train", *flags.split(), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "column 'SUNACTIVITY', row 12 (time 1711)" in err and "log transform needs positive" in err
    assert not (tmp_path / "run").exists()


def test_stored_transforms_are_checked():
    assert Transform.from_dict(None) == Transform()  # runs and bundles from before the transform
    for bad in ({"name": "cube"}, {"name": "boxcox", "lambda": []}, {"name": "log", "lambda": "x"}, 3):
        with pytest.raises(TransformError):
            Transform.from_dict(bad)


def test_eval_of_a_sqrt_run_scores_in_the_series_units_with_the_mapped_intervals(tmp_path, capsys):
    """The mapped interval holds a truth exactly when the transformed interval holds the transformed
    truth, so eval's coverage equals the coverage counted on the model's scale; MAE is in sunspot numbers
    (the mean mapped back, the median), and the run stores the transform."""
    run = tmp_path / "run"
    flags = "--dataset sunspots --model mlp --hidden 8 --horizon 4 --transform sqrt --max-steps 30"
    assert (
        main(["train", *flags.split(), "--seed", "0", "--threads", "1", "--no-progress", "--out", str(run)])
        == 0
    )
    assert json.loads((run / "config.json").read_text())["transform"] == {"name": "sqrt", "lambda": []}
    capsys.readouterr()  # train's summary line
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    loaded = load_run(run)
    p, mc = loaded.prepared, loaded.model.config
    x, y = p.windows(p.splits.test_start, p.splits.length, mc.window, mc.horizon)
    mean, sigma = predict(loaded.model, x)
    assert result["coverage"] == pytest.approx(float(np.mean(np.abs(y - mean) <= Z90 * sigma)), abs=1e-9)
    origins = p.splits.test_start + np.arange(len(y))
    truth = np.stack([p.series.values[o : o + mc.horizon] for o in origins])
    assert result["mae"] == pytest.approx(float(np.mean(np.abs(p.to_units(mean) - truth))))
    assert np.abs(p.to_units(mean) - (mean * p.scaler.std[0] + p.scaler.mean[0]) ** 2).max() < 1e-9
    csv = tmp_path / "history.csv"
    rows = [f"{2000 + i},{-3.0 if i == 27 else 50.0 + i}" for i in range(30)]
    csv.write_text("YEAR,SUNACTIVITY\n" + "\n".join(rows) + "\n")
    assert main(["forecast", str(run), "--csv", str(csv)]) == 2
    err = capsys.readouterr().err
    assert "column 'SUNACTIVITY', row 28 (time 2027): -3 is not non-negative; the sqrt transform" in err
