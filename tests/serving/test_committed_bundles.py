"""The committed bundles (tests/bundles) are whole: every checksum verifies and each loads in its runtime.

That they are what scripts/make_test_bundles.py makes is tests/test_committed_bundles.py (needs torch).
"""

import pytest

from serving.bundle import bundle_digest, discover_bundles, load_manifest
from serving.forecast_runtime import ForecastRuntime
from serving.runtime import LMRuntime
from serving.sampling import SamplingParams
from serving.translator import Seq2SeqRuntime
from tests.committed_bundles import BUNDLES_DIR, FORECASTER, LM_BUNDLES, TRANSLATOR, committed


def test_every_committed_bundle_verifies():
    found = dict(discover_bundles(BUNDLES_DIR))
    assert sorted(found) == sorted([*LM_BUNDLES, TRANSLATOR, FORECASTER])
    assert all(path == committed(name) for name, path in found.items()), found


@pytest.mark.parametrize("name", sorted(LM_BUNDLES))
def test_committed_language_models_load_and_generate(name):
    runtime = LMRuntime.load(committed(name))
    assert runtime.manifest.digest == bundle_digest(committed(name))
    assert runtime.manifest.architecture["cell"] == LM_BUNDLES[name]["cell"]
    # Seeded: a sampled <unk> decodes to five characters, so count ids, not characters.
    ids = list(runtime.generate_ids(runtime.encode("The Time"), 40, SamplingParams(seed=7)))
    assert len(ids) == 40 and all(0 <= i < runtime.vocab_size for i in ids)


def test_committed_translator_loads_and_translates():
    manifest = load_manifest(committed(TRANSLATOR))
    assert manifest.kind == "seq2seq" and manifest.data["search_check"]["beam_identical"] == 24
    [result] = Seq2SeqRuntime.load(committed(TRANSLATOR)).translate(["Where is the station?"])
    assert result.error is None and result.text


def test_committed_forecaster_loads_and_forecasts():
    runtime = ForecastRuntime.load(committed(FORECASTER))
    assert runtime.manifest.kind == "forecast" and runtime.manifest.data["parity"]["max_abs_mean"] < 1e-5
    forecast = runtime.forecast_history(None, 5)
    assert forecast.mean.shape == (1, 5, 1) and (forecast.lower < forecast.upper).all()
