"""Batch translation as a scheduler's job array: one shard per array task, then one merge.

    rnnlab-mt translate --bundle B --input F --output G --shard auto [--shard-count N]   # every task
    rnnlab-mt merge --output G [SHARD ...]                                              # once, after

``--shard auto`` takes the shard from the environment the scheduler sets:

- Slurm (``sbatch --array=0-7``): index ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` (divided by
  ``SLURM_ARRAY_TASK_STEP``), count ``SLURM_ARRAY_TASK_COUNT``; ``--array=1-8`` works the same.
- Kubernetes Indexed Job: index ``JOB_COMPLETION_INDEX`` (0-based), count ``--shard-count N`` (the Job's
  ``completions``; the environment does not carry it).

Every task runs the same command line, so the shard writes ``G.shard-IIIII-of-NNNNN`` instead of G. A
sharded job (``--shard auto`` or ``I/N``) keeps its sidecar when it completes, marked ``"complete": true``
with the shard, the line count and a hash of the job without the shard: that record is what ``merge``
checks. ``merge`` refuses (one line naming every missing, unfinished, changed or foreign shard) unless
shards 0..N-1 of one job are all complete and unchanged since; then it writes their concatenation in shard
order to G, atomically. A task killed and restarted (a requeue, a pod retry) resumes its shard from the
sidecar; a task rerun after it completed finds the record and has nothing left to do.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serving.errors import UserError
from serving.files import atomic_target

AUTO = "auto"
PROGRESS_SUFFIX = ".progress"
_SHARD_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)$")


class ShardError(UserError):
    """A job-array shard that cannot be resolved, or shards that cannot be merged (one-line message)."""


def shard_path(output: str | Path, shard: tuple[int, int]) -> Path:
    """G -> G.shard-00003-of-00008: the output of shard 3 of 8 of a job writing G."""
    index, count = shard
    return Path(f"{output}.shard-{index:05d}-of-{count:05d}")


def progress_path(output: Path) -> Path:
    """The resume sidecar of an output file (``G.progress``)."""
    return output.with_name(output.name + PROGRESS_SUFFIX)


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ShardError(f"--shard auto: {name}={environ[name]!r} is not an integer") from None


def shard_from_env(environ: Mapping[str, str], count: int | None = None) -> tuple[int, int]:
    """-> (index, count) of this array task from Slurm's or Kubernetes' variables (see the module doc).

    ``count`` is ``--shard-count``: required with JOB_COMPLETION_INDEX, checked against Slurm's count.
    """
    if "SLURM_ARRAY_TASK_ID" in environ:
        if "SLURM_ARRAY_TASK_COUNT" not in environ:
            raise ShardError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")
        task, total = _int(environ, "SLURM_ARRAY_TASK_ID"), _int(environ, "SLURM_ARRAY_TASK_COUNT")
        first = _int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
        step = _int(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
        index, off_step = divmod(task - first, max(step, 1))
        if off_step or not 0 <= index < total:
            raise ShardError(
                f"--shard auto: array task {task} is not one of {total} tasks "
                f"{first}, {first + step}, ... (use --array=0-{total - 1})"
            )
        if count is not None and count != total:
            raise ShardError(f"--shard-count {count} disagrees with SLURM_ARRAY_TASK_COUNT={total}")
        return index, total
    if "JOB_COMPLETION_INDEX" in environ:
        if count is None:
            raise ShardError(
                "--shard auto with JOB_COMPLETION_INDEX needs --shard-count N (the Indexed Job's completions)"
            )
        index = _int(environ, "JOB_COMPLETION_INDEX")
        if not 0 <= index < count:
            raise ShardError(f"--shard auto: JOB_COMPLETION_INDEX={index} is not below --shard-count {count}")
        return index, count
    raise ShardError(
        "--shard auto: no array task in the environment; run it as a Slurm array task "
        "(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) or a Kubernetes Indexed Job "
        "(JOB_COMPLETION_INDEX, with --shard-count N), or give --shard I/N"
    )


# --- merge -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardRecord:
    """What a shard's sidecar says about it (``path`` is the shard's output file)."""

    path: Path
    shard: tuple[int, int]
    job_hash: str
    complete: bool
    lines_done: int
    lines_total: int | None
    output_bytes: int

    @property
    def name(self) -> str:
        return f"shard {self.shard[0]}/{self.shard[1]} ({self.path})"


def read_record(path: Path) -> ShardRecord | str:
    """The shard record beside ``path``, or why there is none usable (a phrase for the error line)."""
    sidecar = progress_path(path)
    if not path.exists():
        return f"{path} missing"
    if not sidecar.exists():
        return f"{path} has no {PROGRESS_SUFFIX} record (not from a sharded job, or the record was deleted)"
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        shard = (int(data["shard"][0]), int(data["shard"][1]))
        return ShardRecord(
            path,
            shard,
            str(data["job_hash"]),
            bool(data.get("complete")),
            int(data["lines_done"]),
            data.get("lines_total"),
            int(data["output_bytes"]),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{sidecar} unreadable ({type(exc).__name__}: {exc})"


def _problem(record: ShardRecord, reference: ShardRecord) -> str | None:
    if record.job_hash != reference.job_hash or record.shard[1] != reference.shard[1]:
        return f"{record.name} is from another job than {reference.name} (other input, model or options)"
    if not record.complete:
        total = f" of {record.lines_total}" if record.lines_total is not None else ""
        return f"{record.name} unfinished ({record.lines_done}{total} lines done; rerun its task to resume)"
    size = record.path.stat().st_size
    if size != record.output_bytes:
        return f"{record.name} changed since it finished ({size} bytes, recorded {record.output_bytes})"
    return None


def find_shards(output: Path) -> list[Path]:
    """The files G.shard-I-of-N beside G, for every I present (N from the names)."""
    found = sorted(p for p in output.parent.glob(f"{output.name}.shard-*-of-*") if _SHARD_NAME.search(p.name))
    counts = {int(_SHARD_NAME.search(p.name).group(2)) for p in found}
    if not found:
        raise ShardError(f"no shards {output}.shard-*-of-* to merge")
    if len(counts) > 1:
        raise ShardError(f"shards of several counts {sorted(counts)} beside {output}; remove the stale ones")
    count = counts.pop()
    return [shard_path(output, (index, count)) for index in range(count)]


def check_shards(paths: list[Path]) -> list[ShardRecord]:
    """-> the records of shards 0..N-1 of one job, in shard order; ShardError naming every problem."""
    problems, records = [], []
    for path in paths:
        record = read_record(path)
        (records if isinstance(record, ShardRecord) else problems).append(record)
    if records:
        reference = min(records, key=lambda r: r.shard[0])
        count = reference.shard[1]
        have = {r.shard[0] for r in records}
        problems += [f"shard {i}/{count} not among the files" for i in range(count) if i not in have]
        problems += [p for r in records if (p := _problem(r, reference))]
        seen: dict[int, ShardRecord] = {}
        for record in records:
            if record.shard[0] in seen:
                problems.append(f"{record.name} given twice (also {seen[record.shard[0]].path})")
            seen[record.shard[0]] = record
    if problems:
        raise ShardError(f"cannot merge: {'; '.join(problems)}")
    return sorted(records, key=lambda r: r.shard[0])


def merge_shards(output: Path, parts: list[Path] | None = None) -> list[ShardRecord]:
    """Checks the shards (default: G.shard-*-of-* beside G) and writes their concatenation to G atomically."""
    records = check_shards(parts if parts else find_shards(output))
    with atomic_target(output) as target:
        for record in records:
            with open(record.path, "rb") as source:
                shutil.copyfileobj(source, target, 1 << 20)
    return records


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="merged output file G (written atomically)")
    parser.add_argument(
        "shards",
        nargs="*",
        type=Path,
        help="shard outputs (any order; default: G.shard-*-of-* beside --output)",
    )


def merge_from_args(args: argparse.Namespace) -> int:
    records = merge_shards(Path(args.output), args.shards)
    lines = sum(r.lines_done for r in records)
    print(f"merged {len(records)} shards, {lines} lines, into {args.output}", file=sys.stderr)
    return 0
