"""Batch translation jobs: a file of sentences through an exported bundle (or a translation server).

    rnnlab-mt translate --bundle B --input F --output G [--beam K] [--batch-tokens N] [--shard I/N]

Torch-free (onnxruntime through ``serving.translator``, or gRPC through ``serving.client``).

- Input is read as bytes and decoded line by line: a line that is empty, too long or not UTF-8 gets an
  empty translation and a message on stderr (JSONL: an "error" field); the output always has one line
  per input line, in input order.
- Formats: plain text (one sentence a line) or JSONL (``{"id"?, "text"}`` in,
  ``{"id", "source", "translation", "score", "error"?}`` out; "id" defaults to the input line number,
  1-based). ``--format auto`` picks JSONL for a .jsonl/.json input.
- Work goes in chunks of ``--chunk-lines`` input lines; inside a chunk sentences are sorted by length
  and cut into batches of at most ``--batch-tokens`` (sentences x longest source).
- Resume: after each chunk the output is appended, fsynced, and the sidecar ``G.progress`` records the
  hash of the arguments, the lines done and the byte length of G. A job killed and restarted with the
  same arguments checks the hash, truncates G to the recorded length and continues; the sidecar is
  removed when the job completes. Output to stdout cannot be resumed.
- ``--shard I/N`` (I in 0..N-1) translates the I-th of N contiguous, nearly equal line ranges
  (lines [floor(I*n/N), floor((I+1)*n/N)) of n): the N outputs concatenated in shard order are the
  output of the whole file. A sharded job keeps its sidecar when it completes, marked complete, for
  ``rnnlab-mt merge``. ``--shard auto`` takes I and N from a Slurm array or Kubernetes Indexed Job and
  writes ``G.shard-IIIII-of-NNNNN`` (``serving/job_array.py``).
- ``--references R`` (one reference a line, aligned with the lines translated) prints corpus BLEU and
  chrF (sacrebleu) on stderr at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from serving.bundle import BundleError
from serving.errors import UserError
from serving.files import atomic_write_json
from serving.job_array import AUTO, PROGRESS_SUFFIX, ShardError, shard_from_env, shard_path
from serving.search import BATCH_TOKENS, DEFAULT_SEARCH
from serving.translator import SearchParams, Seq2SeqRuntime, Translation

FORMATS = ("auto", "text", "jsonl")
REMOTE_BATCH, REMOTE_CONCURRENCY = 32, 4
PROGRESS_VERSION = 1


class JobError(UserError):
    """A user-facing failure of the job as a whole (one-line message)."""


@dataclass(frozen=True)
class JobConfig:
    input: str = "-"
    output: str = "-"
    bundle: str | None = None
    server: str | None = None
    model: str | None = None
    """Model name on the server (default: the only translator it serves)."""
    format: str = "auto"
    beam: int = DEFAULT_SEARCH.beam
    length_penalty: float = DEFAULT_SEARCH.length_penalty
    max_len_ratio: float = DEFAULT_SEARCH.max_len_ratio
    n_best: int = 1
    batch_tokens: int = BATCH_TOKENS
    chunk_lines: int = 1000
    shard: tuple[int, int] | None = None
    """(I, N): the I-th of N line ranges; None: the whole input (no shard record)."""
    references: str | None = None
    threads: int = 1
    """onnxruntime intra-op threads per worker."""
    workers: int = 1
    """Batches translated at once (threads over one bundle); the output does not depend on it."""
    progress: bool | None = None
    """None: a bar when stderr is a terminal."""

    def params(self) -> SearchParams:
        return SearchParams(beam=self.beam, length_penalty=self.length_penalty,
                            max_len_ratio=self.max_len_ratio, n_best=self.n_best)

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return "jsonl" if Path(self.input).suffix.lower() in (".jsonl", ".json") else "text"


def parse_shard(text: str) -> tuple[int, int] | str:
    """"I/N" -> (I, N) with 0 <= I < N, or "auto" (argparse type: usage error otherwise)."""
    if text == AUTO:
        return AUTO
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N (e.g. 0/4) or be auto, not {text!r}"
                                         ) from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return index, count


def shard_range(total: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Line range [start, stop) of shard I of N over ``total`` lines (contiguous, sizes differ by <= 1)."""
    index, count = shard
    return total * index // count, total * (index + 1) // count


