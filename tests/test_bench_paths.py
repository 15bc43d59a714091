"""Benchmark results record paths relative to the repository, never a machine's absolute paths."""

import json
from pathlib import Path

from bench import ROOT, repo_path


def test_paths_are_recorded_relative_to_the_repository(tmp_path):
    assert repo_path(ROOT / "runs" / "mt-fra-eng") == "runs/mt-fra-eng"
    assert repo_path(Path("bundles/lm")) == "bundles/lm" or not Path.cwd().samefile(ROOT)
    assert repo_path(tmp_path / "run" / "hyp.txt") == "(outside the repository)/run/hyp.txt"


def test_committed_results_hold_no_absolute_paths():
    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        absolute = [s for s in strings(json.loads(path.read_text())) if s.startswith(("/", "~"))]
        assert not absolute, f"{path.name}: {absolute}"
