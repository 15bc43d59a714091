"""Export a trained language model to an ONNX bundle that onnxruntime runs without torch.

The bundle's step graph maps (tokens (B, T) int64, h (L, B, H) [, c (L, B, H)]) to
(logits (B, T, V), h_out [, c_out]) with dynamic batch and time axes; the mamba and mingru cells carry
the state tensors ``RNNLM.state_shapes`` lists instead (batch on axis 1 for all of them). Before anything
is published the exported graph is run in onnxruntime against the torch model on random and real inputs
at several batch sizes and lengths; on disagreement the export is refused (ExportError with the numbers)
and nothing is left at the output path.
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from lm.decode_graph import build_decode_graph
from lm.model import PARALLEL_CELLS, RNNLM, ModelConfig
from serving.bundle import publish_bundle, staging_dir, write_manifest
from serving.errors import UserError
from serving.runtime import open_session
from serving.tokenizers import Tokenizer, save_tokenizer

OPSET = 17
GRAPH_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
PARITY_TOLERANCE = 1e-4
PARITY_SHAPES = ((1, 1), (1, 7), (3, 1), (3, 33), (8, 7), (8, 33), (2, 130))  # 130: several chunks
DECODE_SHAPES = ((1, 1), (3, 1), (8, 1))
DECODE_FILE = "decode.onnx"
QUANTIZE_CHOICES = ("int8",)
# A real prompt for the parity check; characters outside the vocabulary map to <unk>, which is fine.
PARITY_TEXT = ("The Time Traveller (for so it will be convenient to speak of him) was expounding a "
               "recondite matter to us. His grey eyes shone and twinkled, and his usually pale face "
               "was flushed and animated.\n")


class ExportError(UserError):
    """The model could not be exported faithfully; the message says why (with the measured numbers)."""


@dataclass
class ParityReport:
    """Worst difference between onnxruntime and torch over all checked inputs: absolute on the logits,
    on the state relative to its magnitude where that exceeds 1 (``_state_difference``)."""

    max_abs_logits: float
    max_abs_state: float
    worst_case: str
    cases: int

    @property
    def worst(self) -> float:
        return max(self.max_abs_logits, self.max_abs_state)

    def to_dict(self) -> dict:
        return {"max_abs_logits": self.max_abs_logits, "max_abs_state": self.max_abs_state,
                "worst_case": self.worst_case, "cases": self.cases}


class StepGraph(nn.Module):
    """The exported signature: tokens and each state tensor as separate inputs and outputs."""

    def __init__(self, model: RNNLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """tokens: (B, T) int64, state: h [, c] each (L, B, H) -> (logits (B, T, V), h_out [, c_out])."""
        logits, new_state = self.model(tokens, tuple(state))
        return (logits, *new_state)


class TokenStepGraph(StepGraph):
    """The one-token signature of a parallel cell: its recurrent form (``RNNLM.step``), T = 1."""

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new_state = self.model.step(tokens, tuple(state))
        return (logits, *new_state)


def fused_copy(model: RNNLM) -> RNNLM:
    """An eval-mode model of the same class with the fused (natively exportable) RNN and the same weights.

    ScratchRNN keeps nn.GRU/LSTM/RNN's parameter names, so the state dict loads unchanged.
    """
    config = replace(model.config, impl="fused")
    fused = type(model)(config)
    fused.load_state_dict(model.state_dict())
    return fused.eval()


def state_output_names(config: ModelConfig) -> list[str]:
    return [f"{name}_out" for name in config.state_names]


def export_onnx(model: RNNLM, path: Path, opset: int = OPSET, one_token: bool = False) -> None:
    """Writes the step graph of a fused, eval-mode model with the legacy (TorchScript) exporter.

    The legacy exporter emits the native ONNX RNN/GRU/LSTM ops with dynamic batch and time, and its
    graph runs faster than the dynamo export's. ``one_token``: the T = 1 graph of a parallel cell's
    recurrent form (its decode graph).
    """
    config = model.config
    names = list(config.state_names)
    outputs = state_output_names(config)
    example_tokens = torch.zeros(2, 1 if one_token else 3, dtype=torch.int64)
    example_state = model.init_state(2)
    time_axis = {} if one_token else {1: "time"}
    dynamic_axes = {"tokens": {0: "batch", **time_axis}, "logits": {0: "batch", **time_axis}}
    dynamic_axes |= {name: {1: "batch"} for name in names + outputs}
    graph = (TokenStepGraph if one_token else StepGraph)(model).eval()
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and RNN batch-size warnings
        torch.onnx.export(graph, (example_tokens, *example_state), str(path), dynamo=False,
                          opset_version=opset, input_names=["tokens", *names],
                          output_names=["logits", *outputs], dynamic_axes=dynamic_axes)
    _declare_state_outputs(path, dict(zip(outputs, names, strict=True)))
    onnx.checker.check_model(str(path))


def _declare_state_outputs(path: Path, inputs_of: dict[str, str]) -> None:
    """Gives each state output its input's declared shape: the exporter cannot infer the static size of a
    slice of a window whose length depends on T (mamba's convolution state)."""
    graph = onnx.load(str(path))
    shapes = {v.name: v.type.tensor_type.shape for v in graph.graph.input}
    for value in graph.graph.output:
        if value.name in inputs_of:
            value.type.tensor_type.shape.CopyFrom(shapes[inputs_of[value.name]])
    onnx.save(graph, str(path))


def _parity_inputs(model: RNNLM, tokenizer: Tokenizer | None, shapes: tuple[tuple[int, int], ...],
                   seed: int = 0) -> list[tuple[str, Tensor, tuple[Tensor, ...]]]:
    """(label, tokens (B, T), state) cases: random ids and states, and a real prompt from a zero state."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    prompt = tokenizer.encode(PARITY_TEXT) if tokenizer is not None else []
    if len(prompt) < 2:
        prompt = torch.randint(0, config.vocab_size, (64,), generator=gen).tolist()
    prompt_ids = torch.tensor(prompt, dtype=torch.int64)
    cases = []
    for batch, time in shapes:
        tokens = torch.randint(0, config.vocab_size, (batch, time), generator=gen)
        state = tuple(0.5 * torch.randn(shape[0], batch, *shape[1:], generator=gen)
                      for shape in model.state_shapes())
        cases.append((f"random B={batch} T={time}", tokens, state))
        # Row b reads the prompt from offset 5b, wrapping around: different text per row.
        index = (torch.arange(time)[None, :] + 5 * torch.arange(batch)[:, None]) % len(prompt_ids)
        cases.append((f"prompt B={batch} T={time}", prompt_ids[index], model.init_state(batch)))
    return cases


def _state_difference(got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want|, relative to the state's largest magnitude where that exceeds 1.

    A GRU's h stays in [−1, 1], so this is the absolute difference; a trained mamba's SSM state reaches
    ~50, where float32 sums in another order differ by ~2e-4 (5e-6 relative, measured).
    """
    return float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))


