"""``rnnlab-ts``: numeric-series forecasting (data list|fetch, train, eval, forecast, export).

Errors are one line on stderr ("error: ..."); exit codes follow serving.errors.ExitCode: 0 ok, 2 usage or
user error, 3 training interrupted (resume with --resume), 70 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys

from serving.errors import UserError, run_command


class ForecastInputError(UserError):
    """A forecast request cannot be answered (history too short, wrong columns)."""


def cmd_data(args: argparse.Namespace) -> int:
    from lm.datasets import describe, fetch, format_table

    if args.action == "fetch":
        print(fetch(args.name))
    else:
        print(format_table(describe()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from forecast.config import TrainConfig
    from forecast.train import resume_run, start_run
    from lm.loop import train_command

    return train_command(args, TrainConfig, start_run, resume_run, "rnnlab-ts")


def cmd_eval(args: argparse.Namespace) -> int:
    from forecast.evaluate import evaluate_run, load_run, plot_run

    result = evaluate_run(args.run, args.which)
    plot_run(load_run(args.run, args.which), args.run)
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k}={result[k]:.4g}" for k in ("mae", "rmse", "mase", "coverage")))
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    from serving.bundle import is_bundle

    forecast = _forecast_bundle(args) if is_bundle(args.run) else _forecast_run(args)
    print(json.dumps({"horizon": args.horizon, **forecast}))
    return 0


def _read_history(path: str, time_column: str, columns: list[str], window: int):
    from forecast.data import read_csv

    series = read_csv(path, time_column, columns)
    if len(series.values) < window:
        raise ForecastInputError(f"{path}: {len(series.values)} rows; the model reads {window}")
    return series


def _forecast_run(args: argparse.Namespace) -> dict:
    """The run's torch model (evaluate.forecast_next)."""
    from forecast.evaluate import forecast_next, load_run

    run = load_run(args.run, args.which)
    columns = run.prepared.series.columns
    series = None
    if args.csv:
        time_column = args.time_column or run.config.data.series_time_column()
        series = _read_history(args.csv, time_column, columns, run.model.config.window)
    return {"columns": columns, "forecast": forecast_next(run, args.horizon, series)}


def _forecast_bundle(args: argparse.Namespace) -> dict:
    """An exported bundle through the torch-free runtime (serving.forecast_runtime), as the server runs it."""
    from serving.forecast_runtime import ForecastRuntime

    runtime = ForecastRuntime.load(args.run)
    history = None
    if args.csv:
        time_column = args.time_column or runtime.time_column
        history = _read_history(args.csv, time_column, runtime.columns, runtime.window).values
    if args.horizon < 1:
        raise ForecastInputError(f"--horizon must be at least 1, not {args.horizon}")
    return {"columns": runtime.columns, "forecast": runtime.forecast_history(history, args.horizon).rows()}


def cmd_export(args: argparse.Namespace) -> int:
    from forecast.export import export_run

    out = export_run(args.run, args.out, args.which)
    print(f"exported {args.run} ({args.which}.pt) to {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from forecast.config import TrainConfig
    from lm.config import add_checkpoint_option, add_config_arguments

    parser = argparse.ArgumentParser(prog="rnnlab-ts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="list or fetch the registry's datasets")
    data.add_argument("action", choices=("list", "fetch"))
    data.add_argument("name", nargs="?", default="co2")
    data.set_defaults(func=cmd_data)
    train = sub.add_parser("train", help="train a forecaster", argument_default=argparse.SUPPRESS)
    train.add_argument("--out", required=True, help="run directory to create (or resume with --resume)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    train.add_argument("--config", help="TOML file of settings ([data] [model] [optim] [run])")
    add_config_arguments(train, TrainConfig)
    train.set_defaults(func=cmd_train)
    for name, func, text in (
        ("eval", cmd_eval, "rolling-origin scores on the test horizon"),
        ("forecast", cmd_forecast, "the next values with 90%% intervals (from a run or a bundle)"),
        ("export", cmd_export, "export a run's model as an ONNX bundle that rnnlab-serve serves"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("run", help="run directory (forecast: or a bundle directory)")
        add_checkpoint_option(p)
        p.set_defaults(func=func)
    sub.choices["eval"].add_argument("--json", action="store_true", help="one JSON object on stdout")
    sub.choices["export"].add_argument("--out", required=True, help="bundle directory to write")
    fc = sub.choices["forecast"]
    fc.add_argument("--horizon", type=int, default=8, help="values to forecast (default 8)")
    fc.add_argument("--csv", help="history CSV (the run's value columns); default: the run's own series")
    fc.add_argument("--time-column", help="time column of --csv (default: the run's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
