"""Decoding speed of the PyTorch translator: sentences/s at batch 1 and 64, greedy and beam 4.

Uses the trained run (default runs/mt-fra-eng) when there is one, otherwise a randomly initialised
model of the default size (its outputs run to the length limit, so sentences/s is then a lower bound;
tokens/s is the comparable figure). Writes bench/results/mt_decode.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from seq2seq.data import group_references, load_splits
from seq2seq.decode import search
from seq2seq.model import Seq2Seq
from seq2seq.run import load_run
from seq2seq.train import TrainConfig, train_tokenizers
from serving.search import SearchParams

RESULTS = Path(__file__).resolve().parent / "results"


def load_model(run_dir: Path):
    """-> model, source tokenizer, test sources, description."""
    if (run_dir / "best.pt").is_file():
        run = load_run(run_dir)
        config = TrainConfig.from_dict(run.train_config, strict=False)
        splits = load_splits(config.data_config())
        return run.model, run.src_tokenizer, splits, config, f"trained ({run_dir})"
    config = TrainConfig()
    splits = load_splits(config.data_config())
    src_tok, tgt_tok = train_tokenizers(config.data, splits["train"][:20000])
    torch.manual_seed(0)
    model = Seq2Seq(config.model_config(src_tok.vocab_size, tgt_tok.vocab_size)).eval()
    return model, src_tok, splits, config, "untrained, default size"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/mt-fra-eng"))
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, src_tok, splits, config, description = load_model(args.run)
    eos = src_tok.special_ids["<eos>"]
    groups = group_references(splits["test"], config.src, config.tgt)[: args.sentences]
    sources = [[*src_tok.encode(g.source), eos] for g in groups]
    rows = []
    for beam in (1, 4):
        for batch in (1, 64):
            start = time.perf_counter()
            hyps = search(model, sources, SearchParams(beam=beam), 2, 3, batch_size=batch)
            seconds = time.perf_counter() - start
            tokens = sum(len(h[0].tokens) + 1 for h in hyps)
            rows.append(
                {
                    "search": "greedy" if beam == 1 else f"beam{beam}",
                    "batch": batch,
                    "sentences_per_s": round(len(sources) / seconds, 1),
                    "tokens_per_s": round(tokens / seconds, 1),
                    "seconds": round(seconds, 2),
                }
            )
            print(json.dumps(rows[-1]))
    by_key = {(r["search"], r["batch"]): r["sentences_per_s"] for r in rows}
    result = {
        "model": description,
        "sentences": len(sources),
        "threads": args.threads,
        "rows": rows,
        "batch64_over_batch1_speed": {
            s: round(by_key[(s, 64)] / by_key[(s, 1)], 2) for s in ("greedy", "beam4")
        },
        "beam4_over_greedy_time": {
            str(b): round(by_key[("greedy", b)] / by_key[("beam4", b)], 2) for b in (1, 64)
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mt_decode.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
