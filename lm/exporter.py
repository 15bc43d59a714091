"""The exporter skeleton every model family's export is built on: graphs, parity, manifest, publication.

A family's exporter (lm/export.py, seq2seq/export.py) adds only its graphs and its checks; staging, the
graph export, the parity report with the measured differences, the manifest with the sha256 of every
file and the atomic publication are here, once. The bundle format itself (manifest fields, reading and
verifying) is ``serving.bundle``, which is torch-free; docs/export.md describes both.

The steps, for a family whose graph is one step with recurrent state in and out (the language model's
step graph; a forecaster's step is the same shape)::

    signature = Signature(
        inputs=(TensorSpec("values", ("batch", "time", 3), "float32"),),
        outputs=(TensorSpec("mean", ("batch", "time", 3), "float32"),),
        state=(TensorSpec("h", (layers, "batch", hidden), "float32", output="h_out"),))
    with BundleWriter(out_dir) as bundle:                    # a hidden staging dir beside out_dir
        export_graph(step_module, example_args, bundle.path("model.onnx"), signature)
        report = step_parity(step_module, bundle.path("model.onnx"), signature, cases)
        parity = require_parity(report, "the step graph")    # ExportError above PARITY_TOLERANCE
        ...write tokenizers or scalers with bundle.path(name)...
        bundle.publish({"kind": KIND, "name": ..., "architecture": {...}, "graphs": {"step": "model.onnx"},
                        **signature.manifest_fields(), "special_ids": {...}, "tokenizer": ...,
                        "evaluation": ..., "training_config": ..., "parity": parity,
                        "created_by": created_by("rnnlab forecast.export")})

- ``step_module(*inputs, *state) -> (*outputs, *next_state)`` in the signature's order, eval mode.
- ``cases``: ``(label, {input name: tensor})`` pairs covering several batch sizes and lengths, random
  and real data (lm/export.py's ``_parity_inputs`` is an example); the report keeps the worst case's
  label and the max abs difference per output, states together as "state".
- ``publish`` writes ``manifest.json`` (format, version, the sha256 and size of every file) and renames
  the staging dir to ``out_dir``; on any exception before it nothing is left at ``out_dir``. A family
  whose checks need the staged bundle loaded (the translator's search check) calls
  ``bundle.write_manifest`` first. A new ``kind`` is added to ``serving.bundle.KINDS``.

tests/lm/test_exporter.py is such a family in ~35 lines (a GRU forecaster over float features).

Families with a different graph shape (the translator's encoder and top-k decoder step) use
``export_graph``, ``ParityMeter``/``max_abs_diff`` and ``require_parity`` with their own comparison.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from serving.bundle import TensorSpec, publish_bundle, staging_dir, write_manifest
from serving.errors import UserError
from serving.runtime import open_session

OPSET = 17
# The largest max-abs difference between onnxruntime and torch that an export accepts. Measured
# differences on real fp32 exports are ~1e-7; a wrong graph (dropout left on, a frozen branch) is off by
# ~1e-2 or more.
PARITY_TOLERANCE = 1e-4


class ExportError(UserError):
    """The model could not be exported faithfully; the message says why (with the measured numbers)."""


@dataclass(frozen=True)
class Signature:
    """A graph's inputs, outputs and recurrent state; shapes hold ints and symbolic (dynamic) axis names.

    The graph takes ``(*inputs, *state)`` and returns ``(*outputs, *next state)``; each state tensor's
    ``output`` names the output carrying its next value.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: tuple[TensorSpec, ...] = ()

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return (*self.inputs, *self.state)

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        return (
            *self.outputs,
            *(TensorSpec(s.output or f"{s.name}_out", s.shape, s.dtype) for s in self.state),
        )

    def manifest_fields(self) -> dict:
        """``inputs``, ``outputs`` and ``state`` as the manifest records them (docs/export.md)."""
        return {
            "inputs": [_tensor(t) for t in self.input_specs],
            "outputs": [_tensor(t) for t in self.output_specs],
            "state": [
                {"name": s.name, "output": s.output, **_tensor(s, with_name=False)} for s in self.state
            ],
        }


def _tensor(spec: TensorSpec, with_name: bool = True) -> dict:
    return {**({"name": spec.name} if with_name else {}), "shape": list(spec.shape), "dtype": spec.dtype}


