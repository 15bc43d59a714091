"""Training configurations: nested dataclasses (data, model, optim, run) whose fields carry their help.

Every training command builds its flags from these classes (:func:`add_config_arguments`), reads
``--config FILE.toml`` into them (:func:`build_config`) and stores them flat in config.json and the
checkpoints (field names are unique across the sections of one config). Precedence: dataclass
defaults < TOML file < command-line flags. The TOML file may use one table per section::

    [data]
    corpus = "timemachine"
    [model]
    hidden = 256
    [optim]
    lr = 0.003
    [run]
    epochs = 10

or flat keys (``hidden = 256``), optionally inside a ``[train]`` table (the older form).

Resume policy: a resumed run may change the fields of its ``run`` section only (budgets, logging,
checkpoint cadence, threads, progress); every other field shapes the data, the model or the
optimisation and changing it is refused with the field's flag name.

The language model's defaults are the ``make train-lm`` recipe: a char-level GRU on The Time Machine
that reaches a good validation perplexity within about five minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from serving.errors import UserError

TOKENIZERS = ("char", "word", "spm")
PARTITIONS = ("sequential", "random")
OPTIMIZERS = ("adamw", "sgd")
DECAYED = ("all", "matrices")
LR_SCHEDULES = ("constant", "cosine", "noam", "plateau")
RUN_SECTION = "run"
DIST_TIMEOUT_S = 300.0
"""Collective timeout of data-parallel training (lm.distributed): a rank that hangs (not one that dies:
gloo sees a closed connection at once) fails the others after this long. Every rank validates itself,
so no rank waits on another's validation."""
DIST_FLAGS = ("nproc", "dist_timeout")
"""argparse destinations of :func:`add_distributed_arguments`: not config settings."""

_Config = TypeVar("_Config")


