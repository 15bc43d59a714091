"""Export a trained language model to an ONNX bundle that onnxruntime runs without torch.

The bundle's step graph maps (tokens (B, T) int64, h (L, B, H) [, c (L, B, H)]) to
(logits (B, T, V), h_out [, c_out]) with dynamic batch and time axes; ``decode.onnx`` is the same step
for T = 1 built from MatMuls (lm/decode_graph.py). Before anything is published both graphs are run in
onnxruntime against the torch model on random and real inputs at several batch sizes and lengths; on
disagreement the export is refused (ExportError with the numbers) and nothing is left at the output
path. Staging, parity, manifest and publication are the shared skeleton's (lm/exporter.py).

The parallel cells (mamba, mingru) carry the state tensors ``RNNLM.state_shapes`` lists instead of h [, c]
(batch on axis 1 for all of them); their decode graph is their one-token recurrent form traced from torch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lm.decode_graph import build_decode_graph
from lm.exporter import (
    PARITY_TOLERANCE,
    BundleWriter,
    ExportError,
    ParityReport,
    Signature,
    created_by,
    declare_state_outputs,
    export_graph,
    max_abs_diff,
    quantize_int8,
    require_parity,
    step_parity,
)
from lm.model import PARALLEL_CELLS, RNNLM, ModelConfig
from serving.bundle import TensorSpec
from serving.tokenizers import Tokenizer, save_tokenizer

__all__ = ["PARITY_TOLERANCE", "ExportError", "ParityReport", "export_lm", "export_run"]

KIND = "lm"
GRAPH_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
PARITY_SHAPES = ((1, 1), (1, 7), (3, 1), (3, 33), (8, 7), (8, 33), (2, 130))  # 130: several chunks
DECODE_SHAPES = ((1, 1), (3, 1), (8, 1))
DECODE_FILE = "decode.onnx"
QUANTIZE_CHOICES = ("int8",)
# A real prompt for the parity check; characters outside the vocabulary map to <unk>, which is fine.
PARITY_TEXT = (
    "The Time Traveller (for so it will be convenient to speak of him) was expounding a "
    "recondite matter to us. His grey eyes shone and twinkled, and his usually pale face "
    "was flushed and animated.\n"
)


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


def signature(model: RNNLM, time: str | int = "time") -> Signature:
    """tokens (batch, time) -> logits (batch, time, V); state h [, c] (L, batch, H) -> h_out [, c_out]
    (the parallel cells: their state tensors, (L, batch, ...))."""
    config = model.config
    return Signature(
        inputs=(TensorSpec("tokens", ("batch", time), "int64"),),
        outputs=(TensorSpec("logits", ("batch", time, config.vocab_size), "float32"),),
        state=tuple(
            TensorSpec(name, (shape[0], "batch", *shape[1:]), "float32", output=f"{name}_out")
            for name, shape in zip(config.state_names, model.state_shapes(), strict=True)
        ),
    )


def export_onnx(model: RNNLM, path: Path, one_token: bool = False) -> None:
    """Writes the step graph of a fused, eval-mode model (native ONNX RNN/GRU/LSTM ops); ``one_token``:
    the T = 1 graph of a parallel cell's recurrent form (its decode graph)."""
    sig = signature(model, 1 if one_token else "time")
    example = (torch.zeros(2, 1 if one_token else 3, dtype=torch.int64), *model.init_state(2))
    export_graph(
        (TokenStepGraph if one_token else StepGraph)(model), example, path, sig.input_specs, sig.output_specs
    )
    declare_state_outputs(path, sig)


def _parity_inputs(
    model: RNNLM, tokenizer: Tokenizer | None, shapes: tuple[tuple[int, int], ...], seed: int = 0
) -> list[tuple[str, Tensor, tuple[Tensor, ...]]]:
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
        state = tuple(
            0.5 * torch.randn(shape[0], batch, *shape[1:], generator=gen) for shape in model.state_shapes()
        )
        cases.append((f"random B={batch} T={time}", tokens, state))
        # Row b reads the prompt from offset 5b, wrapping around: different text per row.
        index = (torch.arange(time)[None, :] + 5 * torch.arange(batch)[:, None]) % len(prompt_ids)
        cases.append((f"prompt B={batch} T={time}", prompt_ids[index], model.init_state(batch)))
    return cases


def check_parity(
    model: RNNLM,
    graph: Path,
    tokenizer: Tokenizer | None = None,
    shapes: tuple[tuple[int, int], ...] = PARITY_SHAPES,
) -> ParityReport:
    """Runs ``graph`` in onnxruntime and ``model`` in torch on the same inputs; max abs differences."""
    names = model.config.state_names
    cases = (
        (label, {"tokens": tokens, **dict(zip(names, state, strict=True))})
        for label, tokens, state in _parity_inputs(model, tokenizer, shapes)
    )
    return step_parity(StepGraph(model).eval(), graph, signature(model), cases, state_diff=_state_difference)