# --- translation backends ----------------------------------------------------------------------------
Backend = Callable[[list[str]], list[Translation]]


def local_backend(config: JobConfig) -> tuple[Backend, str]:
    """-> (translate texts, identity for the args hash) over a bundle in this process."""
    try:
        runtime = Seq2SeqRuntime.load(config.bundle, threads=config.threads)
    except BundleError as exc:
        raise JobError(str(exc)) from None
    params = config.params()

    def translate(texts: list[str]) -> list[Translation]:
        # length-sorted batches of at most batch_tokens (sentences x longest source)
        return runtime.translate(texts, params, batch_tokens=config.batch_tokens, workers=config.workers)

    return translate, f"bundle:{runtime.manifest.digest}"


def remote_backend(config: JobConfig) -> tuple[Backend, str]:
    """-> (translate texts, identity) over the Translate RPC of a running server."""
    import grpc

    from serving.client import Client

    client = Client(config.server)
    try:
        models = [m.name for m in client.translators()]
    except grpc.RpcError as exc:
        raise JobError(f"server {config.server}: {exc.code().name}: {exc.details()}") from None
    model = config.model or (models[0] if len(models) == 1 else None)
    if model not in models:
        raise JobError(f"server {config.server} serves translators {models}; pick one with --model"
                       if config.model is None else f"server {config.server} has no translator {model!r} "
                       f"(has {', '.join(models) or 'none'})")
    params = config.params()
    pool = ThreadPoolExecutor(REMOTE_CONCURRENCY)

    def call(texts: list[str]) -> list[Translation]:
        results = client.translate(model, texts, beam=params.beam, length_penalty=params.length_penalty,
                                   max_length_ratio=params.max_len_ratio, max_length=params.max_len_cap,
                                   n_best=params.n_best)
        return [Translation("", [], r.error) if r.failed else
                Translation(r.hypotheses[0].text, [(h.text, h.score) for h in r.hypotheses],
                            source_tokens=r.source_tokens) for r in results]

    def translate(texts: list[str]) -> list[Translation]:
        # Similar lengths together, several requests in flight: the server batches them across calls.
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        parts = [order[i:i + REMOTE_BATCH] for i in range(0, len(order), REMOTE_BATCH)]
        results: list[Translation | None] = [None] * len(texts)
        try:
            for part, translated in zip(parts, pool.map(call, [[texts[i] for i in p] for p in parts]),
                                        strict=True):
                for i, result in zip(part, translated, strict=True):
                    results[i] = result
        except grpc.RpcError as exc:
            raise JobError(f"server {config.server}: {exc.code().name}: {exc.details()}") from None
        return results  # type: ignore[return-value]

    return translate, f"server:{config.server}/{model}"


# --- input and output --------------------------------------------------------------------------------
def read_lines(stream: BinaryIO) -> Iterator[bytes]:
    """Lines without their line break; a last line without a break counts."""
    for raw in stream:
        yield raw.rstrip(b"\n").rstrip(b"\r")


