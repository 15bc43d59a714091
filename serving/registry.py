"""The server's one bundle loader: every bundle of a models directory, by kind, with its digest.

``LOADERS`` maps a manifest ``kind`` to the function that loads a runtime of that kind; a new model
family registers its loader here and a service in ``serving.server.SERVICES`` (nothing else changes).
A bundle that cannot be loaded is logged with its reason and skipped, so the good ones serve; two
bundles of one kind with the same served name keep the first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.bundle import BundleError, bundle_digest, discover_bundles, is_bundle, load_manifest
from serving.forecast_runtime import ForecastRuntime
from serving.runtime import LMRuntime
from serving.translator import Seq2SeqRuntime

log = logging.getLogger("rnnlab.serve")

Loader = Callable[[Path, int], object]  # (bundle dir, onnxruntime threads) -> runtime with .manifest
LOADERS: dict[str, Loader] = {
    "lm": lambda path, threads: LMRuntime.load(path, threads=threads),
    "seq2seq": lambda path, threads: Seq2SeqRuntime.load(path, threads=threads),
    "forecast": lambda path, threads: ForecastRuntime.load(path, threads=threads),
}


@dataclass
class LoadedBundle:
    """One servable bundle: ``name`` is its manifest name (the name clients ask for)."""

    name: str
    kind: str
    path: Path
    digest: str  # sha256 of the manifest, which lists the sha256 of every file (ModelInfo.bundle_digest)
    runtime: object


def load_bundles(models_dir: str | Path, threads: int = 1) -> dict[str, dict[str, LoadedBundle]]:
    """Every good bundle under ``models_dir`` (or the bundle ``models_dir`` itself).

    -> {kind: {served name: bundle}}, with an entry (maybe empty) for every kind in ``LOADERS``.
    """
    models_dir = Path(models_dir)
    found = [(models_dir.name, models_dir)] if is_bundle(models_dir) else discover_bundles(models_dir)
    loaded: dict[str, dict[str, LoadedBundle]] = {kind: {} for kind in LOADERS}
    for dirname, entry in found:
        if isinstance(entry, BundleError):
            log.warning("refusing bundle %s: %s", dirname, entry)
            continue
        bundle = _load_one(dirname, entry, threads)
        if bundle is None:
            continue
        if bundle.name in loaded[bundle.kind]:
            log.warning("refusing bundle %s: model name %r is already served", dirname, bundle.name)
            continue
        loaded[bundle.kind][bundle.name] = bundle
        log.info("serving %s model %r from %s", bundle.kind, bundle.name, entry)
    return loaded


def _load_one(dirname: str, path: Path, threads: int) -> LoadedBundle | None:
    try:
        kind = load_manifest(path, verify=False).kind
        loader = LOADERS.get(kind)
        if loader is None:
            raise BundleError(f"{path}: no server loader for bundle kind {kind!r}")
        runtime = loader(path, threads)
    except (BundleError, ValueError, KeyError, OSError) as exc:
        log.warning("refusing bundle %s: %s", dirname, exc)
        return None
    return LoadedBundle(runtime.manifest.name, kind, path, bundle_digest(path), runtime)
