"""Running an exported forecaster bundle (kind "forecast") with onnxruntime alone (no torch).

The step graph (forecast/export.py) maps (values (B, T, D), window (B, W, D)) to (mean (B, H, D),
sigma (B, H, D), window_out (B, W, D)), all float32 in standardised units. A stream's whole state is its
window: the last W standardised observations, so an observation costs one pass over W values whatever the
stream's length. ``step`` is the batched primitive the server's batcher calls; ``forecast`` adds the
forecasts beyond the model's H steps, made recursively as forecast.evaluate does (the one-step mean fed
back as the next observation; sigma beyond H repeats the H-th), and ``forecast_history`` is the
single-series convenience behind ``rnnlab-ts forecast BUNDLE``. Values come in and go out in the series'
own units; standardisation is float64 numpy with the scaler stored in the manifest, as in training, after
the manifest's ``transform`` (serving.transforms; absent in bundles from before it: none). Forecasts and
both interval ends are mapped back through the transform's inverse, as forecast.evaluate does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.bundle import BundleError, Manifest, load_manifest
from serving.runtime import _check_session_tensor, _raw_run, open_session
from serving.transforms import Transform, TransformError

KIND = "forecast"


@dataclass(frozen=True)
class Forecast:
    """Forecasts of B series, each (B, h, D) in the series' units: mean and the interval lower..upper."""

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    sigma: np.ndarray

    def rows(self, row: int = 0) -> list[dict]:
        """One series' steps as JSON-ready dicts {"step", "mean", "lo90", "hi90"} (rnnlab-ts forecast)."""
        return [
            {
                "step": h + 1,
                "mean": self.mean[row, h].tolist(),
                "lo90": self.lower[row, h].tolist(),
                "hi90": self.upper[row, h].tolist(),
            }
            for h in range(self.mean.shape[1])
        ]


def _section(manifest: Manifest) -> dict:
    """The manifest's ``forecast`` object, checked: columns, scaler, window, horizon, interval."""
    where = manifest.where
    spec = manifest.data.get("forecast")
    if not isinstance(spec, dict):
        raise BundleError(f"{where}: no 'forecast' object")
    columns = spec.get("columns")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise BundleError(f"{where}: forecast.columns must be a non-empty list of names")
    for key in ("window", "horizon"):
        if not isinstance(spec.get(key), int) or spec[key] < 1:
            raise BundleError(f"{where}: forecast.{key} missing or invalid")
    scaler = spec.get("scaler") or {}
    for key in ("mean", "std"):
        values = scaler.get(key)
        if not isinstance(values, list) or len(values) != len(columns):
            raise BundleError(f"{where}: forecast.scaler.{key} must hold one number per column")
        if not np.all(np.isfinite(np.asarray(values, dtype=np.float64))):
            raise BundleError(f"{where}: forecast.scaler.{key} holds a non-finite number")
    if not min(scaler["std"]) > 0:
        raise BundleError(f"{where}: forecast.scaler.std must be positive")
    z = (spec.get("interval") or {}).get("z")
    if not isinstance(z, int | float) or not 0 < z < 10:
        raise BundleError(f"{where}: forecast.interval.z missing or invalid")
    try:
        transform = Transform.from_dict(spec.get("transform"))
    except TransformError as e:
        raise BundleError(f"{where}: forecast.transform: {e}") from None
    if transform.lam and len(transform.lam) != len(columns):
        raise BundleError(f"{where}: forecast.transform.lambda must hold one number per column")
    return spec