def _state_difference(got: np.ndarray, want: Tensor) -> float:
    """max |got − want|, relative to the state's largest magnitude where that exceeds 1.

    A GRU's h stays in [−1, 1], so this is the absolute difference; a trained mamba's SSM state reaches
    ~50, where float32 sums in another order differ by ~2e-4 (5e-6 relative, measured).
    """
    scale = float(want.abs().max()) if want.numel() else 0.0
    return max_abs_diff(got, want) / max(1.0, scale)


def _quantized(model: RNNLM, graph: Path, tokenizer: Tokenizer, shapes: tuple[tuple[int, int], ...]) -> dict:
    """Replaces the fp32 ``graph`` by its int8 version -> sizes and the int8 graph's distance from torch."""
    fp32 = graph.with_name(graph.stem + ".fp32.onnx")
    graph.rename(fp32)
    quantize_int8(fp32, graph, symbolic_shapes=not model.parallel)
    parity = check_parity(model, graph, tokenizer, shapes)
    if not np.isfinite(parity.worst):
        raise ExportError(f"the int8 {graph.name} produces non-finite outputs ({parity.worst_case})")
    report = {
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": graph.stat().st_size,
        **{f"vs_torch_{k}": v for k, v in parity.to_dict().items()},
    }
    fp32.unlink()
    return report


def _architecture(config: ModelConfig, trained_impl: str) -> dict:
    arch = {
        "type": "rnnlm",
        "cell": config.cell,
        "layers": config.layers,
        "embed": config.embed,
        "hidden": config.hidden,
        "vocab_size": config.vocab_size,
        "tie": config.tie,
        "trained_impl": trained_impl,
        "exported_impl": "fused",
    }
    if config.cell in PARALLEL_CELLS:
        arch |= {
            "state_size": config.state_size,
            "expand": config.expand,
            "conv_kernel": config.conv_kernel,
            "heads": config.heads,
            "ff_mult": config.ff_mult,
        }
    return arch


def export_lm(
    model: RNNLM,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    evaluation: dict | None = None,
    training_config: dict | None = None,
    quantize: str | None = None,
    name: str | None = None,
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
    with BundleWriter(out_dir) as bundle:
        graph, decode = bundle.path(GRAPH_FILE), bundle.path(DECODE_FILE)
        export_onnx(fused, graph)
        parity = require_parity(check_parity(fused, graph, tokenizer, PARITY_SHAPES), "the step graph")
        # A one-token step through onnxruntime's GRU/LSTM/RNN op costs ~1.5x a MatMul-based graph of the
        # same cell: decoding gets a T = 1 graph of its own (lm/decode_graph.py).
        if fused.parallel:  # the blocks' recurrent form, traced from torch
            export_onnx(fused, decode, one_token=True)
        else:
            build_decode_graph(fused, decode)
        decode_parity = require_parity(
            check_parity(fused, decode, tokenizer, DECODE_SHAPES), "the decode graph"
        )
        quantization = None
        if quantize == "int8":
            quantization = {
                "method": "onnxruntime quantize_dynamic, int8 weights, per channel",
                "step": _quantized(fused, graph, tokenizer, PARITY_SHAPES),
                "decode": _quantized(fused, decode, tokenizer, DECODE_SHAPES),
            }
        save_tokenizer(tokenizer, bundle.path(TOKENIZER_FILE))
        return bundle.publish(
            {
                "kind": KIND,
                "name": name or out_dir.name,
                "architecture": _architecture(fused.config, model.config.impl),
                "graphs": {"step": GRAPH_FILE, "decode": DECODE_FILE},
                **signature(fused).manifest_fields(),
                "special_ids": tokenizer.special_ids,
                "tokenizer": TOKENIZER_FILE,
                "evaluation": evaluation,
                "training_config": training_config,
                "parity": parity,
                "quantization": quantization,
                "created_by": created_by("rnnlab lm.export"),
                "decode_parity": decode_parity,
            }
        )


def export_run(run_dir: str | Path, out_dir: str | Path, quantize: str | None = None) -> Path:
    """Exports the best checkpoint of a training run directory (config, tokenizer, eval.json with it)."""
    from lm.run import load_run

    run = load_run(run_dir)
    return export_lm(
        run.model,
        run.tokenizer,
        out_dir,
        evaluation=run.evaluation,
        training_config=run.train_config,
        quantize=quantize,
    )
