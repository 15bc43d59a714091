"""The one training loop: every model family (language model, translator, forecaster) trains through it.

A model family implements :class:`Family` (about a hundred lines: its data, its model, the loss of a
batch, a validation); the loop owns everything else:

- **run directory** (:func:`start_run`, :func:`resume_run`): the family's ``run_files()`` (config.json
  with the flat training config, tokenizers, ...), ``last.pt``, ``best.pt``, ``metrics.jsonl``,
  ``metrics.png`` and, with ``--tensorboard``, ``tensorboard/`` (standard SummaryWriter event files);
- **budgets**: ``run.epochs``, ``run.max_steps``, ``run.max_minutes`` (the last validation must fit);
- **signals**: SIGINT and SIGTERM finish the current step, save ``last.pt`` and stop with reason
  ``"interrupted"`` (the CLIs exit with ``ExitCode.INTERRUPTED`` = 3); a second signal interrupts at
  once; the handlers installed before are put back afterwards;
- **exact resume**: a family's batches of epoch e from batch p are a pure function of (seed, e, p);
  the checkpoint holds the weights, optimiser, schedule, early stopping, the global RNGs (dropout),
  the position (epoch, batch, step) and the family's own carried state, and stop requests are acted on
  between optimizer steps only; a run stopped anywhere and resumed ends with the same weights;
- **resume policy** (lm.config.resumed_config): only the ``[run]`` settings may change on resume;
- **validation** at every epoch end and every ``run.eval_every`` steps: ``best.pt`` on improvement of
  the family's ``monitor`` metric, the plateau schedule on the valid loss, early stopping (``run.patience``,
  ``run.min_delta``) on the monitored metric; a last unscheduled validation at a stop;
- **distributed data-parallel** (lm.distributed, docs/distributed.md): under torchrun each rank trains
  its share of every global batch through DistributedDataParallel; the ranks agree on stops, rank 0
  writes the run directory, checkpoints gather what every rank carries, so a run resumes with another N;
- **logging**: every ``run.log_every`` steps one ``metrics.jsonl`` record ``{split: "train", step, epoch,
  loss, ppl, grad_norm (the global norm before clipping, mean over the window), lr, tokens_per_s,
  elapsed_s}`` (``ppl`` only when the family's loss is nats/token); valid records carry the family's
  metrics; a tqdm bar shows loss, tokens/s and the ETA; ``metrics.png`` draws the loss and a second
  figure. The family's ``figures`` (lm.metrics.Figures) name them all, once.

The API a family implements (``F`` = the family object, built before the loop by the family's own
``start_run``/``resume_run`` wrappers, which read the data and tokenizers)::

    F.kind: str                        checkpoint kind ("lm", "mt", ...; lm.checkpoint.KINDS)
    F.title: str                       the plot's title
    F.monitor: str, F.maximize: bool   the valid metric that picks best.pt and drives early stopping
    F.figures: Figures                 names and units of the loss, the plot's second panel, the rate
                                       (lm.metrics.NATS_PER_TOKEN: loss in nats/token and perplexity)
    F.build_model() -> nn.Module       called right after seeding, so the init is a function of the seed
    F.model                            the module step_loss runs; a distributed run sets it to the DDP
                                       wrapper of build_model()'s module (other attributes pass through)
    F.epoch_length(epoch) -> int       batches in that epoch
    F.start_epoch(epoch)               before the first batch of an epoch (e.g. reset a carried state)
    F.batches(epoch, start) -> Iterable[batch]   the epoch's batches from ``start`` on
    F.step_loss(batch) -> StepLoss     forward + loss; the loop does backward, clipping, the step. In a
                                       distributed run: this rank's share of the global batch's loss
    F.validate() -> dict[str, float]   at least {"loss": ...}; the loop adds "ppl" (figures.perplexity)
    F.payload() -> dict                plain data stored in every checkpoint (tokenizers, model config, ...)
    F.restore(payload)                 reads back what ``payload`` stored that evolves (a carried state)
    F.run_files() -> dict[str, Any]    JSON documents written into the run directory

and ``config`` is a :class:`lm.config.Sections` with ``optim`` (lm.config.OptimConfig) and ``run``
(lm.config.RunConfig) sections (a family's own recipe: lm.config.with_defaults; its model section:
lm.config.section_of its model config). ``Trainer(family, config, out).fit() -> FitResult``.

A new family: its config (data section + section_of(model config) + optim + run), the Family class,
``start_run(config, out)`` = read data, ``loop.start_run(family, config, out)``, and ``resume_run(out,
overrides)`` = ``loop.resume_run(family_for, ConfigClass, kind, out, overrides)``; its checkpoint kind
goes into lm.checkpoint.KINDS; its CLI uses lm.config.add_config_arguments/build_config/given_settings
and ``fit_command`` (see lm/cli.py and seq2seq/cli.py ``cmd_train``). lm/train.py and seq2seq/train.py
are the two worked examples.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lm import distributed
from lm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lm.config import DIST_FLAGS, OptimConfig, Sections, build_config, given_settings, resumed_config
from lm.metrics import Figures, MetricsLog, plot_metrics, read_metrics
from lm.progress import Progress, perplexity
from lm.rng import seed_everything
from lm.schedule import EarlyStopping, LRSchedule, TimeBudget, make_lr_scheduler
from serving.errors import ExitCode, UserError
from serving.files import atomic_write_bytes, atomic_write_json

LOOP_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.png")
STOP_REASONS = ("completed", "early_stopping", "time_budget", "max_steps", "interrupted")


class TrainError(UserError):
    """A run cannot start or continue; the message is one user-facing line."""


@dataclass
class StepLoss:
    loss: Tensor
    """() the loss to minimise (backward runs on it); in a distributed run this rank's share of the
    global batch's loss: the shares of all ranks sum to it (lm.distributed)."""
    nll: Tensor
    """() detached mean NLL per token, the logged figure (equal to ``loss`` unless e.g. label smoothing);
    a share like ``loss`` in a distributed run."""
    tokens: int
    """Tokens in the batch, this rank's part in a distributed run (for tokens/s)."""


