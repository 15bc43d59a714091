"""``rnnlab-mt``: train, evaluate and run the translator.

One ``add_<name>`` function builds each subcommand's parser and one ``cmd_<name>`` runs it; a new
subcommand is one more pair, registered in ``SUBCOMMANDS``. Errors are one line on stderr
("error: ..."); exit codes follow serving.errors.ExitCode: 0 ok, 1 some input lines not translated,
2 usage or user error, 3 training interrupted (resume with --resume), 70 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from typing import BinaryIO, TextIO

from serving.errors import ExitCode, UsageError, UserError, run_command


# --- train -------------------------------------------------------------------------------------------
def add_train(subparsers: argparse._SubParsersAction) -> None:
    from lm.config import add_config_arguments, add_distributed_arguments
    from seq2seq.config import TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train a translator (default: attention, en→fr, 55 min)",
        description="Train a GRU encoder-decoder on Tatoeba pairs.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--out", required=True, help="run directory to create (or resume with --resume)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out exactly where it stopped ([run] settings may change)",
    )
    parser.add_argument(
        "--config",
        help="TOML file of settings: [data] [model] [optim] [run] tables or flat keys (flags override it)",
    )
    add_config_arguments(parser, TrainConfig)
    add_distributed_arguments(parser)
    parser.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from lm import distributed
    from lm.loop import train_command
    from seq2seq.config import TrainConfig
    from seq2seq.train import resume_run, start_run

    def train() -> int:
        return train_command(args, TrainConfig, start_run, resume_run, "rnnlab-mt")

    return distributed.train_command(args, "seq2seq.cli", train)


# --- eval --------------------------------------------------------------------------------------------


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    from lm.config import add_checkpoint_option  # lazily, as every torch-side import here
    from serving.search import DEFAULT_SEARCH as S

    parser.add_argument("--beam", type=int, default=S.beam, help=f"beam size; 1 = greedy (default {S.beam})")
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=S.length_penalty,
        help=f"GNMT alpha (default {S.length_penalty})",
    )
    parser.add_argument(
        "--max-length-ratio",
        "--max-len-ratio",
        dest="max_len_ratio",
        type=float,
        default=S.max_len_ratio,
        help=f"at most ratio * source tokens + {S.max_len_extra} output tokens, capped at "
        f"{S.max_len_cap} (default {S.max_len_ratio})",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    add_checkpoint_option(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads: torch's (default: torch's choice), onnxruntime's per worker "
        "with --bundle (default 1)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="batches translated at once, in threads (default 1; on a multi-core CPU "
        "N workers of 1 thread each beat 1 worker of N threads; same output)",
    )


def _set_threads(threads: int, workers: int = 1) -> None:
    """torch's intra-op threads: ``threads``, or by default its own choice shared among the workers."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


def _search_params(args: argparse.Namespace, n_best: int = 1):
    from serving.search import SearchParams

    if args.batch_size < 1 or args.workers < 1:
        raise UsageError("--batch-size and --workers must be at least 1")
    try:
        return SearchParams(
            beam=args.beam,
            length_penalty=args.length_penalty,
            max_len_ratio=args.max_len_ratio,
            n_best=n_best,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="BLEU and chrF (sacrebleu) on a split",
        description="Translate a split's source sentences and score them against "
        "every reference with sacrebleu.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--hyp-out", help="hypotheses file (default RUN_DIR/hyp.SPLIT.beamK.txt)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N source sentences")
    _add_search_options(parser)
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from seq2seq.evaluate import default_hyp_path, evaluate, write_evaluation
    from seq2seq.run import load_run

    params = _search_params(args)
    _set_threads(args.threads, args.workers)
    run = load_run(args.run_dir, args.which)
    hyp_out = args.hyp_out or default_hyp_path(args.run_dir, args.split, params.beam)
    result = evaluate(run, args.split, params, hyp_out, args.batch_size, args.limit, args.workers)
    write_evaluation(args.run_dir, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['split']} {result['direction']} beam {result['beam']}: BLEU {result['bleu']:.2f} "
            f"chrF {result['chrf']:.2f} ({result['sentences']} sentences)\n{result['bleu_signature']}"
        )
    return 0


# --- translate ---------------------------------------------------------------------------------------
def add_translate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "translate",
        help="translate lines (stdin -> stdout)",
        description="Translate one sentence per line. Every input line gives one "
        "output line; a line that cannot be translated gives an empty "
        "line and a message on stderr.",
    )
    parser.add_argument("run_dir", nargs="?", help="training run (torch); or use --bundle / --server")
    parser.add_argument("--input", help="input file (default stdin)")
    parser.add_argument("--output", help="output file (default stdout)")
    parser.add_argument(
        "--n-best",
        type=int,
        default=1,
        help="with > 1: n hypotheses per line, 'text<TAB>score' joined by ' ||| '",
    )
    parser.add_argument(
        "--max-src-tokens",
        type=int,
        default=0,
        help="longer lines are refused (default: twice the training length cap)",
    )
    _add_search_options(parser)
    from serving.batch_job import add_arguments as add_batch_job_arguments  # torch-free

    add_batch_job_arguments(parser)  # --bundle/--server: serving/batch_job.py (helper mt-serve)
    parser.set_defaults(func=cmd_translate)


