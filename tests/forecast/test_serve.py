"""Export and serving against torch: runs trained by ``rnnlab-ts train`` on sunspots (MLP, GRU, a
two-member LSTM ensemble, a two-layer RNN without the AR skip, read in absolute terms, mamba, a two-layer
minGRU) and a GRU on a
two-column CSV, exported by ``rnnlab-ts export``, served by a real server on 127.0.0.1 with real
onnxruntime. Served forecasts equal torch's forecasts of the same run within 1e-4 (the parity
tolerance): Forecast against forecast.evaluate.forecast_next, ForecastStream one observation at a time
against torch on every window of the test horizon, and ``rnnlab-ts forecast BUNDLE`` against
``rnnlab-ts forecast RUN``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from forecast.cli import main
from forecast.evaluate import adaptive_intervals, forecast_next, load_run, predict
from forecast.model import Z90
from serving import state_token
from serving.api.rnnlab.v1 import forecasting_pb2 as fpb
from serving.bundle import load_manifest
from serving.client import Client, observations
from serving.conformal import ALPHA
from serving.harness import ServerThread
from tests.serving.serve_helpers import STATE_KEY, config
from tests.torch_free import run_cli_blocked

TOLERANCE = 1e-4
COMMON = "--max-steps 40 --no-progress --seed 1 --threads 1 --horizon 4"
RUNS = {
    "mlp": f"--dataset sunspots --model mlp --hidden 10 {COMMON}",
    "gru": f"--dataset sunspots --model gru --hidden 12 {COMMON}",
    "lstm": f"--dataset sunspots --model lstm --hidden 8 --members 2 {COMMON}",
    "rnn": f"--dataset sunspots --model rnn --hidden 8 --layers 2 --no-relative --ar 0 {COMMON}",
    "gru-sqrt": f"--dataset sunspots --model gru --hidden 12 --transform sqrt {COMMON}",
    "mamba": f"--dataset sunspots --model mamba --hidden 8 --heads 2 --state-size 4 {COMMON}",
    "mingru": f"--dataset sunspots --model mingru --hidden 8 --layers 2 {COMMON}",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{model: (run dir, bundle dir)}; the bundles sit together in one models directory."""
    root = tmp_path_factory.mktemp("ts-serve")
    out = {}
    for name, flags in RUNS.items():
        run = root / f"run-{name}"
        assert main(["train", *flags.split(), "--out", str(run)]) == 0
        assert main(["export", str(run), "--out", str(root / "models" / f"sun-{name}")]) == 0
        out[name] = (run, root / "models" / f"sun-{name}")
    return out


@pytest.fixture(scope="module")
def server(exported):
    models = next(iter(exported.values()))[1].parent
    with ServerThread(config(models)) as running, Client(f"127.0.0.1:{running.port}") as client:
        yield client


def test_the_bundle_records_the_run(exported):
    run, bundle = exported["gru"]
    manifest = load_manifest(bundle)
    spec = manifest.data["forecast"]
    loaded = load_run(run)
    assert manifest.kind == "forecast" and manifest.tokenizer is None
    assert spec["window"] == 22 and spec["horizon"] == 4 and spec["columns"] == ["SUNACTIVITY"]
    assert spec["scaler"] == {"mean": loaded.prepared.scaler.mean, "std": loaded.prepared.scaler.std}
    assert manifest.data["parity"]["max_abs_mean"] <= TOLERANCE and manifest.data["parity"]["cases"] >= 13
    assert {"mae", "rmse", "mase", "coverage"} <= set(manifest.evaluation["rolling_origin"])


