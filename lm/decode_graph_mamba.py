"""A hand-built ONNX graph for one decode step (T = 1) of a mamba language model (lm/ssm.py), any depth.

At batch 1 the step is bound by the number of graph nodes, not by arithmetic: onnxruntime's profile of the
step traced from ``MambaBlock.step`` (0.7 M parameters, 2 layers, 94 nodes after its optimiser) spent half
of its kernel time in Reshape, Split, Concat, Slice, Squeeze and Unsqueeze. This graph computes the same
step with fewer of them:

- layer 0's input side depends on the token only: (proj_in) embedding, RMSNorm and the input projection
  are one precomputed (V, d + 2E + conv width) table, read with one Gather and one Split;
- Δ, A and D are expanded from one per head to one per channel (each head's value repeated over its P
  channels; the projection's Δ rows likewise), so the SSM runs on (B, E, N) without per-head reshapes
  and dt_bias rides in the projection's bias;
- the layers' states are split once per state tensor and keep their leading layer axis, so nothing is
  squeezed or unsqueezed per layer, and the SSM state is viewed as (L, B, E, N) once on the way in and
  once on the way out (the same memory as the bundle's (L, B, H, P, N)).

Signature (the traced one's): tokens (B, 1) int64, conv (L, B, k − 1, E + 2N), ssm (L, B, H, P, N)
-> logits (B, 1, V), conv_out, ssm_out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lm.decode_graph import IR_VERSION, OPSET, _Builder
from lm.model import RNNLM
from lm.ssm import MambaBlock


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * weight


class _Graph(_Builder):
    """The builder with the few constants every layer shares and the ops this graph repeats."""

    def __init__(self) -> None:
        super().__init__()
        self._consts: dict[tuple, str] = {}

    def ints(self, *values: int) -> str:
        key = ("i", values)
        if key not in self._consts:
            self._consts[key] = self.const(f"ints_{len(self._consts)}", np.array(values, np.int64))
        return self._consts[key]

    def weight(self, name: str, value: np.ndarray) -> str:
        return self.const(name, value.astype(np.float32))

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        """x / sqrt(mean(x², last axis) + eps) · weight, spelt as onnxruntime's SimplifiedLayerNormalization
        fusion expects it (one fused node)."""
        mean = self.op(
            "ReduceMean", self.op("Pow", x, self.weight(f"{name}.two", np.array(2.0))), self.ints(-1)
        )
        root = self.op("Sqrt", self.op("Add", mean, self.weight(f"{name}.eps", np.array(eps))))
        return self.op("Mul", self.op("Div", x, root), self.weight(f"{name}.weight", weight))

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))


def _layer_weights(block: MambaBlock) -> dict[str, np.ndarray]:
    """The block's parameters in float64, A and D repeated per channel."""
    p = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in block.state_dict().items()}
    e, conv, per = block.inner, block.conv_dim, block.head_dim
    w = p["in_proj.weight"]
    return {
        "norm": p["norm.weight"],
        "in": w,  # (E + conv + H, d)
        "in_bias": np.concatenate([np.zeros(e + conv), p["dt_bias"]]),
        "expand": np.repeat(np.eye(block.heads), per, axis=1),  # (H, E): a head's value to its channels
        "conv_w": p["conv_weight"],
        "conv_b": p["conv_bias"],
        "a": np.repeat(-np.exp(p["a_log"]), per),
        "d": np.repeat(p["skip"], per),
        "out_norm": p["out_norm.weight"],
        "out": p["out_proj.weight"],
    }


def _input_table(model: RNNLM, w: dict[str, np.ndarray], eps: float) -> np.ndarray:
    """(V, d + 2E + conv): each token's residual stream entering layer 0, then layer 0's projection."""
    p = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    x = p["embedding.weight"]
    if model.proj_in is not None:
        x = x @ p["proj_in.weight"].T + p["proj_in.bias"]
    return np.concatenate([x, _rms(x, w["norm"], eps) @ w["in"].T + w["in_bias"]], axis=1)