def check_parity(model: RNNLM, graph: Path, tokenizer: Tokenizer | None = None,
                 shapes: tuple[tuple[int, int], ...] = PARITY_SHAPES) -> ParityReport:
    """Runs ``graph`` in onnxruntime and ``model`` in torch on the same inputs; max abs differences."""
    session = open_session(graph)
    names = list(model.config.state_names)
    worst_logits = worst_state = 0.0
    worst_case, worst = "", -1.0
    cases = _parity_inputs(model, tokenizer, shapes)
    for label, tokens, state in cases:
        with torch.no_grad():
            logits, new_state = model(tokens, state)
        feed = {"tokens": tokens.numpy(), **{n: s.numpy() for n, s in zip(names, state, strict=True)}}
        got = session.run(None, feed)
        d_logits = float(np.abs(got[0] - logits.numpy()).max())
        d_state = max(_state_difference(g, s.numpy()) for g, s in zip(got[1:], new_state, strict=True))
        if not (np.isfinite(d_logits) and np.isfinite(d_state)):
            d_logits = d_state = float("inf")
        worst_logits, worst_state = max(worst_logits, d_logits), max(worst_state, d_state)
        if max(d_logits, d_state) > worst:
            worst, worst_case = max(d_logits, d_state), label
    return ParityReport(worst_logits, worst_state, worst_case, len(cases))


def _checked(model: RNNLM, graph: Path, tokenizer: Tokenizer, shapes: tuple[tuple[int, int], ...],
             what: str) -> ParityReport:
    """Parity of an fp32 graph with torch, or ExportError with the measured differences."""
    parity = check_parity(model, graph, tokenizer, shapes)
    if not parity.worst <= PARITY_TOLERANCE:
        raise ExportError(
            f"onnxruntime and torch disagree on {what}: max abs difference {parity.max_abs_logits:.3g} on "
            f"logits, {parity.max_abs_state:.3g} on the state (worst: {parity.worst_case}; tolerance "
            f"{PARITY_TOLERANCE:g}); bundle not written")
    return parity


def _quantized(model: RNNLM, graph: Path, tokenizer: Tokenizer, shapes: tuple[tuple[int, int], ...]) -> dict:
    """Replaces the fp32 ``graph`` by its int8 version -> sizes and the int8 graph's distance from torch."""
    fp32 = graph.with_name(graph.stem + ".fp32.onnx")
    graph.rename(fp32)
    quantize_int8(fp32, graph, symbolic_shapes=not model.parallel)
    parity = check_parity(model, graph, tokenizer, shapes)
    if not np.isfinite(parity.worst):
        raise ExportError(f"the int8 {graph.name} produces non-finite outputs ({parity.worst_case})")
    report = {"fp32_bytes": fp32.stat().st_size, "int8_bytes": graph.stat().st_size,
              **{f"vs_torch_{k}": v for k, v in parity.to_dict().items()}}
    fp32.unlink()
    return report


