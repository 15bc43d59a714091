"""The training configuration: one typed dataclass, filled from defaults, a TOML file, then flags.

Precedence: dataclass defaults < ``--config FILE.toml`` < command-line flags. The defaults are the
``make train-lm`` recipe: a char-level GRU on The Time Machine that reaches a good validation
perplexity within about five minutes on two CPU cores.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from lm.model import CELLS, IMPLS, ModelConfig
from lm.schedule import LR_SCHEDULES
from serving.errors import UserError

TOKENIZERS = ("char", "word", "spm")
PARTITIONS = ("sequential", "random")
OPTIMIZERS = ("adamw", "sgd")

# Fields that only steer one invocation (how long, how often to log or save); a resumed run may change
# them. Every other field shapes the data, the model or the optimisation, and is fixed by the run.
RUN_CONTROL_FIELDS = frozenset({
    "epochs", "max_minutes", "max_steps", "patience", "min_delta", "eval_every", "checkpoint_every",
    "log_every", "threads", "progress",
})


_Config = TypeVar("_Config")


def project(cls: type[_Config], source: object, **given: Any) -> _Config:
    """The dataclass ``cls`` with each field from ``given``, else from ``source``'s attribute of that
    name, else its own default: a flat command-line config hands out its part by field name."""
    values = {f.name: given[f.name] if f.name in given else getattr(source, f.name)
              for f in fields(cls) if f.init and (f.name in given or hasattr(source, f.name))}
    return cls(**values)


class ConfigError(UserError, ValueError):
    """An invalid setting or combination of settings; the message is one user-facing line."""


@dataclass
class TrainConfig:
    # data
    corpus: str = "timemachine"
    tokenizer: str = "char"
    lowercase: bool = False
    min_freq: int = 1
    vocab_size: int = 2000
    # model
    cell: str = "gru"
    layers: int = 2
    embed: int = 64
    hidden: int = 256
    dropout: float = 0.2
    tie: bool = False
    impl: str = "fused"
    forget_bias: float = 1.0
    orthogonal: bool = True
    # mamba and mingru (see lm/ssm.py, lm/mingru.py)
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    heads: int = 4
    # batches
    partition: str = "sequential"
    bptt: int = 64
    batch_size: int = 32
    # optimisation
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    momentum: float = 0.0
    clip: float = 1.0
    lr_schedule: str = "plateau"
    warmup_steps: int = 0
    schedule_steps: int = 0  # cosine: steps from the top to the bottom (0 = epochs x steps per epoch)
    # run control
    epochs: int = 40
    max_minutes: float = 0.0
    max_steps: int = 0
    patience: int = 4
    min_delta: float = 0.0
    eval_every: int = 0
    valid_streams: int = 1  # >1: validate on that many pieces of the valid text side by side (faster)
    checkpoint_every: int = 200
    log_every: int = 20
    seed: int = 0
    # One thread: on a shared CPU two spinning OpenMP threads per process lose far more (2-8x, measured
    # here) than a second thread gains on an idle machine (~1.4x).
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        choices = {"tokenizer": TOKENIZERS, "cell": CELLS, "impl": IMPLS, "partition": PARTITIONS,
                   "optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{_flag(name)} must be one of {', '.join(allowed)}, "
                                  f"not {getattr(self, name)!r}")
        positive = ("bptt", "batch_size", "valid_streams", "layers", "embed", "hidden", "epochs", "min_freq",
                    "vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1, not {getattr(self, name)}")
        non_negative = ("max_minutes", "max_steps", "patience", "eval_every", "checkpoint_every",
                        "warmup_steps", "schedule_steps", "clip", "weight_decay", "momentum", "threads",
                        "min_delta")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, not {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"--log-every must be >= 1, not {self.log_every}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, not {self.lr}")
        try:
            self.model_config(vocab_size=1)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def model_config(self, vocab_size: int) -> ModelConfig:
        return project(ModelConfig, self, vocab_size=vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Builds a config from ``data`` (keys with ``_`` or ``-``); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            values[name] = _coerce(name, value, type(getattr(cls, name)), source)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, value: Any, kind: type, source: str) -> Any:
    """TOML gives ints where floats are meant (``lr = 1``); anything else of the wrong type is an error."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be a {kind.__name__}, not {value!r}")
    return value


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML file: top-level keys, or those of a ``[train]`` table."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    return data.get("train", data)


def build_config(flags: dict[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """defaults < TOML file < ``flags`` (only the flags the user actually gave)."""
    values = dict(read_toml(config_file)) if config_file else {}
    values.update(flags)
    return TrainConfig.from_dict(values, source=str(config_file) if config_file else "config")
