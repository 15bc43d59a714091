"""The torch-free runtime and the bundle paths of the CLIs: they import, start and answer with the
training stack blocked (tests/torch_free.py), as on the serving install of ``make test-serve``.

import-linter (``make lint``) checks the import graph statically; these tests check it at run time, where a
lazy import inside a function or a plugin that pulls torch in would show up too.
"""

import json

import numpy as np

from serving.forecast_runtime import ForecastRuntime
from serving.runtime import LMRuntime
from serving.sampling import DEFAULT_SAMPLING, SamplingParams
from serving.search import SearchParams
from serving.translator import Seq2SeqRuntime
from tests.committed_bundles import FORECASTER, TRANSLATOR, committed
from tests.torch_free import TRAINING_ONLY, run_blocked, run_cli_blocked

SERVING_IMPORTS = """
import pkgutil
import serving

names = [m.name for m in pkgutil.walk_packages(serving.__path__, "serving.")]
for name in names:
    __import__(name)
print(len(names))
from serving.server import main

sys.argv = ["rnnlab-serve", "--help"]
main()
"""


def test_every_serving_module_imports_and_the_server_starts_with_torch_blocked():
    out = run_blocked(SERVING_IMPORTS, (*TRAINING_ONLY, "lm", "seq2seq", "forecast"))
    assert out.returncode == 0, out.stderr
    count, _, usage = out.stdout.partition("\n")
    assert int(count) >= 25  # every module of the package, not an empty walk
    assert "usage: rnnlab-serve" in usage and "--models" in usage


def _forecast(argv: list[str]) -> dict:
    out = run_cli_blocked("forecast.cli", ["forecast", str(committed(FORECASTER)), *argv])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_rnnlab_ts_forecasts_a_bundle_with_torch_blocked(tmp_path):
    """``rnnlab-ts forecast BUNDLE`` (the bundle's own history, then a CSV) prints what the runtime that
    rnnlab-serve runs forecasts; tests/forecast/test_serve.py compares it with the run's torch model."""
    runtime = ForecastRuntime.load(committed(FORECASTER))
    own = _forecast(["--horizon", "5"])
    assert own == {"horizon": 5, "columns": ["x"], "forecast": runtime.forecast_history(None, 5).rows()}
    history = np.sin(np.arange(9.0))[:, None]
    csv = tmp_path / "history.csv"
    csv.write_text("time,x\n" + "".join(f"{i},{float(v[0])!r}\n" for i, v in enumerate(history)))
    got = _forecast(["--horizon", "5", "--csv", str(csv)])["forecast"]
    assert got == runtime.forecast_history(history, 5).rows() and got != own["forecast"]


def test_rnnlab_ts_help_and_data_list_with_torch_blocked():
    for argv, expected in (
        (["--help"], "usage: rnnlab-ts"),
        (["forecast", "--help"], "--horizon"),
        (["train", "--help"], "--max-minutes"),
        (["data", "list"], "sunspots"),
    ):
        out = run_cli_blocked("forecast.cli", argv)
        assert out.returncode == 0 and expected in out.stdout, (argv, out.stderr)


def test_a_run_directory_without_torch_is_a_user_error_naming_the_training_install(tmp_path):
    """Forecasting, evaluating or exporting a run directory needs torch: one error line, exit 2."""
    run = str(tmp_path)
    for argv in (["forecast", run], ["eval", run], ["export", run, "--out", str(tmp_path / "b")]):
        out = run_cli_blocked("forecast.cli", argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert out.stderr.startswith("error: torch is not installed") and "rnnlab[train]" in out.stderr
        assert out.stderr.count("\n") == 1


def test_rnnlab_lm_generates_from_a_bundle_and_lists_data_with_torch_blocked():
    bundle = committed("tiny")
    argv = ["generate", str(bundle), "--prompt", "The ", "--max-tokens", "40", "--seed", "7"]
    out = run_cli_blocked("lm.cli", argv)
    assert out.returncode == 0, out.stderr
    params = SamplingParams(DEFAULT_SAMPLING.temperature, DEFAULT_SAMPLING.top_k, DEFAULT_SAMPLING.top_p, 7)
    text = "".join(LMRuntime.load(bundle).generate("The ", 40, params))
    assert out.stdout == text + "\n" and len(text) >= 40 and "bundle (onnxruntime)" in out.stderr
    for argv, expected in (
        (["--help"], "usage: rnnlab-lm"),
        (["train", "--help"], "--nproc"),
        (["data", "list"], "timemachine"),
    ):
        out = run_cli_blocked("lm.cli", argv)
        assert out.returncode == 0 and expected in out.stdout, (argv, out.stderr)


def test_rnnlab_mt_translates_with_a_bundle_with_torch_blocked(tmp_path):
    lines = ["Hello.", "Where is the station?", "I like cats."]
    (tmp_path / "in.txt").write_text("".join(f"{line}\n" for line in lines))
    bundle, output = committed(TRANSLATOR), tmp_path / "out.txt"
    argv = [
        "translate",
        "--bundle",
        str(bundle),
        "--input",
        str(tmp_path / "in.txt"),
        "--output",
        str(output),
    ]
    out = run_cli_blocked("seq2seq.cli", [*argv, "--beam", "2"])
    assert out.returncode == 0, out.stderr
    want = [t.text for t in Seq2SeqRuntime.load(bundle).translate(lines, SearchParams(beam=2))]
    assert output.read_text().splitlines() == want and all(want)
    for argv, expected in ((["--help"], "usage: rnnlab-mt"), (["train", "--help"], "--joint-spm")):
        out = run_cli_blocked("seq2seq.cli", argv)
        assert out.returncode == 0 and expected in out.stdout, (argv, out.stderr)
