"""Trainer throughput against a minimal hand-written truncated-BPTT loop, side by side.

Both train the same 2-layer nn.GRU language model (the default ``rnnlab-lm train`` model) from the same
initial weights on the same batches of The Time Machine (sequential partition, state carried), with
AdamW and gradient clipping. Each repeat times both on the same slice of batches, in alternating order
(trainer first, then minimal first, ...) so that drift in the machine's load hits both alike; the
figure is the median over repeats of the per-repeat ratio of tokens/s (target >= 0.95).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from bench.lm_common import write_result
from lm.config import TrainConfig
from lm.train import Position, Trainer, epoch_batches, prepare_corpus


def minimal_epoch(model, optimizer, batches, batch_size: int, clip: float) -> int:
    """The loop everyone writes first: forward, loss, backward, clip, step, detach. Returns tokens."""
    state = model.init_state(batch_size)
    tokens = 0
    for x, y in batches:
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        state = tuple(s.detach() for s in state)
        tokens += x.numel()
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batches", type=int, default=12, help="batches per timed epoch slice")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig(corpus="timemachine", progress=False, checkpoint_every=0, eval_every=0,
                         threads=args.threads, epochs=1000)
    corpus = prepare_corpus(config)
    # The trainer's epoch runs until its last batch; start it max_batches before the end.
    total = len(epoch_batches(corpus.train, config, 0))
    start = max(0, total - args.max_batches)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, corpus, Path(tmp))
        model = copy.deepcopy(trainer.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        def time_trainer() -> float:
            trainer.position = Position(epoch=0, batch=start, step=trainer.position.step)
            t0 = time.perf_counter()
            trainer.run_epoch()
            return (total - start) * config.batch_size * config.bptt / (time.perf_counter() - t0)

        def time_minimal() -> float:
            t0 = time.perf_counter()
            tokens = minimal_epoch(model, optimizer, epoch_batches(corpus.train, config, 0, start),
                                   config.batch_size, config.clip)
            return tokens / (time.perf_counter() - t0)

        rates: dict[str, list[float]] = {"trainer": [], "minimal": []}
        for repeat in range(args.repeats + 1):  # the first round warms up both and is not counted
            if repeat % 2:
                minimal_rate, trainer_rate = time_minimal(), time_trainer()
            else:
                trainer_rate, minimal_rate = time_trainer(), time_minimal()
            if repeat:
                rates["trainer"].append(trainer_rate)
                rates["minimal"].append(minimal_rate)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [t / m for t, m in zip(rates["trainer"], rates["minimal"], strict=True)]
    write_result("lm_throughput", {
        "model": f"{config.cell} x{config.layers} hidden {config.hidden} embed {config.embed}",
        "batch": [config.batch_size, config.bptt], "batches_per_repeat": total - start,
        "repeats": args.repeats, "threads": args.threads,
        "tokens_per_s": {k: [round(r) for r in v] for k, v in rates.items()},
        "median_tokens_per_s": {k: round(v) for k, v in medians.items()},
        "ratio_per_repeat": [round(r, 3) for r in ratios],
        "ratio_trainer_to_minimal": round(statistics.median(ratios), 3),
        "ratio_of_medians": round(medians["trainer"] / medians["minimal"], 3),
        "target": 0.95,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
