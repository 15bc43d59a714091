"""Shared test setup: one thread per test worker (pytest -n 2 on two cores), the data mirror."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"
if _MIRROR.is_dir():
    os.environ.setdefault("RNNLAB_DATA_MIRROR", str(_MIRROR))

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # a serve-only install runs the torch-free tests
    pass


@pytest.fixture(scope="session")
def _tiny_bundle_cache(tmp_path_factory):
    return {}


@pytest.fixture
def tiny_bundle(_tiny_bundle_cache, tmp_path_factory, tmp_path):
    """Factory: ``tiny_bundle(cell="gru", layers=1, hidden=32, quantize=None, name="tiny")`` -> a fresh
    copy (safe to modify) of a trained tiny char-LM bundle under this test's tmp_path. Needs torch.

    Built once per argument set and session by tests/tiny_bundles.make_tiny_bundle.
    """
    from tests.tiny_bundles import make_tiny_bundle

    def make(cell: str = "gru", name: str = "tiny", **kwargs) -> Path:
        key = (cell, tuple(sorted(kwargs.items())))
        if key not in _tiny_bundle_cache:
            _tiny_bundle_cache[key] = make_tiny_bundle(tmp_path_factory.mktemp("bundle"), cell, **kwargs)
        target = tmp_path / name
        shutil.copytree(_tiny_bundle_cache[key], target)
        return target

    return make
