"""Training a recurrent LM: truncated BPTT over sequential or random batches, checkpoints, exact resume.

Exact resume rests on three facts: the batches of an epoch are a pure function of (seed, epoch) (the
offset of the sequential cut, or the generator of the random partition); a checkpoint holds everything
else that evolves (weights, optimiser, schedule, early stopping, the global RNGs that drive dropout,
the carried hidden state and the batch position inside the epoch); and a stop request (Ctrl-C,
SIGTERM, time budget, --max-steps) is only acted on between two optimizer steps. A run stopped at
any step and resumed therefore ends with the same weights as one that never stopped.

Run directory: config.json, tokenizer.json, last.pt, best.pt, metrics.jsonl, metrics.png.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

from lm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lm.config import RUN_CONTROL_FIELDS, ConfigError, TrainConfig
from lm.corpus import load_splits
from lm.datasets import REGISTRY
from lm.evaluate import stream_nll
from lm.metrics import MetricsLog, plot_metrics, read_metrics
from lm.model import RNNLM, State, detach_state
from lm.partition import (
    Batches,
    num_random_batches,
    num_sequential_batches,
    random_batches,
    random_offset,
    sequential_batches,
)
from lm.progress import Progress, perplexity
from lm.rng import capture_rng_state, restore_rng_state, seed_everything
from lm.schedule import EarlyStopping, LRSchedule, TimeBudget, make_lr_scheduler
from serving.errors import UserError
from serving.files import atomic_write_bytes, atomic_write_json
from serving.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    tokenizer_from_dict,
)

RUN_FILES = ("config.json", "tokenizer.json", "last.pt", "best.pt", "metrics.jsonl", "metrics.png")


class TrainError(UserError):
    """A run cannot start or continue; the message is one user-facing line."""


@dataclass
class Corpus:
    """The token ids of each split; ``digest`` identifies the text so a resume can check it."""

    tokenizer: Tokenizer
    train: Tensor  # (N,) int64
    valid: Tensor  # (M,) int64
    digest: str


@dataclass
class Position:
    """Where training stands: ``batch`` batches of epoch ``epoch`` are done, ``step`` in all."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    state: State | None = None


@dataclass
class FitResult:
    reason: str  # "completed" | "early_stopping" | "time_budget" | "max_steps" | "interrupted"
    epoch: int
    step: int
    best_valid_loss: float
    elapsed_s: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_valid_ppl(self) -> float:
        return perplexity(self.best_valid_loss)


def build_tokenizer(config: TrainConfig, train_text: str) -> Tokenizer:
    if config.tokenizer == "char":
        return CharTokenizer.train(train_text, lowercase=config.lowercase, min_freq=config.min_freq)
    if config.tokenizer == "word":
        return WordTokenizer.train(train_text, lowercase=config.lowercase, min_freq=config.min_freq)
    lines = [line for line in train_text.splitlines() if line.strip()]
    return SentencePieceTokenizer.train(lines, vocab_size=config.vocab_size)


def text_digest(splits: dict[str, str]) -> str:
    return hashlib.sha256("\0".join(splits[k] for k in ("train", "valid")).encode("utf-8")).hexdigest()


def prepare_corpus(config: TrainConfig, tokenizer: Tokenizer | None = None) -> Corpus:
    """Reads and splits the corpus, trains the tokenizer on the train split (unless given), encodes."""
    splits = load_splits(config.corpus)
    tokenizer = tokenizer or build_tokenizer(config, splits["train"])
    train = torch.tensor(tokenizer.encode(splits["train"]), dtype=torch.long)
    valid = torch.tensor(tokenizer.encode(splits["valid"]), dtype=torch.long)
    # The sequential cut may start up to bptt-1 tokens in; one full batch must remain after it.
    needed = config.batch_size * config.bptt + config.bptt
    if len(train) < needed:
        raise TrainError(f"corpus {config.corpus!r} is too short: its train split has {len(train)} tokens, "
                         f"batch-size {config.batch_size} x bptt {config.bptt} needs at least {needed}")
    if len(valid) < 2:
        raise TrainError(f"corpus {config.corpus!r} is too short: its valid split has {len(valid)} tokens")
    return Corpus(tokenizer, train, valid, text_digest(splits))


