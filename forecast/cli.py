"""``rnnlab-ts``: numeric-series forecasting (data list|fetch, train, eval, forecast).

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
    from forecast.train import TrainConfig, resume_run, start_run, summary
    from lm.loop import train_command

    return train_command(args, TrainConfig, start_run, resume_run, summary, "rnnlab-ts")


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
    from forecast.data import read_csv
    from forecast.evaluate import forecast_next, load_run

    run = load_run(args.run, args.which)
    series = None
    if args.csv:
        data = run.config.data
        columns = run.prepared.series.columns
        series = read_csv(args.csv, args.time_column or data.series_time_column(), columns)
        if len(series.values) < run.model.config.window:
            raise ForecastInputError(
                f"{args.csv}: {len(series.values)} rows; the model reads {run.model.config.window}"
            )
    print(
        json.dumps(
            {
                "horizon": args.horizon,
                "columns": run.prepared.series.columns,
                "forecast": forecast_next(run, args.horizon, series),
            }
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from forecast.train import TrainConfig
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
        ("forecast", cmd_forecast, "the next values with 90%% intervals"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("run", help="run directory")
        add_checkpoint_option(p)
        p.set_defaults(func=func)
    sub.choices["eval"].add_argument("--json", action="store_true", help="one JSON object on stdout")
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