class ForecastRuntime:
    """A loaded forecast bundle: one ORT session over the step graph, and the scaler around it."""

    def __init__(self, manifest: Manifest, session, threads: int = 1) -> None:
        spec = _section(manifest)
        self.manifest = manifest
        self.session = session
        self.threads = threads
        self.columns: list[str] = list(spec["columns"])
        self.width = len(self.columns)
        self.window = int(spec["window"])
        self.horizon = int(spec["horizon"])
        self.level = float(spec["interval"].get("level", 0.9))
        self.z = float(spec["interval"]["z"])
        self.mean = np.asarray(spec["scaler"]["mean"], dtype=np.float64)
        self.std = np.asarray(spec["scaler"]["std"], dtype=np.float64)
        self.transform = Transform.from_dict(spec.get("transform"))  # bundles from before: none
        self.history = spec.get("history") or {}
        self.time_column = str(spec.get("time_column", "time"))
        self.model = str(manifest.architecture.get("model", ""))
        self._run = _raw_run(session)
        self._outputs = ["mean", "sigma", "window_out"]

    @classmethod
    def load(cls, bundle_dir: str | Path, threads: int = 1) -> ForecastRuntime:
        """Verifies the bundle (checksums, the forecast object, the graph's tensors) and opens it."""
        manifest = load_manifest(bundle_dir)
        if manifest.kind != KIND:
            raise BundleError(f"{manifest.path}: a {manifest.kind!r} bundle, not a forecaster")
        graph = manifest.graph("step")
        runtime = cls(manifest, open_session(graph, threads), threads)
        runtime._check_graph(graph)
        return runtime

    def _check_graph(self, path: Path) -> None:
        """The graph's tensors are values (B, T, D), window (B, W, D) -> mean, sigma (B, H, D), window_out."""
        d, w, h = self.width, self.window, self.horizon
        want = {
            "input": {"values": ("batch", "time", d), "window": ("batch", w, d)},
            "output": {"mean": ("batch", h, d), "sigma": ("batch", h, d), "window_out": ("batch", w, d)},
        }
        for kind, args in (("input", self.session.get_inputs()), ("output", self.session.get_outputs())):
            have = {a.name: a for a in args}
            if set(have) != set(want[kind]):
                raise BundleError(f"{path}: graph {kind}s {sorted(have)} are not {sorted(want[kind])}")
            for name, shape in want[kind].items():
                _check_session_tensor(kind, have[name], shape, "float32", path)

    # -- units ---------------------------------------------------------------------------------------

    def standardise(self, values: np.ndarray) -> np.ndarray:
        """values: (N, D) in the series' units, inside the transform's domain (callers check it once,
        naming the row: ``forecast_history`` here, the service's ``read_observations``) -> float32
        transformed and standardised (float64 arithmetic)."""
        values = np.asarray(values, dtype=np.float64)
        return ((self.transform.forward(values) - self.mean) / self.std).astype(np.float32)

    def to_units(self, standardised: np.ndarray) -> np.ndarray:
        """(..., D) standardised (transformed) values -> the series' units (monotone: interval endpoints
        map to interval endpoints)."""
        return self.transform.inverse(standardised.astype(np.float64) * self.std + self.mean)

    def init_state(self, batch: int) -> np.ndarray:
        """An empty window (B, W, D): a stream forecasts once it has read W observations."""
        return np.zeros((batch, self.window, self.width), dtype=np.float32)

    @property
    def state_bytes(self) -> int:
        return self.window * self.width * 4

    # -- the batched primitive -----------------------------------------------------------------------

    def step(self, values: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """values: (B, T, D), window: (B, W, D) float32 standardised -> mean, sigma (B, H, D), window'."""
        if values.ndim != 3 or values.shape[0] != window.shape[0] or values.shape[2] != self.width:
            raise ValueError(f"values: expected (batch, time, {self.width}), got {values.shape}")
        if window.shape[1:] != (self.window, self.width) or window.dtype != np.float32:
            want = (self.window, self.width)
            raise ValueError(f"window: expected float32 (batch, *{want}), got {window.dtype} {window.shape}")
        mean, sigma, updated = self._run(self._outputs, {"values": values, "window": window}, None)
        return mean, sigma, updated

    def forecast(
        self, values: np.ndarray, window: np.ndarray, horizon: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reads values (B, T, D) into the windows (B, W, D) -> (window', mean, sigma (B, horizon, D)),
        standardised. Steps beyond H are recursive: one more call over the batch per step."""
        mean, sigma, updated = self.step(values, window)
        if horizon <= self.horizon:
            return updated, mean[:, :horizon], sigma[:, :horizon]
        steps, current = [mean[:, 0]], updated
        for _ in range(horizon - 1):
            one, _, current = self.step(steps[-1][:, None], current)
            steps.append(one[:, 0])
        tail = np.stack(steps, axis=1)[:, self.horizon :]
        extra = np.repeat(sigma[:, -1:], horizon - self.horizon, axis=1)
        return updated, np.concatenate([mean, tail], axis=1), np.concatenate([sigma, extra], axis=1)

    def in_units(self, mean: np.ndarray, sigma: np.ndarray) -> Forecast:
        """Standardised mean, sigma (B, h, D) -> the forecast in the series' units with its interval: the
        endpoints mean -+ z sigma mapped back; ``sigma`` of the result is the interval's half-width over z
        (sigma times the scaler's std without a transform)."""
        mean, half = mean.astype(np.float64), self.z * sigma.astype(np.float64)
        lower, upper = self.to_units(mean - half), self.to_units(mean + half)
        return Forecast(self.to_units(mean), lower, upper, (upper - lower) / (2 * self.z))

    # -- single-series convenience ---------------------------------------------------------------------

    def forecast_history(self, history: np.ndarray | None, horizon: int) -> Forecast:
        """The next ``horizon`` values after ``history`` (N >= W, D) in the series' units (None: the
        training series' last W observations, stored in the bundle)."""
        if history is None:
            history = np.asarray(self.history.get("values") or [], dtype=np.float64)
        history = np.asarray(history, dtype=np.float64).reshape(-1, self.width)
        if len(history) < self.window:
            raise ValueError(f"the history has {len(history)} points; the model reads {self.window}")
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, not {horizon}")
        start = len(history) - self.window  # only the last W are read; rows are named in the history
        self.transform.check(history[start:], self.columns, first_row=start + 1)
        values = self.standardise(history[start:])[None]
        _, mean, sigma = self.forecast(values, self.init_state(1), horizon)
        return self.in_units(mean, sigma)
