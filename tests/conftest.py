"""Shared test setup: one thread per test worker (pytest -n 2 on two cores), the data mirror, tiny bundles.

tests/serving and tests/e2e import no torch: they run on the committed bundles in tests/bundles, also in
the serve-only environment (``make test-serve``). Comparisons with torch live in tests/lm, tests/seq2seq.
"""

import os
import shutil
from pathlib import Path

import pytest

from tests.committed_bundles import committed, lm_bundle_key

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
    copy (safe to modify) of a trained tiny char-LM bundle under this test's tmp_path.

    The committed bundles (tests/bundles, see tests/committed_bundles.py) serve the argument sets they
    were made with, without torch; other arguments build a bundle once per session (needs torch).
    """

    def make(cell: str = "gru", name: str = "tiny", **kwargs) -> Path:
        key = (cell, tuple(sorted(kwargs.items())))
        if key not in _tiny_bundle_cache:
            known = lm_bundle_key(cell, **kwargs)
            if known is not None:
                _tiny_bundle_cache[key] = committed(known)
            else:
                from tests.tiny_bundles import make_tiny_bundle

                _tiny_bundle_cache[key] = make_tiny_bundle(tmp_path_factory.mktemp("bundle"), cell, **kwargs)
        target = tmp_path / name
        shutil.copytree(_tiny_bundle_cache[key], target)
        return target

    return make
