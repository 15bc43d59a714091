"""The torch-free translator on the committed bundle: refusals, and no torch import on the serving side.

Its comparisons with the torch decoder are tests/seq2seq/test_translator_vs_torch.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving.bundle import BundleError
from serving.translator import Seq2SeqRuntime
from tests.committed_bundles import TRANSLATOR, committed

ROOT = Path(__file__).resolve().parents[2]


def test_corrupt_or_foreign_bundles_are_refused(tmp_path, tiny_bundle):
    copy = tmp_path / "copy"
    shutil.copytree(committed(TRANSLATOR), copy)
    data = bytearray((copy / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"encoder\.onnx: sha256 differs"):
        Seq2SeqRuntime.load(copy)
    with pytest.raises(BundleError, match="not a translator"):
        Seq2SeqRuntime.load(tiny_bundle())


def test_serving_side_never_imports_torch():
    code = ("import sys, json\n"
            "from serving.translator import Seq2SeqRuntime\n"
            "import serving.translation_service, serving.batch_job\n"
            f"r = Seq2SeqRuntime.load({str(committed(TRANSLATOR))!r})\n"
            "print(json.dumps([r.translate(['Hello.'])[0].text, 'torch' in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    text, imported_torch = json.loads(out.stdout)
    assert text and imported_torch is False


def test_a_joint_sentencepiece_model_is_stored_once():
    runtime = Seq2SeqRuntime.load(committed(TRANSLATOR))
    assert runtime.manifest.tokenizer == {"source": "tokenizer.json", "target": "tokenizer.json"}
    assert runtime.src_tokenizer.encode("Where is the station?") == runtime.tgt_tokenizer.encode(
        "Where is the station?")
