"""Training-loop policies: learning-rate schedules, early stopping, a wall-clock budget.

Every object here has ``state_dict``/``load_state_dict`` holding plain numbers only, so it resumes
from a checkpoint loaded with ``weights_only=True``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from lm.config import LR_SCHEDULES


class EarlyStopping:
    """Stops when the monitored metric (lower is better) has not improved by ``min_delta`` for
    ``patience`` consecutive updates."""

    def __init__(self, patience: int = 3, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError("patience must be at least 1")
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_updates = 0

    def update(self, metric: float) -> bool:
        """Records one validation result; True means: stop training now."""
        if metric < self.best - self.min_delta:
            self.best = metric
            self.bad_updates = 0
        else:
            self.bad_updates += 1
        return self.bad_updates >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad_updates": self.bad_updates}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = float(state["best"])
        self.bad_updates = int(state["bad_updates"])


class TimeBudget:
    """A wall-clock budget in minutes (None = unlimited), measured from construction.

    ``already_spent_s`` carries the time used before a resume.
    """

    def __init__(self, max_minutes: float | None, already_spent_s: float = 0.0) -> None:
        self.max_minutes = max_minutes
        self._start = time.monotonic() - already_spent_s

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    @property
    def remaining_s(self) -> float:
        if self.max_minutes is None:
            return math.inf
        return max(0.0, self.max_minutes * 60.0 - self.elapsed_s)

    def exceeded(self) -> bool:
        return self.max_minutes is not None and self.elapsed_s >= self.max_minutes * 60.0


class LRSchedule:
    """Sets each parameter group's lr to ``base_lr * factor``; call :meth:`step` after every optimizer
    step and :meth:`on_validation` after every validation (only "plateau" acts on the latter).

    Factors, with ``w = warmup_steps`` and ``s`` the number of optimizer steps taken so far:
    - warm-up (all kinds, when w > 0): ``(s + 1) / w`` for ``s < w``, a linear ramp to the base lr;
    - "constant": 1 after warm-up;
    - "cosine": from 1 down to ``min_lr_ratio`` along half a cosine between w and ``total_steps``;
    - "noam": ``sqrt(w / (s + 1))`` after warm-up (inverse square-root decay, needs w > 0);
    - "plateau": 1 after warm-up, times ``plateau_factor`` each time validation loss has not improved
      for ``plateau_patience`` validations (never below ``min_lr_ratio``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        *,
        min_lr_ratio: float = 0.0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 1,
        plateau_threshold: float = 1e-4,
    ) -> None:
        if kind not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if kind == "cosine" and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError("the cosine schedule needs total_steps greater than warmup_steps")
        if kind == "noam" and warmup_steps <= 0:
            raise ValueError("the noam schedule needs warmup_steps > 0")
        self.optimizer = optimizer
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.plateau_factor = plateau_factor
        self.plateau_patience = plateau_patience
        self.plateau_threshold = plateau_threshold
        self.base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base
        self.steps = 0
        self.plateau_scale = 1.0
        self.best_metric = math.inf
        self.bad_validations = 0
        self._apply()

    def factor(self) -> float:
        s, w = self.steps, self.warmup_steps
        if s < w:
            return (s + 1) / w
        if self.kind == "cosine":
            assert self.total_steps is not None
            progress = min(1.0, (s - w) / (self.total_steps - w))
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "noam":
            return math.sqrt(w / (s + 1))
        if self.kind == "plateau":
            return self.plateau_scale
        return 1.0

    @property
    def last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        factor = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def on_validation(self, metric: float) -> None:
        if self.kind != "plateau":
            return
        if metric < self.best_metric - self.plateau_threshold:
            self.best_metric = metric
            self.bad_validations = 0
            return
        self.bad_validations += 1
        if self.bad_validations >= self.plateau_patience:
            self.plateau_scale = max(self.min_lr_ratio, self.plateau_scale * self.plateau_factor)
            self.bad_validations = 0
            self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "steps": self.steps,
            "plateau_scale": self.plateau_scale,
            "best_metric": self.best_metric,
            "bad_validations": self.bad_validations,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"schedule state is for {state['kind']!r}, not {self.kind!r}")
        self.steps = int(state["steps"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best_metric = float(state["best_metric"])
        self.bad_validations = int(state["bad_validations"])
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        self._apply()


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    **options: float,
) -> LRSchedule:
    """The schedule ``kind`` (one of LR_SCHEDULES) over ``optimizer``; options as in :class:`LRSchedule`."""
    return LRSchedule(optimizer, kind, warmup_steps, total_steps, **options)
