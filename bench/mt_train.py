"""The default translator, end to end: ``make train-mt`` (55 minutes) then test BLEU/chrF at beam 1, 4, 8.

``--compare`` instead trains the classic and the attention variant for the same time each (default
20 minutes) and scores both at beam 4. Writes bench/results/mt_train.json (or mt_compare.json).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from bench import repo_path
from seq2seq.evaluate import default_hyp_path, evaluate, write_evaluation
from seq2seq.run import load_run
from seq2seq.train import TrainConfig, train
from serving.search import SearchParams

RESULTS = Path(__file__).resolve().parent / "results"


def train_and_eval(out: Path, config: TrainConfig, beams: tuple[int, ...], resume: bool = False) -> dict:
    start = time.perf_counter()
    summary = train(config, out, resume=resume)
    train_seconds = time.perf_counter() - start
    run = load_run(out)
    evaluations = []
    for beam in beams:
        result = evaluate(run, "test", SearchParams(beam=beam), default_hyp_path(out, "test", beam))
        evaluations.append({**result, "hyp_file": repo_path(result["hyp_file"])})
        print(json.dumps({k: result[k] for k in ("beam", "bleu", "chrf", "seconds")}), flush=True)
        if beam == 4:
            write_evaluation(out, result)
    return {"run_dir": repo_path(out), "config": asdict(config), "train": summary,
            "train_wall_s": round(train_seconds, 1), "test": evaluations}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mt-fra-eng"))
    parser.add_argument("--max-minutes", type=float, default=None, help="default: TrainConfig's 55")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--compare", action="store_true", help="classic vs attention at equal training time")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    if args.compare:
        minutes = args.max_minutes or 20.0
        runs = {}
        for attention in ("none", "additive"):
            config = TrainConfig.of(attention=attention, max_minutes=minutes, threads=args.threads)
            runs[attention] = train_and_eval(Path(f"{args.out}-{attention}"), config, (4,))
        bleu = {k: v["test"][0]["bleu"] for k, v in runs.items()}
        result = {"minutes_each": minutes, "runs": runs, "bleu_beam4": bleu,
                  "attention_minus_classic_bleu": round(bleu["additive"] - bleu["none"], 2)}
        (RESULTS / "mt_compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0
    overrides = {"max_minutes": args.max_minutes} if args.max_minutes else {}
    config = TrainConfig.of(threads=args.threads, **overrides)
    result = train_and_eval(args.out, config, (1, 4, 8), resume=args.resume)
    bleu = {r["beam"]: r["bleu"] for r in result["test"]}
    result["beam_gain_bleu"] = {"beam4_minus_greedy": round(bleu[4] - bleu[1], 2),
                                "beam8_minus_beam4": round(bleu[8] - bleu[4], 2)}
    (RESULTS / "mt_train.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