def _layer(
    g: _Graph, k: int, block: MambaBlock, w: dict, inputs: tuple[str, str, str], state: tuple[str, str]
) -> tuple[str, str, str]:
    """One block's step. inputs: z (.., E), x̃BC (.., conv), Δ before softplus (.., E), each (B, ·) or
    (1, B, ·); state: conv (1, B, k − 1, conv), ssm (1, B, E, N) -> (block output, conv', ssm')."""
    z, xbc, delta = inputs
    conv_state, ssm = state
    e, n, conv = block.inner, block.n, block.conv_dim
    window = g.op(
        "Concat", conv_state, g.op("Reshape", xbc, g.ints(1, -1, 1, conv)), axis=2
    )  # (1, B, k, conv)
    conv_out = g.op("Slice", window, g.ints(1), g.ints(block.kernel), g.ints(2))
    mixed = g.op(
        "ReduceSum", g.op("Mul", window, g.weight(f"l{k}.conv_w", w["conv_w"])), g.ints(2), keepdims=0
    )
    act = g.silu(g.op("Add", mixed, g.weight(f"l{k}.conv_b", w["conv_b"])))
    x, b, c = g.op("Split", act, g.ints(e, n, n), axis=-1, outputs=3)  # (1, B, E), (1, B, N) twice
    # Softplus per head, then to the channels with a (H, E) 0/1 MatMul: onnxruntime's Softplus took
    # ~23 ns an element (profiled), 10 µs a layer on 448 channels at batch 1.
    dt = g.op("MatMul", g.op("Softplus", delta), g.weight(f"l{k}.expand", w["expand"]))
    decay = g.op("Exp", g.op("Mul", dt, g.weight(f"l{k}.a", w["a"])))
    drive = g.op("Mul", g.op("Unsqueeze", g.op("Mul", x, dt), g.ints(-1)), g.op("Unsqueeze", b, g.ints(-2)))
    ssm = g.op("Add", g.op("Mul", g.op("Unsqueeze", decay, g.ints(-1)), ssm), drive)  # (1, B, E, N)
    y = g.op("ReduceSum", g.op("Mul", ssm, g.op("Unsqueeze", c, g.ints(-2))), g.ints(-1), keepdims=0)
    y = g.op("Add", y, g.op("Mul", x, g.weight(f"l{k}.d", w["d"])))
    gated = g.rms_norm(g.op("Mul", y, g.silu(z)), w["out_norm"], block.out_norm.eps, f"l{k}.out_norm")
    return g.op("MatMul", gated, g.weight(f"l{k}.out_t", w["out"].T)), conv_out, ssm


def build_mamba_decode_graph(model: RNNLM, path: Path) -> None:
    """Writes the T = 1 step graph of a mamba ``model`` to ``path``."""
    config, blocks = model.config, list(model.blocks)
    layers, first = config.layers, blocks[0]
    e, n, conv = first.inner, first.n, first.conv_dim
    weights = [_layer_weights(block) for block in blocks]
    g = _Graph()
    conv_states = (
        g.op("Split", "conv", axis=0, outputs=layers, num_outputs=layers) if layers > 1 else ["conv"]
    )
    ssm_all = g.op("Reshape", "ssm", g.ints(layers, -1, e, n))
    ssm_states = (
        g.op("Split", ssm_all, axis=0, outputs=layers, num_outputs=layers) if layers > 1 else [ssm_all]
    )
    table = g.weight("input_table", _input_table(model, weights[0], first.norm.eps))
    row = g.op("Gather", table, g.op("Reshape", "tokens", g.ints(-1)))
    x, *inputs = g.op("Split", row, g.ints(config.hidden, e, conv, first.heads), axis=1, outputs=4)
    conv_out, ssm_out = [], []
    for k, (block, w) in enumerate(zip(blocks, weights, strict=True)):
        if k > 0:
            u = g.rms_norm(x, w["norm"], block.norm.eps, f"l{k}.norm")
            projected = g.op(
                "Add",
                g.op("MatMul", u, g.weight(f"l{k}.in_t", w["in"].T)),
                g.weight(f"l{k}.in_b", w["in_bias"]),
            )
            inputs = g.op("Split", projected, g.ints(e, conv, block.heads), axis=-1, outputs=3)
        out, conv_k, ssm_k = _layer(g, k, block, w, tuple(inputs), (conv_states[k], ssm_states[k]))
        x = g.op("Add", x, out)
        conv_out.append(conv_k)
        ssm_out.append(ssm_k)
    p = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    x = g.rms_norm(x, p["norm.weight"], model.norm.eps, "final_norm")
    logits = g.op(
        "Add",
        g.op("MatMul", x, g.weight("head.weight_t", p["head.weight"].T)),
        g.weight("head.bias", p["head.bias"]),
    )
    g.rename_output(g.op("Reshape", logits, g.ints(-1, 1, config.vocab_size)), "logits")
    g.rename_output(
        g.op("Concat", *conv_out, axis=0) if layers > 1 else g.op("Identity", conv_out[0]), "conv_out"
    )
    ssm_shape = g.ints(layers, -1, first.heads, first.head_dim, n)
    g.rename_output(
        g.op("Reshape", g.op("Concat", *ssm_out, axis=0) if layers > 1 else ssm_out[0], ssm_shape), "ssm_out"
    )
    _save(g, model, path)


def _save(g: _Graph, model: RNNLM, path: Path) -> None:
    config = model.config
    specs = [
        (name, [config.layers, "batch", *shape[1:]])
        for name, shape in zip(config.state_names, model.state_shapes(), strict=True)
    ]
    float_info = helper.make_tensor_value_info
    graph = helper.make_graph(
        g.nodes,
        "rnnlab_mamba_decode_step",
        [float_info("tokens", TensorProto.INT64, ["batch", 1])]
        + [float_info(name, TensorProto.FLOAT, shape) for name, shape in specs],
        [float_info("logits", TensorProto.FLOAT, ["batch", 1, config.vocab_size])]
        + [float_info(f"{name}_out", TensorProto.FLOAT, shape) for name, shape in specs],
        g.initializers,
    )
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx.shape_inference.infer_shapes(onnx_model, strict_mode=True), str(path))