def parse_line(raw: bytes, number: int, fmt: str) -> tuple[str, str, str | None]:
    """-> (id, text, error): bytes of one input line as the job sees it (error: why it cannot be used)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return str(number), "", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
    if fmt == "text":
        return str(number), text, None
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        return str(number), "", f"not JSON ({exc.msg})"
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        return str(number), "", 'expected a JSON object with a string "text"'
    return str(item.get("id", number)), item["text"], None


def format_line(fmt: str, item_id: str, source: str, result: Translation, error: str | None,
                n_best: int) -> str:
    if fmt == "jsonl":
        record: dict = {"id": item_id, "source": source, "translation": "" if error else result.text,
                        "score": None if error else round(result.n_best[0][1], 6)}
        if n_best > 1 and not error:
            record["n_best"] = [{"translation": t, "score": round(s, 6)} for t, s in result.n_best]
        if error:
            record["error"] = error
        return json.dumps(record, ensure_ascii=False) + "\n"
    if error:
        return "\n"
    if n_best == 1:
        return result.text + "\n"
    return " ||| ".join(f"{t}\t{s:.4f}" for t, s in result.n_best) + "\n"


# --- resumable output --------------------------------------------------------------------------------
def args_hash(config: JobConfig, backend_identity: str, whole_job: bool = False) -> str:
    """What the output depends on: the input file (path, size, mtime), model, search and layout options.

    ``whole_job``: leaves out the shard and the output path (the same for every shard of one job)."""
    left_out = ("progress", "threads", "workers", "references") + (("shard", "output") if whole_job else ())
    fields = {k: v for k, v in asdict(config).items() if k not in left_out}
    source = Path(config.input)
    stat = source.stat() if config.input != "-" else None
    fields["input_identity"] = [str(source.resolve()), stat.st_size, stat.st_mtime_ns] if stat else "-"
    fields["backend"] = backend_identity
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class ResumableOutput:
    """An output file appended chunk by chunk, with the sidecar that makes the job resumable.

    ``record``: extra sidecar fields (a shard's index, job hash and line count); with it the sidecar is
    kept on completion, marked ``"complete": true``, for ``rnnlab-mt merge``.
    """

    def __init__(self, path: Path, digest: str, record: dict | None = None) -> None:
        self.path = path
        self.sidecar = path.with_name(path.name + PROGRESS_SUFFIX)
        self.digest = digest
        self.record = record
        self.lines_done = 0
        if self.sidecar.exists() and not self._finished_by_another_job():
            self._resume()
        else:
            self._record(0)  # the sidecar first: a kill before the first chunk then resumes from zero
        with open(self.path, "ab") as handle:
            handle.truncate(self.bytes_done)
        self.handle = open(self.path, "ab")  # noqa: SIM115 (kept open across chunks)

    def _finished_by_another_job(self) -> bool:
        """A completion record of other arguments protects nothing: the output is replaced, as without one."""
        try:
            data = json.loads(self.sidecar.read_text(encoding="utf-8"))
            return bool(data.get("complete")) and data.get("args_hash") != self.digest
        except (OSError, ValueError, AttributeError):
            return False

    def _resume(self) -> None:
        try:
            data = json.loads(self.sidecar.read_text(encoding="utf-8"))
            digest, lines, size = data["args_hash"], int(data["lines_done"]), int(data["output_bytes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise JobError(f"{self.sidecar}: unreadable progress file ({exc}); delete it to start over"
                           ) from None
        if digest != self.digest:
            raise JobError(f"{self.sidecar}: left by a job with other arguments or another input/model; "
                           f"rerun that job, or delete {self.sidecar} (and {self.path}) to start over")
        current = self.path.stat().st_size if self.path.exists() else 0
        if current < size:
            raise JobError(f"{self.path}: shorter ({current} bytes) than its progress file says ({size}); "
                           f"delete {self.sidecar} to start over")
        self.lines_done, self.bytes_done = lines, size

    def _record(self, lines: int, complete: bool = False) -> None:
        self.lines_done = lines
        self.bytes_done = self.path.stat().st_size if lines else 0
        atomic_write_json(self.sidecar, {"version": PROGRESS_VERSION, "args_hash": self.digest,
                                          "lines_done": lines, "output_bytes": self.bytes_done,
                                          **(self.record or {}), "complete": complete})

    def append(self, text: str, lines: int) -> None:
        """Appends one chunk's output (``lines`` input lines), durably, then records the progress."""
        self.handle.write(text.encode("utf-8"))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self._record(self.lines_done + lines)

    def complete(self) -> None:
        self.handle.close()
        if self.record is None:
            self.sidecar.unlink()
        else:
            self._record(self.lines_done, complete=True)

    def close(self) -> None:
        self.handle.close()


class StdoutOutput:
    lines_done = 0

    def append(self, text: str, lines: int) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def complete(self) -> None:
        pass

    close = complete


# --- the job -----------------------------------------------------------------------------------------
@dataclass
class JobSummary:
    lines: int
    failed: int
    seconds: float
    resumed_from: int
    bleu: dict | None = None

    @property
    def sentences_per_s(self) -> float:
        return (self.lines - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0


def count_lines(path: str) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def run_job(config: JobConfig, backend: tuple[Backend, str] | None = None) -> JobSummary:
    """Runs (or resumes) the job; per-line problems go to stderr, job-level ones raise JobError."""
    if (config.bundle is None) == (config.server is None):
        raise JobError("give exactly one of --bundle B or --server HOST:PORT")
    if min(config.batch_tokens, config.chunk_lines, config.workers, config.threads) < 1:
        raise JobError("--batch-tokens, --chunk-lines, --workers and --threads must be at least 1")
    try:
        config.params()
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if config.input != "-" and not Path(config.input).is_file():
        raise JobError(f"{config.input}: no such input file")
    if config.shard is not None and config.input == "-":
        raise JobError("--shard needs an input file (the lines are counted first)")
    if config.references and config.output == "-":
        raise JobError("--references needs --output FILE (the output is read back to score it)")
    translate, identity = backend or (local_backend(config) if config.bundle else remote_backend(config))
    fmt = config.resolved_format()
    start, stop = 0, None
    if config.shard is not None:
        start, stop = shard_range(count_lines(config.input), config.shard)
    record = None if config.shard is None else {
        "shard": list(config.shard), "job_hash": args_hash(config, identity, whole_job=True),
        "lines_total": stop - start}
    output = (StdoutOutput() if config.output == "-"
              else ResumableOutput(Path(config.output), args_hash(config, identity), record))
    resumed = output.lines_done
    total = None if stop is None and config.input == "-" else (
        (stop if stop is not None else count_lines(config.input)) - start)
    source = sys.stdin.buffer if config.input == "-" else open(config.input, "rb")  # noqa: SIM115
    bar = tqdm(total=total, initial=resumed, unit="sent", desc="translate", file=sys.stderr,
               disable=None if config.progress is None else not config.progress, dynamic_ncols=True)
    began = time.perf_counter()
    failed = done = 0
    try:
        for chunk in _chunks(read_lines(source), start + resumed, stop, config.chunk_lines):
            failed += _run_chunk(chunk, translate, fmt, config.n_best, output)
            done += len(chunk)
            bar.set_postfix_str(f"{done / max(time.perf_counter() - began, 1e-9):.1f} sent/s", refresh=False)
            bar.update(len(chunk))
        output.complete()
    finally:
        bar.close()
        output.close()
        if source is not sys.stdin.buffer:
            source.close()
    summary = JobSummary(resumed + done, failed, time.perf_counter() - began, resumed)
    if config.references:
        summary.bleu = score_output(config, fmt)
    return summary


def _chunks(lines: Iterator[bytes], first: int, stop: int | None, size: int,
            ) -> Iterator[list[tuple[int, bytes]]]:
    """(line number, bytes) for input lines [first, stop), ``size`` at a time."""
    chunk = []
    for number, raw in enumerate(lines, 1):
        if number <= first:
            continue
        if stop is not None and number > stop:
            break
        chunk.append((number, raw))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _run_chunk(chunk: list[tuple[int, bytes]], translate: Backend, fmt: str, n_best: int,
               output: ResumableOutput | StdoutOutput) -> int:
    """Translates and writes one chunk in input order -> number of failed lines."""
    parsed = [parse_line(raw, number, fmt) for number, raw in chunk]
    results = translate([text if error is None else "" for _, text, error in parsed])
    lines, failed = [], 0
    for (number, _), (item_id, text, error), result in zip(chunk, parsed, results, strict=True):
        error = error or result.error
        if error:
            failed += 1
            print(f"line {number}: {error}; output left empty", file=sys.stderr)
        elif result.warning:
            print(f"line {number}: {result.warning}", file=sys.stderr)
        lines.append(format_line(fmt, item_id, text, result, error, n_best))
    output.append("".join(lines), len(chunk))
    return failed


def score_output(config: JobConfig, fmt: str) -> dict:
    """BLEU and chrF of the finished output file against --references (line-aligned)."""
    from serving.bleu import corpus_scores

    text = Path(config.output).read_text(encoding="utf-8").splitlines()
    hypotheses = [json.loads(line)["translation"] for line in text] if fmt == "jsonl" else text
    if config.n_best > 1 and fmt == "text":
        hypotheses = [h.split(" ||| ")[0].split("\t")[0] for h in hypotheses]
    references = Path(config.references).read_text(encoding="utf-8").splitlines()
    if len(references) != len(hypotheses):
        raise JobError(f"{config.references}: {len(references)} references for {len(hypotheses)} "
                       "translated lines")
    return corpus_scores(hypotheses, [[r] for r in references])


# --- command line (used by ``rnnlab-mt translate``) --------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch-job options of ``rnnlab-mt translate`` (beside its RUN_DIR form's options)."""
    group = parser.add_argument_group("batch job over an exported bundle or a server")
    group.add_argument("--bundle", help="exported bundle directory (torch-free, resumable job)")
    group.add_argument("--server", help="HOST:PORT of rnnlab-serve instead of a local bundle")
    group.add_argument("--model", help="translator name on --server (default: the only one)")
    group.add_argument("--format", choices=FORMATS, default="auto",
                       help="text or jsonl; auto: jsonl for a .jsonl/.json input (default auto)")
    group.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS,
                       help=f"batch budget: sentences x longest source in tokens (default {BATCH_TOKENS}; "
                            "on CPU larger batches are slower per sentence)")
    group.add_argument("--chunk-lines", type=int, default=1000,
                       help="input lines per checkpointed chunk (default 1000)")
    group.add_argument("--shard", type=parse_shard,
                       help="I/N: translate the I-th of N contiguous line ranges (0-based); auto: I and N "
                            "of this Slurm array task or Kubernetes Indexed Job, output G.shard-I-of-N "
                            "(then rnnlab-mt merge --output G)")
    group.add_argument("--shard-count", type=int,
                       help="N for --shard auto in a Kubernetes Indexed Job (its completions)")
    group.add_argument("--references", help="reference file: print BLEU and chrF at the end")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when stderr is a terminal)")


