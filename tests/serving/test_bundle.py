"""Bundle manifests: verification of every file, refusal of damaged bundles, discovery, seq2seq bundles."""

import json
import shutil

import pytest

from serving.bundle import (
    MANIFEST,
    BundleError,
    bundle_digest,
    discover_bundles,
    is_bundle,
    load_manifest,
    numeric_leaves,
    publish_bundle,
    staging_dir,
    write_manifest,
)


def edit_manifest(bundle, **changes):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_fresh_bundle_loads(tiny_bundle):
    manifest = load_manifest(tiny_bundle("lstm", layers=2))
    assert manifest.kind == "lm" and manifest.format_version == 1
    assert manifest.graph("step").name == "model.onnx"
    assert manifest.state_names == ("h", "c")
    assert [s.concrete_shape(batch=5) for s in manifest.state] == [(2, 5, 32), (2, 5, 32)]
    assert [t.name for t in manifest.inputs] == ["tokens", "h", "c"]
    assert [t.name for t in manifest.outputs] == ["logits", "h_out", "c_out"]
    assert manifest.training_config["steps"] == 60


@pytest.mark.parametrize("victim", ["model.onnx", "tokenizer.json"])
def test_changed_file_is_refused_by_name(tiny_bundle, victim):
    bundle = tiny_bundle()
    data = bytearray((bundle / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / victim).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{victim}: sha256 differs"):
        load_manifest(bundle)


def test_truncated_file_is_refused_by_name(tiny_bundle):
    bundle = tiny_bundle()
    data = (bundle / "model.onnx").read_bytes()
    (bundle / "model.onnx").write_bytes(data[:-100])
    with pytest.raises(BundleError, match=r"model.onnx: \d+ bytes, manifest.json says \d+ \(truncated"):
        load_manifest(bundle)


def test_missing_file_is_refused_by_name(tiny_bundle):
    bundle = tiny_bundle()
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing"):
        load_manifest(bundle)


def test_missing_or_garbled_manifest(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_manifest(tmp_path)
    bundle = tiny_bundle()
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: unreadable or not JSON"):
        load_manifest(bundle)


@pytest.mark.parametrize(("changes", "message"), [
    ({"format_version": 2}, "unsupported format_version 2"),
    ({"format": "something-else"}, "not an rnnlab bundle"),
    ({"kind": "vision"}, "unknown kind 'vision'"),
    ({"graphs": {"step": "other.onnx"}}, "'other.onnx' is used but has no checksum"),
    ({"state": [{"name": "h", "shape": [1, "batch", -3], "dtype": "float32"}]},
     "tensor 'h' has an invalid shape"),
    ({"state": [{"name": "h", "shape": [1, "batch", 32], "dtype": "float16"}]}, "unsupported dtype"),
])
def test_bad_manifest_fields_are_refused(tiny_bundle, changes, message):
    bundle = tiny_bundle()
    edit_manifest(bundle, **changes)
    with pytest.raises(BundleError, match=message):
        load_manifest(bundle)


def test_paths_outside_the_bundle_are_refused(tiny_bundle):
    bundle = tiny_bundle()
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"]["../secret"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="leaves the bundle directory"):
        load_manifest(bundle)


def test_discover_reports_good_and_broken_bundles(tiny_bundle, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.move(tiny_bundle("gru", name="good"), models / "good")
    broken = tiny_bundle("gru", name="broken")
    (broken / "model.onnx").write_bytes(b"oops")
    shutil.move(broken, models / "broken")
    (models / "empty").mkdir()
    (models / ".good.tmp-123").mkdir()  # an export in progress is not a bundle yet
    (models / "README.txt").write_text("not a directory")
    found = dict(discover_bundles(models))
    assert sorted(found) == ["broken", "empty", "good"]
    assert found["good"] == models / "good"
    assert isinstance(found["broken"], BundleError) and "model.onnx" in str(found["broken"])
    assert isinstance(found["empty"], BundleError) and "manifest.json: missing" in str(found["empty"])


def test_seq2seq_bundles_are_describable(tmp_path):
    with staging_dir(tmp_path / "mt") as staged:
        (staged / "encoder.onnx").write_bytes(b"encoder graph")
        (staged / "decoder_step.onnx").write_bytes(b"decoder graph")
        (staged / "source.tokenizer.json").write_text("{}")
        (staged / "target.tokenizer.json").write_text("{}")
        write_manifest(staged, {
            "kind": "seq2seq", "name": "fr-en", "architecture": {"hidden": 64, "attention": True},
            "graphs": {"encoder": "encoder.onnx", "decoder_step": "decoder_step.onnx"},
            "inputs": [{"name": "src", "shape": ["batch", "time"], "dtype": "int64"}],
            "state": [{"name": "h", "shape": [1, "batch", 64], "dtype": "float32"}],
            "special_ids": {"<pad>": 0, "<bos>": 2, "<eos>": 3},
            "tokenizer": {"source": "source.tokenizer.json", "target": "target.tokenizer.json"}})
        publish_bundle(staged, tmp_path / "mt")
    manifest = load_manifest(tmp_path / "mt")
    assert manifest.kind == "seq2seq" and manifest.name == "fr-en"
    assert manifest.graph("decoder_step") == tmp_path / "mt" / "decoder_step.onnx"
    assert manifest.tokenizer == {"source": "source.tokenizer.json", "target": "target.tokenizer.json"}
    with pytest.raises(BundleError, match="no graph 'step'"):
        manifest.graph("step")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mt"]


def test_staging_leaves_nothing_behind_on_failure(tmp_path):
    with pytest.raises(RuntimeError), staging_dir(tmp_path / "out") as staged:
        (staged / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_the_digest_names_the_manifest_bytes_and_changes_with_any_file(tiny_bundle, tmp_path):
    bundle = tiny_bundle()
    digest = bundle_digest(bundle)
    assert load_manifest(bundle).digest == digest and len(digest) == 64
    assert is_bundle(bundle) and not is_bundle(tmp_path)
    (bundle / "tokenizer.json").write_text((bundle / "tokenizer.json").read_text() + " ")
    data = json.loads((bundle / MANIFEST).read_text())
    write_manifest(bundle, {k: v for k, v in data.items() if k not in ("files", "file_sizes")})
    assert bundle_digest(bundle) != digest and load_manifest(bundle).digest == bundle_digest(bundle)


def test_numeric_leaves_flatten_nested_numbers_only():
    data = {"test": {"perplexity": 4.5, "tokens": 8949, "split": "test"}, "ok": True, "bleu": 40}
    assert numeric_leaves(data) == {"test.perplexity": 4.5, "test.tokens": 8949.0, "bleu": 40.0}
