"""BLEU and chrF of a trained translator on a split, every reference of a source sentence counted."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from seq2seq.data import group_references, load_splits
from seq2seq.run import LoadedRun
from seq2seq.train import TrainConfig
from serving.bleu import corpus_scores
from serving.files import atomic_write_bytes
from serving.search import SearchParams


def default_hyp_path(run_dir: str | Path, split: str, beam: int) -> Path:
    return Path(run_dir) / f"hyp.{split}.{'greedy' if beam == 1 else f'beam{beam}'}.txt"


def evaluate(
    run: LoadedRun,
    split: str,
    params: SearchParams,
    hyp_out: str | Path,
    batch_size: int = 64,
    limit: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """Translates the split's source sentences (grouped), scores them, writes the hypotheses (one a line);
    ``workers`` batches at once (``TextTranslator.search``)."""
    config = TrainConfig.from_dict(run.train_config, strict=False)
    groups = group_references(load_splits(config.data_config())[split], config.src, config.tgt)
    if limit:
        groups = groups[:limit]
    start = time.perf_counter()
    translations = run.translator().translate([g.source for g in groups], params, batch_size, workers=workers)
    seconds = time.perf_counter() - start
    hypotheses = [t.text for t in translations]
    atomic_write_bytes(hyp_out, "".join(h + "\n" for h in hypotheses).encode("utf-8"))
    scores = corpus_scores(hypotheses, [g.references for g in groups])
    return {
        "split": split,
        "direction": f"{config.src}-{config.tgt}",
        "sentences": len(groups),
        "references": sum(len(g.references) for g in groups),
        "beam": params.beam,
        "length_penalty": params.length_penalty,
        **scores,
        "failed": sum(t.error is not None for t in translations),
        "hyp_file": str(hyp_out),
        "seconds": round(seconds, 2),
        "sentences_per_s": round(len(groups) / seconds, 1) if seconds > 0 else None,
    }


def write_evaluation(run_dir: str | Path, result: dict[str, Any]) -> None:
    atomic_write_bytes(Path(run_dir) / "eval.json", json.dumps(result, indent=2).encode("utf-8"))
