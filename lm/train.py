"""Training a recurrent LM on the shared loop (lm.loop): truncated BPTT over sequential or random batches.

``LanguageModelling`` is the language model's lm.loop.Family: its batches of an epoch are a pure
function of (seed, epoch) (the offset of the sequential cut, or the generator of the random partition)
and it carries the hidden state across sequential batches (saved in every checkpoint), so resume is
exact. In a distributed run (lm.distributed) rank r trains the contiguous block r of the B streams of
every batch and carries their state; checkpoints gather the whole (L, B, H) state, so a run resumes with
any number of processes that divides B. Everything else (checkpoints, signals, budgets, early stopping,
metrics, the plot) is the loop's.

Run directory: config.json, tokenizer.json, last.pt, best.pt, metrics.jsonl, metrics.png (tensorboard/).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from lm import distributed, loop
from lm.checkpoint import CheckpointError
from lm.config import TrainConfig
from lm.corpus import load_splits
from lm.datasets import REGISTRY
from lm.evaluate import stream_nll
from lm.loop import FitResult, Position, StepLoss, Trainer, TrainError, remove_run_files
from lm.metrics import NATS_PER_TOKEN
from lm.model import RNNLM, State, detach_state
from lm.partition import (
    Batch,
    Batches,
    num_random_batches,
    num_sequential_batches,
    random_batches,
    random_offset,
    sequential_batches,
)
from serving.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    tokenizer_from_dict,
)

__all__ = [
    "Corpus",
    "FitResult",
    "LanguageModelling",
    "Position",
    "TrainError",
    "Trainer",
    "epoch_batches",
    "prepare_corpus",
    "remove_run_files",
    "resume_run",
    "start_run",
]


@dataclass
class Corpus:
    """The token ids of each split; ``digest`` identifies the text so a resume can check it."""

    tokenizer: Tokenizer
    train: Tensor  # (N,) int64
    valid: Tensor  # (M,) int64
    digest: str


def build_tokenizer(config: TrainConfig, train_text: str) -> Tokenizer:
    data = config.data
    if data.tokenizer == "char":
        return CharTokenizer.train(train_text, lowercase=data.lowercase, min_freq=data.min_freq)
    if data.tokenizer == "word":
        return WordTokenizer.train(train_text, lowercase=data.lowercase, min_freq=data.min_freq)
    lines = [line for line in train_text.splitlines() if line.strip()]
    return SentencePieceTokenizer.train(lines, vocab_size=data.vocab_size)


def text_digest(splits: dict[str, str]) -> str:
    return hashlib.sha256("\0".join(splits[k] for k in ("train", "valid")).encode("utf-8")).hexdigest()


def prepare_corpus(config: TrainConfig, tokenizer: Tokenizer | None = None) -> Corpus:
    """Reads and splits the corpus, trains the tokenizer on the train split (unless given), encodes."""
    data = config.data
    splits = load_splits(data.corpus)
    if tokenizer is None:
        (tokenizer,) = distributed.current().tokenizers(lambda: [build_tokenizer(config, splits["train"])])
    train = torch.tensor(tokenizer.encode(splits["train"]), dtype=torch.long)
    valid = torch.tensor(tokenizer.encode(splits["valid"]), dtype=torch.long)
    # The sequential cut may start up to bptt-1 tokens in; one full batch must remain after it.
    needed = data.batch_size * data.bptt + data.bptt
    if len(train) < needed:
        raise TrainError(
            f"corpus {data.corpus!r} is too short: its train split has {len(train)} tokens, "
            f"batch-size {data.batch_size} x bptt {data.bptt} needs at least {needed}"
        )
    if len(valid) < 2:
        raise TrainError(f"corpus {data.corpus!r} is too short: its valid split has {len(valid)} tokens")
    return Corpus(tokenizer, train, valid, text_digest(splits))


def epoch_batches(ids: Tensor, config: TrainConfig, epoch: int, start_batch: int = 0) -> Batches:
    """The batches of ``epoch`` from ``start_batch`` on: a pure function of (seed, epoch, start_batch),
    which is what makes resume exact.

    sequential: the cut starts at a random offset in [0, bptt); random: windows in a random order.
    Both draw from a generator seeded by (seed, epoch).
    """
    data = config.data
    seed = int(np.random.default_rng([config.optim.seed, epoch]).integers(2**62))
    generator = torch.Generator().manual_seed(seed)
    if data.partition == "sequential":
        offset = random_offset(data.bptt, generator)
        return sequential_batches(ids, data.batch_size, data.bptt, offset, start_batch=start_batch)
    return random_batches(ids, data.batch_size, data.bptt, generator, start_batch=start_batch)


def steps_per_epoch(num_tokens: int, config: TrainConfig) -> int:
    data = config.data
    if data.partition == "sequential":
        return num_sequential_batches(num_tokens, data.batch_size, data.bptt)
    return num_random_batches(num_tokens, data.batch_size, data.bptt)


class LanguageModelling:
    """The language model's lm.loop.Family: next-token cross-entropy, the state carried across batches."""

    kind = "lm"
    monitor, maximize = "loss", False
    figures = NATS_PER_TOKEN

    def __init__(self, config: TrainConfig, corpus: Corpus) -> None:
        self.config, self.corpus = config, corpus
        self.model_config = config.model_config(corpus.tokenizer.vocab_size)
        self.title = f"{config.model.cell} on {Path(config.data.corpus).name}"
        self.sequential = config.data.partition == "sequential"
        self.state: State | None = None
        self.model: RNNLM | None = None
        self.group = distributed.current()
        self.group.check_divides(config.data.batch_size, "batch_size")

    def build_model(self) -> RNNLM:
        self.model = RNNLM(self.model_config)
        return self.model

    def epoch_length(self, epoch: int) -> int:
        return steps_per_epoch(len(self.corpus.train), self.config)

    def start_epoch(self, epoch: int) -> None:
        assert self.model is not None
        streams = self.config.data.batch_size // self.group.world
        self.state = self.model.init_state(streams) if self.sequential else None

    def batches(self, epoch: int, start: int) -> Batches:
        return epoch_batches(self.corpus.train, self.config, epoch, start)

    def step_loss(self, batch: Batch) -> StepLoss:
        """x, y: (B, T) int64; this rank's rows (B/N, T), whose state is carried (detached) to the next
        sequential batch. Every rank has as many tokens: its share of the mean is its mean / N."""
        assert self.model is not None
        rows = self.group.rows(batch[0].shape[0])
        x, y = batch[0][rows], batch[1][rows]
        logits, state = self.model(x, self.state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) / self.group.world
        self.state = detach_state(state) if self.sequential else None
        return StepLoss(loss, loss.detach(), x.numel())

    def validate(self) -> dict[str, float]:
        assert self.model is not None
        nll, tokens = stream_nll(self.model, self.corpus.valid, streams=self.config.data.valid_streams)
        return {"loss": nll / tokens}

    def payload(self) -> dict[str, Any]:
        return {
            "model_config": self.model_config.to_dict(),
            "tokenizer": self.corpus.tokenizer.to_dict(),
            "data": {"sha256": self.corpus.digest},
            "carried_state": list(self.group.gather_rows(self.state)) if self.state is not None else None,
        }

    def restore(self, payload: dict[str, Any]) -> None:
        if payload.get("data", {}).get("sha256") != self.corpus.digest:
            raise TrainError(f"corpus {self.config.data.corpus!r} is not the one the run was trained on")
        # (runs trained before the shared loop kept the state under "position")
        state = payload["carried_state"] if "carried_state" in payload else payload["position"]["state"]
        rows = self.group.rows(self.config.data.batch_size)  # (L, B, ...) -> this rank's streams
        self.state = tuple(s[:, rows].clone() for s in state) if state is not None else None

    def run_files(self) -> dict[str, Any]:
        return {
            "config.json": {"train": self.config.to_dict(), "model": self.model_config.to_dict()},
            "tokenizer.json": self.corpus.tokenizer.to_dict(),
        }


def start_run(config: TrainConfig, out: str | Path, **trainer_options: Any) -> Trainer:
    """A trainer for a new run in ``out`` (which must not hold a run); the directory is created last."""
    out = Path(out)
    loop.check_new_run_dir(out)
    corpus_name = config.data.corpus
    if corpus_name not in REGISTRY and Path(corpus_name).is_file():
        # eval and --resume may run from another directory
        config = replace(config, data=replace(config.data, corpus=str(Path(corpus_name).resolve())))
    return loop.start_run(LanguageModelling(config, prepare_corpus(config)), config, out, **trainer_options)


def _family_for(config: TrainConfig, payload: dict[str, Any]) -> LanguageModelling:
    try:
        tokenizer = tokenizer_from_dict(payload["tokenizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"last.pt: not a valid lm training checkpoint ({exc})") from None
    return LanguageModelling(config, prepare_corpus(config, tokenizer))


def resume_run(out: str | Path, overrides: dict[str, Any], **trainer_options: Any) -> Trainer:
    """A trainer continuing the run in ``out`` from last.pt, exactly where it stopped (lm.loop.resume_run)."""
    return loop.resume_run(_family_for, TrainConfig, "lm", out, overrides, **trainer_options)