@dataclass
class Position:
    """Where training stands: ``batch`` batches of epoch ``epoch`` are done, ``step`` in all."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class FitResult:
    reason: str  # one of STOP_REASONS
    epoch: int
    step: int
    best: float
    """Best value of the family's monitored valid metric."""
    monitor: str
    elapsed_s: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_valid_loss(self) -> float:
        return self.best

    @property
    def best_valid_ppl(self) -> float:
        return perplexity(self.best)


class Family(Protocol):
    kind: str
    title: str
    monitor: str
    maximize: bool
    figures: Figures

    def build_model(self) -> nn.Module: ...
    def epoch_length(self, epoch: int) -> int: ...
    def start_epoch(self, epoch: int) -> None: ...
    def batches(self, epoch: int, start: int) -> Iterable[Any]: ...
    def step_loss(self, batch: Any) -> StepLoss: ...
    def validate(self) -> dict[str, float]: ...
    def payload(self) -> dict[str, Any]: ...
    def restore(self, payload: dict[str, Any]) -> None: ...
    def run_files(self) -> dict[str, Any]: ...


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    groups = decay_groups(model, optim)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    return torch.optim.AdamW(groups, lr=optim.lr)


def decay_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """The parameters in optimizer groups with their weight decay: one group for ``weight_decay_on all``;
    for ``matrices`` a second group without decay for every parameter of fewer than two axes — biases,
    norm gains, and mamba's A_log, Δ bias and D, which decay would pull towards A = −1 and Δ ≈ 0.69
    rather than towards zero (Mamba's and nanoGPT's practice)."""
    # Every parameter, frozen ones too (the forecaster's fitted highway): the groups then list the same
    # tensors in the same order as the checkpoints written before the option existed, which resume.
    params = list(model.parameters())
    if optim.weight_decay_on == "all":
        return [{"params": params, "weight_decay": optim.weight_decay}]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag read between steps; a second signal interrupts at once.

    A repeat within ``REPEAT_S`` of the first counts as the same request: a terminal's Ctrl-C reaches
    torchrun's ranks twice, from the terminal and forwarded by torchrun's agent. On exit the handlers
    that were installed before are restored, whatever they were (a process started
    with SIGINT ignored keeps it ignored afterwards).
    """

    REPEAT_S = 1.0

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and time.monotonic() - self._first > self.REPEAT_S:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, time.monotonic()

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class _Window:
    """Sums over the steps since the last train record (tensors: no sync in the hot loop)."""

    def __init__(self) -> None:
        self.loss, self.grad_norm = torch.zeros(()), torch.zeros(())
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()


class Trainer:
    """Owns one run: model, optimiser, schedule, position, and the run directory it writes."""

    def __init__(
        self, family: Family, config: Sections, out: Path, *, on_step: Callable[[Trainer], None] | None = None
    ) -> None:
        self.family, self.config, self.out, self.on_step = family, config, Path(out), on_step
        optim, run = config.optim, config.run  # type: ignore[attr-defined]
        if run.threads:
            torch.set_num_threads(run.threads)
        seed_everything(optim.seed)
        self.model = family.build_model()
        self.dist = distributed.current()
        if self.dist.active:  # the family's forward runs through DDP; each rank its own dropout stream
            family.model = self.dist.replicate(self.model)  # type: ignore[attr-defined]
            self.dist.seed_rank(optim.seed, 0)
        self.params = list(self.model.parameters())
        self.optimizer = make_optimizer(self.model, optim)
        self.steps_per_epoch = family.epoch_length(0)
        self.schedule: LRSchedule = make_lr_scheduler(
            self.optimizer,
            optim.lr_schedule,
            optim.warmup_steps,
            total_steps=max(
                optim.schedule_steps or run.epochs * self.steps_per_epoch, optim.warmup_steps + 1
            ),
        )
        self.early = EarlyStopping(run.patience, run.min_delta) if run.patience else None
        self.position = Position()
        self.best = -math.inf if family.maximize else math.inf
        self.elapsed_before = 0.0
        self.stop = StopRequest()
        self.history: list[dict[str, Any]] = []
        self._metrics: MetricsLog | None = None
        self._board: Any = None
        self._budget = TimeBudget(run.max_minutes or None)
        self.steps_since_validation = 0
        self.validation_s = 0.0  # how long the last validation took
        self.saved_step: int | None = None
        self.created_dir = False

    @property
    def run(self) -> Any:
        return self.config.run  # type: ignore[attr-defined]

    # ----- checkpoints -------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        p = self.position
        return {
            **self.family.payload(),
            "kind": self.family.kind,
            "train_config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "early_stopping": self.early.state_dict() if self.early else None,
            **self.dist.rng_payload(),
            "epoch": p.epoch,
            "step": p.step,
            "position": {"epoch": p.epoch, "batch": p.batch},
            "best": {f"valid_{self.family.monitor}": self.best},
            "elapsed_s": self.elapsed_s,
        }

    def save(self, *names: str) -> None:
        payload = self.payload()  # on every rank: it gathers the ranks' carried states and RNGs
        for name in names:
            if self.dist.writes:
                save_checkpoint(self.out / f"{name}.pt", payload)
        self.saved_step = self.position.step

    def restore(self, payload: dict[str, Any]) -> None:
        """Loads a ``last.pt`` payload into this freshly built trainer (after the model's init)."""
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.schedule.load_state_dict(payload["scheduler"])
            if self.early and payload.get("early_stopping"):
                self.early.load_state_dict(payload["early_stopping"])
            pos = payload["position"]
            self.position = Position(int(pos["epoch"]), int(pos["batch"]), int(payload["step"]))
            self.best = float(payload["best"][f"valid_{self.family.monitor}"])
            self.elapsed_before = float(payload.get("elapsed_s", 0.0))
            self.family.restore(payload)
            self.dist.restore_rng(payload, self.config.optim.seed, self.position.step)  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{self.out / 'last.pt'}: does not fit this run ({reason})") from None
        self.saved_step = self.position.step

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + self._budget.elapsed_s

    def summary(self, reason: str) -> dict[str, Any]:
        """What ``PROGRAM train`` prints: steps, epochs, best monitored figure, why it stopped, seconds."""
        return {
            "steps": self.position.step,
            "epochs": self.position.epoch,
            f"best_valid_{self.family.monitor}": self.best,
            "stopped_by": reason,
            "seconds": round(self.elapsed_s, 1),
        }

    # ----- the loop ----------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Trains until the epochs are done, early stopping, a budget or a stop request; checkpoints."""
        self._metrics = MetricsLog(self.out / "metrics.jsonl") if self.dist.writes else None
        if self.run.tensorboard and self.dist.writes:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a resumed run is about to log again are dropped from the view
            self._board = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.position.step or None)
        try:
            with self.stop:
                reason = self._fit_epochs()
        finally:
            if self._metrics:
                self._metrics.close()
            if self._board:
                self._board.close()
        if self.dist.writes:
            plot_metrics(
                self.out / "metrics.jsonl",
                self.out / "metrics.png",
                title=self.family.title,
                figures=self.family.figures,
            )
        return FitResult(
            reason,
            self.position.epoch,
            self.position.step,
            self.best,
            self.family.monitor,
            self.elapsed_s,
            self.history,
        )

    def _fit_epochs(self) -> str:
        while self.position.epoch < self.run.epochs:
            reason = self.run_epoch()
            if reason:
                if reason != "interrupted" and self.steps_since_validation:
                    self.validate(scheduled=False)
                self.save("last")
                return reason
            stop_early = self.validate(scheduled=True)
            self.position = Position(self.position.epoch + 1, 0, self.position.step)
            self.save("last")
            if stop_early:
                return "early_stopping"
            reason = self._stop_reason()
            if reason:
                return reason
        return "completed"

    def _stop_reason(self) -> str:
        # Stop early enough for the last validation to fit into the budget too. The ranks of a
        # distributed run agree: a signal or the budget seen by one stops all at the same step.
        requested, out_of_time = self.dist.any_of(
            self.stop.requested, self._budget.remaining_s <= self.validation_s
        )
        if requested:
            return "interrupted"
        if out_of_time:
            return "time_budget"
        if self.run.max_steps and self.position.step >= self.run.max_steps:
            return "max_steps"
        return ""

    def run_epoch(self) -> str:
        """Trains the rest of the current epoch; returns a stop reason or "" when the epoch is done.

        The hot loop syncs values only every ``run.log_every`` steps.
        """
        run, pos = self.run, self.position
        if pos.batch == 0:
            self.family.start_epoch(pos.epoch)
        length = self.family.epoch_length(pos.epoch)
        batches = self.family.batches(pos.epoch, pos.batch)
        self.model.train()
        window = _Window()
        bar = Progress(
            length,
            desc=f"epoch {pos.epoch + 1}/{run.epochs}",
            initial=pos.batch,
            disable=None if run.progress and self.dist.writes else True,
            figures=self.family.figures,
        )
        try:
            for batch in batches:
                self._step(batch, window)
                if window.steps == run.log_every:
                    self._log_window(window, bar)
                    window = _Window()
                if self.on_step:
                    self.on_step(self)
                # (the epoch's last batch is followed by the epoch-end validation anyway)
                if run.eval_every and pos.step % run.eval_every == 0 and pos.batch < length:
                    if self.validate(scheduled=True):
                        return "early_stopping"
                    self.model.train()
                if run.checkpoint_every and pos.step % run.checkpoint_every == 0:
                    self.save("last")
                reason = self._stop_reason()
                if reason:
                    return reason
        finally:
            bar.close()
        return ""

    def _step(self, batch: Any, window: _Window) -> None:
        out = self.family.step_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.dist.scale_loss(out.loss).backward()
        clip = self.config.optim.clip  # type: ignore[attr-defined]
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)  # returns the norm before clipping
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.optimizer.step()
        self.schedule.step()
        self.position.batch += 1
        self.position.step += 1
        self.steps_since_validation += 1
        window.loss += out.nll
        window.grad_norm += norm.detach()
        window.steps += 1
        window.tokens += out.tokens

    def _log_window(self, window: _Window, bar: Progress) -> None:
        loss, tokens = self.dist.totals(window.loss, window.tokens)  # the ranks' shares add up
        rate = tokens / (time.perf_counter() - window.start)
        mean = loss / window.steps
        self._log(
            split="train",
            loss=mean,
            grad_norm=float(window.grad_norm) / window.steps,
            tokens_per_s=round(rate, 1),
        )
        bar.update(window.steps, loss=mean, tokens=int(tokens))

    def validate(self, scheduled: bool) -> bool:
        """Validates; saves best.pt on improvement of the monitored metric.

        Scheduled validations (epoch ends, --eval-every) also feed the lr plateau schedule and early
        stopping; an extra one at a stop only updates best.pt, so resume stays exact.
        Returns True when early stopping says stop.
        """
        start = time.perf_counter()
        # every rank validates (no rank waits on another); rank 0's figures decide for all
        result = self.dist.from_rank0(self.family.validate())
        self.validation_s = time.perf_counter() - start
        self.steps_since_validation = 0
        self._log(split="valid", **result)
        score = result[self.family.monitor]
        if (score > self.best) if self.family.maximize else (score < self.best):
            self.best = score
            self.save("best")
        if not scheduled:
            return False
        self.schedule.on_validation(result["loss"])
        return bool(self.early and self.early.update(-score if self.family.maximize else score))

    def _log(self, **values: Any) -> None:
        pos = self.position
        epoch = pos.epoch + pos.batch / max(self.steps_per_epoch, 1)
        record = {"split": values.pop("split"), "step": pos.step, "epoch": round(epoch, 4), **values}
        figures = self.family.figures
        if figures.perplexity:
            record["ppl"] = perplexity(record["loss"])
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["elapsed_s"] = round(self.elapsed_s, 3)
        self.history.append(record)
        if self._metrics:
            self._metrics.write(**record)
        if self._board:
            for key, value in record.items():
                if key not in ("split", "step", "epoch") and isinstance(value, int | float):
                    self._board.add_scalar(f"{record['split']}/{key}", value, pos.step)
        if record["split"] == "valid" and self.dist.writes:
            shown = " ".join(
                f"{figures.loss if k == 'loss' else k} {v:.4f}" for k, v in values.items() if k != "ppl"
            )
            if figures.perplexity:
                shown += f" ppl {record['ppl']:.3f}"
            tqdm.write(f"step {pos.step} epoch {record['epoch']:.2f}: valid {shown}", file=sys.stderr)


