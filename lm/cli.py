"""rnnlab-lm: train, eval, generate, export, data.

Errors are one line on stderr (``error: ...``): exit 2 for usage errors, 1 for others, 130 when a
training run was interrupted (its last.pt is kept: continue it with --resume). Set RNNLAB_DEBUG=1 to
see the traceback of an unexpected error instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from lm.config import LR_SCHEDULES, OPTIMIZERS, PARTITIONS, TOKENIZERS, ConfigError, build_config, read_toml
from lm.model import CELLS, IMPLS
from serving.errors import ExitCode, UsageError, run_command


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a language model into a run directory",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="run directory to create (or continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--config", help="TOML file of settings (flags override it)")
    data = p.add_argument_group("data")
    data.add_argument("--corpus", help="registered corpus name (see `rnnlab-lm data list`) or a UTF-8 file")
    data.add_argument("--tokenizer", choices=TOKENIZERS)
    data.add_argument("--lowercase", action=argparse.BooleanOptionalAction)
    data.add_argument("--min-freq", type=int, help="char/word: rarer tokens become <unk>")
    data.add_argument("--vocab-size", type=int, help="spm: number of pieces")
    model = p.add_argument_group("model")
    model.add_argument("--cell", choices=CELLS)
    model.add_argument("--impl", choices=IMPLS, help="fused torch modules or the from-scratch cells")
    model.add_argument("--layers", type=int)
    model.add_argument("--embed", type=int)
    model.add_argument("--hidden", type=int)
    model.add_argument("--dropout", type=float)
    model.add_argument("--tie", action=argparse.BooleanOptionalAction, help="tie output to embedding weights")
    model.add_argument("--forget-bias", type=float, help="LSTM forget-gate bias at init (0 = off)")
    model.add_argument("--orthogonal", action=argparse.BooleanOptionalAction,
                       help="orthogonal recurrent weights at init (--no-orthogonal: torch's uniform init)")
    model.add_argument("--state-size", type=int, help="mamba: SSM state size N per head")
    model.add_argument("--expand", type=int, help="mamba, mingru: inner width = expand x hidden")
    model.add_argument("--conv-kernel", type=int, help="mamba: causal depthwise convolution width (>= 2)")
    model.add_argument("--heads", type=int,
                       help="mamba: heads, each with its own decay (divides expand x hidden)")
    batches = p.add_argument_group("batches")
    batches.add_argument("--partition", choices=PARTITIONS)
    batches.add_argument("--bptt", type=int, help="truncated BPTT length T")
    batches.add_argument("--batch-size", type=int)
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=OPTIMIZERS)
    optim.add_argument("--lr", type=float)
    optim.add_argument("--weight-decay", type=float)
    optim.add_argument("--momentum", type=float, help="sgd only")
    optim.add_argument("--clip", type=float, help="max global gradient norm (0 = off)")
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES)
    optim.add_argument("--warmup-steps", type=int)
    optim.add_argument("--schedule-steps", type=int, help="cosine: length in steps (0 = all epochs)")
    run = p.add_argument_group("run control")
    run.add_argument("--epochs", type=int)
    run.add_argument("--max-minutes", type=float, help="time budget (0 = none); the run stays resumable")
    run.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all (0 = none)")
    run.add_argument("--patience", type=int, help="early stopping after N validations without gain (0 = off)")
    run.add_argument("--min-delta", type=float)
    run.add_argument("--eval-every", type=int, help="validate every N steps too (0 = each epoch only)")
    run.add_argument("--valid-streams", type=int,
                     help="validate on N pieces of the valid text side by side (faster; 1 = exact)")
    run.add_argument("--checkpoint-every", type=int, help="save last.pt every N steps (0 = epoch ends only)")
    run.add_argument("--log-every", type=int, help="log train loss every N steps")
    run.add_argument("--seed", type=int)
    run.add_argument("--threads", type=int, help="torch threads (default 1; 0 = torch's default)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar on stderr")


def build_parser() -> Parser:
    parser = Parser(prog="rnnlab-lm", description="Recurrent language models: train, evaluate, generate.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _train_parser(sub)

    p = sub.add_parser("eval", help="perplexity and bits/char of a run on a split")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("generate", help="continue a prompt with a run or an exported bundle")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory, or bundle directory (manifest.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")

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
TRAIN_ONLY = ("out", "resume", "config", "command")


def cmd_train(args: argparse.Namespace) -> int:
    from lm.train import remove_run_files, resume_run, start_run

    flags = {k: v for k, v in vars(args).items() if k not in TRAIN_ONLY}
    config_file = getattr(args, "config", None)
    if getattr(args, "resume", False):
        overrides = {**(read_toml(config_file) if config_file else {}), **flags}
        overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
        trainer = resume_run(args.out, overrides)
        print(f"resuming {args.out} at epoch {trainer.position.epoch + 1}, step {trainer.position.step}",
              file=sys.stderr)
    else:
        trainer = start_run(build_config(flags, config_file), args.out)
        c = trainer.config
        print(f"training {c.cell} x{c.layers} ({trainer.model.num_parameters():,} parameters, "
              f"vocab {trainer.model_config.vocab_size}) on {c.corpus} -> {args.out}", file=sys.stderr)
    try:
        result = trainer.fit()
    except BaseException:
        if trainer.saved_step is None:  # nothing resumable yet: leave nothing behind
            remove_run_files(trainer.out, trainer.created_dir)
        raise
    print(f"{result.reason}: epoch {result.epoch}, step {result.step}, {result.elapsed_s / 60:.1f} min; "
          f"best valid loss {result.best_valid_loss:.4f} ppl {result.best_valid_ppl:.3f}", file=sys.stderr)
    if result.reason == "interrupted":
        print(f"interrupted; continue with: rnnlab-lm train --out {args.out} --resume", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lm.corpus import load_split
    from lm.evaluate import evaluate_text
    from lm.run import load_run
    from serving.files import atomic_write_json

    run = load_run(args.run_dir, args.checkpoint)
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
        print(f"{args.split}: perplexity {result['perplexity']:.4f}, {result['bits_per_char']:.4f} bits/char "
              f"over {result['tokens']} tokens")
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

        run = load_run(path, args.checkpoint)
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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "export": cmd_export,
            "data": cmd_data}


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