def dynamic_axes(specs: Iterable[TensorSpec]) -> dict[str, dict[int, str]]:
    """The exporter's dynamic axes: every symbolic dimension of every tensor, by name."""
    axes = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}
    return {name: dims for name, dims in axes.items() if dims}


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences file descriptor 2: the TorchScript exporter's C++ warnings (PackPadded shapes)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def export_graph(
    module: nn.Module,
    args: tuple,
    path: Path,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    opset: int = OPSET,
) -> None:
    """Writes ``module(*args)`` as an ONNX graph with the legacy (TorchScript) exporter, then checks it.

    The legacy exporter, not the dynamo one: it emits the native ONNX RNN/GRU/LSTM ops with dynamic
    batch and time, turns packed sequences into the GRU op's ``sequence_lens``, and its graphs ran
    faster; the dynamo exporter froze a bidirectional GRU's time axis to the example's length.
    """
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), _quiet_stderr(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation, RNN batch-size and PackPadded shape warnings
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_axes=dynamic_axes([*inputs, *outputs]),
        )
    onnx.checker.check_model(str(path))


def declare_state_outputs(path: Path, sig: Signature) -> None:
    """Gives each state output its input's declared shape: the exporter cannot infer the static size of a
    slice of a window whose length depends on T (mamba's convolution state, a forecaster's window)."""
    graph = onnx.load(str(path))
    shapes = {v.name: v.type.tensor_type.shape for v in graph.graph.input}
    outputs = {spec.output: spec.name for spec in sig.state}
    for value in graph.graph.output:
        if value.name in outputs:
            value.type.tensor_type.shape.CopyFrom(shapes[outputs[value.name]])
    onnx.save(graph, str(path))


def declare_outputs(path: Path, specs: Sequence[TensorSpec]) -> None:
    """Writes the signature's shapes onto the graph's outputs (ints fixed, names symbolic): the exporter
    leaves a size it cannot infer as a made-up symbol (a forecaster ensemble's mean over its members gave
    ``ReduceMeanmean_dim_1`` for the horizon), which the runtimes' checks against the manifest refuse."""
    graph = onnx.load(str(path))
    shapes = {spec.name: spec.shape for spec in specs}
    for value in graph.graph.output:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[value.name]:
                dim = dims.add()
                if isinstance(size, str):
                    dim.dim_param = size
                else:
                    dim.dim_value = size
    onnx.save(graph, str(path))


def created_by(tool: str) -> dict:
    """The manifest's ``created_by``: the exporting tool and the versions that made the graphs."""
    return {
        "tool": tool,
        "exporter": "torch.onnx (dynamo=False)",
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }


@dataclass
class ParityReport:
    """Worst absolute difference between onnxruntime and torch per kind of tensor, over ``cases`` inputs.

    ``max_abs``: {kind: difference}, e.g. {"logits": 3e-8, "state": 1e-7}; ``labels`` says what each kind
    is in messages ("the state").
    """

    max_abs: dict[str, float]
    labels: dict[str, str]
    worst_case: str
    cases: int

    @property
    def worst(self) -> float:
        return max(self.max_abs.values(), default=0.0)

    def to_dict(self) -> dict:
        return {
            **{f"max_abs_{kind}": value for kind, value in self.max_abs.items()},
            "worst_case": self.worst_case,
            "cases": self.cases,
        }

    def describe(self) -> str:
        return ", ".join(f"{value:.3g} on {self.labels[kind]}" for kind, value in self.max_abs.items())


class ParityMeter:
    """Collects the per-case differences into a ParityReport: ``meter.case(label, logits=d1, state=d2)``."""

    def __init__(self, **labels: str) -> None:
        self.labels = labels
        self.max_abs = dict.fromkeys(labels, 0.0)
        self.worst_case, self._worst, self.cases = "", -1.0, 0

    def case(self, label: str, **diffs: float) -> None:
        for kind, value in diffs.items():
            self.max_abs[kind] = max(self.max_abs[kind], value)
        self.cases += 1
        if max(diffs.values()) > self._worst:
            self._worst, self.worst_case = max(diffs.values()), label

    def report(self) -> ParityReport:
        return ParityReport(dict(self.max_abs), self.labels, self.worst_case, self.cases)


