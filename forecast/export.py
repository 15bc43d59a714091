"""Export a trained forecaster to an ONNX bundle (kind "forecast") that serving.forecast_runtime runs.

Every model reads a window of the last W standardised observations (the MLP of the notes: its τ lags; the
recurrent regressors: W steps from a zero state, read relative to the window's last value), so a stream's
whole state is that window. The step graph takes any number of new observations and the window, and
returns the forecast read from the updated window:

    values (B, T, D), window (B, W, D)  ->  mean (B, H, D), sigma (B, H, D), window_out (B, W, D)

all float32 in standardised units (sigma is exp of the head's log sigma); window_out is the last W rows
of window ++ values, so T observations cost one call whatever T is. The manifest's ``forecast`` object holds
what the runtime needs around the graph: the columns, the transform (when there is one) and the
standardisation fitted on the training part, W,
H, the interval (90%: mean ± z·sigma) and the last W observations of the training series (``history``),
so that ``rnnlab-ts forecast BUNDLE`` forecasts after the series' end as ``rnnlab-ts forecast RUN`` does.
The graph is checked against torch (lm.exporter.step_parity, 1e-4) before anything is published.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from forecast.evaluate import LoadedRun, load_run, rolling_origin
from forecast.model import Z90, Forecaster
from lm.exporter import (
    BundleWriter,
    ParityReport,
    Signature,
    created_by,
    declare_outputs,
    export_graph,
    require_parity,
    step_parity,
)
from serving.bundle import TensorSpec

KIND = "forecast"
GRAPH_FILE = "model.onnx"
PARITY_BATCHES = (1, 3, 8)


class StepGraph(nn.Module):
    """The exported step: new observations into the window, the forecast from the updated window."""

    def __init__(self, model: Forecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, values: Tensor, window: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """values: (B, T, D), window: (B, W, D) -> mean, sigma (B, H, D), window_out (B, W, D)."""
        updated = torch.cat([window, values], dim=1)[:, -self.model.config.window :]
        mean, log_sigma = self.model(updated)
        return mean, torch.exp(log_sigma), updated


def signature(model: Forecaster) -> Signature:
    c = model.config
    return Signature(
        inputs=(TensorSpec("values", ("batch", "time", c.inputs), "float32"),),
        outputs=(
            TensorSpec("mean", ("batch", c.horizon, c.inputs), "float32"),
            TensorSpec("sigma", ("batch", c.horizon, c.inputs), "float32"),
        ),
        state=(TensorSpec("window", ("batch", c.window, c.inputs), "float32", output="window_out"),),
    )


Case = tuple[str, dict[str, Tensor]]


def _parity_cases(model: Forecaster, scaled: np.ndarray, seed: int = 0) -> list[Case]:
    """Random windows and observations at several batch sizes and lengths (1, 2, W, W + 3), and windows of
    the real series read one observation at a time."""
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for batch in PARITY_BATCHES:
        for time in sorted({1, 2, c.window, c.window + 3}):
            feed = {
                "values": torch.randn(batch, time, c.inputs, generator=gen),
                "window": torch.randn(batch, c.window, c.inputs, generator=gen),
            }
            cases.append((f"random B={batch} T={time}", feed))
    series = torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))
    starts = np.linspace(0, len(series) - c.window - 1, num=min(8, len(series) - c.window), dtype=np.int64)
    windows = torch.stack([series[s : s + c.window] for s in starts])
    values = torch.stack([series[s + c.window : s + c.window + 1] for s in starts])
    cases.append((f"series B={len(starts)} T=1", {"values": values, "window": windows}))
    return cases


def check_parity(model: Forecaster, graph: Path, scaled: np.ndarray) -> ParityReport:
    """onnxruntime against torch on the parity cases -> the max abs differences (standardised units)."""
    return step_parity(StepGraph(model).eval(), graph, signature(model), _parity_cases(model, scaled))


def _forecast_section(run: LoadedRun) -> dict:
    """The manifest's forecast object; ``transform`` only when there is one (absent = none, as in the
    bundles from before the transform, which load unchanged)."""
    p, c = run.prepared, run.model.config
    transform = {} if p.transform.name == "none" else {"transform": p.transform.to_dict()}
    return {
        **transform,
        "columns": list(p.series.columns),
        "scaler": {"mean": list(p.scaler.mean), "std": list(p.scaler.std)},
        "window": c.window,
        "horizon": c.horizon,
        "interval": {"level": 0.9, "z": Z90},
        "season": p.preset.season,
        "time_column": run.config.data.series_time_column(),
        "history": {
            "values": p.series.values[-c.window :].tolist(),
            "times": p.series.times[-c.window :],
        },
    }


def _architecture(model: Forecaster) -> dict:
    c = model.config
    return {
        "type": "forecaster",
        "model": c.model,
        "hidden": c.hidden,
        "layers": c.layers,
        "inputs": c.inputs,
        "window": c.window,
        "horizon": c.horizon,
        "relative": c.relative,
        "ar": c.ar,
        "members": c.members,
    }


def export_forecaster(run: LoadedRun, out_dir: str | Path, name: str | None = None) -> Path:
    """Exports a loaded run's model as a bundle at ``out_dir`` (replacing a bundle already there); raises
    lm.exporter.ExportError, leaving nothing at ``out_dir``, when onnxruntime and torch differ by more than
    1e-4 on any parity case."""
    out_dir = Path(out_dir)
    model = run.model.eval()
    sig = signature(model)
    c = model.config
    example = (torch.zeros(2, 1, c.inputs), torch.zeros(2, c.window, c.inputs))
    with BundleWriter(out_dir) as bundle:
        graph = bundle.path(GRAPH_FILE)
        export_graph(StepGraph(model), example, graph, sig.input_specs, sig.output_specs)
        declare_outputs(graph, sig.output_specs)
        parity = require_parity(check_parity(model, graph, run.prepared.scaled), "the step graph")
        evaluation = {k: v for k, v in rolling_origin(run).items() if k != "per_step_mae"}
        return bundle.publish(
            {
                "kind": KIND,
                "name": name or out_dir.name,
                "architecture": _architecture(model),
                "graphs": {"step": GRAPH_FILE},
                **sig.manifest_fields(),
                "tokenizer": None,
                "forecast": _forecast_section(run),
                "evaluation": {"split": "test", "rolling_origin": evaluation},
                "training_config": run.config.to_dict(),
                "parity": parity,
                "created_by": created_by("rnnlab forecast.export"),
            }
        )


def export_run(run_dir: str | Path, out_dir: str | Path, which: str = "best") -> Path:
    """Exports checkpoint ``which`` (best or last) of a run directory."""
    return export_forecaster(load_run(run_dir, which), out_dir)
