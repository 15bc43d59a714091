"""``rnnlab-lm train`` at its defaults against a minimal textbook loop, side by side, at torch's threads.

The trainer side is the real code path: ``lm.train.start_run`` with the default ``TrainConfig`` (char GRU
2x256, embed 64, dropout 0.2, batch 32 x bptt 64, AdamW, clipping, the plateau schedule, threads =
torch's default), timed through ``Trainer.run_epoch`` (the loop's hot path: step, gradient norm, logging
window, progress bar, stop checks). The textbook side is PyTorch's ``examples/word_language_model``
loop: a time-major ``nn.GRU`` with the same weights, dropout, a plain SGD update and gradient clipping,
on the same batches (sequential partition, state carried and detached).

Each repeat times both on the same slice of batches, in alternating order (trainer first, then textbook
first, ...) so that drift in the machine's load hits both alike; the figure is the median over repeats
of the per-repeat ratio of tokens/s (target >= 0.95). Threads: torch's default unless --threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bench.lm_common import write_result
from lm.config import TrainConfig
from lm.loop import Position
from lm.model import RNNLM
from lm.train import epoch_batches, start_run


class TextbookGRU(nn.Module):
    """The word_language_model example's RNNModel: time-major, dropout on embeddings and outputs."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, embed)
        self.rnn = nn.GRU(embed, hidden, layers, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """tokens: (T, B) int64, hidden: (L, B, H) -> logits (T, B, V), hidden'."""
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(output)), hidden

    @classmethod
    def like(cls, model: RNNLM) -> TextbookGRU:
        c = model.config
        textbook = cls(c.vocab_size, c.embed, c.hidden, c.layers, c.dropout)
        textbook.encoder.load_state_dict(model.embedding.state_dict())
        textbook.rnn.load_state_dict(model.rnn.state_dict())
        textbook.decoder.load_state_dict(model.head.state_dict())
        return textbook


def textbook_epoch(model: TextbookGRU, batches, batch_size: int, lr: float, clip: float) -> int:
    """The example's train(): forward, loss, backward, clip, p -= lr * grad, detach. Returns tokens."""
    model.train()
    hidden = torch.zeros(model.rnn.num_layers, batch_size, model.rnn.hidden_size)
    tokens = 0
    for x, y in batches:
        x, y = x.t().contiguous(), y.t().contiguous()  # (T, B): the example's layout
        model.zero_grad()
        hidden = hidden.detach()
        logits, hidden = model(x, hidden)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-lr)
        tokens += x.numel()
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch's default (what training uses)")
    parser.add_argument("--max-batches", type=int, default=12, help="batches per timed epoch slice")
    parser.add_argument("--result", default="lm_throughput", help="bench/results/RESULT.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig()  # rnnlab-lm train's defaults
    with tempfile.TemporaryDirectory() as tmp:
        trainer = start_run(config, tmp + "/run")
        ids = trainer.family.corpus.train
        # The trainer's epoch runs until its last batch; start it max_batches before the end.
        total = trainer.steps_per_epoch
        start = max(0, total - args.max_batches)
        data = config.data
        textbook = TextbookGRU.like(trainer.model)

        def time_trainer() -> float:
            trainer.position = Position(epoch=0, batch=start, step=trainer.position.step)
            trainer.family.start_epoch(0)
            t0 = time.perf_counter()
            trainer.run_epoch()
            return (total - start) * data.batch_size * data.bptt / (time.perf_counter() - t0)

        def time_textbook() -> float:
            t0 = time.perf_counter()
            tokens = textbook_epoch(textbook, epoch_batches(ids, config, 0, start), data.batch_size,
                                    lr=1.0, clip=config.optim.clip)
            return tokens / (time.perf_counter() - t0)

        rates: dict[str, list[float]] = {"trainer": [], "textbook": []}
        for repeat in range(args.repeats + 1):  # the first round warms up both and is not counted
            if repeat % 2:
                textbook_rate, trainer_rate = time_textbook(), time_trainer()
            else:
                trainer_rate, textbook_rate = time_trainer(), time_textbook()
            if repeat:
                rates["trainer"].append(trainer_rate)
                rates["textbook"].append(textbook_rate)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [t / m for t, m in zip(rates["trainer"], rates["textbook"], strict=True)]
    model = config.model
    write_result(args.result, {
        "trainer": "rnnlab-lm train defaults (lm.train.start_run, Trainer.run_epoch)",
        "textbook": "time-major nn.GRU, plain SGD update, clip_grad_norm_ (word_language_model)",
        "model": f"{model.cell} x{model.layers} hidden {model.hidden} embed {model.embed} "
                 f"dropout {model.dropout}",
        "batch": [data.batch_size, data.bptt], "batches_per_repeat": total - start,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "tokens_per_s": {k: [round(r) for r in v] for k, v in rates.items()},
        "median_tokens_per_s": {k: round(v) for k, v in medians.items()},
        "ratio_per_repeat": [round(r, 3) for r in ratios],
        "ratio_trainer_to_textbook": round(statistics.median(ratios), 3),
        "ratio_of_medians": round(medians["trainer"] / medians["textbook"], 3),
        "target": 0.95,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