def max_abs_diff(got: np.ndarray, want: Tensor | np.ndarray) -> float:
    """max |got - want| in float64; inf when the shapes differ or a value is not finite; 0 when empty."""
    want_np = want.numpy() if isinstance(want, Tensor) else want
    if got.shape != want_np.shape:
        return float("inf")
    if not got.size:
        return 0.0
    diff = np.abs(got.astype(np.float64) - want_np.astype(np.float64))
    return float(diff.max()) if np.isfinite(diff).all() else float("inf")


def step_parity(
    module: nn.Module,
    graph: Path,
    signature: Signature,
    cases: Iterable[tuple[str, dict[str, Tensor]]],
    state_diff: Callable[[np.ndarray, Tensor], float] = max_abs_diff,
) -> ParityReport:
    """Runs ``graph`` in onnxruntime and ``module`` in torch on each case's inputs (by name); the max abs
    difference per output ("state" for all state outputs together, measured by ``state_diff``: a family
    whose state grows large may measure it relative to its magnitude)."""
    session = open_session(graph)
    kinds = [s.name for s in signature.outputs] + ["state"] * len(signature.state)
    meter = ParityMeter(
        **{s.name: s.name for s in signature.outputs}, **({"state": "the state"} if signature.state else {})
    )
    names = [s.name for s in signature.input_specs]
    for label, feed in cases:
        with torch.no_grad():
            want = module(*(feed[n] for n in names))
        got = session.run([s.name for s in signature.output_specs], {n: feed[n].numpy() for n in names})
        diffs: dict[str, float] = {}
        for kind, g, w in zip(kinds, got, want, strict=True):
            diff = state_diff(g, w) if kind == "state" else max_abs_diff(g, w)
            diffs[kind] = max(diffs.get(kind, 0.0), diff)
        meter.case(label, **diffs)
    return meter.report()


def require_parity(report: ParityReport, what: str, tolerance: float = PARITY_TOLERANCE) -> dict:
    """The manifest's record of a parity check ({"tolerance", "max_abs_...", "worst_case", "cases"}), or
    ExportError with the measured differences when any exceeds ``tolerance``."""
    if not report.worst <= tolerance:
        raise ExportError(
            f"onnxruntime and torch disagree on {what}: max abs difference {report.describe()} "
            f"(worst: {report.worst_case}; tolerance {tolerance:g}); bundle not written"
        )
    return {"tolerance": tolerance, **report.to_dict()}


def quantize_int8(src: Path, dst: Path, symbolic_shapes: bool = True) -> None:
    """Dynamic int8 quantisation of the weights (MatMul/Gemm, LSTM; ORT leaves GRU and RNN ops in fp32).

    On a graph of MatMuls (lm/decode_graph.py) every weight becomes MatMulInteger. (MatMulNBits,
    weight-only int8 in blocks, was measured too: 15% faster at batch 1 but 3x slower at batch 64 on
    this CPU.) quant_pre_process (shape inference + optimisation) runs first, or quantize_dynamic skips
    ops it cannot see the shapes of. ``symbolic_shapes=False`` for the parallel LM cells: onnxruntime's
    symbolic shape inference fails on their padded chunks (and then leaves temporary files in the
    working directory); ONNX's own shape inference still sees every MatMul's weight.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.stem + ".pre.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice through the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=not symbolic_shapes)
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    pre.unlink()


class BundleWriter(AbstractContextManager):
    """A bundle being written: files go into a hidden staging dir beside ``out_dir`` (``.NAME.tmp-*``),
    which ``publish`` renames to ``out_dir``; leaving the ``with`` block without publishing removes it."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._staging = staging_dir(self.out_dir)
        self.dir = Path()

    def __enter__(self) -> BundleWriter:
        self.dir = self._staging.__enter__()
        return self

    def __exit__(self, *exc_info) -> bool | None:
        return self._staging.__exit__(*exc_info)

    def path(self, relpath: str) -> Path:
        """Where the bundle file ``relpath`` is written while staged."""
        return self.dir / relpath

    def write_manifest(self, manifest: dict) -> Path:
        """Writes the staged manifest (format, version, sha256 and size of every file staged so far)."""
        return write_manifest(self.dir, manifest)

    def publish(self, manifest: dict) -> Path:
        """Writes the manifest and moves the bundle to ``out_dir`` atomically (an old bundle there is
        replaced; any other non-empty directory is refused) -> ``out_dir``."""
        self.write_manifest(manifest)
        return publish_bundle(self.dir, self.out_dir)
