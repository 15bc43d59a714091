"""Model bundles on disk: the manifest, its checks, and the atomic publication of a new bundle.

A bundle is a directory holding ``manifest.json`` beside the ONNX graph(s) and tokenizer file(s) it
names. Torch-free: the exporters write bundles through ``write_manifest``/``publish_bundle`` and the
server reads them through ``load_manifest``/``discover_bundles``.

manifest.json (format_version 1)::

    {"format": "rnnlab-bundle", "format_version": 1, "kind": "lm" | "seq2seq" | "forecast", "name": str,
     "architecture": {...}, "graphs": {role: relpath},          # lm: {"step": "model.onnx"}
     "inputs": [tensor], "outputs": [tensor], "state": [tensor],  # tensor: {"name", "shape", "dtype"}
     "special_ids": {token: id}, "tokenizer": relpath | {role: relpath},  # null for "forecast"
     "files": {relpath: sha256}, "file_sizes": {relpath: bytes},
     "evaluation": {...} | null, "training_config": {...} | null, "created_by": {...}}

Shapes list concrete ints except the symbolic axes ("batch", "time"). A "forecast" bundle has no tokenizer;
its ``forecast`` object (columns, scaler, window, horizon, interval) is read by serving.forecast_runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from serving.errors import UserError
from serving.files import sha256_file

BUNDLE_FORMAT = "rnnlab-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("lm", "seq2seq", "forecast")
TOKENIZER_FREE_KINDS = ("forecast",)  # numeric series: no tokenizer
DTYPES = ("float32", "int64", "int32", "bool")


class BundleError(UserError):
    """A bundle that cannot be served; the message names the bundle file or tensor at fault."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output/state tensor. shape: ints and symbolic axis names such as "batch"."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    output: str | None = None  # for a state tensor: the graph output carrying its next value

    @classmethod
    def from_dict(cls, data: object, where: str) -> TensorSpec:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise BundleError(f"{where}: tensor entry needs a name, got {data!r}")
        name = data["name"]
        shape = data.get("shape")
        valid = isinstance(shape, list) and all(
            (isinstance(d, int) and not isinstance(d, bool) and d > 0) or isinstance(d, str) for d in shape
        )
        if not valid:
            raise BundleError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        dtype = data.get("dtype")
        if dtype not in DTYPES:
            raise BundleError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
        output = data.get("output")
        if output is not None and not isinstance(output, str):
            raise BundleError(f"{where}: tensor {name!r} has an invalid output name {output!r}")
        return cls(name, tuple(shape), dtype, output)

    def to_dict(self) -> dict:
        data: dict = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.output is not None:
            data["output"] = self.output
        return data

    def concrete_shape(self, **axes: int) -> tuple[int, ...]:
        """The shape with symbolic axes filled in, e.g. ``concrete_shape(batch=4)``."""
        return tuple(axes[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class Manifest:
    """A verified manifest. ``data`` keeps the whole JSON document for fields read by one kind only."""

    path: Path
    kind: str
    name: str
    format_version: int
    architecture: dict
    graphs: dict[str, str]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: tuple[TensorSpec, ...]
    special_ids: dict[str, int]
    tokenizer: str | dict[str, str] | None
    files: dict[str, str]
    evaluation: dict | None = None
    training_config: dict | None = None
    created_by: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict, repr=False)
    digest: str = ""  # sha256 of the manifest's bytes: names this exact bundle (see bundle_digest)

    def file(self, relpath: str) -> Path:
        return self.path / relpath

    def graph(self, role: str) -> Path:
        if role not in self.graphs:
            raise BundleError(f"{self.path / MANIFEST}: no graph {role!r} (has {', '.join(self.graphs)})")
        return self.path / self.graphs[role]

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.state)

    @property
    def where(self) -> Path:
        """The manifest file, for error messages about its content."""
        return self.path / MANIFEST

    def evaluation_numbers(self) -> dict[str, float]:
        """Numeric leaves of ``evaluation``, nested keys joined with dots: ``{"test.perplexity": 4.4}``."""
        return numeric_leaves(self.evaluation or {})


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle directory (has a manifest); says nothing about its validity."""
    return (Path(path) / MANIFEST).is_file()


def bundle_digest(bundle_dir: str | Path) -> str:
    """sha256 of the manifest file, which lists the sha256 of every other file: one bundle, one digest.

    Servers report it (ModelInfo.bundle_digest), state tokens and batch-job sidecars carry it, so a
    re-exported bundle is told apart from the one a token or a half-done job was made with.
    """
    return sha256_file(Path(bundle_dir) / MANIFEST)


def numeric_leaves(data: object, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON value, nested keys joined with dots; booleans and strings are left out."""
    if isinstance(data, dict):
        return {
            name: number
            for key, value in data.items()
            for name, number in numeric_leaves(value, f"{prefix}{key}.").items()
        }
    if isinstance(data, bool) or not isinstance(data, int | float):
        return {}
    return {prefix.rstrip("."): float(data)}


def _safe_relpath(relpath: object, where: str) -> str:
    """Bundle paths are plain relative POSIX paths that stay inside the bundle directory."""
    if not isinstance(relpath, str) or not relpath:
        raise BundleError(f"{where}: invalid file name {relpath!r}")
    parts = PurePosixPath(relpath).parts
    if PurePosixPath(relpath).is_absolute() or ".." in parts or "\\" in relpath:
        raise BundleError(f"{where}: file name {relpath!r} leaves the bundle directory")
    return relpath