# ----- run directories ---------------------------------------------------------------------------
def check_new_run_dir(out: Path) -> None:
    """Refuses an ``out`` that holds a run (rank 0 looks, before any rank writes; all ranks raise)."""

    def check() -> None:
        if (out / "last.pt").exists() or (out / "config.json").exists():
            raise TrainError(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out"
            )
        if out.exists() and not out.is_dir():
            raise TrainError(f"{out} exists and is not a directory")

    distributed.current().on_rank0(check)


def start_run(family: Family, config: Sections, out: str | Path, **trainer_options: Any) -> Trainer:
    """A trainer for a new run in ``out`` (checked by :func:`check_new_run_dir` before the family read its
    data); the directory is created only now, and removed again if the trainer cannot be built."""
    out = Path(out)
    check_new_run_dir(out)
    created = distributed.current().writes and not out.exists()
    if distributed.current().writes:
        out.mkdir(parents=True, exist_ok=True)
    try:
        trainer = Trainer(family, config, out, **trainer_options)
        write_run_files(out, family)
    except BaseException:
        remove_run_files(out, created, family)
        raise
    trainer.created_dir = created
    return trainer


def open_checkpoint(out: Path, kind: str) -> dict[str, Any]:
    if not (out / "last.pt").exists():
        raise TrainError(f"--resume: {out} holds no run (no last.pt); train without --resume first")
    return load_checkpoint(out / "last.pt", kind)