def read_lines(stream: BinaryIO, chunk: int) -> Iterator[list[bytes]]:
    """Lines (without their line break) in chunks of up to ``chunk``; a last line without a break counts."""
    lines = []
    for raw in stream:
        lines.append(raw.rstrip(b"\n").rstrip(b"\r"))
        if len(lines) >= chunk:
            yield lines
            lines = []
    if lines:
        yield lines


def decode_line(raw: bytes) -> str:
    """UTF-8 bytes -> text; raises ValueError naming the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def cmd_translate(args: argparse.Namespace) -> int:
    if args.bundle or args.server:
        return _batch_job(args)  # torch-free: a job-array task starts without importing torch
    from seq2seq.run import load_run

    if not args.run_dir:
        raise UserError("give RUN_DIR, --bundle B or --server HOST:PORT")
    params = _search_params(args, n_best=args.n_best)
    _set_threads(args.threads, args.workers)
    translator = load_run(args.run_dir, args.which).translator(args.max_src_tokens or None)
    source = open(args.input, "rb") if args.input else sys.stdin.buffer  # noqa: SIM115
    target: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    # A terminal gets each line answered at once; files and pipes are decoded in batches, one per worker.
    chunk = 1 if source.isatty() else args.batch_size * args.workers
    number, failed = 0, 0
    try:
        for raw_lines in read_lines(source, chunk):
            texts, errors = [], {}
            for k, raw in enumerate(raw_lines):
                try:
                    texts.append(decode_line(raw))
                except ValueError as exc:
                    texts.append("")
                    errors[k] = str(exc)
            for k, result in enumerate(
                translator.translate(texts, params, args.batch_size, workers=args.workers)
            ):
                number += 1
                error = errors.get(k, result.error)
                if error:
                    failed += 1
                    print(f"line {number}: {error}; output left empty", file=sys.stderr)
                elif result.warning:
                    print(f"line {number}: {result.warning}", file=sys.stderr)
                text = (
                    ""
                    if error
                    else (
                        result.text
                        if params.n_best == 1
                        else " ||| ".join(f"{t}\t{s:.4f}" for t, s in result.n_best)
                    )
                )
                target.write(text + "\n")
            target.flush()
    finally:
        if args.input:
            source.close()
        if args.output:
            target.close()
    if failed:
        print(f"{failed} of {number} lines not translated", file=sys.stderr)
        return ExitCode.SOME_FAILED
    return ExitCode.OK


# --- export and batch jobs (seq2seq/export.py, serving/batch_job.py: helper mt-serve) -----------------
def _batch_job(args: argparse.Namespace) -> int:
    from serving.batch_job import run_from_args

    if args.run_dir:
        raise UserError("give either RUN_DIR or --bundle/--server, not both")
    return run_from_args(args)


def add_merge(subparsers: argparse._SubParsersAction) -> None:
    from serving.job_array import add_merge_arguments  # torch-free

    parser = subparsers.add_parser(
        "merge",
        help="concatenate the shards of a --shard job, once all finished",
        description="Check that every shard of a sharded batch job finished (its "
        ".progress record) and write their concatenation in shard "
        "order to --output (serving/job_array.py).",
    )
    add_merge_arguments(parser)
    parser.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from serving.job_array import merge_from_args

    return merge_from_args(args)


def add_export(subparsers: argparse._SubParsersAction) -> None:
    from lm.config import add_checkpoint_option

    parser = subparsers.add_parser(
        "export",
        help="export a run to an ONNX bundle (encoder + decoder step)",
        description="Export a trained translator to encoder.onnx + "
        "decoder_step.onnx with its tokenizers and manifest, after "
        "checking onnxruntime against torch (logits, greedy, beam).",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
    add_checkpoint_option(parser)
    parser.add_argument("--name", help="model name in the manifest (default: the --out directory's name)")
    parser.add_argument(
        "--sentences",
        help="file of source sentences for the search check (default: the first valid-split sentences)",
    )
    parser.add_argument("--sample", type=int, default=64, help="valid sentences for the search check")
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from seq2seq.export import describe, export_run

    sentences = None
    if args.sentences:
        with open(args.sentences, encoding="utf-8") as f:
            sentences = [line.rstrip("\n") for line in f if line.strip()]
    out = export_run(
        args.run_dir, args.out, sentences=sentences, sample=args.sample, which=args.which, name=args.name
    )
    print(describe(out))
    return 0


# --- main --------------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_train,
    add_eval,
    add_translate,
    add_merge,
    add_export,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnlab-mt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