def _read_json(path: Path) -> tuple[dict, str]:
    """-> (the JSON object, sha256 of the bytes it was parsed from)."""
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing (not a bundle directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable or not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a JSON object")
    return data, hashlib.sha256(raw).hexdigest()


def _tensors(data: dict, key: str, where: str) -> tuple[TensorSpec, ...]:
    entries = data.get(key, [])
    if not isinstance(entries, list):
        raise BundleError(f"{where}: {key!r} must be a list of tensors")
    return tuple(TensorSpec.from_dict(e, f"{where} {key}") for e in entries)


def verify_files(bundle_dir: Path, files: dict[str, str], sizes: dict[str, int]) -> None:
    """Every listed file exists, has the recorded size and sha256."""
    for relpath, expected in files.items():
        path = bundle_dir / relpath
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if relpath in sizes and size != sizes[relpath]:
            raise BundleError(
                f"{path}: {size} bytes, {MANIFEST} says {sizes[relpath]} (truncated or changed)"
            )
        if sha256_file(path) != expected:
            raise BundleError(f"{path}: sha256 differs from {MANIFEST} (file changed or corrupt)")


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    """Reads and checks manifest.json: format, version, kind, graphs, tensors and (verify) every checksum."""
    bundle_dir = Path(bundle_dir)
    where = str(bundle_dir / MANIFEST)
    data, digest = _read_json(bundle_dir / MANIFEST)
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where}: not an rnnlab bundle (format {data.get('format')!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{where}: unsupported format_version {version!r} (this rnnlab reads {FORMAT_VERSION})"
        )
    kind = data.get("kind")
    if kind not in KINDS:
        raise BundleError(f"{where}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    files = data.get("files")
    if (
        not isinstance(files, dict)
        or not files
        or not all(isinstance(v, str) and len(v) == 64 for v in files.values())
    ):
        raise BundleError(f"{where}: 'files' must map every bundle file to its sha256")
    files = {_safe_relpath(k, where): v for k, v in files.items()}
    sizes = data.get("file_sizes") or {}
    if not isinstance(sizes, dict):
        raise BundleError(f"{where}: 'file_sizes' must map files to byte counts")
    graphs = data.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        raise BundleError(f"{where}: 'graphs' must map roles to .onnx files")
    tokenizer = data.get("tokenizer")
    if tokenizer is None and kind not in TOKENIZER_FREE_KINDS:
        raise BundleError(f"{where}: a {kind!r} bundle needs a 'tokenizer'")
    tokenizers = list(tokenizer.values()) if isinstance(tokenizer, dict) else [tokenizer]
    named = [*graphs.values(), *(t for t in tokenizers if t is not None)]
    for relpath in named:
        if _safe_relpath(relpath, where) not in files:
            raise BundleError(f"{where}: {relpath!r} is used but has no checksum in 'files'")
    special_ids = data.get("special_ids") or {}
    if not isinstance(special_ids, dict) or not all(isinstance(v, int) for v in special_ids.values()):
        raise BundleError(f"{where}: 'special_ids' must map tokens to ints")
    architecture = data.get("architecture")
    if not isinstance(architecture, dict):
        raise BundleError(f"{where}: 'architecture' must be an object")
    if verify:
        verify_files(bundle_dir, files, sizes)
    return Manifest(
        path=bundle_dir,
        kind=kind,
        name=str(data.get("name") or bundle_dir.name),
        format_version=version,
        architecture=architecture,
        graphs=dict(graphs),
        inputs=_tensors(data, "inputs", where),
        outputs=_tensors(data, "outputs", where),
        state=_tensors(data, "state", where),
        special_ids=special_ids,
        tokenizer=tokenizer,
        files=files,
        evaluation=data.get("evaluation"),
        training_config=data.get("training_config"),
        created_by=data.get("created_by") or {},
        data=data,
        digest=digest,
    )


def discover_bundles(models_dir: str | Path) -> list[tuple[str, Path | BundleError]]:
    """Each subdirectory of ``models_dir`` (hidden ones skipped) as (name, path) or (name, the error).

    A broken bundle is reported, not raised, so that the server keeps serving the good ones.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise BundleError(f"{models_dir}: not a directory")
    found: list[tuple[str, Path | BundleError]] = []
    for path in sorted(models_dir.iterdir()):
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            load_manifest(path)
            found.append((path.name, path))
        except BundleError as exc:
            found.append((path.name, exc))
    return found


def write_manifest(bundle_dir: str | Path, manifest: dict) -> Path:
    """Adds format, version, the sha256 and size of every file present, and writes manifest.json."""
    bundle_dir = Path(bundle_dir)
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    rel = [p.relative_to(bundle_dir).as_posix() for p in files]
    document = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "files": {r: sha256_file(p) for r, p in zip(rel, files, strict=True)},
        "file_sizes": {r: p.stat().st_size for r, p in zip(rel, files, strict=True)},
    }
    path = bundle_dir / MANIFEST
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def staging_dir(out_dir: str | Path) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` that is removed unless the caller published it.

    Writers fill it, then call ``publish_bundle``; on any exception nothing is left at ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_bundle(staged: Path, out_dir: str | Path) -> Path:
    """Moves a complete staged bundle to ``out_dir`` by rename.

    An existing bundle (or empty directory) at ``out_dir`` is replaced; anything else there is refused.
    """
    out_dir = Path(out_dir)
    old: Path | None = None
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file()):
            raise BundleError(f"{out_dir}: exists and is not a bundle; refusing to overwrite it")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "bundle")
    umask = os.umask(0)
    os.umask(umask)
    staged.chmod(0o777 & ~umask)  # mkdtemp made it private; a published bundle has ordinary permissions
    _fsync_tree(staged)
    os.replace(staged, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
