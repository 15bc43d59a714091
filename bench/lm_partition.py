"""Sequential vs random partitioning on The Time Machine: validation perplexity at equal tokens seen.

Two runs of the default char GRU that differ only in --partition, each for the same number of
optimizer steps of the same batch shape (so the same number of training tokens), validated every
``--eval-every`` steps over the whole valid split with the state carried. Sequential batches carry the
state across batches (so the model learns to use context beyond T); random batches start every window
from a zero state.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.lm_common import write_result
from lm.config import TrainConfig
from lm.train import start_run


def run(partition: str, args: argparse.Namespace, root: Path) -> dict:
    config = TrainConfig.of(
        corpus="timemachine",
        partition=partition,
        max_steps=args.steps,
        epochs=1000,
        eval_every=args.eval_every,
        hidden=args.hidden,
        threads=args.threads,
        lr_schedule="constant",
        patience=0,
        checkpoint_every=0,
        progress=False,
    )
    start = time.perf_counter()
    result = start_run(config, root / partition).fit()
    valid = [r for r in result.history if r["split"] == "valid"]
    return {
        "steps": result.step,
        "tokens_seen": result.step * config.data.batch_size * config.data.bptt,
        "wall_s": round(time.perf_counter() - start, 1),
        "valid_ppl_by_step": {r["step"]: round(r["ppl"], 3) for r in valid},
        "final_valid_ppl": round(valid[-1]["ppl"], 3),
        "best_valid_ppl": round(result.best_valid_ppl, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=75)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: run(p, args, Path(tmp)) for p in ("sequential", "random")}
    write_result(
        "lm_partition",
        {
            "corpus": "timemachine",
            "model": f"gru x2 hidden {args.hidden}",
            "batch": [32, 64],
            "runs": runs,
            "ppl_ratio_random_to_sequential": round(
                runs["random"]["final_valid_ppl"] / runs["sequential"]["final_valid_ppl"], 3
            ),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