class ConfigError(UserError, ValueError):
    """An invalid setting or combination of settings; the message is one user-facing line."""


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A config field: its default, its help text, and what :func:`check_fields` and the CLI need."""
    return field(
        default=default, metadata={"help": help, "choices": choices, "min": minimum, "aliases": aliases}
    )


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_fields(obj: Any) -> None:
    """Checks every field against its ``choices`` and ``min`` metadata; raises ConfigError naming the flag."""
    for f in fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{flag(f.name)} must be one of {', '.join(meta['choices'])}, not {value!r}")
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{flag(f.name)} must be >= {meta['min']}, not {value}")


def section_of(cls: type, name: str, doc: str, exclude: tuple[str, ...] = (), **defaults: Any) -> type:
    """A dataclass with the fields of ``cls`` but ``exclude`` (same defaults and help, unless ``defaults``
    overrides them): the model section of a training config is the model's own config minus what the
    data decides (the vocabulary sizes), so its defaults live in one place."""
    specs = []
    for f in fields(cls):
        if f.name in exclude:
            continue
        default = defaults.get(f.name, f.default)
        if default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} has no default; exclude it from the section")
        specs.append((f.name, f.type, field(default=default, metadata=f.metadata)))
    section = make_dataclass(name, specs, namespace={"__post_init__": check_fields, "__doc__": doc})
    section.__module__ = cls.__module__
    return section


def with_defaults(cls: type[_Config], name: str, **defaults: Any) -> type[_Config]:
    """A subclass of the section ``cls`` with other defaults (help text and checks kept): a model family's
    recipe (the translator's optimisation, say) without re-declaring the fields."""
    by_name = {f.name: f for f in fields(cls)}
    specs = [
        (key, by_name[key].type, field(default=value, metadata=by_name[key].metadata))
        for key, value in defaults.items()
    ]
    return make_dataclass(name, specs, bases=(cls,))


@dataclass
class OptimConfig:
    """How the weights move: shapes the run, fixed on resume."""

    optimizer: str = setting("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = setting(3e-3, "peak learning rate", minimum=1e-12)
    weight_decay: float = setting(0.01, "decoupled weight decay (AdamW) or L2 (SGD)", minimum=0)
    weight_decay_on: str = setting(
        "all",
        "which weights decay: all, or matrices only (not biases, norm gains, mamba's A_log, Δ bias, D)",
        choices=DECAYED,
    )
    momentum: float = setting(0.0, "sgd only", minimum=0)
    clip: float = setting(
        1.0, "max global gradient norm (0 = off); the norm before clipping is logged", minimum=0
    )
    lr_schedule: str = setting(
        "plateau", "learning-rate schedule after the warm-up", choices=LR_SCHEDULES, aliases=("--schedule",)
    )
    warmup_steps: int = setting(0, "linear warm-up steps (noam needs >= 1)", minimum=0)
    schedule_steps: int = setting(
        0, "cosine: steps from top to bottom (0 = epochs x steps per epoch)", minimum=0
    )
    seed: int = setting(0, "seeds weight init, batch order and dropout")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lr_schedule == "noam" and self.warmup_steps < 1:
            raise ConfigError("--lr-schedule noam needs --warmup-steps >= 1")


@dataclass
class RunConfig:
    """Run control: how long, how often to validate, log and save; may change on --resume."""

    epochs: int = setting(40, "epochs to train in all", minimum=1)
    max_minutes: float = setting(0.0, "time budget in minutes (0 = none); the run stays resumable", minimum=0)
    max_steps: int = setting(0, "stop after this many optimizer steps in all (0 = none)", minimum=0)
    patience: int = setting(4, "early stopping after N validations without gain (0 = off)", minimum=0)
    min_delta: float = setting(
        0.0, "smallest change of the monitored metric that counts as a gain", minimum=0
    )
    eval_every: int = setting(0, "validate every N steps too (0 = each epoch only)", minimum=0)
    checkpoint_every: int = setting(
        200, "save last.pt every N steps (0 = epoch ends and stops only)", minimum=0
    )
    log_every: int = setting(20, "log the train loss, gradient norm and lr every N steps", minimum=1)
    threads: int = setting(0, "torch intra-op threads (0 = torch's default: all physical cores)", minimum=0)
    progress: bool = setting(True, "progress bar on stderr (loss, tokens/s, ETA)")
    tensorboard: bool = setting(False, "also write TensorBoard event files into RUN_DIR/tensorboard")

    def __post_init__(self) -> None:
        check_fields(self)


class Sections:
    """Mixin of a training config made of section dataclasses (each field of the config is one section)."""

    SECTIONS: ClassVar[tuple[str, ...]] = ("data", "model", "optim", "run")

    def section_of_field(self, name: str) -> str | None:
        for section in self.SECTIONS:
            if any(f.name == name for f in fields(getattr(self, section))):
                return section
        return None

    def to_dict(self) -> dict[str, Any]:
        """The flat form stored in config.json and checkpoints: {field: value} over all sections."""
        return {
            f.name: getattr(getattr(self, s), f.name) for s in self.SECTIONS for f in fields(getattr(self, s))
        }

    def section(self, name: str) -> dict[str, Any]:
        """One section's {field: value} (the model section is its family's network config, less what the
        data decides)."""
        part = getattr(self, name)
        return {f.name: getattr(part, f.name) for f in fields(part)}

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """The TOML form: {section: {field: value}}."""
        return {s: self.section(s) for s in self.SECTIONS}

    @classmethod
    def of(cls, **flat: Any) -> Any:
        """A config from flat keyword arguments (``TrainConfig.of(hidden=32, epochs=2)``)."""
        return cls.from_dict(flat)

    @classmethod
    def section_classes(cls) -> dict[str, type]:
        return {f.name: f.default_factory for f in fields(cls)}  # type: ignore[arg-type, misc]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config", strict: bool = True) -> Any:
        """A config from flat keys or section tables (keys with ``_`` or ``-``, flag aliases accepted).

        ``None`` values keep the default; ``strict=False`` (a stored run's config) skips unknown keys.
        """
        classes = cls.section_classes()
        owner = {f.name: (s, f) for s, c in classes.items() for f in fields(c)}
        aliases = {
            a.removeprefix("--").replace("-", "_"): name
            for name, (_, f) in owner.items()
            for a in f.metadata.get("aliases", ())
        }
        values: dict[str, dict[str, Any]] = {s: {} for s in classes}
        for key, value in _flatten(data, classes).items():
            name = key.replace("-", "_")
            name = aliases.get(name, name)
            if value is None:  # an older run's "no limit"; the default stands
                continue
            if name not in owner:
                if strict:
                    raise ConfigError(f"{source}: unknown setting {key!r}")
                continue
            section, f = owner[name]
            values[section][name] = _coerce(name, value, type(f.default), source)
        try:
            return cls(**{s: c(**values[s]) for s, c in classes.items()})
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _flatten(data: dict[str, Any], classes: dict[str, type]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in classes and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _coerce(name: str, value: Any, kind: type, source: str) -> Any:
    """TOML gives ints where floats are meant (``lr = 1``); anything else of the wrong type is an error."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be a {kind.__name__}, not {value!r}")
    return value


# ----- the language model's config ---------------------------------------------------------------
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
"""Gates of each recurrent cell (its weight matrices stack that many blocks of ``hidden`` rows)."""
PARALLEL_CELLS = ("mamba", "mingru")
CELLS = (*GATES, *PARALLEL_CELLS)
IMPLS = ("fused", "scratch")
PRECISIONS = ("fp32", "bf16")
STATE_NAMES = {"lstm": ("h", "c"), "mamba": ("conv", "ssm")}


@dataclass
class ModelConfig:
    """The network of lm.model.RNNLM. Its defaults are the ``rnnlab-lm train`` recipe (the model section
    below); it lives here, not beside the torch modules, so that the flags build without torch."""

    vocab_size: int
    cell: str = setting("gru", "recurrent cell", choices=CELLS)
    layers: int = setting(2, "stacked recurrent layers")
    embed: int = setting(64, "embedding size")
    hidden: int = setting(256, "hidden state size")
    dropout: float = setting(0.2, "dropout on embeddings, between layers and before the output layer")
    tie: bool = setting(False, "tie output to embedding weights (needs embed == hidden)")
    impl: str = setting("fused", "fused torch modules or the from-scratch cells", choices=IMPLS)
    forget_bias: float = setting(1.0, "LSTM forget-gate bias at init (0 = off)")
    orthogonal: bool = setting(
        True, "orthogonal recurrent weights at init (--no-orthogonal: torch's uniform)"
    )
    # mamba and mingru only (lm/ssm.py, lm/mingru.py)
    state_size: int = setting(16, "mamba: SSM state size N per head")
    expand: int = setting(2, "mamba, mingru: inner (recurrent) width = expand x hidden")
    conv_kernel: int = setting(4, "mamba: causal depthwise convolution width (>= 2)")
    heads: int = setting(4, "mamba: heads, each with its own decay (must divide expand x hidden)")
    ff_mult: int = setting(
        0,
        "mamba, mingru: a residual feed-forward layer of ff_mult x hidden after each block (0: none)",
    )
    precision: str = setting(
        "fp32",
        "mamba, mingru: training matmuls (bf16: autocast; scan, eval, export fp32)",
        choices=PRECISIONS,
    )

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, not {self.impl!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.precision != "fp32" and self.cell not in PARALLEL_CELLS:
            raise ValueError(f"--precision {self.precision} is for mamba and mingru")
        if self.tie and self.embed != self.hidden:
            raise ValueError(f"--tie needs embed == hidden (got embed {self.embed}, hidden {self.hidden})")
        if self.layers < 1 or self.hidden < 1 or self.embed < 1 or self.vocab_size < 1:
            raise ValueError("layers, embed, hidden and vocab_size must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.cell in PARALLEL_CELLS:
            self._check_parallel()
        elif self.ff_mult:
            raise ValueError("--ff-mult is for mamba and mingru")

    def _check_parallel(self) -> None:
        if self.impl != "fused":
            raise ValueError(f"--impl scratch is for rnn/gru/lstm; {self.cell} has one implementation")
        if self.ff_mult < 0:
            raise ValueError(f"--ff-mult must be >= 0, not {self.ff_mult}")
        for name in ("state_size", "expand", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(self, name)}")
        if self.conv_kernel < 2:
            raise ValueError(f"--conv-kernel must be >= 2, not {self.conv_kernel}")
        if self.cell == "mamba" and (self.expand * self.hidden) % self.heads:
            raise ValueError(
                f"--heads ({self.heads}) must divide expand x hidden "
                f"({self.expand} x {self.hidden} = {self.expand * self.hidden})"
            )

    @property
    def state_names(self) -> tuple[str, ...]:
        return STATE_NAMES.get(self.cell, ("h",))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LMDataConfig:
    """The corpus, its tokenizer and how it is cut into batches."""

    corpus: str = setting("timemachine", "registered corpus name (see `rnnlab-lm data list`) or a UTF-8 file")
    tokenizer: str = setting("char", "token unit", choices=TOKENIZERS)
    lowercase: bool = setting(False, "lowercase the text before tokenizing")
    min_freq: int = setting(1, "char/word: rarer tokens become <unk>", minimum=1)
    vocab_size: int = setting(2000, "spm: number of pieces", minimum=1)
    partition: str = setting(
        "sequential", "sequential (state carried across batches) or random windows", choices=PARTITIONS
    )
    bptt: int = setting(64, "truncated BPTT length T", minimum=1)
    batch_size: int = setting(32, "rows per batch B", minimum=1)
    valid_streams: int = setting(
        1, "validate on N pieces of the valid text side by side (faster; 1 = exact)", minimum=1
    )

    def __post_init__(self) -> None:
        check_fields(self)


LMModelConfig = section_of(
    ModelConfig, "LMModelConfig", "The network (ModelConfig).", exclude=("vocab_size",)
)


@dataclass
class TrainConfig(Sections):
    """``rnnlab-lm train``: data, model (ModelConfig without the vocabulary size), optim, run."""

    data: LMDataConfig = field(default_factory=LMDataConfig)
    model: Any = field(default_factory=LMModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        try:
            self.model_config(vocab_size=1)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **self.section("model"))


# ----- files and flags ---------------------------------------------------------------------------
def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML file: section tables and/or flat keys, optionally inside ``[train]``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    return data.get("train", data)


def build_config(cls: type[_Config], flags: dict[str, Any], config_file: str | Path | None = None) -> _Config:
    """defaults < TOML file < ``flags`` (only the flags the user actually gave)."""
    return cls.from_dict(
        given_settings(cls, flags, config_file),  # type: ignore[attr-defined]
        source=str(config_file) if config_file else "config",
    )


def given_settings(cls: type, flags: dict[str, Any], config_file: str | Path | None = None) -> dict[str, Any]:
    """The flat settings the user gave: the TOML file's, then the flags over them."""
    values = _flatten(read_toml(config_file), cls.section_classes()) if config_file else {}  # type: ignore
    values.update(flags)
    return values


def resumed_config(stored: Sections, overrides: dict[str, Any]) -> Any:
    """``stored`` with ``overrides`` applied; a change outside the run section is refused by name."""
    values = stored.to_dict()
    for key, value in overrides.items():
        name = key.replace("-", "_")
        section = stored.section_of_field(name)
        if section is None or section == RUN_SECTION:
            values[name] = value
            continue
        if _coerce(name, value, type(values[name]), "config") != values[name]:
            raise ConfigError(
                f"--resume cannot change {flag(name)} (the run has {values[name]!r}; "
                f"only the [{RUN_SECTION}] settings may change)"
            )
    return type(stored).from_dict(values)


def add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint best|last`` (alias ``--which``, an earlier spelling) into ``args.which``."""
    parser.add_argument(
        "--checkpoint",
        "--which",
        dest="which",
        choices=("best", "last"),
        default="best",
        help="checkpoint of the run (default best)",
    )


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument group per section of ``cls``, one flag per field (help and default from the field).

    Flags default to argparse.SUPPRESS: the namespace holds only what the user gave, so a TOML file
    and a resumed run's stored settings are not overridden by defaults.
    """
    for section, section_cls in cls.section_classes().items():  # type: ignore[attr-defined]
        group = parser.add_argument_group(section, (section_cls.__doc__ or "").strip().split("\n")[0])
        for f in fields(section_cls):
            meta = f.metadata
            names = [flag(f.name), *meta.get("aliases", ())]
            # argparse %-formats help strings: a literal "20%" in a field's help must not break --help.
            help_text = f"{meta.get('help', '')} (default: {f.default})".replace("%", "%%")
            if isinstance(f.default, bool):
                group.add_argument(
                    *names,
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            else:
                group.add_argument(
                    *names,
                    dest=f.name,
                    type=type(f.default),
                    choices=meta.get("choices"),
                    default=argparse.SUPPRESS,
                    help=help_text,
                    metavar=f.name.upper() if not meta.get("choices") else None,
                )


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--nproc`` and ``--dist-timeout`` of a family's ``train`` command (lm.distributed runs them)."""
    group = parser.add_argument_group(
        "distributed", "data-parallel training on torchrun (docs/distributed.md)"
    )
    group.add_argument(
        "--nproc",
        type=int,
        help="train with N processes on this machine: runs this command under torchrun "
        "(python -m torch.distributed.run --standalone --nproc-per-node N); default 1",
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
        help="seconds a collective waits for a silent rank before the run stops "
        f"(default {DIST_TIMEOUT_S:g})",
    )
