"""The forecasters' settings, torch-free: the network (``ForecastConfig``) and ``rnnlab-ts train``'s
config sections (data, model, optim, run). ``rnnlab-ts`` builds its flags from them without importing
torch, so that ``rnnlab-ts forecast BUNDLE`` runs on the serving install (``pip install '.[serve]'``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from forecast.data import PRESETS
from lm.config import (
    PARALLEL_CELLS,
    ConfigError,
    ModelConfig,
    OptimConfig,
    RunConfig,
    Sections,
    check_fields,
    section_of,
    setting,
    with_defaults,
)
from serving.transforms import TRANSFORMS

MODELS = ("mlp", "rnn", "gru", "lstm", *PARALLEL_CELLS)


def _as_lm(name: str) -> Any:
    """The language model's setting ``name`` (lm.config.ModelConfig: its default and help, held once)."""
    lm = next(f for f in fields(ModelConfig) if f.name == name)
    return field(default=lm.default, metadata=lm.metadata)


@dataclass
class ForecastConfig:
    """The network of forecast.model.Forecaster (stored in checkpoints and bundles as a dict)."""

    model: str = setting("gru", "network reading the window", choices=MODELS)
    hidden: int = setting(32, "hidden units (002's MLP: 10)", minimum=1)
    layers: int = setting(1, "recurrent layers (the MLP has one hidden layer)", minimum=1)
    inputs: int = setting(1, "values per time step (columns)", minimum=1)
    window: int = setting(4, "past values read per forecast", minimum=1)
    horizon: int = setting(1, "steps forecast at once (direct multi-horizon)", minimum=1)
    relative: bool = setting(
        True,
        "read the window relative to its last value and forecast the change "
        "(a trending series leaves the training range)",
    )
    ar: int = setting(
        0,
        "lags a linear autoregressive skip reads beside the network (LSTNet's highway; 0 = off)",
        minimum=0,
    )
    members: int = setting(1, "networks trained side by side and averaged (a seed ensemble)", minimum=1)
    # mamba and mingru only (lm/ssm.py, lm/mingru.py), as rnnlab-lm train's
    state_size: int = _as_lm("state_size")
    expand: int = _as_lm("expand")
    conv_kernel: int = _as_lm("conv_kernel")
    heads: int = _as_lm("heads")

    def __post_init__(self) -> None:
        if self.ar > self.window:
            raise ConfigError(f"--ar {self.ar} reads more values than the window of {self.window}")
        if self.model in PARALLEL_CELLS:
            try:  # the language model's checks of the same settings
                ModelConfig(1, self.model, self.layers, self.hidden, self.hidden, 0.0, **self.cell_settings())
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    def cell_settings(self) -> dict[str, int]:
        """The parallel cells' settings (state_size, expand, conv_kernel, heads) by name."""
        return {k: getattr(self, k) for k in ("state_size", "expand", "conv_kernel", "heads")}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TSDataConfig:
    """The series, its split and its windows."""

    dataset: str = setting("sine-d2l", "preset series; ignored with --csv", choices=tuple(PRESETS))
    csv: str = setting("", "a CSV file with a header instead of a preset")
    time_column: str = setting("time", "--csv: the time column (strictly increasing)")
    value_column: str = setting("value", "--csv: value column(s), comma-separated (several = multivariate)")
    test: int = setting(
        0, "points at the end held out as the test horizon (0 = the preset's; --csv: 20%)", minimum=0
    )
    season: int = setting(0, "seasonal period of the MASE scale (0 = the preset's; --csv: 1)", minimum=0)
    window: int = setting(0, "past values per forecast (0 = the preset's; --csv: 8)", minimum=0)
    horizon: int = setting(1, "steps forecast at once", minimum=1)
    ar: int = setting(
        -1,
        "lags of the linear autoregressive skip beside the network (-1 = the preset's; --csv: 0 = off)",
        minimum=-1,
    )
    batch_size: int = setting(0, "windows per batch (0 = the preset's; --csv: 16)", minimum=0)
    fit_valid: bool = setting(
        False,
        "also train on the validation part: a final refit after a first run chose the epochs "
        "(pass its best epoch as --epochs, --patience 0, and its interval scale as --interval-scale)",
    )
    interval_scale: float = setting(
        0.0, "fixed factor on sigma (0 = calibrated on the validation part at each validation)", minimum=0
    )
    transform: str = setting(
        "none",
        "variance-stabilising transform modelled instead of the values (boxcox: lambda fitted on the "
        "training part; log and boxcox need positive values, sqrt non-negative); forecasts and intervals "
        "are mapped back",
        choices=TRANSFORMS,
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def series_time_column(self) -> str:
        """The time column of the series' CSV (a preset's own, or --time-column)."""
        source = PRESETS[self.dataset].source
        return source[1] if source and not self.csv else self.time_column

    def columns(self) -> list[str]:
        return [c.strip() for c in self.value_column.split(",") if c.strip()]


TSModelConfig = section_of(
    ForecastConfig,
    "TSModelConfig",
    "The network (ForecastConfig).",
    exclude=("inputs", "window", "horizon", "ar"),
)
LOSSES = ("nll", "mse")


@dataclass
class TSOptimConfig(OptimConfig):
    """How the weights move (lm.config.OptimConfig) and the loss."""

    lr: float = setting(1e-2, "peak learning rate", minimum=1e-12)
    weight_decay: float = setting(0.0, "decoupled weight decay (AdamW) or L2 (SGD)", minimum=0)
    loss: str = setting(
        "nll",
        "nll: Gaussian NLL of mean and sigma; mse: the notes' MSE on the mean (sigma learns from the "
        "NLL of the detached mean)",
        choices=LOSSES,
    )


# log_every 5: the loop logs train records within an epoch only, and sine-rnn has 9 batches an epoch
# (with 10, its metrics.png had no train curve at all)
TSRunConfig = with_defaults(RunConfig, "TSRunConfig", epochs=60, patience=8, log_every=5, max_minutes=5.0)


@dataclass
class TrainConfig(Sections):
    """``rnnlab-ts train``: data, model, optim, run."""

    data: TSDataConfig = field(default_factory=TSDataConfig)
    model: Any = field(default_factory=TSModelConfig)
    optim: Any = field(default_factory=TSOptimConfig)
    run: Any = field(default_factory=TSRunConfig)

    def __post_init__(self) -> None:
        if self.model.model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)}")