def resume_run(
    family_for: Callable[[Any, dict[str, Any]], Family],
    config_cls: type[Sections],
    kind: str,
    out: str | Path,
    overrides: dict[str, Any],
    **trainer_options: Any,
) -> Trainer:
    """A trainer continuing the run in ``out`` from last.pt, exactly where it stopped.

    ``family_for(config, payload)`` builds the family from the stored tokenizers; ``overrides`` (the
    settings the user gave) may change the ``[run]`` section only (lm.config.resumed_config).
    """
    out = Path(out)
    # rank 0 reads last.pt for every rank: the other nodes need no shared disk
    payload = distributed.current().on_rank0(lambda: open_checkpoint(out, kind))
    try:
        stored = config_cls.from_dict(payload["train_config"], source=str(out / "last.pt"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{out / 'last.pt'}: not a valid {kind} training checkpoint ({exc})") from None
    config = resumed_config(stored, overrides)
    family = family_for(config, payload)
    trainer = Trainer(family, config, out, **trainer_options)
    trainer.restore(payload)
    truncate_metrics(out / "metrics.jsonl", trainer.position.step)
    write_run_files(out, family)
    return trainer


def write_run_files(out: Path, family: Family) -> None:
    if not distributed.current().writes:
        return
    for name, document in family.run_files().items():
        atomic_write_json(out / name, document)


def truncate_metrics(path: Path, step: int) -> None:
    """Drops records logged after the checkpoint a run resumes from (they will be logged again)."""
    if not distributed.current().writes or not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode("utf-8"))


def remove_run_files(out: Path, remove_dir: bool, family: Family | None = None) -> None:
    """Undoes a run that failed before it began: its files, and its directory if the run created it."""
    if not distributed.current().writes:
        return
    if remove_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in (*LOOP_FILES, *(family.run_files() if family else ())):
        (out / name).unlink(missing_ok=True)


def fit_command(trainer: Trainer, resume_hint: str) -> tuple[FitResult, int]:
    """Runs ``trainer.fit()`` for a CLI: a run that stopped before its first checkpoint leaves nothing;
    an interrupted run prints how to resume it. Returns the result and the exit code (ExitCode table)."""
    try:
        result = trainer.fit()
    except BaseException:
        if trainer.saved_step is None:  # nothing resumable yet: leave nothing behind
            remove_run_files(trainer.out, trainer.created_dir, trainer.family)
        raise
    if result.reason == "interrupted" and trainer.dist.writes:
        print(f"interrupted; continue with: {resume_hint}", file=sys.stderr)
        return result, ExitCode.INTERRUPTED
    return result, ExitCode.OK


TRAIN_ONLY = ("out", "resume", "config", "command", "func", *DIST_FLAGS)
"""argparse destinations of a family's ``train`` command that are not config settings."""


def train_command(
    args: Any,
    config_cls: type,
    start_run: Callable[[Any, str], Trainer],
    resume_run: Callable[[str, dict[str, Any]], Trainer],
    program: str,
) -> int:
    """A family's ``PROGRAM train``: a new run (or ``--resume``) from the flags and ``--config FILE.toml``,
    fit, the trainer's summary as one JSON line on stdout; returns the exit code (ExitCode table)."""
    flags = {k: v for k, v in vars(args).items() if k not in TRAIN_ONLY}
    config_file = getattr(args, "config", None)
    if getattr(args, "resume", False):
        trainer = resume_run(args.out, given_settings(config_cls, flags, config_file))
    else:
        trainer = start_run(build_config(config_cls, flags, config_file), args.out)
    result, code = fit_command(trainer, f"{program} train --out {args.out} --resume")
    if trainer.dist.writes:
        print(json.dumps(trainer.summary(result.reason)))
    return code
