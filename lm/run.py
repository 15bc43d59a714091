"""Loading a trained run directory: the model of best.pt (or last.pt), its tokenizer and configs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm.checkpoint import CheckpointError, load_checkpoint
from lm.model import RNNLM, ModelConfig
from serving.tokenizers import Tokenizer, tokenizer_from_dict

CHECKPOINTS = ("best", "last")


@dataclass
class LoadedRun:
    model: RNNLM  # in eval mode
    tokenizer: Tokenizer
    model_config: ModelConfig
    train_config: dict[str, Any]
    evaluation: dict[str, Any] | None
    checkpoint: Path


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """RUN_DIR/{which}.pt; "best" falls back to last.pt for a run stopped before its first validation."""
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {', '.join(CHECKPOINTS)}, not {which!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    for name in (which, "last") if which == "best" else (which,):
        if (run_dir / f"{name}.pt").is_file():
            return run_dir / f"{name}.pt"
    raise CheckpointError(f"{run_dir}: not a run directory (no {which}.pt)")


def load_run(run_dir: str | Path, which: str = "best") -> LoadedRun:
    """The model and tokenizer of a run; raises CheckpointError naming the file on any mismatch."""
    path = checkpoint_path(run_dir, which)
    payload = load_checkpoint(path, "lm")
    try:
        model_config = ModelConfig(**payload["model_config"])
        tokenizer = tokenizer_from_dict(payload["tokenizer"])
        model = RNNLM(model_config)
        model.load_state_dict(payload["model"])
        train_config = dict(payload.get("train_config") or {})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a valid lm checkpoint ({reason})") from None
    if tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens, the model {model_config.vocab_size}"
        )
    model.eval()
    return LoadedRun(model, tokenizer, model_config, train_config, read_evaluation(Path(run_dir)), path)


def read_evaluation(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
