"""Benchmarks: each script writes its figures as JSON into bench/results/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str | Path) -> str:
    """``path`` as recorded in a result file: relative to the repository, so that results from different
    machines and checkouts compare; a path outside it keeps only its last two parts."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(ROOT):
        return resolved.relative_to(ROOT).as_posix()
    return "(outside the repository)/" + "/".join(resolved.parts[-2:])
