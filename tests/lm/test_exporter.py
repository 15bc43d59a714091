"""The exporter skeleton on its own, as a new model family would use it: a step graph with float inputs and
a recurrent state in and out (a forecaster's shape), checked, published, verified; and refused when wrong."""

import json

import pytest
import torch
from torch import Tensor, nn

from lm.exporter import (
    BundleWriter,
    ExportError,
    Signature,
    created_by,
    export_graph,
    require_parity,
    step_parity,
)
from serving.bundle import MANIFEST, TensorSpec, verify_files

LAYERS, FEATURES, HIDDEN = 2, 3, 8


class Forecaster(nn.Module):
    """values (B, T, F), h (L, B, H) -> mean (B, T, F), h_out (L, B, H)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(FEATURES, HIDDEN, LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, FEATURES)

    def forward(self, values: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        out, h_out = self.rnn(values, h)
        return self.head(out), h_out


SIGNATURE = Signature(inputs=(TensorSpec("values", ("batch", "time", FEATURES), "float32"),),
                      outputs=(TensorSpec("mean", ("batch", "time", FEATURES), "float32"),),
                      state=(TensorSpec("h", (LAYERS, "batch", HIDDEN), "float32", output="h_out"),))


def cases(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((1, 1), (4, 9))
    return [(f"B={b} T={t}", {"values": torch.randn(b, t, FEATURES, generator=gen),
                              "h": torch.randn(LAYERS, b, HIDDEN, generator=gen)}) for b, t in shapes]


def export(model, out_dir):
    with BundleWriter(out_dir) as bundle:
        example = (torch.zeros(2, 3, FEATURES), torch.zeros(LAYERS, 2, HIDDEN))
        export_graph(model, example, bundle.path("model.onnx"), SIGNATURE.input_specs, SIGNATURE.output_specs)
        parity = require_parity(step_parity(model, bundle.path("model.onnx"), SIGNATURE, cases()), "the step")
        return bundle.publish({"kind": "forecast", "name": out_dir.name, "graphs": {"step": "model.onnx"},
                               **SIGNATURE.manifest_fields(), "parity": parity,
                               "created_by": created_by("test")})


def test_a_new_family_exports_a_checked_step_graph_with_state(tmp_path):
    torch.manual_seed(0)
    bundle = export(Forecaster().eval(), tmp_path / "forecaster")
    data = json.loads((bundle / MANIFEST).read_text())
    verify_files(bundle, data["files"], data["file_sizes"])
    assert data["parity"]["max_abs_mean"] <= 1e-4 and data["parity"]["max_abs_state"] <= 1e-4
    assert data["parity"]["cases"] == 2 and data["state"] == [
        {"name": "h", "output": "h_out", "shape": [LAYERS, "batch", HIDDEN], "dtype": "float32"}]
    assert [t["name"] for t in data["inputs"]] == ["values", "h"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecaster"]


def test_a_graph_that_disagrees_with_torch_is_refused_and_nothing_is_left(tmp_path):
    class Drifting(Forecaster):
        def forward(self, values: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
            mean, h_out = super().forward(values, h)
            # traced with T = 3, the exported graph keeps the +1 whatever T is; torch adds it only at T = 3
            return (mean + 1 if values.shape[1] == 3 else mean), h_out

    message = (r"on the step: max abs difference [0-9.e+-]+ on mean, .* on the state "
               r"\(worst: B=\d T=\d; tolerance 0.0001\); bundle not written")
    with pytest.raises(ExportError, match=message):
        export(Drifting().eval(), tmp_path / "forecaster")
    assert list(tmp_path.iterdir()) == []