def quantize_int8(src: Path, dst: Path, symbolic_shapes: bool = True) -> None:
    """Dynamic int8 quantisation of the weights (MatMul/Gemm, LSTM; ORT leaves GRU and RNN ops in fp32).

    On the decode graph every weight is a MatMul and becomes MatMulInteger. (MatMulNBits, weight-only
    int8 in blocks, was measured too: 15% faster at batch 1 but 3x slower at batch 64 on this CPU.)

    quant_pre_process (shape inference + optimisation) runs first, or quantize_dynamic skips ops it
    cannot see the shapes of. ``symbolic_shapes=False`` for the parallel cells: onnxruntime's symbolic
    shape inference fails on their padded chunks (and then leaves temporary files in the working
    directory); ONNX's own shape inference still sees every MatMul's weight.
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


def _architecture(config: ModelConfig, trained_impl: str) -> dict:
    arch = {"type": "rnnlm", "cell": config.cell, "layers": config.layers, "embed": config.embed,
            "hidden": config.hidden, "vocab_size": config.vocab_size, "tie": config.tie,
            "trained_impl": trained_impl, "exported_impl": "fused"}
    if config.cell in PARALLEL_CELLS:
        arch |= {"state_size": config.state_size, "expand": config.expand, "conv_kernel": config.conv_kernel,
                 "heads": config.heads}
    return arch


def _manifest(model: RNNLM, tokenizer: Tokenizer, name: str, evaluation: dict | None,
              training_config: dict | None, parity: ParityReport, quantization: dict | None,
              trained_impl: str, graphs: dict[str, str]) -> dict:
    config = model.config
    state = [{"name": n, "output": o, "shape": [shape[0], "batch", *shape[1:]], "dtype": "float32"}
             for n, o, shape in zip(config.state_names, state_output_names(config), model.state_shapes(),
                                    strict=True)]
    return {
        "kind": "lm", "name": name, "architecture": _architecture(config, trained_impl),
        "graphs": graphs,
        "inputs": [{"name": "tokens", "shape": ["batch", "time"], "dtype": "int64"},
                   *({"name": s["name"], "shape": s["shape"], "dtype": s["dtype"]} for s in state)],
        "outputs": [{"name": "logits", "shape": ["batch", "time", config.vocab_size], "dtype": "float32"},
                    *({"name": s["output"], "shape": s["shape"], "dtype": s["dtype"]} for s in state)],
        "state": state, "special_ids": tokenizer.special_ids, "tokenizer": TOKENIZER_FILE,
        "evaluation": evaluation, "training_config": training_config,
        "parity": {"tolerance": PARITY_TOLERANCE, **parity.to_dict()}, "quantization": quantization,
        "created_by": {"tool": "rnnlab lm.export", "exporter": "torch.onnx (dynamo=False)", "opset": OPSET,
                       "torch": torch.__version__, "onnx": onnx.__version__},
    }


def export_lm(model: RNNLM, tokenizer: Tokenizer, out_dir: str | Path, *, evaluation: dict | None = None,
              training_config: dict | None = None, quantize: str | None = None, name: str | None = None,
              ) -> Path:
    """Exports ``model`` and ``tokenizer`` as a bundle at ``out_dir`` (replacing a bundle already there).

    Raises ExportError when onnxruntime and torch differ by more than 1e-4 on any parity case; then
    nothing is written at ``out_dir``.
    """
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {quantize!r}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ExportError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    out_dir = Path(out_dir)
    fused = fused_copy(model)
    with staging_dir(out_dir) as tmp:
        graph = tmp / GRAPH_FILE
        export_onnx(fused, graph)
        parity = _checked(fused, graph, tokenizer, PARITY_SHAPES, "the step graph")
        graphs = {"step": GRAPH_FILE}
        # A one-token step through onnxruntime's GRU/LSTM/RNN op costs ~1.5x a MatMul-based graph of the
        # same cell: decoding gets a T = 1 graph of its own (lm/decode_graph.py).
        decode = tmp / DECODE_FILE
        if fused.parallel:  # the blocks' recurrent form, exported from torch
            export_onnx(fused, decode, one_token=True)
        else:
            build_decode_graph(fused, decode)
        decode_parity = _checked(fused, decode, tokenizer, DECODE_SHAPES, "the decode graph")
        graphs["decode"] = DECODE_FILE
        quantization = None
        if quantize == "int8":
            quantization = {"method": "onnxruntime quantize_dynamic, int8 weights, per channel",
                            "step": _quantized(fused, graph, tokenizer, PARITY_SHAPES),
                            "decode": _quantized(fused, decode, tokenizer, DECODE_SHAPES)}
        save_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
        manifest = _manifest(fused, tokenizer, name or out_dir.name, evaluation, training_config, parity,
                             quantization, model.config.impl, graphs)
        manifest["decode_parity"] = {"tolerance": PARITY_TOLERANCE, **decode_parity.to_dict()}
        write_manifest(tmp, manifest)
        return publish_bundle(tmp, out_dir)


def export_run(run_dir: str | Path, out_dir: str | Path, quantize: str | None = None) -> Path:
    """Exports the best checkpoint of a training run directory (config, tokenizer, eval.json with it)."""
    from lm.run import load_run

    run = load_run(run_dir)
    return export_lm(run.model, run.tokenizer, out_dir, evaluation=run.evaluation,
                     training_config=run.train_config, quantize=quantize)

