"""The committed bundles are what scripts/make_test_bundles.py makes from this code (needs torch).

Fails when the exporter, the tiny models or their training change what a bundle holds; the message says
what differs and how to regenerate.
"""

import json
import shutil

from tests.committed_bundles import BUNDLES_DIR, compare_bundle_dirs, make_test_bundles


def test_the_committed_bundles_are_what_the_script_makes(tmp_path):
    made = tmp_path / "made"
    make_test_bundles(made)
    problems = compare_bundle_dirs(BUNDLES_DIR, made)
    assert not problems, "\n".join([*problems, "regenerate: python scripts/make_test_bundles.py"])
    # and the comparison sees a change: a copy with one field and one weight file changed
    copy = tmp_path / "copy"
    shutil.copytree(BUNDLES_DIR, copy)
    manifest = copy / "tiny" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": "other"}))
    (copy / "tiny-lstm" / "tokenizer.json").write_text("{}")
    assert compare_bundle_dirs(copy, made) == [f"{manifest}: 'name' differs from the script's",
                                               f"{copy / 'tiny-lstm' / 'tokenizer.json'}: content differs "
                                               "from the script's"]