def epoch_batches(ids: Tensor, config: TrainConfig, epoch: int, start_batch: int = 0) -> Batches:
    """The batches of ``epoch`` from ``start_batch`` on: a pure function of (seed, epoch, start_batch),
    which is what makes resume exact.

    sequential: the cut starts at a random offset in [0, bptt); random: windows in a random order.
    Both draw from a generator seeded by (seed, epoch).
    """
    seed = int(np.random.default_rng([config.seed, epoch]).integers(2**62))
    generator = torch.Generator().manual_seed(seed)
    if config.partition == "sequential":
        offset = random_offset(config.bptt, generator)
        return sequential_batches(ids, config.batch_size, config.bptt, offset, start_batch=start_batch)
    return random_batches(ids, config.batch_size, config.bptt, generator, start_batch=start_batch)


def steps_per_epoch(num_tokens: int, config: TrainConfig) -> int:
    if config.partition == "sequential":
        return num_sequential_batches(num_tokens, config.batch_size, config.bptt)
    return num_random_batches(num_tokens, config.batch_size, config.bptt)


def make_optimizer(model: RNNLM, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag read between steps; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    """Owns one run: model, optimiser, schedule, position, and the run directory it writes."""

    def __init__(self, config: TrainConfig, corpus: Corpus, out: Path, *,
                 on_step: Callable[[Trainer], None] | None = None) -> None:
        self.config = config
        self.corpus = corpus
        self.out = out
        self.on_step = on_step
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.model_config = config.model_config(corpus.tokenizer.vocab_size)
        self.model = RNNLM(self.model_config)
        self.optimizer = make_optimizer(self.model, config)
        self.steps_per_epoch = steps_per_epoch(len(corpus.train), config)
        self.schedule: LRSchedule = make_lr_scheduler(
            self.optimizer, config.lr_schedule, config.warmup_steps,
            total_steps=max(config.schedule_steps or config.epochs * self.steps_per_epoch,
                            config.warmup_steps + 1))
        self.early = EarlyStopping(config.patience, config.min_delta) if config.patience else None
        self.position = Position()
        self.best_loss = math.inf
        self.elapsed_before = 0.0
        self.stop = StopRequest()
        self.history: list[dict[str, Any]] = []
        self._metrics: MetricsLog | None = None
        self._budget = TimeBudget(config.max_minutes or None)
        self.steps_since_validation = 0
        self.validation_s = 0.0  # how long the last validation took
        self.saved_step: int | None = None
        self.created_dir = False

    # ----- checkpoints -------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        p = self.position
        return {
            "kind": "lm", "model_config": self.model_config.to_dict(), "train_config": self.config.to_dict(),
            "tokenizer": self.corpus.tokenizer.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
            "early_stopping": self.early.state_dict() if self.early else None, "rng": capture_rng_state(),
            "epoch": p.epoch, "step": p.step,
            "position": {"epoch": p.epoch, "batch": p.batch,
                         "state": list(p.state) if p.state is not None else None},
            "best": {"valid_loss": self.best_loss}, "data": {"sha256": self.corpus.digest},
            "elapsed_s": self.elapsed_s,
        }

    def save(self, *names: str) -> None:
        payload = self.payload()
        for name in names:
            save_checkpoint(self.out / f"{name}.pt", payload)
        self.saved_step = self.position.step

    def restore(self, payload: dict[str, Any]) -> None:
        """Loads a ``last.pt`` payload into this freshly built trainer (after the model's init)."""
        if payload.get("data", {}).get("sha256") != self.corpus.digest:
            raise TrainError(f"corpus {self.config.corpus!r} differs from the one this run was trained on")
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.schedule.load_state_dict(payload["scheduler"])
            if self.early and payload.get("early_stopping"):
                self.early.load_state_dict(payload["early_stopping"])
            pos = payload["position"]
            state = tuple(pos["state"]) if pos["state"] is not None else None
            self.position = Position(pos["epoch"], pos["batch"], payload["step"], state)
            self.best_loss = float(payload["best"]["valid_loss"])
            self.elapsed_before = float(payload.get("elapsed_s", 0.0))
            restore_rng_state(payload["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.out / 'last.pt'}: does not fit this run "
                                  f"({str(exc).splitlines()[0]})") from None

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + self._budget.elapsed_s

    # ----- the loop ----------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Trains until the epochs are done, early stopping, or a stop request; checkpoints as it goes."""
        self._metrics = MetricsLog(self.out / "metrics.jsonl")
        try:
            with self.stop:
                reason = self._fit_epochs()
        finally:
            self._metrics.close()
        plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png",
                     title=f"{self.config.cell} on {Path(self.config.corpus).name}")
        return FitResult(reason, self.position.epoch, self.position.step, self.best_loss, self.elapsed_s,
                         self.history)

    def _fit_epochs(self) -> str:
        while self.position.epoch < self.config.epochs:
            reason = self.run_epoch()
            if reason:
                if reason != "interrupted" and self.steps_since_validation:
                    self.validate(scheduled=False)
                self.save("last")
                return reason
            stop_early = self.validate(scheduled=True)
            self.position = Position(self.position.epoch + 1, 0, self.position.step, None)
            self.save("last")
            if stop_early:
                return "early_stopping"
            if self._stop_reason():
                return self._stop_reason()
        return "completed"

    def _stop_reason(self) -> str:
        if self.stop.requested:
            return "interrupted"
        # Stop early enough for the last validation to fit into the budget too.
        if self._budget.remaining_s <= self.validation_s:
            return "time_budget"
        if self.config.max_steps and self.position.step >= self.config.max_steps:
            return "max_steps"
        return ""

    def run_epoch(self) -> str:
        """Trains the rest of the current epoch; returns a stop reason or "" when the epoch is done.

        The hot loop syncs a loss value only every ``log_every`` steps.
        """
        cfg, pos, model = self.config, self.position, self.model
        batches = epoch_batches(self.corpus.train, cfg, pos.epoch, pos.batch)
        sequential = cfg.partition == "sequential"
        if pos.batch == 0:
            pos.state = model.init_state(cfg.batch_size) if sequential else None
        model.train()
        params = list(model.parameters())
        window_loss, window_steps, window_start = torch.zeros(()), 0, time.perf_counter()
        epoch_length = pos.batch + len(batches)
        bar = Progress(epoch_length, desc=f"epoch {pos.epoch + 1}/{cfg.epochs}",
                       initial=pos.batch, disable=None if cfg.progress else True)
        try:
            for x, y in batches:
                logits, state = model(x, pos.state)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                self.optimizer.step()
                self.schedule.step()
                pos.state = detach_state(state) if sequential else None
                pos.batch += 1
                pos.step += 1
                self.steps_since_validation += 1
                window_loss += loss.detach()
                window_steps += 1
                if window_steps == cfg.log_every:
                    tokens = window_steps * x.numel()
                    rate = tokens / (time.perf_counter() - window_start)
                    mean = float(window_loss) / window_steps
                    self._log(split="train", loss=mean, tokens_per_s=rate)
                    bar.update(window_steps, loss=mean, tokens=tokens)
                    window_loss, window_steps, window_start = torch.zeros(()), 0, time.perf_counter()
                if self.on_step:
                    self.on_step(self)
                # (the epoch's last batch is followed by the epoch-end validation anyway)
                if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.batch < epoch_length:
                    if self.validate(scheduled=True):
                        return "early_stopping"
                    model.train()
                if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0:
                    self.save("last")
                reason = self._stop_reason()
                if reason:
                    return reason
        finally:
            bar.close()
        return ""

    def validate(self, scheduled: bool) -> bool:
        """Validation loss over the whole valid stream; saves best.pt on improvement.

        Scheduled validations (epoch ends, --eval-every) also feed the lr plateau schedule and early
        stopping; an extra one at a stop request only updates best.pt, so resume stays exact.
        Returns True when early stopping says stop.
        """
        start = time.perf_counter()
        nll, tokens = stream_nll(self.model, self.corpus.valid, streams=self.config.valid_streams)
        loss = nll / tokens
        self.validation_s = time.perf_counter() - start
        self.steps_since_validation = 0
        self._log(split="valid", loss=loss)
        if loss < self.best_loss:
            self.best_loss = loss
            self.save("best")
        if not scheduled:
            return False
        self.schedule.on_validation(loss)
        return bool(self.early and self.early.update(loss))

    def _log(self, **record: Any) -> None:
        pos = self.position
        epoch = pos.epoch + pos.batch / self.steps_per_epoch
        record = {"split": record.pop("split"), "step": pos.step, "epoch": round(epoch, 4), **record}
        record["ppl"] = perplexity(record["loss"])
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["elapsed_s"] = round(self.elapsed_s, 3)
        self.history.append(record)
        if self._metrics:
            self._metrics.write(**record)
        if record["split"] == "valid":
            tqdm.write(f"step {pos.step} epoch {record['epoch']:.2f}: valid loss {record['loss']:.4f} "
                  f"ppl {record['ppl']:.3f}", file=sys.stderr)


# ----- run directories ---------------------------------------------------------------------------
def start_run(config: TrainConfig, out: str | Path, **trainer_options: Any) -> Trainer:
    """A trainer for a new run in ``out`` (which must not hold a run); the directory is created last."""
    out = Path(out)
    if (out / "last.pt").exists():
        raise TrainError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out} exists and is not a directory")
    if config.corpus not in REGISTRY and Path(config.corpus).is_file():
        # eval and --resume may run from another directory
        config = replace(config, corpus=str(Path(config.corpus).resolve()))
    corpus = prepare_corpus(config)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        trainer = Trainer(config, corpus, out, **trainer_options)
        atomic_write_json(out / "config.json",
                          {"train": config.to_dict(), "model": trainer.model_config.to_dict()})
        atomic_write_json(out / "tokenizer.json", corpus.tokenizer.to_dict())
    except BaseException:
        remove_run_files(out, created)
        raise
    trainer.created_dir = created
    return trainer