@pytest.mark.parametrize("name", sorted(RUNS))
@pytest.mark.parametrize("horizon", [2, 4, 9])
def test_served_forecast_equals_torch(exported, server, name, horizon):
    run_dir, _ = exported[name]
    run = load_run(run_dir)
    values = run.prepared.series.values
    want = forecast_next(run, horizon)
    steps = server.forecast(f"sun-{name}", values[-40:].tolist(), horizon)
    for got, row in zip(steps, want, strict=True):
        for key, ours in (("mean", got.mean), ("lo90", got.lower), ("hi90", got.upper)):
            assert abs(ours[0] - row[key][0]) <= TOLERANCE, (key, ours[0], row[key][0])


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_served_stream_equals_torch_on_every_window(exported, server, name):
    """The test horizon streamed one observation per message: each answer equals torch on that window."""
    run = load_run(exported[name][0])
    p, window = run.prepared, run.model.config.window
    start = p.splits.test_start - window
    rows = p.series.values[start:].tolist()
    requests = [fpb.ForecastStreamRequest(observations=observations([row])) for row in rows]
    requests[0].model = f"sun-{name}"
    replies = list(server.forecast_stream(requests))
    windows = np.stack([p.scaled[o - window : o] for o in range(start + window, len(rows) + start + 1)])
    mean, sigma = predict(run.model, windows)
    want = p.to_units(mean)
    answers = replies[window - 1 :]
    got = np.array([[s.mean for s in r.steps] for r in answers])
    assert got.shape == want.shape == (len(rows) - window + 1, 4, 1)
    assert np.abs(got - want).max() <= TOLERANCE
    origins = np.arange(start + window, len(rows) + start + 1)
    adaptive = adaptive_intervals(p, origins, mean, Z90 * sigma)  # eval's replay of the same rule
    for key, sign, ends in (("lower", -1, adaptive[0]), ("upper", 1, adaptive[1])):
        served = np.array([[getattr(s, key) for s in r.steps] for r in answers])
        assert np.abs(served - ends).max() <= TOLERANCE
        assert np.abs(served - p.to_units(mean + sign * Z90 * sigma)).max() > 100 * TOLERANCE  # it adapted
    scale = np.array([[s.scale for s in r.steps] for r in answers])
    if p.transform.name == "none":
        half = (adaptive[1] - adaptive[0]) / (2 * Z90)
        assert np.abs(scale - half).max() <= TOLERANCE


def test_a_resumed_stream_continues_the_adaptive_intervals(exported, server):
    """A stream exported half way and resumed from its state token answers as the uninterrupted one."""
    run = load_run(exported["gru"][0])
    p, window = run.prepared, run.model.config.window
    rows = p.series.values[p.splits.test_start - window :].tolist()

    def stream(rows, first):
        requests = [fpb.ForecastStreamRequest(observations=observations([row])) for row in rows]
        for key, value in first.items():
            setattr(requests[0], key, value)
        requests[-1].export = True
        return list(server.forecast_stream(requests))

    whole = stream(rows, {"model": "sun-gru"})
    half = len(rows) // 2
    head = stream(rows[:half], {"model": "sun-gru"})
    assert (
        state_token.decode(head[-1].state_token, STATE_KEY.encode()).extra["alpha_t"] != ALPHA
    )  # it has moved
    tail = stream(rows[half:], {"state_token": head[-1].state_token})
    for got, want in zip(head + tail, whole, strict=True):
        for a, b in zip(got.steps, want.steps, strict=True):
            assert abs(a.lower[0] - b.lower[0]) <= 1e-9 and abs(a.upper[0] - b.upper[0]) <= 1e-9


def test_a_transformed_model_serves_skewed_intervals(exported, server):
    """sqrt: the bundle records the transform; the served interval is wider above the median than below
    and narrows with the level."""
    spec = load_manifest(exported["gru-sqrt"][1]).data["forecast"]
    assert spec["transform"] == {"name": "sqrt", "lambda": []}
    assert "transform" not in load_manifest(exported["gru"][1]).data["forecast"]  # none: as before
    values = load_run(exported["gru-sqrt"][0]).prepared.series.values
    low, high = (server.forecast("sun-gru-sqrt", (values[-40:] * f).tolist(), 4) for f in (0.2, 1.5))
    for steps in (low, high):
        assert all(s.upper[0] - s.mean[0] > s.mean[0] - s.lower[0] > 0 for s in steps)
    assert low[0].upper[0] - low[0].lower[0] < high[0].upper[0] - high[0].lower[0]


