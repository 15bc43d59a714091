"""rnnlab-ts end to end on real data: train through the shared loop, eval --json, forecast, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from forecast.cli import main
from lm.checkpoint import load_checkpoint
from lm.metrics import read_metrics
from tests.tiny_forecasters import TINY_TS_TRAIN

TRAIN = [
    "train",
    "--dataset",
    "sunspots",
    "--model",
    "gru",
    "--horizon",
    "4",
    "--hidden",
    "16",
    "--max-steps",
    "30",
    "--no-progress",
    "--seed",
    "3",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ts") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def test_run_directory(run_dir):
    for name in ("config.json", "last.pt", "best.pt", "metrics.jsonl", "metrics.png"):
        assert (run_dir / name).exists(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["test"] == 30 and config["season"] == 11 and len(config["scaler"]["mean"]) == 1


def _plot_labels(png) -> str:
    """The y labels that lm.metrics.plot_metrics wrote into the PNG ("left | right")."""
    with Image.open(png) as image:
        return image.text["Description"]


def test_the_loss_curve_shows_the_forecasters_figures_not_perplexity(run_dir):
    assert _plot_labels(run_dir / "metrics.png") == (
        "Gaussian NLL (nats/value, standardised) | valid MSE of the mean (standardised)"
    )
    records = read_metrics(run_dir / "metrics.jsonl")
    assert {"train", "valid"} == {r["split"] for r in records}
    assert not [r for r in records if "ppl" in r]
    assert all(r["mse"] > 0 for r in records if r["split"] == "valid")


def test_an_mse_run_names_its_loss_mse_in_the_plot_and_the_valid_lines(tmp_path, capsys):
    out = tmp_path / "mse"
    assert (
        main(["train", *TINY_TS_TRAIN.split(), "--max-steps", "20", "--loss", "mse", "--out", str(out)]) == 0
    )
    err = capsys.readouterr().err
    assert "valid MSE " in err and "ppl" not in err and "valid loss" not in err
    assert _plot_labels(out / "metrics.png").startswith("MSE (standardised units²) | valid MSE")


def test_eval_json_keys(run_dir, capsys):
    assert main(["eval", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"mae", "rmse", "mase", "coverage", "coverage_fixed", "coverage_by_gamma"} <= set(result)
    assert result["origins"] == 30 - 4 + 1 and result["points"] == 27 * 4
    assert 0 <= result["coverage"] <= 1 and result["rmse"] >= result["mae"] > 0
    for name in ("forecast.png", "error_growth.png", "hidden_pca.png"):  # a GRU: the PCA too
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_forecast_from_csv(run_dir, tmp_path, capsys):
    csv = tmp_path / "h.csv"
    csv.write_text("YEAR,SUNACTIVITY\n" + "".join(f"{1900 + i},{(i * 7) % 90}\n" for i in range(40)))
    assert main(["forecast", str(run_dir), "--horizon", "6", "--csv", str(csv)]) == 0
    out = json.loads(capsys.readouterr().out)["forecast"]
    assert [f["step"] for f in out] == [1, 2, 3, 4, 5, 6]
    assert all(f["lo90"][0] < f["mean"][0] < f["hi90"][0] for f in out)
    short = tmp_path / "short.csv"
    short.write_text("YEAR,SUNACTIVITY\n1900,3\n1901,4\n")
    assert main(["forecast", str(run_dir), "--csv", str(short)]) == 2
    assert "the model reads 22" in capsys.readouterr().err


def test_determinism_by_seed(run_dir, tmp_path):
    again = tmp_path / "again"
    assert main([*TRAIN, "--out", str(again)]) == 0
    a = load_checkpoint(run_dir / "last.pt", "ts")["model"]
    b = load_checkpoint(again / "last.pt", "ts")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_csv_is_a_user_error(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("t,v\n1,1\n2,x\n")
    assert (
        main(
            [
                "train",
                "--csv",
                str(csv),
                "--time-column",
                "t",
                "--value-column",
                "v",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "bad.csv:3" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
