"""The small bundles committed in tests/bundles/, and how scripts/make_test_bundles.py makes and checks them.

    tests/bundles/tiny        char GRU LM, 1 layer, hidden 32   (make_tiny_bundle("gru"))
    tests/bundles/tiny-lstm   char LSTM LM, 2 layers, hidden 32 (make_tiny_bundle("lstm", layers=2))
    tests/bundles/tiny-mt     GRU translator with attention, en->fr, joint sentencepiece, 1x32,
                              900 steps
                              (tests/tiny_translators.py with TRANSLATOR_CONFIG)
    tests/bundles/tiny-ts     GRU forecaster, hidden 8, sine-rnn (window 5), horizon 3, 60 steps
                              (tests/tiny_forecasters.py)

Reading them needs no torch (the serving tests, also in the serve-only environment of ``make test-serve``);
making and comparing them does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
LM_BUNDLES: dict[str, dict] = {"tiny": {"cell": "gru"}, "tiny-lstm": {"cell": "lstm", "layers": 2}}
TRANSLATOR = "tiny-mt"
FORECASTER = "tiny-ts"
# One joint sentencepiece model, which the bundle stores once: a model file is ~320 KB, mostly
# sentencepiece's normalisation table. 900 steps, not the suite's 300: after 300 the joint model said "."
# to every test sentence (mean output 1 character on 40 sentences; 13 after 900), too short a search for
# the tests that need the translation workers to overlap. (Dimensions 16 instead of 32 saved 200 KB
# more, but that model translated every test sentence to nothing.)
TRANSLATOR_CONFIG = {"joint_spm": True, "max_steps": 900}
# Manifest fields that hold measurements or tool versions rather than what the bundle is (a forecaster's
# evaluation is its rolling-origin scores, which move with the weights' float rounding).
MEASURED = (
    "files",
    "file_sizes",
    "created_by",
    "parity",
    "decode_parity",
    "quantization",
    "search_check",
    "evaluation",
)
WEIGHT_TOLERANCE = 1e-3


def committed(name: str) -> Path:
    """The committed bundle ``name`` (read-only: copy it before changing anything)."""
    return BUNDLES_DIR / name


def lm_bundle_key(cell: str, **kwargs) -> str | None:
    """The committed LM bundle made with these ``make_tiny_bundle`` arguments, or None."""
    for name, args in LM_BUNDLES.items():
        if {"cell": cell, **kwargs} == args:
            return name
    return None


def make_test_bundles(out: Path) -> None:
    """Makes every committed bundle under ``out`` (replacing bundles there); one thread, seeded."""
    import torch

    from tests.tiny_bundles import make_tiny_bundle
    from tests.tiny_forecasters import make_tiny_forecaster
    from tests.tiny_translators import make_tiny_translator

    torch.set_num_threads(1)  # reductions round differently on other thread counts
    for name, args in LM_BUNDLES.items():
        make_tiny_bundle(out, name=name, **args)
    work = out / f".{TRANSLATOR}-run"
    shutil.rmtree(work, ignore_errors=True)
    try:
        make_tiny_translator(work, out / TRANSLATOR, **TRANSLATOR_CONFIG)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    work = out / f".{FORECASTER}-run"
    shutil.rmtree(work, ignore_errors=True)
    try:
        make_tiny_forecaster(work, out / FORECASTER)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _graph_differences(ours: Path, theirs: Path) -> list[str]:
    """Same nodes, inputs, outputs and initializer shapes; initializers within WEIGHT_TOLERANCE."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    a, b = onnx.load(str(ours)).graph, onnx.load(str(theirs)).graph
    problems = []
    for what, get in (
        ("nodes", lambda g: [n.op_type for n in g.node]),
        ("inputs", lambda g: [i.name for i in g.input]),
        ("outputs", lambda g: [o.name for o in g.output]),
    ):
        if get(a) != get(b):
            problems.append(f"{ours}: {what} differ from the script's")
    weights = {t.name: numpy_helper.to_array(t) for t in b.initializer}
    for tensor in a.initializer:
        mine, other = numpy_helper.to_array(tensor), weights.get(tensor.name)
        if other is None or other.shape != mine.shape or other.dtype != mine.dtype:
            problems.append(f"{ours}: initializer {tensor.name!r} differs in name, shape or type")
        elif mine.size and np.abs(mine.astype(np.float64) - other).max() > WEIGHT_TOLERANCE:
            problems.append(f"{ours}: initializer {tensor.name!r} differs by more than {WEIGHT_TOLERANCE:g}")
    return problems


def compare_bundles(ours: Path, theirs: Path) -> list[str]:
    """What differs between bundle ``ours`` and ``theirs`` beyond measurements and float rounding."""
    from serving.bundle import MANIFEST
    from serving.files import sha256_file

    a, b = (json.loads((d / MANIFEST).read_text(encoding="utf-8")) for d in (ours, theirs))
    problems = [
        f"{ours / MANIFEST}: {key!r} differs from the script's"
        for key in sorted(set(a) | set(b))
        if key not in MEASURED and a.get(key) != b.get(key)
    ]
    if sorted(a["files"]) != sorted(b["files"]):
        return [*problems, f"{ours}: files {sorted(a['files'])}, the script's {sorted(b['files'])}"]
    for relpath in a["files"]:
        if sha256_file(ours / relpath) == sha256_file(theirs / relpath):
            continue
        if relpath.endswith(".onnx"):
            problems += _graph_differences(ours / relpath, theirs / relpath)
        else:
            problems.append(f"{ours / relpath}: content differs from the script's")
    return problems


def compare_bundle_dirs(committed_dir: Path, made_dir: Path) -> list[str]:
    names = sorted(p.name for p in made_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    problems = [f"{committed_dir / n}: missing" for n in names if not (committed_dir / n).is_dir()]
    extra = [p.name for p in committed_dir.iterdir() if p.is_dir() and p.name not in names]
    problems += [f"{committed_dir / n}: not made by the script" for n in extra]
    for name in names:
        if (committed_dir / name).is_dir():
            problems += compare_bundles(committed_dir / name, made_dir / name)
    return problems