@pytest.mark.parametrize("name", ["gru", "gru-sqrt"])
def test_forecast_from_the_bundle_equals_forecast_from_the_run(exported, capsys, tmp_path, name):
    """``rnnlab-ts forecast BUNDLE`` runs with torch blocked (as on the serving install) and prints the
    forecast of ``rnnlab-ts forecast RUN`` (torch)."""
    run, bundle = exported[name]
    csv = tmp_path / "h.csv"
    csv.write_text("YEAR,SUNACTIVITY\n" + "".join(f"{1900 + i},{(i * 7) % 90}\n" for i in range(30)))
    for extra in ([], ["--csv", str(csv)]):
        assert main(["forecast", str(run), "--horizon", "7", *extra]) == 0
        theirs = json.loads(capsys.readouterr().out)
        out = run_cli_blocked("forecast.cli", ["forecast", str(bundle), "--horizon", "7", *extra])
        assert out.returncode == 0, out.stderr
        ours = json.loads(out.stdout)
        assert ours["columns"] == theirs["columns"] and ours["horizon"] == 7
        for a, b in zip(ours["forecast"], theirs["forecast"], strict=True):
            assert a["step"] == b["step"]
            for key in ("mean", "lo90", "hi90"):
                assert abs(a[key][0] - b[key][0]) <= TOLERANCE


def test_a_multivariate_csv_run_is_served(tmp_path):
    """Two positive columns under Box-Cox (one lambda each): the bundle reads (W, 2) windows; a one-value
    observation and a non-positive value are refused naming them."""
    csv = tmp_path / "two.csv"
    rows = [f"{t},{2 + math.sin(0.3 * t):.5f},{1.5 + math.cos(0.2 * t) + 0.01 * t:.5f}" for t in range(160)]
    csv.write_text("t,a,b\n" + "\n".join(rows) + "\n")
    run, bundle = tmp_path / "run", tmp_path / "models" / "two"
    flags = (
        f"--csv {csv} --time-column t --value-column a,b --model gru --hidden 8 --transform boxcox {COMMON}"
    )
    assert main(["train", *flags.split(), "--out", str(run)]) == 0
    assert main(["export", str(run), "--out", str(bundle)]) == 0
    loaded = load_run(run)
    history = loaded.prepared.series.values[-30:]
    with ServerThread(config(bundle.parent)) as running, Client(f"127.0.0.1:{running.port}") as client:
        steps = client.forecast("two", history.tolist(), 4)
        with pytest.raises(grpc.RpcError) as caught:
            client.forecast("two", [[1.0]] * 30, 4)
        bad = history.tolist()
        bad[3][1] = -0.5
        with pytest.raises(grpc.RpcError) as negative:
            client.forecast("two", bad, 4)
        assert client.forecast("two", history.tolist(), 4)[0].mean == steps[0].mean  # still serving
    want = forecast_next(loaded, 4, _series(loaded, history))
    assert len(set(loaded.prepared.transform.lam)) == 2
    assert load_manifest(bundle).data["forecast"]["transform"] == loaded.prepared.transform.to_dict()
    for key, field in (("mean", "mean"), ("lo90", "lower"), ("hi90", "upper")):
        got = np.array([getattr(s, field) for s in steps])
        assert got.shape == (4, 2)
        assert np.abs(got - np.array([row[key] for row in want])).max() <= TOLERANCE
    assert "history[0].values has 1 values; the model reads 2 (a, b)" in caught.value.details()
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "history[3].values[1] is -0.5; the model's boxcox transform needs positive"
        in negative.value.details()
    )
    shutil.rmtree(run)


def _series(loaded, values: np.ndarray):
    from forecast.data import Series

    s = loaded.prepared.series
    return Series(values, np.ones_like(values, dtype=bool), s.times[-len(values) :], s.columns, s.name)


def test_a_corrupt_checkpoint_is_refused_naming_it_and_nothing_is_written(exported, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(exported["mlp"][0], run)
    (run / "best.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(run), "--out", str(tmp_path / "bundle")]) == 2
    assert "best.pt" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle*"))