def resume_run(out: str | Path, overrides: dict[str, Any], **trainer_options: Any) -> Trainer:
    """A trainer continuing the run in ``out`` from last.pt, exactly where it stopped.

    ``overrides`` (flags the user gave) may change run-control settings such as --epochs or
    --max-minutes; changing anything that shapes the data, model or optimisation is an error.
    """
    out = Path(out)
    if not (out / "last.pt").exists():
        raise TrainError(f"--resume: {out} holds no run (no last.pt); train without --resume first")
    payload = load_checkpoint(out / "last.pt", "lm")
    try:
        stored = TrainConfig.from_dict(payload["train_config"], source=str(out / "last.pt"))
        tokenizer = tokenizer_from_dict(payload["tokenizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{out / 'last.pt'}: not a valid lm training checkpoint ({exc})") from None
    values = stored.to_dict()
    for name, value in overrides.items():
        if name not in RUN_CONTROL_FIELDS and values.get(name) != value:
            raise ConfigError(f"--resume cannot change --{name.replace('_', '-')} "
                              f"(the run has {values.get(name)!r})")
        values[name] = value
    config = TrainConfig.from_dict(values)
    trainer = Trainer(config, prepare_corpus(config, tokenizer), out, **trainer_options)
    trainer.restore(payload)
    trainer.saved_step = trainer.position.step
    truncate_metrics(out / "metrics.jsonl", trainer.position.step)
    atomic_write_json(out / "config.json",
                      {"train": config.to_dict(), "model": trainer.model_config.to_dict()})
    return trainer


def truncate_metrics(path: Path, step: int) -> None:
    """Drops records logged after the checkpoint a run resumes from (they will be logged again)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode("utf-8"))


def remove_run_files(out: Path, remove_dir: bool) -> None:
    """Undoes a run that failed before it began: its files, and its directory if the run created it."""
    if remove_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
