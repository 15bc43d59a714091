"""A hand-built ONNX graph for one decode step (T = 1) of a GRU or Elman RNN language model.

onnxruntime's dynamic quantisation has int8 kernels for MatMul and LSTM but none for the GRU and RNN ops,
so an int8 bundle of those cells would keep its recurrent weights (most of the model) in fp32. This graph
spells the step out in Gather/MatMul/elementwise ops, which ``quantize_dynamic`` turns into int8
MatMulInteger. The embedding is folded into layer 0's input projection (a V × gates·H lookup table).

Signature, the step graph's with T fixed to 1: tokens (B, 1) int64, h (L, B, H) -> logits (B, 1, V), h_out.
Only int8 bundles carry it (role "decode"): in fp32 the native GRU op is faster than these MatMuls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lm.model import RNNLM

DECODE_CELLS = ("gru", "rnn_tanh", "rnn_relu")
OPSET = 18
IR_VERSION = 9  # onnx.helper's default is newer than onnxruntime accepts (DESIGN.md pitfalls)


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        self._count += 1
        names = [f"{op_type.lower()}_{self._count}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def rename_output(self, name: str, new: str) -> None:
        """Points the node that produces ``name`` at the graph output name ``new``."""
        for node in self.nodes:
            node.output[:] = [new if o == name else o for o in node.output]


def _linear(b: _Builder, x: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
    """x (B, I) @ weight.T + bias, weight (O, I) -> (B, O)."""
    w = b.const(f"{name}.weight_t", weight.T.astype(np.float32))
    return b.op("Add", b.op("MatMul", x, w), b.const(f"{name}.bias", bias.astype(np.float32)))


def _gru_layer(b: _Builder, gi: str, h: str, w_hh: np.ndarray, b_hh: np.ndarray, k: int) -> str:
    """torch's GRU: r, z from gi + gh; n = tanh(gi_n + r * gh_n); h' = n + z * (h - n)."""
    gh = _linear(b, h, w_hh, b_hh, f"rnn.hh{k}")
    i_r, i_z, i_n = b.op("Split", gi, outputs=3, axis=1, num_outputs=3)
    h_r, h_z, h_n = b.op("Split", gh, outputs=3, axis=1, num_outputs=3)
    r = b.op("Sigmoid", b.op("Add", i_r, h_r))
    z = b.op("Sigmoid", b.op("Add", i_z, h_z))
    n = b.op("Tanh", b.op("Add", i_n, b.op("Mul", r, h_n)))
    return b.op("Add", n, b.op("Mul", z, b.op("Sub", h, n)))


def _rnn_layer(b: _Builder, gi: str, h: str, w_hh: np.ndarray, b_hh: np.ndarray, k: int, act: str) -> str:
    return b.op(act, b.op("Add", gi, _linear(b, h, w_hh, b_hh, f"rnn.hh{k}")))


def build_decode_graph(model: RNNLM, path: Path) -> None:
    """Writes the T = 1 step graph of ``model`` (a GRU or RNN LM, any number of layers) to ``path``."""
    config = model.config
    if config.cell not in DECODE_CELLS:
        raise ValueError(f"no hand-built decode graph for cell {config.cell!r}")
    p = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    rnn = {k.removeprefix("rnn."): v for k, v in p.items() if k.startswith("rnn.")}
    b = _Builder()
    axis0, axis1 = b.const("axis0", np.array([0], np.int64)), b.const("axis1", np.array([1], np.int64))
    # Layer 0's input projection of every token, precomputed: embedding (V, E) @ W_ih0.T + b_ih0.
    table = p["embedding.weight"] @ rnn["weight_ih_l0"].T + rnn["bias_ih_l0"]
    x = b.op("Gather", b.const("input_table", table.astype(np.float32)), b.op("Squeeze", "tokens", axis1))
    layers_h = b.op("Split", "h", outputs=config.layers, axis=0, num_outputs=config.layers) \
        if config.layers > 1 else ["h"]
    new_h = []
    for k in range(config.layers):
        h = b.op("Squeeze", layers_h[k], axis0)
        gi = x if k == 0 else _linear(b, x, rnn[f"weight_ih_l{k}"], rnn[f"bias_ih_l{k}"], f"rnn.ih{k}")
        if config.cell == "gru":
            x = _gru_layer(b, gi, h, rnn[f"weight_hh_l{k}"], rnn[f"bias_hh_l{k}"], k)
        else:
            act = "Tanh" if config.cell == "rnn_tanh" else "Relu"
            x = _rnn_layer(b, gi, h, rnn[f"weight_hh_l{k}"], rnn[f"bias_hh_l{k}"], k, act)
        new_h.append(b.op("Unsqueeze", x, axis0))
    h_out = b.op("Concat", *new_h, axis=0) if config.layers > 1 else b.op("Identity", new_h[0])
    b.rename_output(h_out, "h_out")
    logits = b.op("Unsqueeze", _linear(b, x, p["head.weight"], p["head.bias"], "head"), axis1)
    b.rename_output(logits, "logits")
    graph = helper.make_graph(
        b.nodes, "rnnlab_decode_step",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", 1]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [config.layers, "batch", config.hidden])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, config.vocab_size]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [config.layers, "batch", config.hidden])],
        b.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   ir_version=IR_VERSION)
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))