def resolve_shard(args: argparse.Namespace) -> tuple[tuple[int, int] | None, str]:
    """-> (shard, output path) with ``--shard auto`` resolved from the environment (serving/job_array.py)."""
    output = args.output or "-"
    if args.shard != AUTO:
        if args.shard_count is not None:
            raise ShardError("--shard-count goes with --shard auto")
        return args.shard, output
    if args.shard_count is not None and args.shard_count < 1:
        raise ShardError("--shard-count must be at least 1")
    if output == "-":
        raise ShardError("--shard auto needs --output G (each array task writes G.shard-I-of-N)")
    shard = shard_from_env(os.environ, args.shard_count)
    return shard, str(shard_path(output, shard))


def config_from_args(args: argparse.Namespace) -> JobConfig:
    shard, output = resolve_shard(args)
    return JobConfig(input=args.input or "-", output=output, bundle=args.bundle,
                     server=args.server, model=args.model, format=args.format, beam=args.beam,
                     length_penalty=args.length_penalty, max_len_ratio=args.max_len_ratio, n_best=args.n_best,
                     batch_tokens=args.batch_tokens, chunk_lines=args.chunk_lines, shard=shard,
                     references=args.references, threads=args.threads or 1, workers=args.workers,
                     progress=args.progress)


def run_from_args(args: argparse.Namespace) -> int:
    summary = run_job(config_from_args(args))
    note = f", resumed after line {summary.resumed_from}" if summary.resumed_from else ""
    print(f"translated {summary.lines} lines ({summary.failed} failed) in {summary.seconds:.1f} s, "
          f"{summary.sentences_per_s:.1f} sentences/s{note}", file=sys.stderr)
    if summary.bleu is not None:
        bleu = summary.bleu
        print(f"BLEU {bleu['bleu']:.2f} chrF {bleu['chrf']:.2f}\n{bleu['bleu_signature']}", file=sys.stderr)
    return 0
