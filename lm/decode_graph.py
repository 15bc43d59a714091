"""A hand-built ONNX graph for one decode step (T = 1) of a language model, any cell and depth.

onnxruntime's GRU/LSTM/RNN ops are built for long sequences: for a single token they cost ~1.5x the same
step spelt out in Gather/MatMul/elementwise ops. The spelt-out graph also lets int8 export quantise every
weight matrix (MatMulInteger, see lm/export.py), which onnxruntime cannot do inside the GRU and RNN ops.
The embedding is folded into layer 0's input projection (a V × gates·H lookup table), so layer 0 reads
one table row instead of a gates·H × E matrix per token.

Signature, the step graph's with T fixed to 1:
tokens (B, 1) int64, h (L, B, H) [, c (L, B, H)] -> logits (B, 1, V), h_out [, c_out].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lm.model import RNNLM

OPSET = 18
IR_VERSION = 9  # onnx.helper writes a newer IR version than onnxruntime loads (docs/export.md)


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


def _lstm_layer(b: _Builder, gi: str, h: str, c: str, w_hh: np.ndarray, b_hh: np.ndarray, k: int,
                ) -> tuple[str, str]:
    """torch's LSTM, gates in order i, f, g, o: c' = f * c + i * g; h' = o * tanh(c')."""
    gates = b.op("Add", gi, _linear(b, h, w_hh, b_hh, f"rnn.hh{k}"))
    i, f, g, o = b.op("Split", gates, outputs=4, axis=1, num_outputs=4)
    c_new = b.op("Add", b.op("Mul", b.op("Sigmoid", f), c), b.op("Mul", b.op("Sigmoid", i), b.op("Tanh", g)))
    return b.op("Mul", b.op("Sigmoid", o), b.op("Tanh", c_new)), c_new


def _split_layers(b: _Builder, state: str, layers: int, axis0: str) -> list[str]:
    """(L, B, H) -> L tensors of (B, H)."""
    parts = b.op("Split", state, outputs=layers, axis=0, num_outputs=layers) if layers > 1 else [state]
    return [b.op("Squeeze", part, axis0) for part in parts]


def _stack_layers(b: _Builder, per_layer: list[str], axis0: str, name: str) -> None:
    """L tensors of (B, H) -> the graph output ``name``, (L, B, H)."""
    stacked = [b.op("Unsqueeze", x, axis0) for x in per_layer]
    b.rename_output(b.op("Concat", *stacked, axis=0) if len(stacked) > 1 else b.op("Identity", stacked[0]),
                    name)


def build_decode_graph(model: RNNLM, path: Path) -> None:
    """Writes the T = 1 step graph of ``model`` (any cell, any number of layers) to ``path``."""
    config = model.config
    p = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    rnn = {k.removeprefix("rnn."): v for k, v in p.items() if k.startswith("rnn.")}
    b = _Builder()
    axis0, axis1 = b.const("axis0", np.array([0], np.int64)), b.const("axis1", np.array([1], np.int64))
    # Layer 0's input projection of every token, precomputed: embedding (V, E) @ W_ih0.T + b_ih0.
    table = p["embedding.weight"] @ rnn["weight_ih_l0"].T + rnn["bias_ih_l0"]
    x = b.op("Gather", b.const("input_table", table.astype(np.float32)), b.op("Squeeze", "tokens", axis1))
    hs = _split_layers(b, "h", config.layers, axis0)
    cs = _split_layers(b, "c", config.layers, axis0) if config.cell == "lstm" else []
    new_h, new_c = [], []
    for k in range(config.layers):
        gi = x if k == 0 else _linear(b, x, rnn[f"weight_ih_l{k}"], rnn[f"bias_ih_l{k}"], f"rnn.ih{k}")
        w_hh, b_hh = rnn[f"weight_hh_l{k}"], rnn[f"bias_hh_l{k}"]
        if config.cell == "lstm":
            x, c = _lstm_layer(b, gi, hs[k], cs[k], w_hh, b_hh, k)
            new_c.append(c)
        elif config.cell == "gru":
            x = _gru_layer(b, gi, hs[k], w_hh, b_hh, k)
        else:
            x = _rnn_layer(b, gi, hs[k], w_hh, b_hh, k, "Tanh" if config.cell == "rnn_tanh" else "Relu")
        new_h.append(x)
    _stack_layers(b, new_h, axis0, "h_out")
    if new_c:
        _stack_layers(b, new_c, axis0, "c_out")
    logits = b.op("Unsqueeze", _linear(b, x, p["head.weight"], p["head.bias"], "head"), axis1)
    b.rename_output(logits, "logits")
    state = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [config.layers, "batch", config.hidden])
             for name in config.state_names]
    state_out = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT,
                                               [config.layers, "batch", config.hidden])
                 for name in config.state_names]
    graph = helper.make_graph(
        b.nodes, "rnnlab_decode_step",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", 1]), *state],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, config.vocab_size]),
         *state_out],
        b.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   ir_version=IR_VERSION)
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))
