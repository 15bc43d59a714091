"""`make train-lm` as a benchmark: the default char GRU on The Time Machine with --max-minutes 4.5.

Runs the real command line (``rnnlab-lm train --corpus timemachine --out RUN --max-minutes 4.5`` then
``rnnlab-lm eval RUN --split valid/test --json``) and records its wall time and perplexities.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.lm_common import write_result
from lm.cli import main as cli
from lm.metrics import read_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=4.5, help="the --max-minutes of the run")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directory here")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    run = args.keep or tmp / "run"
    try:
        start = time.perf_counter()
        if (
            cli(
                [
                    "train",
                    "--corpus",
                    "timemachine",
                    "--out",
                    str(run),
                    "--max-minutes",
                    str(args.minutes),
                    "--no-progress",
                ]
            )
            != 0
        ):
            return 1
        train_s = time.perf_counter() - start
        figures = {}
        for split in ("valid", "test"):
            if cli(["eval", str(run), "--split", split, "--json"]) != 0:
                return 1
            figures[split] = json.loads((run / "eval.json").read_text())
        wall_s = time.perf_counter() - start
        records = read_metrics(run / "metrics.jsonl")
        valid = [r for r in records if r["split"] == "valid"]
        train_rates = [r["tokens_per_s"] for r in records if r["split"] == "train"]
        write_result(
            "lm_default",
            {
                "command": f"rnnlab-lm train --corpus timemachine --out RUN --max-minutes {args.minutes}",
                "config": json.loads((run / "config.json").read_text()),
                "train_wall_s": round(train_s, 1),
                "train_and_eval_wall_s": round(wall_s, 1),
                "steps": valid[-1]["step"] if valid else 0,
                "epochs": valid[-1]["epoch"] if valid else 0,
                "median_train_tokens_per_s": round(statistics.median(train_rates)) if train_rates else 0,
                "valid_ppl_by_epoch": [round(r["ppl"], 3) for r in valid],
                "valid": {k: round(v, 4) for k, v in figures["valid"].items() if isinstance(v, float)},
                "test": {k: round(v, 4) for k, v in figures["test"].items() if isinstance(v, float)},
            },
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
