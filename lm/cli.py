"""rnnlab-lm: train, eval, generate, export, data.

Errors are one line on stderr (``error: ...``); exit codes follow serving.errors.ExitCode: 0 ok, 2 usage
or user error, 3 a training run interrupted by Ctrl-C/SIGTERM (its last.pt is kept: continue it with
--resume), 70 an internal error (RNNLAB_DEBUG=1 shows its traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from lm.config import (
    ConfigError,
    TrainConfig,
    add_checkpoint_option,
    add_config_arguments,
    add_distributed_arguments,
    build_config,
    given_settings,
)
from serving.errors import UsageError, run_command
from serving.sampling import DEFAULT_SAMPLING


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a language model into a run directory", argument_default=argparse.SUPPRESS
    )
    p.add_argument("--out", required=True, help="run directory to create (or continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument(
        "--config",
        help="TOML file of settings: [data] [model] [optim] [run] tables or flat keys (flags override it)",
    )
    add_config_arguments(p, TrainConfig)
    add_distributed_arguments(p)


def build_parser() -> Parser:
    parser = Parser(prog="rnnlab-lm", description="Recurrent language models: train, evaluate, generate.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _train_parser(sub)

    p = sub.add_parser("eval", help="perplexity and bits/char of a run on a split")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    add_checkpoint_option(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("generate", help="continue a prompt with a run or an exported bundle")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory, or bundle directory (manifest.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_SAMPLING.temperature,
        help=f"0 = greedy (default {DEFAULT_SAMPLING.temperature})",
    )
    p.add_argument("--top-k", type=int, default=DEFAULT_SAMPLING.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=DEFAULT_SAMPLING.top_p, help="1 = off")
    p.add_argument("--seed", type=int, default=DEFAULT_SAMPLING.seed)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_checkpoint_option(p)

    p = sub.add_parser("export", help="export a run to an ONNX bundle")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR")
    p.add_argument("--quantize", choices=("int8",), default=None)

    p = sub.add_parser("data", help="the corpus registry")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    data_sub.add_parser("list", help="registered corpora and whether they are cached")
    fetch = data_sub.add_parser("fetch", help="download (or copy from the mirror) and verify a corpus")
    fetch.add_argument("name")
    return parser


# ----- commands ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from lm.distributed import train_command

    return train_command(args, "lm.cli", lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from lm.loop import TRAIN_ONLY, fit_command
    from lm.train import resume_run, start_run

    flags = {k: v for k, v in vars(args).items() if k not in TRAIN_ONLY}
    config_file = getattr(args, "config", None)
    if getattr(args, "resume", False):
        trainer = resume_run(args.out, given_settings(TrainConfig, flags, config_file))
        started = f"resuming {args.out} at epoch {trainer.position.epoch + 1}, step {trainer.position.step}"
    else:
        trainer = start_run(build_config(TrainConfig, flags, config_file), args.out)
        c = trainer.config
        started = (
            f"training {c.model.cell} x{c.model.layers} ({trainer.model.num_parameters():,} parameters, "
            f"vocab {trainer.family.model_config.vocab_size}) on {c.data.corpus} -> {args.out} "
            f"({torch_threads()} threads{_ranks(trainer)})"
        )
    if trainer.dist.writes:
        print(started, file=sys.stderr)
    result, code = fit_command(trainer, f"rnnlab-lm train --out {args.out} --resume")
    if trainer.dist.writes:
        print(
            f"{result.reason}: epoch {result.epoch}, step {result.step}, {result.elapsed_s / 60:.1f} min; "
            f"best valid loss {result.best_valid_loss:.4f} ppl {result.best_valid_ppl:.3f}",
            file=sys.stderr,
        )
    return code


def _ranks(trainer) -> str:
    return f" x {trainer.dist.world} processes" if trainer.dist.active else ""


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def cmd_eval(args: argparse.Namespace) -> int:
    from lm.corpus import load_split
    from lm.evaluate import evaluate_text
    from lm.run import load_run
    from serving.files import atomic_write_json

    run = load_run(args.run_dir, args.which)
    corpus = run.train_config.get("corpus")
    if not corpus:
        raise ConfigError(f"{run.checkpoint}: the run does not record its corpus")
    text = load_split(corpus, args.split)
    result = evaluate_text(run.model, run.tokenizer, text, args.split).to_dict()
    result = {**result, "corpus": corpus, "checkpoint": run.checkpoint.name}
    atomic_write_json(Path(args.run_dir) / "eval.json", result)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.split}: perplexity {result['perplexity']:.4f}, {result['bits_per_char']:.4f} bits/char "
            f"over {result['tokens']} tokens"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from serving.sampling import SamplingParams

    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0, not {args.max_tokens}")
    if not args.prompt:
        raise UsageError("--prompt: empty (no tokens to condition on)")
    path = Path(args.run_dir)
    start = time.perf_counter()
    from serving.bundle import is_bundle

    if is_bundle(path):
        from serving.runtime import LMRuntime

        pieces = LMRuntime.load(path).generate(args.prompt, args.max_tokens, params, args.stop)
        source = "bundle (onnxruntime)"
    else:
        from lm.generate import generate
        from lm.run import load_run

        run = load_run(path, args.which)
        pieces = generate(run.model, run.tokenizer, args.prompt, args.max_tokens, params, args.stop)
        source = f"{run.checkpoint} (torch)"
    chars = 0
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        chars += len(piece)
    sys.stdout.write("\n")
    print(f"[{chars} characters from {source} in {time.perf_counter() - start:.2f} s]", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lm.export import export_run

    bundle = export_run(args.run_dir, args.out, args.quantize)
    print(bundle)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from lm import datasets

    if args.data_command == "list":
        print(datasets.format_table(datasets.describe()))
    else:
        print(datasets.fetch(args.name))
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "export": cmd_export,
    "data": cmd_data,
}


def main(argv: Sequence[str] | None = None) -> int:
    def command() -> int:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)

    try:
        return run_command(command)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
